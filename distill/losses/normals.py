"""Surface normals of a depth map, and the distance of predicted normals from them: the target of
v3's training-only normal head (`loss.normal_weight`, distill/training/objective.py); and virtual
normals (`loss.virtual_normal_weight`): planes through random triplets of back-projected pixels,
which hold a depth map's 3D shape across the whole image (Yin et al. 2019, "Enforcing geometric
constraints of virtual normal for depth prediction")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def surface_normals(depth: torch.Tensor, valid: torch.Tensor, intrinsics: torch.Tensor,
                    max_log_step: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) z-depth, its mask and (B, 4) fx, fy, cx, cy in pixels of this resolution ->
    (B, 3, H, W) unit normals facing the camera (x right, y down, z forward; central differences of
    the back-projected points, pixel centres at u + 0.5; zero on the border rows and columns) and
    where they are defined: the 3x3 neighbourhood valid and inside the image, and its log-depth
    spanning less than 2 x `max_log_step` (a depth edge has no surface normal; nor, at this
    threshold, a plane seen at a grazing angle, such as the floor's far rows at 128x160)."""
    b, _, h, w = depth.shape
    fx, fy, cx, cy = (t.view(b, 1, 1, 1) for t in intrinsics.to(depth).unbind(-1))
    u = torch.arange(w, device=depth.device, dtype=depth.dtype).view(1, 1, 1, w) + 0.5
    v = torch.arange(h, device=depth.device, dtype=depth.dtype).view(1, 1, h, 1) + 0.5
    points = torch.cat([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], dim=1)
    along_u = F.pad(points[..., :, 2:] - points[..., :, :-2], (1, 1, 0, 0))
    along_v = F.pad(points[..., 2:, :] - points[..., :-2, :], (0, 0, 1, 1))
    normal = torch.cross(along_u, along_v, dim=1)
    normal = normal * torch.where((normal * points).sum(1, keepdim=True) > 0, -1.0, 1.0)   # towards the camera
    log_depth = torch.log(depth.clamp_min(1e-6))
    spread = (F.max_pool2d(log_depth.masked_fill(~valid, -1e4), 3, 1, 1)
              + F.max_pool2d((-log_depth).masked_fill(~valid, -1e4), 3, 1, 1))   # max - min over 3x3
    all_valid = -F.max_pool2d(-valid.float(), 3, 1, 1) > 0.5
    inside = torch.zeros_like(valid)
    inside[..., 1:-1, 1:-1] = True
    return F.normalize(normal, dim=1), (spread < 2 * max_log_step) & all_valid & inside


def cosine_distance(pred: torch.Tensor, normals: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(pred, normals) over the `defined` pixels; `pred` (B, 3, H, W) of any length.
    Zero (with a gradient path) where nothing is defined."""
    normals = torch.where(defined, normals, torch.zeros_like(normals))   # nothing undefined reaches a gradient
    cos = (F.normalize(pred, dim=1) * normals).sum(1, keepdim=True)
    return (1 - cos)[defined].mean() if defined.any() else pred.sum() * 0


Vec = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # x, y, z of many 3-vectors (componentwise: fast on a CPU)


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vec, b: Vec) -> Vec:
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def _length(a: Vec) -> torch.Tensor:
    return _dot(a, a).clamp_min(1e-12).sqrt()


def _unit(a: Vec) -> Vec:
    norm = _length(a)
    return a[0] / norm, a[1] / norm, a[2] / norm


def virtual_normal_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, intrinsics: torch.Tensor,
                        triplets: int = 2048, min_angle_deg: float = 30.0) -> torch.Tensor:
    """Mean L1 distance between the unit normals of the planes through the same random pixel
    triplets of the predicted and the target (B, 1, H, W) depth, back-projected with (B, 4)
    intrinsics (L1: about the angle, so small errors keep a gradient). A triplet counts where its
    three pixels are valid and the target's triangle has no angle under `min_angle_deg`
    (near-collinear points have no stable plane; nor has a pixel drawn twice). Draws from torch's
    global RNG."""
    b, _, h, w = pred.shape
    index = torch.randint(0, h * w, (b, 3 * triplets), device=pred.device)
    fx, fy, cx, cy = (t.view(b, 1) for t in intrinsics.to(pred).unbind(-1))
    ray_x = ((index % w).to(pred.dtype) + 0.5 - cx) / fx
    ray_y = (torch.div(index, w, rounding_mode="floor").to(pred.dtype) + 0.5 - cy) / fy

    def corners(depth: torch.Tensor) -> tuple[Vec, Vec, Vec]:
        """The triangles' vertices: three (x, y, z) of (B, T) each."""
        z = depth.reshape(b, -1).gather(1, index)
        xyz = [(c.view(b, 3, triplets)) for c in (ray_x * z, ray_y * z, z)]
        return tuple((xyz[0][:, k], xyz[1][:, k], xyz[2][:, k]) for k in range(3))

    def edges(p: tuple[Vec, Vec, Vec]) -> tuple[Vec, Vec, Vec]:
        return tuple(tuple(q - o for q, o in zip(p[j], p[i])) for i, j in ((0, 1), (0, 2), (1, 2)))

    target = torch.where(valid, target, torch.ones_like(target))   # no NaN from invalid pixels
    e01, e02, e12 = edges(corners(target))
    u01, u02, u12 = _unit(e01), _unit(e02), _unit(e12)
    cos_max = math.cos(math.radians(min_angle_deg))
    well_shaped = ((_dot(u01, u02) < cos_max) & (-_dot(u01, u12) < cos_max) & (_dot(u02, u12) < cos_max)
                   & (torch.minimum(torch.minimum(_length(e01), _length(e02)), _length(e12)) > 1e-4))   # a pixel drawn twice
    counted = valid.reshape(b, -1).gather(1, index).view(b, 3, triplets).all(1) & well_shaped
    if not counted.any():
        return pred.sum() * 0
    p01, p02, _ = edges(corners(pred))
    n_pred, n_target = _unit(_cross(p01, p02)), _unit(_cross(e01, e02))
    distance = sum((a - t).abs() for a, t in zip(n_pred, n_target))
    return distance[counted].mean()
