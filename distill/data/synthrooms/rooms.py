"""Room recipes (bedroom, living room, dining room, office, kitchen, library) and `sample_scene`.

A scene is a pure function of (seed, split, index): `scene_rng` seeds one numpy Generator from
those three numbers, so image i never depends on how many images are generated.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from . import furniture as fu
from . import materials as mat
from .layout import Layout, box_arrays_contain, sample_camera
from .raycast import render
from .scene import Camera, Light, Room, Scene

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
ROOM_TYPES: tuple[str, ...] = ("bedroom", "living", "dining", "office", "kitchen", "library")
_ROOM_WEIGHTS = np.array([0.25, 0.25, 0.12, 0.14, 0.11, 0.13])
MAX_LIGHTS = 3


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator that fully determines scene `index` of `split` for `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; valid splits: {', '.join(SPLITS)}.")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}.")
    return np.random.default_rng([seed, SPLITS[split], index])


def _sample_room(rng: np.random.Generator) -> Room:
    wall = mat.wall(rng)
    walls = [wall] * 4
    if rng.random() < 0.25:
        walls[int(rng.integers(4))] = mat.wall(rng)  # accent wall
    # Skewed towards NYU-like small rooms (mean about 4.9 x 5.4 m), up to 8 x 9.5 m.
    width, height = 3.0 + 5.0 * rng.beta(1.5, 2.5), rng.uniform(2.4, 3.2)
    depth = 3.0 + 6.5 * rng.beta(1.5, 2.5)
    return Room(width=width, height=height, depth=depth, floor=mat.floor(rng),
                ceiling=mat.ceiling(rng), walls=tuple(walls))


def _openings(lay: Layout, rng: np.random.Generator) -> None:
    """Door and windows first: they reserve the space in front of them."""
    if rng.random() < 0.6:
        lay.on_wall(fu.door(rng, lay.room.height), 0.0, keepout=0.9)
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):
        g, _sill = fu.window(rng, lay.room.height)
        lay.on_wall(g, 0.0, keepout=0.35)


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _bedroom(lay: Layout, rng: np.random.Generator) -> None:
    bed = fu.bed(rng)
    spot = lay.against_wall(bed)
    if spot:
        for side in (-1, 1):
            if _maybe(rng, 0.65):
                ns = fu.cabinet(rng, "nightstand")
                fu.decorate(ns, rng, int(rng.integers(0, 3)), lamp_prob=0.5)
                lay.against_wall(ns, spot[0], spot[1] + side * (bed.width + ns.width + 0.08) / 2)
    if _maybe(rng, 0.6):
        lay.against_wall(fu.cabinet(rng, "wardrobe"))
    if _maybe(rng, 0.6):
        dresser = fu.cabinet(rng, "dresser")
        if _maybe(rng, 0.35):
            dresser.merge(fu.tv(rng, stand=True), 0, dresser.height, 0)
        else:
            fu.decorate(dresser, rng, int(rng.integers(0, 4)), lamp_prob=0.3)
        lay.against_wall(dresser)
    if _maybe(rng, 0.35):
        lay.against_wall(fu.desk_set(rng))
    if _maybe(rng, 0.3):
        lay.against_wall(fu.bookshelf(rng))
    if _maybe(rng, 0.3):
        lay.free(fu.chair(rng), margin=0.2)


def _tv_corner(lay: Layout, rng: np.random.Generator, wall: int | None, u: float | None) -> None:
    """TV on a stand, or on the wall (often above a low stand), on `wall` near `u`."""
    stand = fu.cabinet(rng, "tv_stand")
    on_wall = _maybe(rng, 0.4)
    if not on_wall:
        stand.merge(fu.tv(rng, stand=True), 0, stand.height, 0)
    fu.decorate(stand, rng, int(rng.integers(0, 3)))
    if wall is not None:
        length = lay.wall_length(wall)
        u = float(np.clip(u + rng.uniform(-0.5, 0.5), stand.width / 2 + 0.02,
                          length - stand.width / 2 - 0.02))
    placed = lay.against_wall(stand, wall, u if wall is not None else None)
    if on_wall:
        lay.on_wall(fu.tv(rng, stand=False), rng.uniform(0.9, 1.3),
                    wall=placed[0] if placed else None, keepout=0.0)


def _living(lay: Layout, rng: np.random.Generator) -> None:
    spot = lay.against_wall(fu.lounge_set(rng))
    if spot is None:
        lay.free(fu.lounge_set(rng))
    if _maybe(rng, 0.9):
        wall = (spot[0] + 2) % 4 if spot else None
        _tv_corner(lay, rng, wall, spot[1] if spot else None)
    if _maybe(rng, 0.5):
        lay.free(fu.sofa(rng, 1), margin=0.3)
    for _ in range(int(rng.integers(0, 3))):
        lay.against_wall(fu.bookshelf(rng))
    if _maybe(rng, 0.4):
        side = fu.table(rng, "side")
        fu.decorate(side, rng, 1, lamp_prob=0.7)
        lay.against_wall(side)
    if _maybe(rng, 0.4):
        lay.against_wall(fu.lamp(rng, True))
    if _maybe(rng, 0.3):
        sideboard = fu.cabinet(rng, "sideboard")
        fu.decorate(sideboard, rng, int(rng.integers(0, 4)))
        lay.against_wall(sideboard)


def _dining(lay: Layout, rng: np.random.Generator) -> None:
    placed = lay.free(fu.dining_set(rng), margin=0.3)
    if placed and _maybe(rng, 0.6):
        lay.hang(fu.ceiling_fixture(rng), placed[0], placed[1])
    for kind in ("sideboard", "dresser"):
        if _maybe(rng, 0.6 if kind == "sideboard" else 0.3):
            c = fu.cabinet(rng, kind)
            fu.decorate(c, rng, int(rng.integers(0, 4)), lamp_prob=0.2)
            lay.against_wall(c)
    if _maybe(rng, 0.4):
        lay.against_wall(fu.bookshelf(rng))


def _office(lay: Layout, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(1, 4))):
        lay.against_wall(fu.desk_set(rng))
    for _ in range(int(rng.integers(1, 4))):
        lay.against_wall(fu.bookshelf(rng))
    for _ in range(int(rng.integers(0, 3))):
        c = fu.cabinet(rng, "dresser")
        fu.decorate(c, rng, int(rng.integers(0, 3)))
        lay.against_wall(c)
    if _maybe(rng, 0.3):
        lay.against_wall(fu.sofa(rng))
    for _ in range(int(rng.integers(0, 3))):
        lay.free(fu.chair(rng), margin=0.2)


def _kitchen(lay: Layout, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(1, 3))):
        wall = int(rng.integers(4))
        length = min(lay.wall_length(wall) - 0.3, rng.uniform(1.5, 4.0))
        lay.against_wall(fu.kitchen_counter(rng, length), wall)
    if _maybe(rng, 0.7):
        lay.against_wall(fu.fridge(rng))
    if _maybe(rng, 0.6):
        lay.free(fu.dining_set(rng), margin=0.3)
    for _ in range(int(rng.integers(0, 3))):
        lay.free(fu.chair(rng), margin=0.2)


def _library(lay: Layout, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(3, 8))):
        lay.against_wall(fu.bookshelf(rng))
    if _maybe(rng, 0.7):
        lay.free(fu.dining_set(rng), margin=0.3)
    if _maybe(rng, 0.4):
        lay.against_wall(fu.lounge_set(rng))
    if _maybe(rng, 0.4):
        lay.free(fu.sofa(rng, 1), margin=0.3)


_RECIPES = {"bedroom": _bedroom, "living": _living, "dining": _dining, "office": _office,
            "kitchen": _kitchen, "library": _library}


def _extra(lay: Layout, rng: np.random.Generator) -> None:
    """A few pieces any room may hold, more in bigger rooms."""
    area = lay.room.width * lay.room.depth
    for _ in range(int(rng.integers(3, 6 + int(area / 5)))):
        r = rng.random()
        if r < 0.08:
            _tv_corner(lay, rng, None, None)
            continue
        if r < 0.2:
            lay.against_wall(fu.bookshelf(rng))
        elif r < 0.4:
            c = fu.cabinet(rng, str(rng.choice(["dresser", "sideboard", "nightstand"])))
            fu.decorate(c, rng, int(rng.integers(0, 4)), lamp_prob=0.3)
            lay.against_wall(c)
        elif r < 0.55:
            side = fu.table(rng, "side")
            fu.decorate(side, rng, int(rng.integers(1, 3)), lamp_prob=0.5)
            lay.free(side, margin=0.2) or lay.against_wall(side)
        elif r < 0.65:
            lay.free(fu.sofa(rng, 1), margin=0.3)
        elif r < 0.88:
            lay.free(fu.chair(rng), margin=0.2) or lay.against_wall(fu.chair(rng))
        else:
            lay.against_wall(fu.lamp(rng, True))


def _finish(lay: Layout, rng: np.random.Generator) -> None:
    """Pictures, floor clutter, plants, a rug and ceiling fixtures, common to all rooms."""
    for _ in range(int(rng.integers(2, 9))):
        pic = fu.picture(rng)
        centre = rng.uniform(1.3, 1.75)
        lay.on_wall(pic, centre - pic.height / 2)
    for _ in range(int(rng.integers(0, 4))):
        shelf = fu.wall_shelf(rng)
        lay.on_wall(shelf, rng.uniform(1.0, min(1.9, lay.room.height - 0.5)))
    if _maybe(rng, 0.5):
        panel = fu.wall_panel(rng)
        lay.on_wall(panel, rng.uniform(0.8, 1.2))
    for _ in range(int(rng.integers(3, 11))):
        item = fu.clutter(rng, 0.6)
        if not lay.free(item, margin=0.05):
            lay.against_wall(item)
    for _ in range(int(rng.choice([0, 0, 1, 2]))):
        plant = fu.plant(rng)
        lay.against_wall(plant) or lay.free(plant, margin=0.2)
    if _maybe(rng, 0.45):
        g = fu.rug(rng)
        r = lay.room
        if g.width < r.width - 0.4 and g.depth < r.depth - 0.4:
            x = rng.uniform(g.width / 2 + 0.2, r.width - g.width / 2 - 0.2)
            z = rng.uniform(g.depth / 2 + 0.2, r.depth - g.depth / 2 - 0.2)
            lay.commit(g, x, 0.0, z, int(rng.integers(2)) * math.pi / 2, [])
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        r = lay.room
        lay.hang(fu.ceiling_fixture(rng), rng.uniform(0.5, r.width - 0.5),
                 rng.uniform(0.5, r.depth - 0.5))


def _pick_lights(lay: Layout, rng: np.random.Generator) -> list[Light]:
    """Up to MAX_LIGHTS point lights from lamps and fixtures (plus, sometimes, daylight through
    the room); never inside a box."""
    lights = [li for li in lay.lights
              if not box_arrays_contain(lay.boxes, np.array([li.position]), 0.02)[0]]
    r = lay.room
    if not lights or _maybe(rng, 0.3):
        pos = (rng.uniform(0.3, r.width - 0.3), rng.uniform(1.2, r.height - 0.1),
               rng.uniform(0.3, r.depth - 0.3))
        if not box_arrays_contain(lay.boxes, np.array([pos]), 0.02)[0]:
            color = fu.color_temperature(rng.uniform(2700, 7500))
            lights.append(Light(position=pos, color=color, intensity=float(rng.uniform(3, 12)),
                                radius=float(rng.uniform(0.3, 1.2))))
    if not lights:  # everything collided: a light just under the ceiling centre
        lights.append(Light(position=(r.width / 2, r.height - 0.05, r.depth / 2)))
    if len(lights) > MAX_LIGHTS:
        keep = np.sort(rng.choice(len(lights), MAX_LIGHTS, replace=False))
        lights = [lights[i] for i in keep]
    # Vary brightness per light so that no light position dominates every image.
    return [replace(li, intensity=li.intensity * float(rng.uniform(0.5, 1.5))) for li in lights]


def sample_scene(rng: np.random.Generator) -> tuple[Scene, Camera]:
    """Sample one furnished room, its lights, camera settings and camera pose."""
    room = _sample_room(rng)
    lay = Layout(room, rng)
    kind = ROOM_TYPES[int(rng.choice(len(ROOM_TYPES), p=_ROOM_WEIGHTS))]
    _openings(lay, rng)
    _RECIPES[kind](lay, rng)
    _extra(lay, rng)
    _finish(lay, rng)
    lights = _pick_lights(lay, rng)
    mean_power = float(np.mean([li.intensity for li in lights]))
    scene = Scene(room=room, objects=tuple(lay.boxes), lights=tuple(lights),
                  ambient=mean_power * float(rng.uniform(0.01, 0.08)),
                  ambient_color=fu.color_temperature(rng.uniform(4000, 9000)),
                  exposure=float(rng.uniform(0.35, 0.8)),
                  white_balance=tuple(float(g) for g in rng.uniform(0.9, 1.1, 3)),
                  noise=float(rng.uniform(0.003, 0.02)), vignette=float(rng.uniform(0.0, 0.4)),
                  seed=int(rng.integers(2**31)))
    return scene, sample_camera(lay, rng)


def render_scene(seed: int, height: int, width: int, *, split: str = "train", index: int = 0
                 ) -> dict[str, np.ndarray]:
    """Sample and render scene `index` of `split` for `seed` at `height` x `width`.

    Returns `render`'s dict: rgb uint8 (H, W, 3), depth float32 (H, W) z-depth in metres,
    seg uint8 (H, W) NYU13 ids, intrinsics float32 (4,) fx, fy, cx, cy in pixels; plus `camera`
    (the `Camera`) and `scene` (the `Scene`). The same arguments always give the same arrays.
    """
    scene, camera = sample_scene(scene_rng(seed, split, index))
    out = render(scene, camera, height, width)
    out["camera"], out["scene"] = camera, scene
    return out
