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


def floor_plane(depth: torch.Tensor, valid: torch.Tensor, floor: torch.Tensor, intrinsics: torch.Tensor,
                min_fraction: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The floor's plane in the camera frame, fitted by least squares to the back-projected pixels
    of `floor` (B, 1, H, W) bool: (B, 3) its unit normal pointing up (towards the camera), (B,) the
    camera's height above it in depth units, and (B,) where it is defined: at least `min_fraction`
    of the image is valid floor, and the plane is within 45 degrees of level (camera y points down)."""
    points = back_project(depth, intrinsics).flatten(2).transpose(1, 2)   # (B, HW, 3)
    weight = (floor & valid).flatten(1).to(depth.dtype)
    count = weight.sum(1)
    mean = (points * weight[..., None]).sum(1) / count.clamp_min(1)[:, None]
    centred = (points - mean[:, None]) * weight[..., None]
    scatter = centred.transpose(1, 2) @ centred + torch.eye(3, dtype=depth.dtype, device=depth.device) * 1e-6
    normal = torch.linalg.eigh(scatter)[1][..., 0]   # the direction of least spread
    normal = normal * torch.where((normal * mean).sum(1, keepdim=True) > 0, -1.0, 1.0)   # towards the camera
    height = -(normal * mean).sum(1)
    defined = (count >= min_fraction * floor[0].numel()) & (normal[:, 1] < -0.7) & (height > 0)
    return normal, height, defined


def height_above_floor(depth: torch.Tensor, valid: torch.Tensor, floor: torch.Tensor,
                       intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) each pixel's height above the floor plane fitted to `floor`'s pixels (depth
    units), and where it is defined (valid, in an image whose floor plane is)."""
    normal, height, defined = floor_plane(depth, valid, floor, intrinsics)
    above = (back_project(depth, intrinsics) * normal[:, :, None, None]).sum(1, keepdim=True) + height.view(-1, 1, 1, 1)
    return above, valid & defined.view(-1, 1, 1, 1)


def back_project(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) z-depth and (B, 4) fx, fy, cx, cy -> (B, 3, H, W) camera-frame points (x right,
    y down, z forward; pixel centres at u + 0.5)."""
    b, _, h, w = depth.shape
    fx, fy, cx, cy = (t.view(b, 1, 1, 1) for t in intrinsics.to(depth).unbind(-1))
    u = torch.arange(w, device=depth.device, dtype=depth.dtype).view(1, 1, 1, w) + 0.5
    v = torch.arange(h, device=depth.device, dtype=depth.dtype).view(1, 1, h, 1) + 0.5
    return torch.cat([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], dim=1)
