"""Furniture and objects as groups of labelled boxes in a local frame.

A `Group` frame has its origin on the floor at the centre of the footprint, y up and the front
facing +z. Wall-mounted groups (windows, pictures, doors, wall TVs) put the wall plane at z = 0
and extend towards +z. Builders take a numpy Generator and return a Group; `Group.place` maps it
into the world.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..classes import nyu13_id
from . import materials as mat
from .scene import Box, Light, Material, Vec3

BED, BOOKS, CHAIR, FURNITURE = (nyu13_id(n) for n in ("bed", "books", "chair", "furniture"))
OBJECTS, PICTURE, SOFA, TABLE = (nyu13_id(n) for n in ("objects", "picture", "sofa", "table"))
TV, WALL, WINDOW, FLOOR = (nyu13_id(n) for n in ("tv", "wall", "window", "floor"))


def _rotate_xz(x: float, z: float, yaw: float) -> tuple[float, float]:
    c, s = math.cos(yaw), math.sin(yaw)
    return c * x + s * z, -s * x + c * z


@dataclass
class Group:
    """Boxes and lights in a local frame; `width` x `depth` footprint (x, z, metres) and `height`.

    `supports` are free top surfaces (y, x0, x1, z0, z1) in the local frame where small items
    may stand.
    """
    width: float
    depth: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    lights: list[Light] = field(default_factory=list)
    supports: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def add(self, center: Vec3, size: Vec3, label: int, material: Material,
            yaw: float = 0.0) -> None:
        self.boxes.append(Box(center=tuple(float(c) for c in center),
                              size=tuple(float(s) for s in size), label=label,
                              yaw=float(yaw), material=material))

    def merge(self, other: "Group", x: float, y: float, z: float, yaw: float = 0.0) -> None:
        """Add `other`'s boxes and lights, placed at (x, y, z) with `yaw`, in this frame."""
        boxes, lights = other.place(x, y, z, yaw)
        self.boxes.extend(boxes)
        self.lights.extend(lights)

    def place(self, x: float, y: float, z: float, yaw: float) -> tuple[list[Box], list[Light]]:
        """Boxes and lights in the parent frame for the group origin at (x, y, z), rotated by
        `yaw` about +y."""
        boxes = []
        for b in self.boxes:
            dx, dz = _rotate_xz(b.center[0], b.center[2], yaw)
            boxes.append(Box(center=(x + dx, y + b.center[1], z + dz), size=b.size,
                             label=b.label, yaw=b.yaw + yaw, material=b.material))
        lights = []
        for li in self.lights:
            dx, dz = _rotate_xz(li.position[0], li.position[2], yaw)
            lights.append(Light(position=(x + dx, y + li.position[1], z + dz), color=li.color,
                                intensity=li.intensity, radius=li.radius))
        return boxes, lights


def _legs(g: Group, w: float, d: float, h: float, t: float, inset: float, label: int,
          m: Material, y0: float = 0.0) -> None:
    for sx in (-1, 1):
        for sz in (-1, 1):
            g.add((sx * (w / 2 - inset - t / 2), y0 + h / 2, sz * (d / 2 - inset - t / 2)),
                  (t, h, t), label, m)


def color_temperature(kelvin: float) -> Vec3:
    """Approximate linear RGB of a black body at `kelvin` (1500..12000), normalised to max 1."""
    t = kelvin / 100.0
    r = 1.0 if t <= 66 else 1.2929 * (t - 60) ** -0.1332
    g = 0.3901 * math.log(t) - 0.6318 if t <= 66 else 1.1298 * (t - 60) ** -0.0755
    b = 1.0 if t >= 66 else (0.0 if t <= 19 else 0.5432 * math.log(t - 10) - 1.1962)
    rgb = np.clip([r, g, b], 0.05, 1.0) ** 2.2
    return tuple(float(c) for c in rgb / rgb.max())


def bed(rng: np.random.Generator) -> Group:
    """Frame, mattress, optional blanket and headboard (bed); pillows (objects, as in NYU)."""
    w, length = rng.uniform(0.9, 1.9), rng.uniform(1.95, 2.2)
    frame_h, matt_h = rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.28)
    head_h, head_t = rng.uniform(0.8, 1.3), rng.uniform(0.05, 0.1)
    depth = length + head_t
    g = Group(w + 0.04, depth, head_h)
    frame_m, bedding = mat.wood(rng), mat.fabric(rng)
    zc = head_t / 2
    g.add((0, frame_h / 2, zc), (w, frame_h, length), BED, frame_m)
    g.add((0, frame_h + matt_h / 2, zc), (w - 0.04, matt_h, length - 0.04), BED, mat.fabric(rng))
    top = frame_h + matt_h
    if rng.random() < 0.7:
        cover = length * rng.uniform(0.5, 0.8)
        g.add((0, top - matt_h * 0.3 + 0.02, depth / 2 - cover / 2 + 0.01),
              (w + 0.03, matt_h * 0.6 + 0.04, cover), BED, bedding)
    g.add((0, head_h / 2, -depth / 2 + head_t / 2), (w + 0.04, head_h, head_t), BED,
          frame_m if rng.random() < 0.6 else mat.fabric(rng))
    n = 1 if w < 1.2 else 2
    pillow_m = mat.fabric(rng)
    for i in range(n):
        pw = w / n - 0.12
        g.add(((i - (n - 1) / 2) * (w / n), top + 0.06, -depth / 2 + head_t + 0.25),
              (pw, 0.13, rng.uniform(0.3, 0.4)), OBJECTS, pillow_m)
    return g


def sample_size(rng: np.random.Generator, dims: dict, kind: str, what: str) -> tuple[float, float, float]:
    """(width, depth, height) in metres drawn uniformly from `dims[kind]`'s three (low, high) ranges."""
    if kind not in dims:
        raise ValueError(f"{what} kind {kind!r} is unknown; valid: {', '.join(dims)}.")
    (w0, w1), (d0, d1), (h0, h1) = dims[kind]
    return rng.uniform(w0, w1), rng.uniform(d0, d1), rng.uniform(h0, h1)


def cabinet(rng: np.random.Generator, kind: str = "dresser") -> Group:
    """Dresser, sideboard, TV stand, nightstand or wardrobe (furniture) with drawer/door fronts."""
    dims = {"dresser": ((0.8, 1.6), (0.4, 0.55), (0.7, 1.1)),
            "sideboard": ((1.2, 2.0), (0.4, 0.5), (0.7, 0.9)),
            "tv_stand": ((1.0, 2.0), (0.35, 0.5), (0.4, 0.6)),
            "nightstand": ((0.4, 0.55), (0.35, 0.45), (0.45, 0.65)),
            "wardrobe": ((0.8, 1.8), (0.55, 0.65), (1.8, 2.3))}
    w, d, h = sample_size(rng, dims, kind, "cabinet")
    g = Group(w, d + 0.03, h)
    body = mat.wood(rng)
    leg_h = rng.uniform(0.05, 0.15) if rng.random() < 0.4 else 0.0
    if leg_h:
        _legs(g, w, d, leg_h, 0.04, 0.03, FURNITURE, body)
    g.add((0, leg_h + (h - leg_h) / 2, 0), (w, h - leg_h, d), FURNITURE, body)
    rows = int(rng.integers(1, 4 if kind != "wardrobe" else 2))
    cols = max(1, min(3, int(round(w / rng.uniform(0.4, 0.8)))))
    front = body if rng.random() < 0.6 else mat.any_surface(rng)
    knob = mat.paint(rng)
    ph, pw = (h - leg_h - 0.04) / rows, (w - 0.04) / cols
    for r in range(rows):
        for c in range(cols):
            x, y = -w / 2 + 0.02 + pw * (c + 0.5), leg_h + 0.02 + ph * (r + 0.5)
            g.add((x, y, d / 2 + 0.006), (pw - 0.012, ph - 0.012, 0.012), FURNITURE, front)
            g.add((x, y + ph * 0.3 if kind != "wardrobe" else y, d / 2 + 0.02),
                  (min(0.12, pw * 0.4), 0.02, 0.02), FURNITURE, knob)
    g.supports.append((h, -w / 2 + 0.05, w / 2 - 0.05, -d / 2 + 0.05, d / 2 - 0.05))
    return g


def bookshelf(rng: np.random.Generator) -> Group:
    """Open shelving (furniture) filled with books (books) and a few objects."""
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.25, 0.4), rng.uniform(0.8, 2.1)
    t = rng.uniform(0.018, 0.03)
    g = Group(w, d, h)
    m = mat.wood(rng)
    for sx in (-1, 1):
        g.add((sx * (w / 2 - t / 2), h / 2, 0), (t, h, d), FURNITURE, m)
    g.add((0, h / 2, -d / 2 + 0.005), (w - 2 * t, h, 0.01), FURNITURE, m)
    n = max(2, int(h / rng.uniform(0.3, 0.42)))
    gap = (h - t) / n
    for i in range(n + 1):
        g.add((0, i * gap + t / 2, 0), (w - 2 * t, t, d - 0.01), FURNITURE, m)
    inner_w, inner_d = w - 2 * t, d - 0.02
    for i in range(n):
        y0 = i * gap + t
        x = -inner_w / 2
        end = inner_w / 2 - rng.uniform(0, 0.5) * inner_w
        while x < end - 0.02:
            if rng.random() < 0.08:  # an ornament or a box instead of a book
                s = rng.uniform(0.06, min(0.2, gap - t - 0.02))
                g.add((x + s / 2, y0 + s / 2, 0), (s, s, min(s, inner_d)), OBJECTS,
                      mat.any_surface(rng))
                x += s + 0.01
                continue
            bw = rng.uniform(0.02, 0.06)
            bh = min(gap - t - 0.01, rng.uniform(0.15, 0.3))
            bd = inner_d * rng.uniform(0.6, 0.95)
            g.add((x + bw / 2, y0 + bh / 2, inner_d / 2 - bd / 2), (bw, bh, bd), BOOKS,
                  mat.paint(rng, (0.1, 0.9)))
            x += bw + (0.002 if rng.random() < 0.9 else rng.uniform(0.01, 0.05))
    return g


def table(rng: np.random.Generator, kind: str = "dining") -> Group:
    """Top and four legs (or side panels for desks), all labelled table."""
    dims = {"dining": ((1.0, 2.0), (0.75, 1.0), (0.72, 0.78)),
            "coffee": ((0.8, 1.3), (0.5, 0.8), (0.35, 0.48)),
            "desk": ((1.0, 1.6), (0.55, 0.8), (0.72, 0.76)),
            "side": ((0.4, 0.6), (0.4, 0.6), (0.5, 0.65))}
    w, d, h = sample_size(rng, dims, kind, "table")
    top_t = rng.uniform(0.025, 0.05)
    g = Group(w, d, h)
    m = mat.wood(rng)
    g.add((0, h - top_t / 2, 0), (w, top_t, d), TABLE, m)
    leg_m = m if rng.random() < 0.7 else mat.paint(rng)
    if kind == "desk" and rng.random() < 0.5:
        for sx in (-1, 1):
            g.add((sx * (w / 2 - 0.02), (h - top_t) / 2, 0), (0.03, h - top_t, d - 0.04), TABLE, m)
        g.add((0, (h - top_t) * 0.6, -d / 2 + 0.03), (w - 0.1, (h - top_t) * 0.6, 0.02), TABLE, m)
    else:
        _legs(g, w, d, h - top_t, rng.uniform(0.04, 0.08), rng.uniform(0.02, 0.1), TABLE, leg_m)
    g.supports.append((h, -w / 2 + 0.05, w / 2 - 0.05, -d / 2 + 0.05, d / 2 - 0.05))
    return g


def chair(rng: np.random.Generator) -> Group:
    """Seat, back and legs (chair); the sitter faces +z."""
    w, d = rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.5)
    seat_h, seat_t = rng.uniform(0.42, 0.48), rng.uniform(0.03, 0.07)
    back_h, back_t = rng.uniform(0.35, 0.5), rng.uniform(0.02, 0.05)
    g = Group(w, d, seat_h + back_h)
    m = mat.wood(rng)
    seat_m = m if rng.random() < 0.5 else mat.fabric(rng)
    g.add((0, seat_h - seat_t / 2, 0), (w, seat_t, d), CHAIR, seat_m)
    if rng.random() < 0.8:
        _legs(g, w, d, seat_h - seat_t, rng.uniform(0.025, 0.045), 0.01, CHAIR, m)
    else:  # office chair: column and a star base approximated by two crossed bars
        g.add((0, (seat_h - seat_t) / 2, 0), (0.05, seat_h - seat_t, 0.05), CHAIR, m)
        for yaw in (0.0, math.pi / 2):
            g.add((0, 0.03, 0), (0.55, 0.04, 0.05), CHAIR, m, yaw=yaw)
    if rng.random() < 0.7:
        g.add((0, seat_h + back_h / 2, -d / 2 + back_t / 2), (w, back_h, back_t), CHAIR, seat_m)
    else:
        for sx in (-1, 1):
            g.add((sx * (w / 2 - 0.02), seat_h + back_h / 2, -d / 2 + back_t / 2),
                  (0.035, back_h, back_t), CHAIR, m)
        g.add((0, seat_h + back_h - 0.06, -d / 2 + back_t / 2), (w, 0.12, back_t), CHAIR, m)
    return g


def sofa(rng: np.random.Generator, seats: int | None = None) -> Group:
    """Base, seat cushions, back and arms (sofa), sometimes throw pillows (objects)."""
    seats = int(rng.integers(1, 4)) if seats is None else seats
    arm_w = rng.uniform(0.1, 0.22)
    w = seats * rng.uniform(0.55, 0.75) + 2 * arm_w
    d, seat_h = rng.uniform(0.8, 1.0), rng.uniform(0.38, 0.46)
    back_h, back_t, arm_h = rng.uniform(0.75, 0.95), rng.uniform(0.15, 0.25), rng.uniform(0.5, 0.65)
    cush_h, leg_h = rng.uniform(0.1, 0.15), rng.uniform(0.0, 0.12)
    g = Group(w, d, back_h)
    m = mat.fabric(rng)
    cush_m = m if rng.random() < 0.7 else mat.fabric(rng)
    if leg_h > 0.03:
        _legs(g, w, d, leg_h, 0.04, 0.03, SOFA, mat.wood(rng))
    else:
        leg_h = 0.0
    base_h = seat_h - cush_h - leg_h
    g.add((0, leg_h + base_h / 2, 0), (w, base_h, d), SOFA, m)
    g.add((0, leg_h + back_h / 2, -d / 2 + back_t / 2), (w, back_h - leg_h, back_t), SOFA, m)
    for sx in (-1, 1):
        g.add((sx * (w / 2 - arm_w / 2), leg_h + arm_h / 2, 0), (arm_w, arm_h - leg_h, d), SOFA, m)
    inner = w - 2 * arm_w
    cd = d - back_t - 0.02
    for i in range(seats):
        g.add((-inner / 2 + inner / seats * (i + 0.5), seat_h - cush_h / 2, d / 2 - cd / 2 - 0.01),
              (inner / seats - 0.01, cush_h, cd), SOFA, cush_m)
    for _ in range(int(rng.integers(0, 3))):
        s = rng.uniform(0.3, 0.45)
        g.add((rng.uniform(-inner / 2 + s / 2, inner / 2 - s / 2), seat_h + s / 2 - 0.03,
               -d / 2 + back_t + 0.08), (s, s, 0.12), OBJECTS, mat.fabric(rng),
              yaw=rng.uniform(-0.3, 0.3))
    return g


def tv(rng: np.random.Generator, stand: bool) -> Group:
    """Television (tv): body, screen and, on furniture, a stand. Wall sets: back at z = 0."""
    w = rng.uniform(0.7, 1.5)
    h, t = w * 0.5625, rng.uniform(0.03, 0.08)
    bezel = rng.uniform(0.008, 0.03)
    stand_h = rng.uniform(0.05, 0.12) if stand else 0.0
    g = Group(w, t, h + stand_h)
    body = mat.paint(rng, (0.02, 0.25))
    z = t / 2 if not stand else 0.0
    g.add((0, stand_h + h / 2, z), (w, h, t), TV, body)
    g.add((0, stand_h + h / 2, z + t / 2 + 0.0015), (w - 2 * bezel, h - 2 * bezel, 0.003), TV,
          mat.screen(rng))
    if stand:
        g.add((0, stand_h / 2 + 0.01, 0), (0.06, stand_h, 0.03), TV, body)
        g.add((0, 0.006, 0.02), (min(0.4, w * 0.4), 0.012, 0.2), TV, body)
    return g


def picture(rng: np.random.Generator) -> Group:
    """Framed or bare canvas (picture); back at z = 0, bottom at y = 0."""
    w, h = rng.uniform(0.25, 1.2), rng.uniform(0.2, 0.9)
    t = rng.uniform(0.015, 0.04)
    g = Group(w, t, h)
    frame = rng.uniform(0.02, 0.07) if rng.random() < 0.7 else 0.0
    if frame:
        g.add((0, h / 2, t / 2), (w, h, t), PICTURE, mat.wood(rng))
    art = mat.painting(rng)
    g.add((0, h / 2, t + 0.0015 if frame else t / 2),
          (w - 2 * frame, h - 2 * frame, 0.003 if frame else t), PICTURE, art)
    return g


def window(rng: np.random.Generator, room_height: float) -> tuple[Group, float]:
    """Window on a wall (window): self-lit glass, frame, bars, sill, maybe curtains (window,
    as NYU maps curtains). Returns the group (wall at z = 0, floor at y = 0) and the sill height."""
    w, h = rng.uniform(0.6, 2.2), rng.uniform(0.8, 1.8)
    sill = rng.uniform(0.5, 1.0)
    h = min(h, room_height - 0.12 - sill)
    fw, ft = rng.uniform(0.04, 0.08), rng.uniform(0.04, 0.07)
    g = Group(w, ft, sill + h)
    g.add((0, sill + h / 2, 0.005), (w, h, 0.01), WINDOW, mat.sky(rng))
    frame = mat.paint(rng, (0.6, 0.95)) if rng.random() < 0.6 else mat.wood(rng)
    for sx in (-1, 1):
        g.add((sx * (w / 2 - fw / 2), sill + h / 2, ft / 2), (fw, h, ft), WINDOW, frame)
    for y in (sill + fw / 2, sill + h - fw / 2):
        g.add((0, y, ft / 2), (w - 2 * fw, fw, ft), WINDOW, frame)
    for i in range(int(rng.integers(0, 3))):
        g.add(((i + 1) / 3 * w - w / 2 if i else 0.0, sill + h / 2, ft / 2),
              (fw * 0.6, h - 2 * fw, ft * 0.8), WINDOW, frame)
    if rng.random() < 0.5:
        g.add((0, sill + h / 2, ft / 2), (w - 2 * fw, fw * 0.6, ft * 0.8), WINDOW, frame)
    g.add((0, sill - 0.015, 0.08), (w + 0.1, 0.03, 0.16), WINDOW, frame)
    if rng.random() < 0.4:
        cloth = mat.fabric(rng)
        top = min(room_height - 0.02, sill + h + 0.15)
        bottom = 0.02 if rng.random() < 0.5 else sill - 0.1
        cw, cd = rng.uniform(0.2, 0.5), rng.uniform(0.04, 0.1)
        for sx in (-1, 1):
            g.add((sx * (w / 2 + cw / 2 - 0.05), (top + bottom) / 2, 0.2), (cw, top - bottom, cd),
                  WINDOW, cloth)
        g.depth = 0.2 + cd / 2
    return g, sill


def door(rng: np.random.Generator, room_height: float) -> Group:
    """Door leaf, trims and handle, labelled wall as NYU13 maps doors."""
    w, h = rng.uniform(0.75, 0.95), min(rng.uniform(1.95, 2.1), room_height - 0.15)
    t, trim = rng.uniform(0.02, 0.04), rng.uniform(0.05, 0.09)
    g = Group(w + 2 * trim, t + 0.06, h + trim)
    leaf = mat.wood(rng) if rng.random() < 0.5 else mat.paint(rng)
    tm = mat.paint(rng, (0.5, 0.95))
    g.add((0, h / 2, t / 2), (w, h, t), WALL, leaf)
    for sx in (-1, 1):
        g.add((sx * (w / 2 + trim / 2), (h + trim) / 2, 0.01), (trim, h + trim, 0.02), WALL, tm)
    g.add((0, h + trim / 2, 0.01), (w, trim, 0.02), WALL, tm)
    g.add((w / 2 - 0.08, 1.0, t + 0.03), (0.12, 0.025, 0.025), WALL, mat.paint(rng))
    return g


def lamp(rng: np.random.Generator, floor_standing: bool) -> Group:
    """Floor or table lamp (objects) with a glowing shade and a point light just above it."""
    shade_w, shade_h = rng.uniform(0.2, 0.45), rng.uniform(0.18, 0.35)
    pole_h = rng.uniform(1.1, 1.6) if floor_standing else rng.uniform(0.15, 0.35)
    base_w = rng.uniform(0.15, 0.35) if floor_standing else rng.uniform(0.08, 0.16)
    g = Group(max(base_w, shade_w), max(base_w, shade_w), pole_h + shade_h)
    body = mat.paint(rng)
    kelvin = rng.uniform(2500, 4500)
    color = color_temperature(kelvin)
    g.add((0, 0.015, 0), (base_w, 0.03, base_w), OBJECTS, body)
    pole_w = 0.03 if floor_standing else base_w * 0.6
    g.add((0, pole_h / 2, 0), (pole_w, pole_h, pole_w), OBJECTS, body)
    g.add((0, pole_h + shade_h / 2 - 0.02, 0), (shade_w, shade_h, shade_w), OBJECTS,
          mat.glow(rng, color))
    g.lights.append(Light(position=(0.0, pole_h + shade_h + 0.05, 0.0), color=color,
                          intensity=float(rng.uniform(1.5, 5.0)),
                          radius=float(rng.uniform(0.2, 0.5))))
    return g


def plant(rng: np.random.Generator) -> Group:
    """Pot and foliage blocks (objects)."""
    pot, pot_h = rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.45)
    g = Group(pot * 1.8, pot * 1.8, pot_h + 0.9)
    g.add((0, pot_h / 2, 0), (pot, pot_h, pot), OBJECTS, mat.paint(rng))
    leaf = Material(color=mat.hsv(rng.uniform(0.2, 0.38), rng.uniform(0.4, 0.9),
                                      rng.uniform(0.2, 0.6)),
                        color2=mat.hsv(rng.uniform(0.2, 0.38), 0.8, 0.25), pattern="noise",
                        scale=float(rng.uniform(8, 20)),
                        jitter=tuple(float(x) for x in rng.random(4)))
    y = pot_h
    for _ in range(int(rng.integers(2, 4))):
        s = rng.uniform(0.2, 0.45) * pot * 3
        g.add((rng.uniform(-0.1, 0.1), y + s / 2, rng.uniform(-0.1, 0.1)), (s, s, s), OBJECTS, leaf,
              yaw=rng.uniform(0, math.pi))
        y += s * 0.6
    g.height = y
    return g


def clutter(rng: np.random.Generator, max_size: float) -> Group:
    """One or two stacked small boxes (objects): boxes, bins, bags, cups."""
    sx, sy, sz = (rng.uniform(0.05, max_size) for _ in range(3))
    g = Group(sx, sz, sy)
    g.add((0, sy / 2, 0), (sx, sy, sz), OBJECTS, mat.any_surface(rng))
    if rng.random() < 0.25:
        tx, ty = sx * rng.uniform(0.5, 0.9), sy * rng.uniform(0.5, 1.0)
        tz = sz * rng.uniform(0.5, 0.9)
        g.add((0, sy + ty / 2, 0), (tx, ty, tz), OBJECTS, mat.any_surface(rng),
              yaw=rng.uniform(-0.5, 0.5))
        g.height = sy + ty
    return g


def book_stack(rng: np.random.Generator) -> Group:
    """1-4 books lying flat (books)."""
    g = Group(0.3, 0.3, 0.0)
    y = 0.0
    for _ in range(int(rng.integers(1, 5))):
        w, d, t = rng.uniform(0.13, 0.3), rng.uniform(0.18, 0.3), rng.uniform(0.015, 0.06)
        g.add((rng.uniform(-0.02, 0.02), y + t / 2, rng.uniform(-0.02, 0.02)), (w, t, d), BOOKS,
              mat.paint(rng, (0.1, 0.9)), yaw=rng.uniform(-0.3, 0.3))
        y += t
    g.height = y
    return g


def decorate(g: Group, rng: np.random.Generator, count: int, lamp_prob: float = 0.0) -> None:
    """Put up to `count` small items (books, clutter, a table lamp) on the group's supports,
    avoiding overlaps between them."""
    for y, x0, x1, z0, z1 in g.supports:
        taken: list[tuple[float, float, float]] = []
        for _ in range(count):
            r = rng.random()
            item = (lamp(rng, False) if r < lamp_prob else book_stack(rng) if r < 0.5
                    else clutter(rng, 0.25))
            half = max(item.width, item.depth) / 2 * 1.2
            if x1 - x0 < 2 * half or z1 - z0 < 2 * half:
                continue
            x, z = rng.uniform(x0 + half, x1 - half), rng.uniform(z0 + half, z1 - half)
            if any(abs(x - tx) < half + th and abs(z - tz) < half + th for tx, tz, th in taken):
                continue
            taken.append((x, z, half))
            g.merge(item, x, y, z, rng.uniform(-0.4, 0.4))
            lamp_prob = 0.0  # at most one lamp per surface


def dining_set(rng: np.random.Generator) -> Group:
    """Dining table with chairs around it; the footprint includes the chairs."""
    t = table(rng, "dining")
    decorate(t, rng, int(rng.integers(0, 4)))
    g = Group(t.width + 1.0, t.depth + 1.0, t.height)
    g.merge(t, 0, 0, 0)
    per_side = max(1, int(t.width / 0.65))
    for side in (-1, 1):
        c = chair(rng)  # one model per side
        for i in range(per_side):
            if rng.random() < 0.2:
                continue
            x = -t.width / 2 + t.width / per_side * (i + 0.5)
            z = side * (t.depth / 2 + rng.uniform(0.0, 0.25))
            g.merge(c, x, 0, z, (0.0 if side < 0 else math.pi) + rng.uniform(-0.15, 0.15))
    if rng.random() < 0.5:
        c = chair(rng)
        for side in (-1, 1):
            g.merge(c, side * (t.width / 2 + rng.uniform(0.05, 0.25)), 0, 0, -side * math.pi / 2)
    return g


def desk_set(rng: np.random.Generator) -> Group:
    """Desk against the wall (back at -z) with a chair in front and items on top."""
    t = table(rng, "desk")
    decorate(t, rng, int(rng.integers(1, 4)), lamp_prob=0.3)
    g = Group(t.width, t.depth + 0.55, t.height)
    g.merge(t, 0, 0, -g.depth / 2 + t.depth / 2)
    if rng.random() < 0.85:
        x = rng.uniform(-0.2, 0.2)
        z = -g.depth / 2 + t.depth + rng.uniform(0.0, 0.2)
        g.merge(chair(rng), x, 0, z, math.pi + rng.uniform(-0.4, 0.4))
    return g


def lounge_set(rng: np.random.Generator) -> Group:
    """Sofa (back at -z) and, often, a coffee table in front of it."""
    s = sofa(rng, int(rng.integers(2, 4)))
    gap = rng.uniform(0.3, 0.5)
    ct = table(rng, "coffee") if rng.random() < 0.75 else None
    depth = s.depth + (gap + ct.depth if ct else 0.0)
    g = Group(s.width, depth, s.height)
    g.merge(s, 0, 0, -depth / 2 + s.depth / 2)
    if ct:
        decorate(ct, rng, int(rng.integers(0, 3)))
        g.merge(ct, 0, 0, depth / 2 - ct.depth / 2)
    return g


def kitchen_counter(rng: np.random.Generator, length: float) -> Group:
    """Base cabinets with a worktop and wall cabinets above (furniture), items on top."""
    d, h = rng.uniform(0.55, 0.65), rng.uniform(0.86, 0.92)
    g = Group(length, d + 0.03, 2.2)
    body, top = mat.paint(rng) if rng.random() < 0.6 else mat.wood(rng), mat.any_surface(rng)
    g.add((0, (h - 0.04) / 2, -0.01), (length, h - 0.04, d - 0.02), FURNITURE, body)
    g.add((0, h - 0.02, 0.01), (length + 0.02, 0.04, d + 0.02), FURNITURE, top)
    n = max(1, int(length / 0.6))
    for i in range(n):
        x = -length / 2 + length / n * (i + 0.5)
        g.add((x, (h - 0.1) / 2 + 0.06, d / 2 - 0.01), (length / n - 0.01, h - 0.16, 0.012),
              FURNITURE, body)
    if rng.random() < 0.7:
        up_d, up_y = rng.uniform(0.3, 0.36), rng.uniform(1.45, 1.6)
        up_h = min(rng.uniform(0.6, 0.8), 2.35 - up_y)
        g.add((0, up_y + up_h / 2, -d / 2 + up_d / 2), (length, up_h, up_d), FURNITURE, body)
    g.supports.append((h, -length / 2 + 0.1, length / 2 - 0.1, -d / 2 + 0.05, -d / 2 + 0.28))
    decorate(g, rng, int(rng.integers(1, 5)))
    return g


def fridge(rng: np.random.Generator) -> Group:
    """Refrigerator (furniture, as NYU13 maps it) with a handle."""
    w, d, h = rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.72), rng.uniform(1.6, 1.95)
    g = Group(w, d + 0.05, h)
    body = mat.paint(rng, (0.5, 0.95))
    g.add((0, h / 2, 0), (w, h, d), FURNITURE, body)
    g.add((0, h * 0.62, d / 2 + 0.003), (w - 0.01, 0.006, 0.006), FURNITURE, mat.paint(rng))
    g.add((w / 2 - 0.06, h * 0.75, d / 2 + 0.025), (0.025, 0.35, 0.04), FURNITURE, mat.paint(rng))
    return g


def ceiling_fixture(rng: np.random.Generator) -> Group:
    """Glowing ceiling lamp (objects) with a point light below; top at y = 0 (hang from the
    ceiling by placing the group at y = room height)."""
    w, t = rng.uniform(0.2, 0.6), rng.uniform(0.04, 0.15)
    color = color_temperature(rng.uniform(2700, 6500))
    g = Group(w, w, t)
    g.add((0, -t / 2, 0), (w, t, w if rng.random() < 0.6 else w * rng.uniform(1.5, 3)), OBJECTS,
          mat.glow(rng, color))
    g.lights.append(Light(position=(0.0, -t - 0.12, 0.0), color=color,
                          intensity=float(rng.uniform(3.0, 12.0)),
                          radius=float(rng.uniform(0.3, 1.0))))
    return g


def rug(rng: np.random.Generator) -> Group:
    """Flat rug, 5 mm thick, labelled floor (NYU13 maps floor mats to floor)."""
    w, d = rng.uniform(1.0, 3.0), rng.uniform(0.8, 2.5)
    g = Group(w, d, 0.005)
    g.add((0, 0.0025, 0), (w, 0.005, d), FLOOR, mat.fabric(rng))
    return g


def wall_shelf(rng: np.random.Generator) -> Group:
    """Wall-mounted board (furniture) with books and objects on it; wall at z = 0."""
    w, d, t = rng.uniform(0.6, 1.4), rng.uniform(0.18, 0.3), rng.uniform(0.02, 0.04)
    g = Group(w, d, t)
    g.add((0, t / 2, d / 2), (w, t, d), FURNITURE, mat.wood(rng))
    g.supports.append((t, -w / 2 + 0.03, w / 2 - 0.03, 0.02, d - 0.02))
    x = -w / 2 + 0.03
    while x < w / 2 - 0.1:
        if rng.random() < 0.6:  # a run of upright books
            for _ in range(int(rng.integers(3, 12))):
                bw, bh = rng.uniform(0.02, 0.05), rng.uniform(0.15, 0.28)
                if x + bw > w / 2 - 0.03:
                    break
                bd = rng.uniform(0.12, d - 0.02)
                g.add((x + bw / 2, t + bh / 2, 0.01 + bd / 2), (bw, bh, bd), BOOKS,
                      mat.paint(rng, (0.1, 0.9)))
                x += bw + 0.002
        else:
            s = rng.uniform(0.06, min(0.2, d - 0.02))
            if x + s > w / 2 - 0.03:
                break
            g.add((x + s / 2, t + s / 2, 0.01 + s / 2), (s, s * rng.uniform(0.5, 1.5), s), OBJECTS,
                  mat.any_surface(rng))
            x += s
        x += rng.uniform(0.02, 0.15)
    g.height = max(b.center[1] + b.size[1] / 2 for b in g.boxes)
    return g


def wall_panel(rng: np.random.Generator) -> Group:
    """Whiteboard, mirror, clock or poster board (objects) flat on a wall; wall at z = 0."""
    w, h = rng.uniform(0.3, 1.8), rng.uniform(0.3, 1.2)
    t = rng.uniform(0.01, 0.04)
    g = Group(w, t, h)
    surface = mat.paint(rng, (0.6, 0.98)) if rng.random() < 0.5 else mat.any_surface(rng)
    g.add((0, h / 2, t / 2), (w, h, t), OBJECTS, surface)
    return g
