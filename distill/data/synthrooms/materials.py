"""Random material families (wood, fabric, paint, ...) for SynthRooms scene sampling.

Colours are drawn in HSV and returned as linear-RGB albedos; every family mixes several
patterns so that no colour or texture is tied to a class or to a distance.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import replace

import numpy as np

from .scene import Material, Vec3


def hsv(h: float, s: float, v: float) -> Vec3:
    """Linear-RGB albedo of an sRGB colour given in HSV (all in [0, 1])."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (r ** 2.2, g ** 2.2, b ** 2.2)


def _jitter(rng: np.random.Generator) -> tuple[float, float, float, float]:
    return tuple(float(x) for x in rng.random(4))


def _scaled(c: Vec3, k: float) -> Vec3:
    return tuple(min(1.0, x * k) for x in c)


def _make(rng: np.random.Generator, c1: Vec3, c2: Vec3, pattern: str, scale: float,
          angle: float | None = None, emission: float = 0.0) -> Material:
    if angle is None:
        angle = float(rng.choice([0.0, math.pi / 2, rng.uniform(0, math.pi)]))
    return Material(color=c1, color2=c2, pattern=pattern, scale=float(scale), angle=float(angle),
                    jitter=_jitter(rng), emission=float(emission))


def random_color(rng: np.random.Generator, sat: tuple[float, float] = (0.0, 0.8),
                 val: tuple[float, float] = (0.15, 0.95)) -> Vec3:
    return hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def wood(rng: np.random.Generator) -> Material:
    """Wood grain, planks or plain lacquer in browns (sometimes painted)."""
    if rng.random() < 0.25:
        return paint(rng)
    base = hsv(rng.uniform(0.04, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.85))
    dark = _scaled(base, rng.uniform(0.45, 0.8))
    kind = rng.choice(["wood", "wood", "plain", "noise"])
    return _make(rng, base, dark, str(kind), rng.uniform(3, 12), angle=rng.choice([0, math.pi / 2]))


def fabric(rng: np.random.Generator) -> Material:
    """Upholstery and bedding: plain, striped, checked or mottled, any hue."""
    c1 = random_color(rng, (0.0, 0.7), (0.1, 0.9))
    c2 = random_color(rng, (0.0, 0.7), (0.1, 0.95)) if rng.random() < 0.5 else _scaled(c1, 0.7)
    kind = rng.choice(["plain", "stripes", "checker", "noise", "noise"])
    return _make(rng, c1, c2, str(kind), rng.uniform(2, 15))


def paint(rng: np.random.Generator, val: tuple[float, float] = (0.2, 0.95)) -> Material:
    """Painted or plastic surface, mostly plain with faint mottling."""
    c1 = random_color(rng, (0.0, 0.6), val)
    kind = "noise" if rng.random() < 0.4 else "plain"
    return _make(rng, c1, _scaled(c1, rng.uniform(0.8, 0.95)), kind, rng.uniform(0.5, 4))


def any_surface(rng: np.random.Generator) -> Material:
    """A random family: wood, fabric, paint or a bold pattern."""
    r = rng.random()
    if r < 0.3:
        return wood(rng)
    if r < 0.55:
        return fabric(rng)
    if r < 0.85:
        return paint(rng)
    c1, c2 = random_color(rng), random_color(rng)
    return _make(rng, c1, c2, str(rng.choice(["checker", "stripes", "tiles"])), rng.uniform(2, 20))


def floor(rng: np.random.Generator) -> Material:
    """Floors: planks, tiles, carpet, concrete or linoleum checker."""
    r = rng.random()
    if r < 0.35:
        base = hsv(rng.uniform(0.03, 0.12), rng.uniform(0.2, 0.7), rng.uniform(0.2, 0.8))
        return _make(rng, base, _scaled(base, 0.35), "planks", rng.uniform(4, 9),
                     angle=rng.choice([0, math.pi / 2]))
    if r < 0.6:
        c1 = random_color(rng, (0.0, 0.4), (0.3, 0.95))
        grout = random_color(rng, (0.0, 0.2), (0.2, 0.9))
        return _make(rng, c1, grout, "tiles", rng.uniform(1.5, 5))
    if r < 0.85:
        c1 = random_color(rng, (0.0, 0.6), (0.1, 0.7))
        return _make(rng, c1, _scaled(c1, 0.75), "noise", rng.uniform(3, 25))
    if r < 0.93:
        return _make(rng, random_color(rng), random_color(rng), "checker", rng.uniform(1.5, 4))
    return paint(rng, (0.3, 0.7))


def wall(rng: np.random.Generator) -> Material:
    """Walls: mostly paint, sometimes wallpaper stripes, bricks or panelling."""
    r = rng.random()
    if r < 0.6:
        return paint(rng, (0.35, 0.95))
    if r < 0.75:
        c1 = random_color(rng, (0.0, 0.5), (0.4, 0.95))
        return _make(rng, c1, random_color(rng, (0.0, 0.5), (0.3, 0.9)), "stripes",
                     rng.uniform(2, 10), angle=0.0)
    if r < 0.85:
        brick = hsv(rng.uniform(0.0, 0.08), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        m = _make(rng, brick, random_color(rng, (0.0, 0.1), (0.5, 0.9)), "tiles",
                  rng.uniform(3, 5), angle=0.0)
        return replace(m, jitter=(m.jitter[0], m.jitter[1], 0.9, m.jitter[3]))  # bricks
    if r < 0.93:
        return wood(rng)
    c1 = random_color(rng, (0.0, 0.5), (0.3, 0.9))
    return _make(rng, c1, _scaled(c1, 0.8), "noise", rng.uniform(0.5, 6))


def ceiling(rng: np.random.Generator) -> Material:
    """Ceilings: light paint, sometimes office tiles."""
    if rng.random() < 0.2:
        c1 = random_color(rng, (0.0, 0.15), (0.6, 0.95))
        return _make(rng, c1, _scaled(c1, 0.6), "tiles", rng.uniform(1.5, 2), angle=0.0)
    return paint(rng, (0.55, 0.97))


def sky(rng: np.random.Generator) -> Material:
    """Self-lit window view: daylight sky with clouds, overcast white, or dusk."""
    r = rng.random()
    if r < 0.55:
        horizon, zenith = hsv(0.58, rng.uniform(0, 0.2), 0.95), hsv(rng.uniform(0.55, 0.62),
                                                                    rng.uniform(0.3, 0.7), 0.9)
    elif r < 0.85:
        horizon = zenith = hsv(0.6, rng.uniform(0, 0.08), rng.uniform(0.8, 1.0))
    else:
        horizon, zenith = hsv(rng.uniform(0.02, 0.1), 0.6, 0.9), hsv(0.65, 0.7, 0.35)
    return _make(rng, horizon, zenith, "sky", rng.uniform(0.5, 2), angle=0.0,
                 emission=rng.uniform(1.0, 5.0))


def screen(rng: np.random.Generator) -> Material:
    """TV screen: off (dark glass with a glare band) or on (blocky bright picture)."""
    if rng.random() < 0.35:
        return _make(rng, random_color(rng, (0.2, 1.0), (0.2, 1.0)), random_color(rng), "screen",
                     rng.uniform(4, 20), angle=0.0, emission=rng.uniform(0.5, 2.0))
    dark = hsv(rng.uniform(0.5, 0.7), rng.uniform(0, 0.3), rng.uniform(0.03, 0.12))
    return _make(rng, dark, dark, "screen", 1.0, angle=0.0)


def painting(rng: np.random.Generator) -> Material:
    """Picture content: colourful abstract patterns."""
    c1, c2 = random_color(rng, (0.2, 1.0), (0.1, 1.0)), random_color(rng, (0.2, 1.0), (0.1, 1.0))
    kind = rng.choice(["noise", "noise", "checker", "stripes", "tiles", "wood"])
    return _make(rng, c1, c2, str(kind), rng.uniform(2, 12))


def glow(rng: np.random.Generator, color: Vec3) -> Material:
    """Self-lit lamp shade or ceiling fixture in the light's colour."""
    return Material(color=color, color2=color, pattern="plain", emission=float(rng.uniform(1, 4)))
