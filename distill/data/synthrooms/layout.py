"""Room layout by rejection sampling: floor footprints, wall-mounted items, lights and camera.

Footprints are oriented rectangles on the floor (x, z). Solid footprints may not overlap each
other; wall-mounted items (doors, windows, pictures, wall TVs) reserve a keep-out strip in front
of them where only furniture lower than the item may stand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .furniture import Group
from .scene import Box, Camera, Light, Room


@dataclass(frozen=True)
class Rect:
    """Oriented floor rectangle: centre (x, z), half extents along its local x and z, `yaw`.

    For a solid, `top` is the height of its highest point; for a keep-out strip (`solid=False`)
    it is the greatest height a solid standing in it may have."""
    x: float
    z: float
    hw: float
    hd: float
    yaw: float
    top: float
    solid: bool = True

    def axes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Unit vectors (x, z) of the local x and z axes, as plain floats (see rects_overlap)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return (c, -s), (s, c)

    def extent(self) -> tuple[float, float]:
        """Half extents of the axis-aligned bounding box (x, z)."""
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        return self.hw * c + self.hd * s, self.hw * s + self.hd * c


def rects_overlap(a: Rect, b: Rect, margin: float = 0.0) -> bool:
    """Separating-axis test of two oriented rectangles grown by `margin` metres in total.

    Plain floats: layout runs this test thousands of times per scene, and 2-vectors in numpy
    cost more in overhead than in arithmetic."""
    (ax, az), (bx, bz) = a.axes(), b.axes()
    dx, dz = b.x - a.x, b.z - a.z
    for nx, nz in (ax, az, bx, bz):
        ra = a.hw * abs(ax[0] * nx + ax[1] * nz) + a.hd * abs(az[0] * nx + az[1] * nz)
        rb = b.hw * abs(bx[0] * nx + bx[1] * nz) + b.hd * abs(bz[0] * nx + bz[1] * nz)
        if abs(dx * nx + dz * nz) > ra + rb + margin:
            return False
    return True


def _conflict(a: Rect, b: Rect, margin: float) -> bool:
    if not (a.solid or b.solid):
        return False
    if a.solid and b.solid:
        return rects_overlap(a, b, margin)
    solid, keep = (a, b) if a.solid else (b, a)
    return solid.top > keep.top and rects_overlap(a, b)


def box_arrays_contain(boxes: list[Box], points: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(N,) bool: whether each of N world points (N, 3) lies inside any box (grown by tol)."""
    if not boxes or len(points) == 0:
        return np.zeros(len(points), bool)
    c = np.array([b.center for b in boxes])
    h = np.array([b.size for b in boxes]) / 2 + tol
    yaw = np.array([b.yaw for b in boxes])
    d = points[:, None, :] - c[None]
    cs, sn = np.cos(yaw), np.sin(yaw)
    loc = np.stack([cs * d[..., 0] - sn * d[..., 2], d[..., 1],
                    sn * d[..., 0] + cs * d[..., 2]], -1)
    return np.all(np.abs(loc) <= h, axis=-1).any(axis=1)


class Layout:
    """Accumulates placed boxes, lights and footprints for one room."""

    def __init__(self, room: Room, rng: np.random.Generator):
        self.room, self.rng = room, rng
        self.rects: list[Rect] = []
        self.wall_spans: list[list[tuple[float, float, float, float]]] = [[], [], [], []]
        self.boxes: list[Box] = []
        self.lights: list[Light] = []

    def wall_length(self, wall: int) -> float:
        return self.room.width if wall % 2 == 0 else self.room.depth

    def wall_pose(self, wall: int, u: float, offset: float) -> tuple[float, float, float]:
        """(x, z, yaw) of the point `u` metres along `wall` and `offset` metres into the room,
        with yaw turning a group's front (+z) towards the room."""
        r = self.room
        return [(u, offset, 0.0), (r.width - offset, u, -math.pi / 2),
                (u, r.depth - offset, math.pi), (offset, u, math.pi / 2)][wall]

    def fits(self, rect: Rect, margin: float) -> bool:
        """Inside the room and in conflict with no footprint placed so far."""
        ex, ez = rect.extent()
        r = self.room
        if (rect.x - ex < -1e-6 or rect.x + ex > r.width + 1e-6 or rect.z - ez < -1e-6
                or rect.z + ez > r.depth + 1e-6 or rect.top > r.height):
            return False
        return not any(_conflict(rect, other, margin) for other in self.rects)

    def commit(self, g: Group, x: float, y: float, z: float, yaw: float,
               rects: list[Rect]) -> None:
        boxes, lights = g.place(x, y, z, yaw)
        self.boxes.extend(boxes)
        self.lights.extend(lights)
        self.rects.extend(rects)

    def against_wall(self, g: Group, wall: int | None = None, u: float | None = None,
                     tries: int = 25) -> tuple[int, float] | None:
        """Place a floor group with its back (-z) against a wall; returns (wall, u) or None."""
        for _ in range(tries if u is None else 1):
            w = int(self.rng.integers(4)) if wall is None else wall
            length = self.wall_length(w)
            if g.width + 0.02 > length:
                continue
            uu = (self.rng.uniform(g.width / 2 + 0.01, length - g.width / 2 - 0.01)
                  if u is None else u)
            x, z, yaw = self.wall_pose(w, uu, g.depth / 2 + self.rng.uniform(0.0, 0.04))
            rect = Rect(x, z, g.width / 2, g.depth / 2, yaw, g.height)
            if self.fits(rect, 0.03):
                self.commit(g, x, 0.0, z, yaw, [rect])
                return w, uu
        return None

    def free(self, g: Group, margin: float = 0.4, tries: int = 25
             ) -> tuple[float, float, float] | None:
        """Place a floor group anywhere (mostly aligned with the room) with `margin` metres of
        walkway to other solids; returns (x, z, yaw) or None."""
        r = self.room
        for _ in range(tries):
            if self.rng.random() < 0.7:
                yaw = int(self.rng.integers(4)) * math.pi / 2 + self.rng.uniform(-0.1, 0.1)
            else:
                yaw = self.rng.uniform(0, 2 * math.pi)
            rect0 = Rect(0, 0, g.width / 2, g.depth / 2, yaw, g.height)
            ex, ez = rect0.extent()
            if 2 * ex >= r.width or 2 * ez >= r.depth:
                continue
            x, z = self.rng.uniform(ex, r.width - ex), self.rng.uniform(ez, r.depth - ez)
            rect = Rect(x, z, g.width / 2, g.depth / 2, yaw, g.height)
            if self.fits(rect, margin):
                self.commit(g, x, 0.0, z, yaw, [rect])
                return x, z, yaw
        return None

    def on_wall(self, g: Group, y0: float, wall: int | None = None, keepout: float = 0.3,
                tries: int = 20) -> tuple[int, float] | None:
        """Mount a wall group (wall plane at its z = 0) with its origin at height `y0`.

        Its wall area may not overlap other wall items; a keep-out strip `keepout` metres deep
        in front admits only solids lower than the item's bottom edge."""
        y_lo = y0 + min(b.center[1] - b.size[1] / 2 for b in g.boxes)
        y_hi = y0 + max(b.center[1] + b.size[1] / 2 for b in g.boxes)
        if y_hi > self.room.height - 0.01:
            return None
        for _ in range(tries):
            w = int(self.rng.integers(4)) if wall is None else wall
            length = self.wall_length(w)
            lo, hi = g.width / 2 + 0.3, length - g.width / 2 - 0.3
            if lo >= hi:
                continue
            u = self.rng.uniform(lo, hi)
            if any(u - g.width / 2 - 0.1 < u1 and u + g.width / 2 + 0.1 > u0
                   and y_lo - 0.1 < v1 and y_hi + 0.1 > v0
                   for u0, u1, v0, v1 in self.wall_spans[w]):
                continue
            depth = max(keepout, g.depth)
            x, z, yaw = self.wall_pose(w, u, depth / 2)
            rect = Rect(x, z, g.width / 2, depth / 2, yaw, y_lo - 0.02, solid=False)
            if not self.fits(rect, 0.0):
                continue
            x0, z0, _ = self.wall_pose(w, u, 0.0)
            self.commit(g, x0, y0, z0, yaw, [rect])
            self.wall_spans[w].append((u - g.width / 2, u + g.width / 2, y_lo, y_hi))
            return w, u
        return None

    def hang(self, g: Group, x: float, z: float) -> None:
        """Hang a group from the ceiling (its top at local y = 0) above (x, z)."""
        self.commit(g, x, self.room.height, z, float(self.rng.uniform(0, math.pi)), [])


def _free_distance(room: Room, rects: list[Rect], x: float, z: float, height: float,
                   yaws: np.ndarray) -> np.ndarray:
    """Horizontal distance (m) from (x, z) along each yaw to the first wall or to a solid
    footprint taller than `height` - 0.5 m."""
    dx, dz = np.sin(yaws), np.cos(yaws)
    with np.errstate(divide="ignore"):
        tx = np.where(dx > 0, (room.width - x) / dx, np.where(dx < 0, -x / dx, np.inf))
        tz = np.where(dz > 0, (room.depth - z) / dz, np.where(dz < 0, -z / dz, np.inf))
    dist = np.minimum(tx, tz)
    for r in rects:
        if not r.solid or r.top < height - 0.5:
            continue
        ax, az = r.axes()
        ox, oz = (x - r.x) * ax[0] + (z - r.z) * ax[1], (x - r.x) * az[0] + (z - r.z) * az[1]
        lx, lz = dx * ax[0] + dz * ax[1], dx * az[0] + dz * az[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-r.hw - ox) / lx, (r.hw - ox) / lx
            t3, t4 = (-r.hd - oz) / lz, (r.hd - oz) / lz
        near = np.fmax(np.fmin(t1, t2), np.fmin(t3, t4))
        far = np.fmin(np.fmax(t1, t2), np.fmax(t3, t4))
        hit = (near <= far) & (near > 0)
        dist = np.where(hit, np.minimum(dist, near), dist)
    return dist


def _furniture_in_view(rects: list[Rect], x: float, z: float, yaws: np.ndarray) -> np.ndarray:
    """Number of solid footprints within +-30 deg of each yaw and more than 0.8 m away."""
    solids = [(r.x - x, r.z - z) for r in rects if r.solid]
    if not solids:
        return np.zeros(len(yaws))
    d = np.array(solids)
    bearing = np.arctan2(d[:, 0], d[:, 1])                       # yaw that looks at each
    diff = np.angle(np.exp(1j * (bearing[None] - yaws[:, None])))
    far = np.hypot(d[:, 0], d[:, 1]) > 0.8
    return ((np.abs(diff) < math.radians(30)) & far[None]).sum(1).astype(float)


def _camera_spot(lay: Layout, rng: np.random.Generator, attempt: int) -> tuple[float, float]:
    """A floor position for the camera: often 0.5-1.5 m in front of a wall (photos are mostly
    taken from the edge of a room, looking across it), else anywhere away from the walls."""
    r = lay.room
    margin = min(0.7 if attempt < 40 else 0.4, 0.3 * min(r.width, r.depth))
    x, z = rng.uniform(margin, r.width - margin), rng.uniform(margin, r.depth - margin)
    if rng.random() < 0.6:
        wall = int(rng.integers(4))
        off = min(rng.uniform(0.5, 1.5), (r.depth if wall % 2 == 0 else r.width) / 2)
        x, z = [(x, off), (r.width - off, z), (x, r.depth - off), (off, z)][wall]
    return x, z


def sample_camera(lay: Layout, rng: np.random.Generator) -> Camera:
    """A plausible handheld pose: 1.0-1.7 m high, pitch -30..+5 deg, roll +-3 deg, clear of
    walls and furniture, looking along a direction with open space, preferring furniture."""
    r = lay.room
    for attempt in range(80):
        x, z = _camera_spot(lay, rng, attempt)
        half = 0.3 if attempt < 40 else 0.12
        probe = Rect(x, z, half, half, 0.0, 10.0)
        if any(o.solid and rects_overlap(probe, o) for o in lay.rects):
            continue
        height = rng.uniform(1.0, min(1.7, r.height - 0.4))
        yaws = rng.uniform(0, 2 * math.pi) + np.arange(16) * (2 * math.pi / 16)
        dist = _free_distance(r, lay.rects, x, z, height, yaws)
        good = np.flatnonzero(dist >= min(2.0, 0.5 * dist.max()))
        score = (1.0 + _furniture_in_view(lay.rects, x, z, yaws[good])) ** 3
        yaw = float(rng.choice(yaws[good], p=score / score.sum()) + rng.uniform(-0.15, 0.15))
        pitch = -30 + 35 * rng.beta(2.0, 2.0)  # mean -12.5 deg: furniture fills more of the view
        cam = Camera(position=(x, height, z), yaw=yaw, pitch=math.radians(pitch),
                     roll=math.radians(rng.uniform(-3, 3)))
        if not box_arrays_contain(lay.boxes, np.array([cam.position]), 0.1)[0]:
            return cam
    return _fallback_camera(lay)


def _fallback_camera(lay: Layout) -> Camera:
    """First point of a grid over the room that is clear of every box, looking along +z."""
    r = lay.room
    h = min(1.4, r.height - 0.4)
    grid = [(x, h, z) for z in np.linspace(0.3, r.depth - 0.3, 12)
            for x in np.linspace(0.3, r.width - 0.3, 12)]
    inside = box_arrays_contain(lay.boxes, np.array(grid), 0.1)
    x, y, z = grid[int(np.argmin(inside))]
    return Camera(position=(float(x), y, float(z)), yaw=0.0, pitch=math.radians(-8))
