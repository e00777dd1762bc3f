"""Segmentation loss: pixel-wise cross-entropy that ignores unlabelled pixels without NaN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.classes import IGNORE_INDEX


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the labelled pixels of the batch.

    logits: (B, C, H, W) float, unnormalised class scores (computed in float32, autocast-safe).
    target: (B, H, W) integer class ids in [0, C), `ignore_index` for unlabelled pixels.
    Returns a 0-d float32 tensor. When every pixel is ignored (an unlabelled crop) it returns a 0
    that keeps the graph (all gradients 0), where `F.cross_entropy(reduction="mean")` gives NaN.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}.")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = {(b, h, w)} to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}; "
                         "drop a channel dimension with `.squeeze(1)`.")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids (int64), got dtype {target.dtype}; "
                         "convert with `.long()` after checking the values are ids.")
    per_pixel = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index,
                                reduction="none")  # 0 at ignored pixels
    labelled = (target != ignore_index).sum()
    return per_pixel.sum() / labelled.clamp_min(1)
