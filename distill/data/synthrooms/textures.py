"""Procedural textures: per-pixel albedo from a material table and surface coordinates.

Every pattern is a closed-form function of the surface's own (u, v) coordinates in metres, so the
texture sticks to the surface, never to the image, and carries no information about the camera
distance. Cell hashes use integer arithmetic (bit-exact on every machine).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .scene import PATTERNS, Material

_TWO_PI = np.float32(2 * np.pi)


class MaterialTable(NamedTuple):
    """Materials as arrays: color, color2 (M, 3); kind (M,) index into PATTERNS; scale, angle,
    emission (M,); jitter (M, 4). All float32 except kind (int64)."""
    color: np.ndarray
    color2: np.ndarray
    kind: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    jitter: np.ndarray
    emission: np.ndarray


def material_table(materials: Sequence[Material]) -> MaterialTable:
    """Stack materials into a `MaterialTable` (row i = materials[i])."""
    f32 = np.float32
    return MaterialTable(
        color=np.array([m.color for m in materials], f32).reshape(-1, 3),
        color2=np.array([m.color2 for m in materials], f32).reshape(-1, 3),
        kind=np.array([PATTERNS.index(m.pattern) for m in materials], np.int64),
        scale=np.array([m.scale for m in materials], f32),
        angle=np.array([m.angle for m in materials], f32),
        jitter=np.array([m.jitter for m in materials], f32).reshape(-1, 4),
        emission=np.array([m.emission for m in materials], f32),
    )


def cell_hash(ix: np.ndarray, iy: np.ndarray, salt: np.ndarray | int = 0) -> np.ndarray:
    """Deterministic pseudo-random float32 in [0, 1) per integer cell (ix, iy, salt)."""
    u32 = np.uint32
    h = (np.asarray(ix).astype(np.int64).astype(u32) * u32(0x8DA6B343)
         ^ np.asarray(iy).astype(np.int64).astype(u32) * u32(0xD8163841)
         ^ np.asarray(salt).astype(np.int64).astype(u32) * u32(0xCB1AB31F))
    h ^= h >> u32(15)
    h *= u32(0x2C1B3C6D)
    h ^= h >> u32(12)
    h *= u32(0x297A2D39)
    h ^= h >> u32(15)
    return (h >> u32(8)).astype(np.float32) / np.float32(1 << 24)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _rotate(u, v, angle):
    ca, sa = np.cos(angle), np.sin(angle)
    return u * ca + v * sa, -u * sa + v * ca


def _smooth_noise(u, v, scale, jit, octaves: int = 4) -> np.ndarray:
    """Band-limited noise in about [-1, 1] from summed oriented sinusoids (n,)."""
    n = np.zeros_like(u)
    for k in range(octaves):
        theta = _TWO_PI * jit[:, k % 4] + np.float32(1.7 * k)
        phase = _TWO_PI * jit[:, (k + 1) % 4] + np.float32(2.3 * k)
        f = scale * np.float32(_TWO_PI * (2.03 ** k))
        n += np.float32(0.55 ** k) * np.sin(f * (u * np.cos(theta) + v * np.sin(theta)) + phase)
    return n * np.float32(0.6)


# Each pattern maps (u, v, scale, angle, jitter, emission) of n pixels to (t, shade): the colour is
# lerp(color, color2, t) * shade.
def _plain(u, v, s, a, j, e):
    return np.zeros_like(u), 1 + 0.08 * _smooth_noise(u, v, s * 0 + 0.7, j, 2)


def _stripes(u, v, s, a, j, e):
    x, _ = _rotate(u, v, a)
    return (_frac(x * s + j[:, 0]) < 0.2 + 0.6 * j[:, 1]).astype(np.float32), np.ones_like(u)


def _checker(u, v, s, a, j, e):
    x, y = _rotate(u, v, a)
    parity = (np.floor(x * s + j[:, 0]) + np.floor(y * s + j[:, 1])) % 2
    return parity.astype(np.float32), np.ones_like(u)


def _wood(u, v, s, a, j, e):
    x, y = _rotate(u, v, a)
    w = y * s + 0.35 * np.sin(x * 2.1 + _TWO_PI * j[:, 0]) + 0.12 * np.sin(x * 7.3 + y * 3.1)
    return _frac(w) ** 2, 1 + 0.06 * np.sin(x * 40.0 + _TWO_PI * j[:, 1])


def _noise(u, v, s, a, j, e):
    return np.clip(0.5 + 0.5 * _smooth_noise(u, v, s, j), 0, 1), np.ones_like(u)


def _tiles(u, v, s, a, j, e):
    x, y = _rotate(u, v, a)
    brick = j[:, 2] > 0.5
    rows = y * s * np.where(brick, 2.0, 1.0).astype(np.float32) + j[:, 0]
    row = np.floor(rows)
    cols = x * s + j[:, 1] + np.where(brick, 0.5 * (row % 2), 0).astype(np.float32)
    col = np.floor(cols)
    fu, fv = cols - col, rows - row
    gap = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv))
    return (gap < 0.03 + 0.03 * j[:, 3]).astype(np.float32), 0.82 + 0.36 * cell_hash(col, row, 7)


def _planks(u, v, s, a, j, e):
    x, y = _rotate(u, v, a)
    rows = y * s + j[:, 0]
    row = np.floor(rows)
    cols = x * s / 5 + cell_hash(row, 0, 11)
    col = np.floor(cols)
    fu, fv = cols - col, rows - row
    seam = (np.minimum(fv, 1 - fv) < 0.03) | (np.minimum(fu, 1 - fu) < 0.006)
    grain = 0.08 * np.sin(y * 90.0 + 3 * np.sin(x * 4 + _TWO_PI * cell_hash(col, row, 3)))
    return seam.astype(np.float32), 0.78 + 0.4 * cell_hash(col, row, 5) + grain


def _sky(u, v, s, a, j, e):
    clouds = np.clip(_smooth_noise(u + 3 * j[:, 0], v, s, j, 3), 0, 1)
    t = np.clip(0.35 + 0.5 * v + 0.3 * j[:, 1], 0, 1) * (1 - clouds)
    return t, 1 + 0.3 * clouds


def _screen(u, v, s, a, j, e):
    on = e > 0
    blocks = cell_hash(np.floor(u * s + 13 * j[:, 0]), np.floor(v * s), 5)
    glare = 1 + 1.5 * np.clip(0.4 - np.abs(u - v - j[:, 1] + 0.5), 0, None)
    return np.where(on, blocks, 0).astype(np.float32), np.where(on, 1.0, glare).astype(np.float32)


_PATTERN_FUNCS = {"plain": _plain, "stripes": _stripes, "checker": _checker, "wood": _wood,
                  "noise": _noise, "tiles": _tiles, "planks": _planks, "sky": _sky,
                  "screen": _screen}
if tuple(_PATTERN_FUNCS) != PATTERNS:  # one function per Material pattern name, same order
    raise RuntimeError(f"textures and scene.PATTERNS disagree: {tuple(_PATTERN_FUNCS)} vs {PATTERNS}")


def albedo(table: MaterialTable, mid: np.ndarray, u: np.ndarray, v: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Albedo (P, 3) float32 in [0, 1] and emission (P,) float32 of P surface points.

    `mid` (P,) indexes `table`; `u`, `v` (P,) are surface coordinates in metres.
    """
    u = u.astype(np.float32, copy=False)
    v = v.astype(np.float32, copy=False)
    out = np.empty((mid.shape[0], 3), np.float32)
    kind = table.kind[mid]
    for k, name in enumerate(PATTERNS):
        sel = np.flatnonzero(kind == k)
        if sel.size == 0:
            continue
        m = mid[sel]
        t, shade = _PATTERN_FUNCS[name](u[sel], v[sel], table.scale[m], table.angle[m],
                                        table.jitter[m], table.emission[m])
        c1, c2 = table.color[m], table.color2[m]
        out[sel] = (c1 + (c2 - c1) * t[:, None]) * shade[:, None]
    # Fine grain (fabric, paint roughness) on every surface: 1 cm cells, +-4 %.
    grain = cell_hash(np.floor(u * 100), np.floor(v * 100), mid)
    out *= (0.96 + 0.08 * grain)[:, None]
    return np.clip(out, 0, 1, out=out), table.emission[mid]
