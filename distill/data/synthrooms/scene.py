"""Scene description for SynthRooms: materials, boxes, the room, lights and the camera.

World frame: metres, y up. The room is the box [0, width] x [0, height] x [0, depth] (x, y, z):
floor at y = 0, ceiling at y = height, walls at z = 0 (wall 0), x = width (wall 1), z = depth
(wall 2) and x = 0 (wall 3). Camera frame: OpenCV (x right, y down, z forward); the pixel
(u, v) covers [u, u + 1) x [v, v + 1) in image coordinates, so its centre ray goes through
(u + 0.5, v + 0.5).
With this convention scaling intrinsics with the image is exact and a horizontal flip maps
cx -> W - cx.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Vec3 = tuple[float, float, float]

# NYU Depth V2 colour camera (Silberman et al.) at 640x480: fx, fy, cx, cy in pixels.
NYU_INTRINSICS: tuple[float, float, float, float] = (518.8579, 519.4696, 325.5824, 253.7362)
NYU_SIZE: tuple[int, int] = (480, 640)  # (height, width) the intrinsics above refer to

PATTERNS: tuple[str, ...] = ("plain", "stripes", "checker", "wood", "noise", "tiles", "planks",
                             "sky", "screen")


@dataclass(frozen=True)
class Material:
    """Procedural surface appearance.

    `color` and `color2` are linear-RGB albedos in [0, 1] mixed by `pattern`, evaluated from the
    surface's own coordinates in metres; `scale` is the pattern frequency in cycles per metre,
    `angle` its rotation in the surface plane (radians), `jitter` four numbers in [0, 1) used as
    phases and offsets. `emission` > 0 makes the surface self-lit (windows, screens, lamps): its
    radiance is `emission * albedo` and lights do not shade it.
    """
    color: Vec3 = (0.6, 0.6, 0.6)
    color2: Vec3 = (0.3, 0.3, 0.3)
    pattern: str = "plain"
    scale: float = 1.0
    angle: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    emission: float = 0.0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"Material pattern {self.pattern!r} is unknown; valid patterns: "
                             f"{', '.join(PATTERNS)}.")


@dataclass(frozen=True)
class Box:
    """A solid box: `center` (world, m), full `size` (x, y, z extents in m before rotation),
    `yaw` (radians, rotation about +y: local +z maps to (sin yaw, 0, cos yaw)), NYU13 `label`."""
    center: Vec3
    size: Vec3
    label: int
    yaw: float = 0.0
    material: Material = field(default_factory=Material)

    def __post_init__(self) -> None:
        if min(self.size) <= 0:
            raise ValueError(f"Box size must be positive in every axis, got {self.size}.")
        if not 0 <= self.label < 13:
            raise ValueError(f"Box label must be an NYU13 id in 0..12, got {self.label}.")

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> box-local coordinates (..., 3), origin at the centre."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = np.asarray(points, dtype=np.float64) - np.asarray(self.center)
        return np.stack([c * d[..., 0] - s * d[..., 2], d[..., 1], s * d[..., 0] + c * d[..., 2]],
                        axis=-1)

    def contains(self, points: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Bool mask (...) of world points (..., 3) inside the box grown by `tol` metres."""
        half = np.asarray(self.size) / 2 + tol
        return np.all(np.abs(self.to_local(points)) <= half, axis=-1)

    def corners(self) -> np.ndarray:
        """(8, 3) world coordinates of the corners."""
        signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
        local = signs * np.asarray(self.size) / 2
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        world = np.stack([c * local[:, 0] + s * local[:, 2], local[:, 1],
                          -s * local[:, 0] + c * local[:, 2]], axis=-1)
        return world + np.asarray(self.center)


def _grey(v: float) -> Material:
    return Material(color=(v, v, v), color2=(v, v, v))


@dataclass(frozen=True)
class Room:
    """Closed box room [0, width] x [0, height] x [0, depth] in metres (x, y up, z)."""
    width: float
    height: float
    depth: float
    floor: Material = field(default_factory=lambda: _grey(0.45))
    ceiling: Material = field(default_factory=lambda: _grey(0.85))
    walls: tuple[Material, Material, Material, Material] = field(
        default_factory=lambda: (_grey(0.7),) * 4)

    def __post_init__(self) -> None:
        if min(self.width, self.height, self.depth) <= 0:
            raise ValueError(f"Room dimensions must be positive, got width={self.width}, "
                             f"height={self.height}, depth={self.depth}.")
        if len(self.walls) != 4:
            raise ValueError(f"Room needs 4 wall materials (z=0, x=W, z=D, x=0), got "
                             f"{len(self.walls)}.")

    @property
    def size(self) -> np.ndarray:
        return np.array([self.width, self.height, self.depth], dtype=np.float64)


@dataclass(frozen=True)
class Light:
    """Point light at `position` (world, m). Irradiance on a surface facing it at distance d is
    `intensity * color / (d**2 + radius**2)` (the radius softens the singularity near the light)."""
    position: Vec3
    color: Vec3 = (1.0, 1.0, 1.0)
    intensity: float = 4.0
    radius: float = 0.5


@dataclass(frozen=True)
class Camera:
    """Pinhole camera. `yaw` (about +y, 0 looks along +z), `pitch` (positive looks up) and `roll`
    (about the optical axis) in radians; `intrinsics` (fx, fy, cx, cy) in pixels at `ref_size`
    (height, width), by default NYU Depth V2 at 640x480."""
    position: Vec3
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    intrinsics: tuple[float, float, float, float] = NYU_INTRINSICS
    ref_size: tuple[int, int] = NYU_SIZE

    def rotation(self) -> np.ndarray:
        """(3, 3) float64 world-from-camera rotation; columns are the camera's right, down and
        forward axes in world coordinates."""
        cp = math.cos(self.pitch)
        fwd = np.array([math.sin(self.yaw) * cp, math.sin(self.pitch), math.cos(self.yaw) * cp])
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        right, down = cr * right + sr * down, -sr * right + cr * down
        return np.stack([right, down, fwd], axis=1)

    def intrinsics_at(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels for an image of `height` x `width`."""
        fx, fy, cx, cy = self.intrinsics
        sy, sx = height / self.ref_size[0], width / self.ref_size[1]
        return fx * sx, fy * sy, cx * sx, cy * sy

    def ray_directions(self, height: int, width: int) -> np.ndarray:
        """(H, W, 3) float64 world directions of the pixel-centre rays, scaled so that their
        component along the optical axis is 1: `position + z * dir` is the point at z-depth z."""
        fx, fy, cx, cy = self.intrinsics_at(height, width)
        x = (np.arange(width) + 0.5 - cx) / fx
        y = (np.arange(height) + 0.5 - cy) / fy
        cam = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 1.0), axis=-1)
        return cam @ self.rotation().T

    def backproject(self, depth: np.ndarray) -> np.ndarray:
        """World points (H, W, 3) of a z-depth map (H, W) in metres."""
        h, w = depth.shape
        return np.asarray(self.position) + depth[..., None] * self.ray_directions(h, w)


@dataclass(frozen=True)
class Scene:
    """Everything `render` needs besides the camera.

    `lights`: empty means one default light under the ceiling centre. `ambient`: ambient
    irradiance (same units as lights' irradiance) with colour `ambient_color`. `exposure`: target
    linear brightness of the 75th-percentile pixel before gamma (auto exposure). `white_balance`:
    per-channel camera gains. `noise`: sensor noise standard deviation in [0, 1] units of the
    8-bit output. `vignette`: relative darkening at the image corners. `seed`: noise stream.
    """
    room: Room
    objects: tuple[Box, ...] = ()
    lights: tuple[Light, ...] = ()
    ambient: float = 0.25
    ambient_color: Vec3 = (1.0, 1.0, 1.0)
    exposure: float = 0.55
    white_balance: Vec3 = (1.0, 1.0, 1.0)
    noise: float = 0.0
    vignette: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "lights", tuple(self.lights))
        if len(self.objects) >= 65535:
            raise ValueError(f"A scene holds at most 65534 boxes, got {len(self.objects)}.")

    def effective_lights(self) -> tuple[Light, ...]:
        """The lights to shade with (a default ceiling light when none are given)."""
        if self.lights:
            return self.lights
        r = self.room
        return (Light(position=(r.width / 2, r.height - 0.2, r.depth / 2)),)
