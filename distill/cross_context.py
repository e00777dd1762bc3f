"""Cross-context and assistant-guided distillation (Distill Any Depth, seed 004, section 3.2).

- Shared context: teacher and student see the same random crop (`sample_shared_crop`,
  `crop_batch`); the crop keeps the image's aspect (the paper's crops are square because its
  inputs are; ours are 4:5) and is resized back to the training size (static shapes for export).
- Local-global: the teacher labels overlapping patches of the student's input at its own input
  size, and each patch supervises the student's full-image prediction on that patch (eq. 8).
- Assistant: each step's labels come from the assistant with probability `ratio` (7:3).
All draws are functions of (seed, step): resumed runs and torchrun ranks agree.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[int, int, int, int]   # top, left, height, width in pixels
SPATIAL_NEAREST = ("depth", "valid", "teacher_depth")


def sample_shared_crop(height: int, width: int, *, min_frac: float, rng: np.random.Generator) -> Box:
    """A random crop with the image's aspect, side fraction uniform in [min_frac, 1]."""
    if not 0 < min_frac <= 1:
        raise ValueError(f"distill.crop_min={min_frac} must be in (0, 1]")
    frac = rng.uniform(min_frac, 1.0)
    h, w = max(2, int(round(height * frac))), max(2, int(round(width * frac)))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def crop_batch(batch: dict, box: Box, out_hw: tuple[int, int]) -> dict:
    """The batch cut to `box` and resized to `out_hw`: image bilinear; depth, masks and labels
    nearest (never interpolated across holes); intrinsics (B, 4) follow the crop and the resize."""
    top, left, h, w = box
    oh, ow = out_hw
    out = dict(batch)
    cut = lambda x: x[..., top:top + h, left:left + w]  # noqa: E731
    out["image"] = F.interpolate(cut(batch["image"]), size=out_hw, mode="bilinear", align_corners=False)
    for key in SPATIAL_NEAREST:
        if key in batch:
            x = cut(batch[key])
            out[key] = F.interpolate(x.float(), size=out_hw, mode="nearest").to(x.dtype)
    if "seg" in batch:
        out["seg"] = F.interpolate(cut(batch["seg"])[:, None].float(), size=out_hw, mode="nearest")[:, 0].long()
    if "intrinsics" in batch:
        sx, sy = ow / w, oh / h
        fx, fy, cx, cy = batch["intrinsics"].unbind(-1)
        # pixel centres: u' + 0.5 = (u + 0.5 - left) * sx
        out["intrinsics"] = torch.stack([fx * sx, fy * sy, (cx + 0.5 - left) * sx - 0.5,
                                         (cy + 0.5 - top) * sy - 0.5], dim=-1)
    return out


def overlapping_patches(height: int, width: int, grid: int) -> list[Box]:
    """grid x grid patches covering the image, neighbours overlapping by half a patch: a patch
    side is 2 / (grid + 1) of the image side (grid 2: 2/3), strided by half of it."""
    if grid < 1:
        raise ValueError(f"distill.local_global_grid={grid} must be >= 1")
    ph, pw = (2 * height // (grid + 1)) // 2 * 2, (2 * width // (grid + 1)) // 2 * 2
    if grid == 1:
        ph, pw = height, width
    tops = np.linspace(0, height - ph, grid).round().astype(int)
    lefts = np.linspace(0, width - pw, grid).round().astype(int)
    return [(int(t), int(l), ph, pw) for t in tops for l in lefts]


def local_global_loss(student_depth: Tensor, batch: dict, teacher, patches: list[Box],
                      loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], *,
                      teacher_hw: tuple[int, int] | None = None) -> Tensor:
    """Seed 004 eq. 8: mean over patches of loss_fn(student's full prediction on the patch,
    teacher's prediction on the patch alone). The teacher sees each patch resized to `teacher_hw`
    (default: the full input size, which real teachers prefer), its output resized back."""
    size = teacher_hw or tuple(batch["image"].shape[-2:])
    total = student_depth.new_zeros(())
    for top, left, h, w in patches:
        local = crop_batch(batch, (top, left, h, w), size)
        with torch.no_grad():
            label = F.interpolate(teacher(local).float(), size=(h, w), mode="bilinear", align_corners=False)
            cut_valid = F.interpolate(local["valid"].float(), size=(h, w), mode="nearest") > 0 \
                if "valid" in local else torch.ones_like(label, dtype=torch.bool)
        valid = (label > 0) & torch.isfinite(label)
        if teacher.needs_ground_truth:  # an embedded teacher has no opinion outside ground truth
            valid &= cut_valid
        total = total + loss_fn(student_depth[..., top:top + h, left:left + w], label, valid)
    return total / max(1, len(patches))


class AssistantSchedule:
    """Which teacher labels step `step`: the assistant with probability `ratio`, from a draw seeded
    by (seed, step) so every rank and every resume agree."""

    def __init__(self, ratio: float, seed: int):
        if not 0 <= ratio <= 1:
            raise ValueError(f"teacher.assistant_ratio={ratio} must be in [0, 1] (Distill Any Depth: 0.3)")
        self.ratio, self.seed = ratio, seed

    def use_assistant(self, step: int) -> bool:
        return bool(np.random.default_rng([self.seed, step, 0xA5]).random() < self.ratio)
