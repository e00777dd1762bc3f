"""Depth normalisations for pseudo-label distillation (Distill Any Depth, seed 004, eqs. 1-6).

`normalized_l1(pred, target, valid, mode)` compares student and teacher depth after normalising
each within its *contexts*: groups of an image's valid pixels that share a depth range. A level S
splits an image's valid pixels into S groups of (near-)equal pixel count by the teacher's
(target's) depth ranking: the paper's "dividing the depth range into S segments", with segment
borders at the target's depth quantiles (equal-count segments stay populated on long-tailed depth,
where equal-width depth bins leave some nearly empty and let one outlier define a context). In a
context u, each of pred and target is normalised separately (eq. 1):

    N_u(d) = (d - median_u(d)) / mean_u(|d - median_u(d)|)

    none    plain L1 between raw depths (eq. 6)
    global  one context per image, S = 1 (eqs. 1-2: median / mean absolute deviation)
    hybrid  levels S in {1, 2, 4}: each pixel is in 3 contexts, its loss averaged over them (eq. 3)
    local   level S = 4 only (eq. 5)

The per-pixel losses are averaged over the valid pixels of the whole batch (eq. 4). Every mode but
`none` is invariant to a per-image scale a > 0 and shift of either input: it cannot teach metres,
so a metric recipe adds it to the metric loss (`distill.metric_weight`).

Cost: one sort of pred and one of target per call (B rows of H*W), then per level a cumulative
count over (B, S, H*W) and scatter-adds; no loop over pixels, images or contexts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.spaces import check_depth_tensors

LEVELS: dict[str, tuple[int, ...]] = {"global": (1,), "hybrid": (1, 2, 4), "local": (4,)}
MODES = ("none", *LEVELS)
# Floor of a context's mean absolute deviation, in the inputs' depth units. A flat context (a
# wall facing the camera inside one depth segment) has a deviation near 0; with the floor its
# normalised values keep mean |N_u| <= 1, so a flat context can never blow the loss up.
EPS = 1e-6


def normalized_l1(pred: Tensor, target: Tensor, valid: Tensor, mode: str) -> Tensor:
    """Mean over valid pixels of |N_u(pred) - N_u(target)| averaged over each pixel's contexts.

    pred, target: (B, 1, H, W) depth in the same units (values at invalid pixels are never read:
    NaN there is fine); valid: (B, 1, H, W) bool; mode: one of `MODES`. Returns a 0-d float32
    tensor; 0 with the graph kept (gradient 0) when no pixel is valid.
    """
    per_pixel, valid = normalized_l1_map(pred, target, valid, mode)
    count = valid.sum()
    return per_pixel.sum() / count.clamp_min(1)   # per_pixel is an exact 0 off `valid`


def normalized_l1_map(pred: Tensor, target: Tensor, valid: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-pixel loss of eq. 3 (B, 1, H, W) float32, 0 at invalid pixels, and `valid`.

    Exposed so that tests (and visualisations) can ask which pixels a mode penalises.
    """
    if mode not in MODES:
        raise ValueError(f"normalization {mode!r} is not one of {', '.join(MODES)}; "
                         f"set distill.normalization to one of them")
    check_depth_tensors(pred, target, valid)
    zero = torch.zeros((), dtype=torch.float32, device=pred.device)
    # torch.where (not a multiply) keeps NaN at invalid pixels out of values and gradients.
    pred, target = torch.where(valid, pred.float(), zero), torch.where(valid, target.float(), zero)
    if mode == "none":
        return torch.where(valid, (pred - target).abs(), zero), valid
    b = pred.shape[0]
    p, t, v = pred.reshape(b, -1), target.reshape(b, -1), valid.reshape(b, -1)
    order_p, order_t = valid_first_order(p, v), valid_first_order(t, v)
    rank = torch.empty_like(order_t)
    rank.scatter_(1, order_t, torch.arange(t.shape[1], device=t.device).expand(b, -1))
    n_valid = v.sum(dim=1, keepdim=True)
    per_pixel = torch.zeros_like(p)
    for segments in LEVELS[mode]:
        # segment of a valid pixel: floor(S * rank / n); -1 marks invalid pixels
        segment = torch.where(v, rank * segments // n_valid.clamp_min(1), torch.full_like(rank, -1))
        per_pixel = per_pixel + (robust_normalize(p, segment, segments, order_p)
                                 - robust_normalize(t, segment, segments, order_t)).abs()
    per_pixel = torch.where(v, per_pixel / len(LEVELS[mode]), zero)
    return per_pixel.reshape(pred.shape), valid


def valid_first_order(x: Tensor, valid: Tensor) -> Tensor:
    """(B, N) int64: per row, the indices that sort `x` ascending with the invalid pixels last.

    The sort is stable, so ties keep pixel order and equal depths split between neighbouring
    segments deterministically. Ranking is not differentiable: it reads `x` detached.
    """
    keyed = torch.where(valid, x.detach(), torch.full_like(x, float("inf")))
    return keyed.argsort(dim=1, stable=True)


def robust_normalize(x: Tensor, segment: Tensor, segments: int, order: Tensor) -> Tensor:
    """x normalised by the median and mean absolute deviation of its pixel's segment (eq. 1).

    x: (B, N) float32, 0 at invalid pixels; segment: (B, N) int64 in [0, segments), -1 where
    invalid; order: `valid_first_order(x, ...)`. Returns (B, N), 0 at invalid pixels. Gradients
    reach x through the deviations, the median pixel (as torch.median's) and the scale.
    """
    median = segment_median(x, segment, segments, order)                  # (B, S)
    member = segment >= 0
    index = segment.clamp_min(0)
    deviation = x - median.gather(1, index)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    abs_dev = torch.where(member, deviation.abs(), zero)
    count = torch.zeros_like(median).scatter_add_(1, index, member.to(x.dtype))
    mad = torch.zeros_like(median).scatter_add(1, index, abs_dev) / count.clamp_min(1)
    return torch.where(member, deviation / mad.clamp_min(EPS).gather(1, index), zero)


def segment_median(x: Tensor, segment: Tensor, segments: int, order: Tensor) -> Tensor:
    """(B, S) lower median of x over each segment's pixels (torch.median's convention).

    In x's sorted order, a segment's median is its member whose running count within the segment
    reaches (count + 1) // 2: a cumulative sum over (B, S, N) finds it without sorting per
    segment. An empty segment gets an arbitrary finite value (no pixel reads it).
    """
    sorted_segment = segment.gather(1, order)
    member = sorted_segment.unsqueeze(1) == torch.arange(segments, device=x.device).view(1, -1, 1)
    running = member.cumsum(dim=2)                                        # (B, S, N) int64
    wanted = (running[..., -1:] + 1) // 2
    position = (member & (running == wanted)).to(torch.uint8).argmax(dim=2)   # (B, S)
    return x.gather(1, order.gather(1, position))


__all__ = ["LEVELS", "MODES", "EPS", "normalized_l1", "normalized_l1_map"]
