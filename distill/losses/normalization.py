"""Depth normalisations for pseudo-label distillation (Distill Any Depth, seed 004, eqs. 1-6).

`normalized_l1(pred, target, valid, mode)` compares student and teacher depth after normalising
each within its *contexts*: groups of an image's valid pixels that share a depth range. A level S
splits the pixels into S groups of (near-)equal count by the teacher's depth ranking (the paper's
"depth range divided into S segments"; equal-count quantile segments do not collapse to empty
groups on long-tailed depth). In a context u, d -> (d - median_u(d)) / mean_u(|d - median_u(d)|).

    none    plain L1 between raw depths (eq. 6)
    global  one context per image, S = 1 (eqs. 1-2: median / mean absolute deviation)
    hybrid  levels S in {1, 2, 4}: each pixel is in 3 contexts, its loss averaged over them (eq. 3)
    local   level S = 4 only (eq. 5)

Every mode but `none` is invariant to a per-image scale and shift of either input: it cannot
teach metres, so a metric recipe adds it to the metric loss (`distill.metric_weight`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.spaces import check_depth_tensors

LEVELS: dict[str, tuple[int, ...]] = {"global": (1,), "hybrid": (1, 2, 4), "local": (4,)}
MODES = ("none", *LEVELS)
EPS = 1e-6   # floor of a context's mean absolute deviation (a flat context normalises to 0)


def normalized_l1(pred: Tensor, target: Tensor, valid: Tensor, mode: str) -> Tensor:
    """Mean over valid pixels of |N(pred) - N(target)| averaged over each pixel's contexts.

    pred, target: (B, 1, H, W) depth in the same units; valid: (B, 1, H, W) bool. Returns a 0-d
    tensor; 0 with the graph kept when no pixel is valid.
    """
    if mode not in MODES:
        raise ValueError(f"normalization {mode!r} is not one of {', '.join(MODES)}")
    check_depth_tensors(pred, target, valid)
    pred, target = pred.float(), target.float()
    if not valid.any():
        return pred.sum() * 0.0
    if mode == "none":
        return (pred - target).abs()[valid].mean()
    quantile = depth_quantile(target, valid)
    per_pixel = torch.zeros_like(pred)
    for s in LEVELS[mode]:
        segment = torch.where(valid, (quantile * s).long().clamp_max(s - 1), torch.full_like(quantile, -1, dtype=torch.long))
        per_pixel = per_pixel + (normalize_in(pred, segment, s) - normalize_in(target, segment, s)).abs()
    return (per_pixel / len(LEVELS[mode]))[valid].mean()


def depth_quantile(target: Tensor, valid: Tensor) -> Tensor:
    """(B, 1, H, W) in [0, 1): each valid pixel's rank by target depth among its image's valid
    pixels, divided by their count (level S puts it in segment floor(S * quantile))."""
    b = target.shape[0]
    flat_t, flat_v = target.detach().reshape(b, -1), valid.reshape(b, -1)
    keyed = torch.where(flat_v, flat_t, torch.full_like(flat_t, float("inf")))  # invalid sort last
    ranks = torch.empty_like(flat_t)
    ranks.scatter_(1, keyed.argsort(dim=1), torch.arange(flat_t.shape[1], device=target.device,
                                                        dtype=flat_t.dtype).expand(b, -1))
    return (ranks / flat_v.sum(dim=1, keepdim=True).clamp_min(1)).reshape(target.shape)


def normalize_in(x: Tensor, segment: Tensor, segments: int) -> Tensor:
    """x normalised by the median and mean absolute deviation of its pixel's segment.

    x: (B, 1, H, W); segment: (B, 1, H, W) int64 in [0, segments), -1 where invalid (-> 0 out).
    Dense (B, S, H*W) masks and `nanmedian` keep it a few fused kernels (no loop over contexts).
    """
    b = x.shape[0]
    flat = x.reshape(b, 1, -1)
    member = segment.reshape(b, 1, -1) == torch.arange(segments, device=x.device).view(1, segments, 1)
    median = torch.where(member, flat, torch.full_like(flat, float("nan"))).nanmedian(dim=2).values
    median = torch.nan_to_num(median).unsqueeze(2)                     # empty segment: unused
    count = member.sum(dim=2, keepdim=True).clamp_min(1)
    mad = ((flat - median).abs() * member).sum(dim=2, keepdim=True) / count
    normalized = (flat - median) / mad.clamp_min(EPS)
    return (normalized * member).sum(dim=1).reshape(x.shape)
