"""Cross-context and assistant-guided distillation (Distill Any Depth, seed 004, section 3.2).

- Shared context (eq. 7): teacher and student see the same random crop (`sample_shared_crop`,
  `crop_batch`). The paper's crops are square because its inputs are; ours are not (e.g. 4:5), so
  a crop keeps the image's aspect and is resized back to the training size (static shapes for
  export, and no distortion of the scene's geometry).
- Local-global (eq. 8): the teacher labels overlapping patches of the student's input, each seen
  alone at the teacher's input size (`overlapping_patches`, `local_global_loss`), and each patch
  supervises the student's full-image prediction where they overlap.
- Assistant: each step's labels come from the assistant with probability `ratio` (7:3,
  `AssistantSchedule`).
All draws are functions of (seed, step): resumed runs and torchrun ranks agree.

Boxes are (top, left, height, width) in pixels of the batch's images.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.transforms import keyed_rng

Box = tuple[int, int, int, int]   # top, left, height, width in pixels
SPATIAL_NEAREST = ("depth", "valid", "teacher_depth")   # (B, 1, H, W): never interpolated across holes
STALE_AFTER_CROP = ("teacher_features",)                # describe the uncropped image: dropped


def sample_shared_crop(height: int, width: int, *, min_frac: float, rng: np.random.Generator) -> Box:
    """A random crop with the image's aspect ratio, side fraction uniform in [min_frac, 1].

    Both sides are the same fraction of the image's sides (rounded to pixels, at least 2), the
    position uniform among those that fit.
    """
    if not 0 < min_frac <= 1:
        raise ValueError(f"distill.crop_min={min_frac} must be in (0, 1] (a fraction of the image side; "
                         f"0.5 keeps crops at least half the image)")
    if height < 2 or width < 2:
        raise ValueError(f"cannot crop a {height}x{width} image; images need at least 2x2 pixels")
    frac = rng.uniform(min_frac, 1.0)
    h, w = max(2, int(round(height * frac))), max(2, int(round(width * frac)))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def check_box(box: Box, height: int, width: int) -> None:
    top, left, h, w = box
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"crop box (top, left, h, w)={tuple(box)} does not lie inside the {height}x{width} "
                         f"image; use sample_shared_crop / overlapping_patches to make boxes")


def crop_batch(batch: dict, box: Box, out_hw: tuple[int, int]) -> dict:
    """The batch cut to `box` and resized to `out_hw` (a new dict; the input is not modified).

    image (B, 3, H, W): bilinear, align_corners=False. depth, valid, teacher_depth (B, 1, H, W)
    and seg (B, H, W): nearest (pixel-centre nearest, "nearest-exact"), so no label or depth is
    interpolated across a hole or an edge; dtypes are kept. intrinsics (B, 4) fx, fy, cx, cy in
    pixels follow the crop and the resize (pixel-centre convention of align_corners=False:
    u' + 0.5 = (u + 0.5 - left) * out_w / w). Other keys (index, flipped) are kept; keys that
    describe the uncropped image (teacher_features) are dropped.
    """
    top, left, h, w = box
    check_box(box, *batch["image"].shape[-2:])
    oh, ow = out_hw
    if oh < 1 or ow < 1:
        raise ValueError(f"crop output size {tuple(out_hw)} must be positive (height, width)")
    out = {k: v for k, v in batch.items() if k not in STALE_AFTER_CROP}

    def cut(x: Tensor) -> Tensor:
        return x[..., top:top + h, left:left + w]

    out["image"] = F.interpolate(cut(batch["image"]), size=out_hw, mode="bilinear", align_corners=False)
    for key in SPATIAL_NEAREST:
        if key in batch:
            x = cut(batch[key])
            out[key] = F.interpolate(x.float(), size=out_hw, mode="nearest-exact").to(x.dtype)
    if "seg" in batch:
        seg = cut(batch["seg"])[:, None].float()
        out["seg"] = F.interpolate(seg, size=out_hw, mode="nearest-exact")[:, 0].to(batch["seg"].dtype)
    if "intrinsics" in batch:
        sx, sy = ow / w, oh / h
        fx, fy, cx, cy = batch["intrinsics"].unbind(-1)
        # The project's pixel centres are at u + 0.5 (SynthRooms' camera, hflip_intrinsics): a crop
        # shifts the principal point, a resize scales it with the image.
        out["intrinsics"] = torch.stack([fx * sx, fy * sy, (cx - left) * sx, (cy - top) * sy], dim=-1)
    return out


def overlapping_patches(height: int, width: int, grid: int) -> list[Box]:
    """grid x grid patches covering the image, neighbours overlapping by at least half a patch.

    Geometry: a patch side is 2 / (grid + 1) of the image side, rounded up to a multiple of 2
    (grid 2: 2/3 H x 2/3 W), so grid patches strided by half a patch span the image. The first
    and last patches touch the image borders and the others are evenly spaced between (integer
    positions); the stride is at most half a patch (less where rounding up left slack).
    grid 1 is the whole image. Row-major order: [(top_0, left_0), (top_0, left_1), ...].
    """
    if grid < 1:
        raise ValueError(f"distill.local_global_grid={grid} must be >= 1 (patches per side; 2 gives 4 patches)")
    if grid == 1:
        return [(0, 0, height, width)]
    ph, pw = patch_side(height, grid), patch_side(width, grid)
    if height - ph < grid - 1 or width - pw < grid - 1:   # patches would not fit or would repeat
        raise ValueError(f"distill.local_global_grid={grid} is too fine for a {height}x{width} image "
                         f"(patches of {ph}x{pw} pixels); use a smaller grid")
    tops = np.linspace(0, height - ph, grid).round().astype(int)
    lefts = np.linspace(0, width - pw, grid).round().astype(int)
    return [(int(t), int(l), ph, pw) for t in tops for l in lefts]


def patch_side(side: int, grid: int) -> int:
    """ceil(2 * side / (grid + 1)) rounded up to even: half of it is a whole-pixel stride."""
    p = -(-2 * side // (grid + 1))
    return p + p % 2


def local_global_loss(student_depth: Tensor, batch: dict, teacher, patches: list[Box],
                      loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], *,
                      teacher_hw: tuple[int, int] | None = None) -> Tensor:
    """Seed 004 eq. 8: mean over patches of loss_fn(student's full-image prediction cut to the
    patch, teacher's prediction on the patch alone, valid).

    student_depth: (B, 1, H, W), the student's prediction on the whole batch image (H, W);
    batch: the sample schema at (H, W); teacher: a `Teacher` (called without gradient);
    patches: boxes in (H, W); loss_fn: a depth loss (pred, target, valid) -> 0-d.
    The teacher sees each patch resized to `teacher_hw` (default (H, W): real teachers prefer
    their full input size); its output is resized back to the patch's pixels by mask-normalised
    bilinear interpolation, so pixels where the teacher has no opinion (0 or non-finite) neither
    leak into their neighbours nor count. For a teacher that reads ground truth (embedded ones)
    the patch's own `valid` mask is applied too. Returns a 0-d tensor; gradients reach only
    `student_depth`.
    """
    if student_depth.dim() != 4 or student_depth.shape[-2:] != batch["image"].shape[-2:]:
        raise ValueError(f"student_depth {tuple(student_depth.shape)} must be (B, 1, H, W) at the batch's "
                         f"image size {tuple(batch['image'].shape[-2:])}: the full-image prediction")
    if not patches:
        raise ValueError("local_global_loss needs at least one patch (see overlapping_patches)")
    size = tuple(teacher_hw or batch["image"].shape[-2:])
    total = student_depth.new_zeros((), dtype=torch.float32)
    for top, left, h, w in patches:
        with torch.no_grad():
            label, known = resize_label(teacher(crop_batch(batch, (top, left, h, w), size)), (h, w))
            if teacher.needs_ground_truth and "valid" in batch:
                known &= batch["valid"][..., top:top + h, left:left + w]
        total = total + loss_fn(student_depth[..., top:top + h, left:left + w], label, known)
    return total / len(patches)


def resize_label(label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, 1, h, w) depth with holes (0 or non-finite) -> ((B, 1, *size) depth, bool mask).

    Bilinear over the known pixels only (normalised by the interpolated mask); a pixel is known
    when every source pixel it reads is known.
    """
    label = label.float()
    known = (label > 0) & torch.isfinite(label)
    num = F.interpolate(torch.where(known, label, torch.zeros_like(label)), size=size, mode="bilinear",
                        align_corners=False)
    den = F.interpolate(known.float(), size=size, mode="bilinear", align_corners=False)
    ok = den > 1 - 1e-4
    return torch.where(ok, num / den.clamp_min(1e-6), torch.zeros_like(num)), ok


class AssistantSchedule:
    """Which teacher labels step `step`: the assistant with probability `ratio`.

    The draw is seeded by (seed, step) alone, so every torchrun rank and every resumed run makes
    the same choice at the same step (seed 004: primary : assistant = 7 : 3, ratio 0.3).
    """

    def __init__(self, ratio: float, seed: int):
        if not 0 <= ratio <= 1:
            raise ValueError(f"teacher.assistant_ratio={ratio} must be in [0, 1] (Distill Any Depth: 0.3)")
        if int(seed) < 0:
            raise ValueError(f"train.seed={seed} must be >= 0 (it seeds the assistant schedule)")
        self.ratio, self.seed = float(ratio), int(seed)

    def use_assistant(self, step: int) -> bool:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return bool(keyed_rng(0xA5, self.seed, step).random() < self.ratio)   # not a scene's stream
