"""Surface normals of a depth map, and the distance of predicted normals from them: the target of
v3's training-only normal head (`loss.normal_weight`, distill/training/objective.py)."""
from __future__ import annotations

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
