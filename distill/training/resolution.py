"""Progressive resizing (`train.half_res_epochs`): the first epochs train on batches at half resolution.

A halved image shows the same scene through the same field of view, so its metric depth is the
same: unlike a crop (which drops context) or a crop resized up (which zooms, and a metric student
then sees the same metres at another apparent distance: README, Distill Any Depth options), nothing
the student must learn about metres changes, and a step costs about half (fixed per-layer costs
dominate at 64x80 on a CPU). The last epochs at full resolution adapt the filters and the batch
statistics to the size that is evaluated and shipped (Touvron et al. 2019, "Fixing the train-test
resolution discrepancy").

The halved batch is padded to the students' input multiple (64x80 -> 64x96): the image by
repeating its border, every label as unknown there (depth 0 and invalid, segmentation ignored),
so no loss reads a padded pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.data.classes import IGNORE_INDEX
from distill.training.cross_context import crop_batch

# what a padded pixel holds per key: labels unknown there (teacher_depth 0 is "no opinion": depth_target)
PAD_VALUES = {"depth": 0.0, "valid": False, "teacher_depth": 0.0, "seg": IGNORE_INDEX}


def half_resolution(batch: dict, multiple: int) -> dict:
    """The batch at half its height and width (a new dict), padded on every side to sides that are
    multiples of `multiple`. The image is averaged over 2x2 blocks (bilinear at exactly half is
    their mean); depth, masks and labels are sampled (crop_batch: never interpolated across an
    edge); intrinsics follow the resize and the padding."""
    height, width = batch["image"].shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"half resolution needs even image sides, got {height}x{width}")
    out = crop_batch(batch, (0, 0, height, width), (height // 2, width // 2))
    return pad_to_multiple(out, multiple)


def pad_to_multiple(batch: dict, multiple: int) -> dict:
    """Pad the batch's spatial tensors to sides that are multiples of `multiple`, centred."""
    height, width = batch["image"].shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return batch
    top, left = pad_h // 2, pad_w // 2
    sides = (left, pad_w - left, top, pad_h - top)   # F.pad's order: last axis first
    out = dict(batch)
    out["image"] = F.pad(batch["image"], sides, mode="replicate")
    for key, value in PAD_VALUES.items():
        if key in batch:
            x = batch[key]
            out[key] = F.pad(x, sides, value=value) if x.dtype != torch.bool else \
                F.pad(x.to(torch.uint8), sides, value=int(value)).bool()
    if "intrinsics" in batch:
        fx, fy, cx, cy = batch["intrinsics"].unbind(-1)
        out["intrinsics"] = torch.stack([fx, fy, cx + left, cy + top], dim=-1)
    return out
