"""Depth losses: `(pred, target, valid) -> scalar`, computed over valid pixels only.

Contract of every loss in `DEPTH_LOSSES` (a registry of *factories*; `build_depth_loss(name,
**options)` calls the factory and returns the loss callable):

- `pred`, `target`: (B, 1, H, W) float tensors in the same space (metres for metric depth; the
  affine-invariant losses work in whatever space they are given). Values at invalid pixels are never
  read, so NaN or 0 there is fine.
- `valid`: (B, 1, H, W) bool tensor, the pixels to use.
- Returns a 0-d float32 tensor. Computation is in float32 (inputs are cast with `.float()`), so the
  losses are safe under `torch.autocast(dtype=torch.bfloat16)`.
- A batch without any valid pixel (a random crop can legitimately have none) gives a zero that
  keeps the autograd graph (`backward()` works, every gradient is 0), never NaN.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import Tensor

from core.registry import Registry
from core.spaces import check_depth_tensors

DepthLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
DEPTH_LOSSES: Registry[Callable[..., DepthLoss]] = Registry("depth loss")

_LOG_EPS = 1e-6  # metres (or space units): floor applied before a log so that log(0) never happens


def build_depth_loss(name: str, **options) -> DepthLoss:
    """Build a registered depth loss, e.g. `build_depth_loss("berhu", threshold="p80")`."""
    return DEPTH_LOSSES.get(name)(**options)


# ----------------------------------------------------------------------------- helpers

def _prepare(pred: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes, cast to float32 and zero the invalid pixels (so NaN holes cannot leak).

    Returns (pred, target, valid) with pred/target float32 (B, 1, H, W) and 0 where `~valid`.
    Zeroing with `torch.where` (not a multiply) keeps NaN out of both values and gradients.
    """
    check_depth_tensors(pred, target, valid)
    zero = torch.zeros((), dtype=torch.float32, device=pred.device)
    return torch.where(valid, pred.float(), zero), torch.where(valid, target.float(), zero), valid


def _zero_with_graph(pred: Tensor) -> Tensor:
    """A float32 0 connected to `pred`'s graph (its gradient is 0 everywhere, never NaN)."""
    return pred.float().flatten()[:0].sum()


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of `x` over the True pixels of `valid` pooled over the batch; 0 with graph if none."""
    count = valid.sum()
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / count.clamp_min(1)  # count == 0 -> total is an exact 0 that keeps the graph


def _per_image_sum(x: Tensor, valid: Tensor) -> Tensor:
    """Sum of (B, 1, H, W) `x` over each image's valid pixels -> (B,)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=(1, 2, 3))


def _mean_over_images(per_image: Tensor, has_pixels: Tensor) -> Tensor:
    """Average a (B,) per-image value over the images that have pixels; 0 with graph if none."""
    zero = torch.zeros((), dtype=per_image.dtype, device=per_image.device)
    total = torch.where(has_pixels, per_image, zero).sum()
    return total / has_pixels.sum().clamp_min(1)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt that is 0 (with gradient 0, not inf/NaN) where x <= 0 — rounding can make x = -1e-9."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))),
                       torch.zeros_like(x))


def quantile(x: Tensor, q: float) -> Tensor:
    """q-quantile of a 1-D tensor with linear interpolation (same as `torch.quantile`'s default).

    Uses `torch.kthvalue`, so unlike `torch.quantile` it has no 16M-element input limit (a batch of
    64 images at 480x640 has 19.7M pixels). `x` must be non-empty; 0 <= q <= 1.
    """
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor is undefined; check the valid mask first.")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(x, lo + 1).values
    if hi == lo:
        return v_lo
    # The next order statistic without a second selection (3.7 -> 2.4 ms on a batch of 8 at
    # 128x160, the same value): v_lo again if it repeats, otherwise the smallest value above it.
    above = x > v_lo
    next_up = torch.where(above, x, torch.full_like(x, math.inf)).min()
    v_hi = torch.where(x.numel() - above.sum() > lo + 1, v_lo, next_up)
    return v_lo + (v_hi - v_lo) * (pos - lo)


# ----------------------------------------------------------------------------- MSE

@DEPTH_LOSSES.register("mse")
def mse() -> DepthLoss:
    """Mean squared error over valid pixels, pooled over the batch (units: space units squared)."""

    def loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred, target, valid = _prepare(pred, target, valid)
        return _masked_mean((pred - target) ** 2, valid)

    return loss


# ----------------------------------------------------------------------------- berHu

def parse_berhu_threshold(threshold: str | float) -> Callable[[Tensor], Tensor]:
    """Turn "p80" / "p99.5" / "laina" / a positive number into `abs_residuals (N,) -> c` (0-d). A
    number may come as text ("0.5": `loss.berhu_threshold=0.5` on the command line)."""
    if isinstance(threshold, str):
        try:
            threshold = float(threshold)
        except ValueError:
            pass
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        if not math.isfinite(threshold):
            raise ValueError(f"berHu threshold {threshold!r} must be a finite number.")
        if not threshold > 0:
            raise ValueError(f"berHu threshold {threshold!r} must be > 0 when given as a number.")
        value = float(threshold)
        return lambda abs_r: torch.full((), value, device=abs_r.device)
    if threshold == "laina":
        return lambda abs_r: 0.2 * abs_r.max()
    match = re.fullmatch(r"p(\d+(?:\.\d+)?)", str(threshold))
    if match and 0 < float(match.group(1)) <= 100:
        q = float(match.group(1)) / 100.0
        return lambda abs_r: quantile(abs_r, q)
    raise ValueError(f"Unknown berHu threshold {threshold!r}. Valid: 'pNN' (percentile of the "
                     "per-batch |residual|, 0 < NN <= 100, e.g. 'p80'), 'laina' (0.2 * max |r|) "
                     "or a positive number (fixed threshold in space units).")


BERHU_RESIDUALS = ("absolute", "relative", "log")


def log_ratio(pred: Tensor, target: Tensor, eps: float = _LOG_EPS) -> Tensor:
    """ln(max(pred, eps)) - ln(max(target, eps)): the log residual of berHu and SILog."""
    return torch.log(pred.clamp_min(eps)) - torch.log(target.clamp_min(eps))


def residual(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """pred - target in the units a loss penalises: "absolute" (space units), "relative" (a
    fraction of the target: its L1 is AbsRel) or "log" (log ratio). Invalid pixels must be 0 in
    both (`_prepare`), where every kind gives 0."""
    if kind == "absolute":
        return pred - target
    if kind == "relative":
        return (pred - target) / target.clamp_min(_LOG_EPS)
    return log_ratio(pred, target)


@DEPTH_LOSSES.register("berhu")
def berhu(threshold: str | float = "p80", residual_kind: str = "absolute") -> DepthLoss:
    """Reverse Huber (berHu) loss, Laina et al. 2016 ("Deeper Depth Prediction with FCRNs").

    Per valid pixel with residual r:  |r| if |r| <= c, else (r^2 + c^2) / (2c);
    averaged over the valid pixels of the batch. Continuous with continuous slope at |r| = c.

    residual_kind: r = pred - target ("absolute", Laina's, in metres for metric depth), or that
    difference as a fraction of the target ("relative": below c the loss is AbsRel itself), or
    log(pred / target) ("log"). Why not always metres: a metre of error weighs the same at 0.5 m
    and at 5 m, and an exp-activated student's gradient is scaled by its depth once more, so near
    pixels learn last (v3 at CPU defaults: 2.5x too far below 1 m, docs/TRAINING.md). All three
    stay metric: none is invariant to scale.

    threshold: how c is chosen, without gradient (detached), from the valid |r| of the batch:
      - "p80" (default, seed 000's V3 recipe): 80th percentile of |r| (any "pNN" works, e.g. "p90"),
        linear interpolation as `torch.quantile`;
      - "laina": 0.2 * max |r| (Laina et al.);
      - a positive number: a fixed c in the residual's units.
    Guard: if c == 0 (e.g. at least 80% of residuals are exactly 0) the quadratic branch would
    divide by 0, so c falls back to max |r| (pure L1); if every residual is 0 the loss is 0.
    """
    pick_c = parse_berhu_threshold(threshold)
    if residual_kind not in BERHU_RESIDUALS:
        raise ValueError(f"berHu residual {residual_kind!r} is not one of {', '.join(BERHU_RESIDUALS)}")

    def loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred, target, valid = _prepare(pred, target, valid)
        abs_r = residual(pred, target, residual_kind).abs()
        valid_abs_r = abs_r.detach()[valid]
        if valid_abs_r.numel() == 0:
            return _zero_with_graph(pred)
        with torch.no_grad():  # the threshold is a statistic of the batch, not a function to train
            c = pick_c(valid_abs_r)
            c = torch.where(c > 0, c, valid_abs_r.max()).clamp_min(1e-12)
        per_pixel = torch.where(abs_r <= c, abs_r, (abs_r ** 2 + c ** 2) / (2 * c))
        return _masked_mean(per_pixel, valid)

    return loss


# ----------------------------------------------------------------------------- SILog

@DEPTH_LOSSES.register("silog")
def silog(lam: float = 0.85, per_image: bool = True, scale: float = 1.0,
          eps: float = _LOG_EPS) -> DepthLoss:
    """Scale-invariant log loss, Eigen et al. 2014; form of BTS (Lee et al. 2019).

    g = ln(max(pred, eps)) - ln(max(target, eps)) over valid pixels;
    loss = scale * sqrt(mean(g^2) - lam * mean(g)^2).

    lam: 0 gives the RMS of log errors, 1 makes the loss fully scale-invariant (a scaled copy of the
      target costs 0); BTS uses 0.85 (default), seed 001 found 0.15 learnt scale faster.
    per_image: True computes the term per image and averages over images with valid pixels (each
      image's own scale offset is forgiven); False pools every valid pixel of the batch.
    scale: output multiplier; BTS multiplies by 10, the default 1.0 keeps the loss in log units.
    eps: floor before the log (space units). `valid` should exclude non-positive targets.
    Computed as sqrt(var(g) + (1 - lam) * mean(g)^2) (same value, no float32 cancellation); the
    sqrt is guarded: at 0 it gives 0 with a zero gradient, not inf/NaN.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"silog lam={lam} must lie in [0, 1] (BTS uses 0.85).")

    def loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred, target, valid = _prepare(pred, target, valid)
        g = log_ratio(pred, target, eps)
        # mean(g^2) - lam * mean(g)^2 == var(g) + (1 - lam) * mean(g)^2; the centred form avoids
        # float32 cancellation (a scaled copy with lam = 1 would otherwise give ~5e-4, not 0).
        if not per_image:
            mean_g = _masked_mean(g, valid)
            var_g = _masked_mean((g - mean_g) ** 2, valid)
            return scale * _safe_sqrt(var_g + (1.0 - lam) * mean_g ** 2)
        counts = valid.sum(dim=(1, 2, 3))
        n = counts.clamp_min(1).float()
        mean_g = _per_image_sum(g, valid) / n
        var_g = _per_image_sum((g - mean_g.view(-1, 1, 1, 1)) ** 2, valid) / n
        term = _safe_sqrt(var_g + (1.0 - lam) * mean_g ** 2)
        return scale * _mean_over_images(term, counts > 0)

    return loss


# ----------------------------------------------------------------------------- SSI

def align_scale_shift(pred: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image least-squares (s, t) minimising ||s * pred + t - target||^2 over valid pixels.

    The 2x2 normal equations [[sum p^2, sum p], [sum p, n]] [s, t] = [sum p*y, sum y] are solved
    in closed form in centred variables (same solution, no float32 cancellation):
    s = cov(p, y) / var(p), t = mean(y) - s * mean(p). Degenerate images (fewer than 2 valid
    pixels or a constant prediction, var(p) ~ 0) get s = 0, t = mean(y).
    Inputs as `_prepare` returns them ((B, 1, H, W) float32, 0 where invalid); returns s, t of
    shape (B, 1, 1, 1). Gradients flow through s and t (as in MiDaS' implementation).
    """
    counts = valid.sum(dim=(1, 2, 3)).float()
    n = counts.clamp_min(1)
    mean_p = _per_image_sum(pred, valid) / n
    mean_y = _per_image_sum(target, valid) / n
    p_c = pred - mean_p.view(-1, 1, 1, 1)
    y_c = target - mean_y.view(-1, 1, 1, 1)
    var_p = _per_image_sum(p_c * p_c, valid) / n
    cov = _per_image_sum(p_c * y_c, valid) / n
    mean_p2 = _per_image_sum(pred * pred, valid) / n
    ok = (counts >= 2) & (var_p > 1e-12 * mean_p2 + 1e-30)
    s = torch.where(ok, cov / torch.where(ok, var_p, torch.ones_like(var_p)), torch.zeros_like(cov))
    t = mean_y - s * mean_p
    return s.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)


@DEPTH_LOSSES.register("ssi")
def ssi() -> DepthLoss:
    """Scale-and-shift-invariant loss, Ranftl et al. 2020 (MiDaS); D3epth eq. (3).

    Per image: (s, t) = least-squares alignment of pred to target over valid pixels
    (`align_scale_shift`), then mean |s * pred + t - target| over that image's valid pixels;
    the result is averaged over images that have valid pixels.
    The alignment is done in whatever space the inputs are given (depth, disparity, normalised
    relative depth): aligning in disparity space is a different loss from aligning in depth space.
    Invariant to pred -> a * pred + b for any a > 0 (indeed any a != 0) and b.
    """

    def loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred, target, valid = _prepare(pred, target, valid)
        s, t = align_scale_shift(pred, target, valid)
        counts = valid.sum(dim=(1, 2, 3))
        per_image = _per_image_sum((s * pred + t - target).abs(), valid) / counts.clamp_min(1)
        return _mean_over_images(per_image, counts > 0)

    return loss


# ----------------------------------------------------------------------------- gradient Huber

def _four_direction_differences(x: Tensor) -> list[Tensor]:
    """Differences of neighbouring pixels of (B, 1, H, W) `x`: horizontal, vertical, diagonal,
    anti-diagonal; shapes (B,1,H,W-1), (B,1,H-1,W), (B,1,H-1,W-1), (B,1,H-1,W-1)."""
    return [x[..., :, 1:] - x[..., :, :-1],
            x[..., 1:, :] - x[..., :-1, :],
            x[..., 1:, 1:] - x[..., :-1, :-1],
            x[..., 1:, :-1] - x[..., :-1, 1:]]


def _pair_valid(valid: Tensor) -> list[Tensor]:
    """A difference is usable only where both of its pixels are valid (same order as above)."""
    return [valid[..., :, 1:] & valid[..., :, :-1],
            valid[..., 1:, :] & valid[..., :-1, :],
            valid[..., 1:, 1:] & valid[..., :-1, :-1],
            valid[..., 1:, :-1] & valid[..., :-1, 1:]]


def modified_huber(x: Tensor, delta: float) -> Tensor:
    """D3epth's modified Huber: delta * |x| if |x| <= delta, else 0.5 * x^2 + 0.5 * delta^2.

    Both value (delta^2) and slope (delta) are continuous at |x| = delta; it equals
    delta * berHu(x; c=delta). Elementwise, same shape as `x`.
    """
    abs_x = x.abs()
    return torch.where(abs_x <= delta, delta * abs_x, 0.5 * x * x + 0.5 * delta * delta)


@DEPTH_LOSSES.register("gradient_huber")
def gradient_huber(delta: float = 1.0, scales: int = 1) -> DepthLoss:
    """Edge-aware gradient Huber loss over 4 directions, D3epth (2025) eq. (4).

    For each direction (horizontal, vertical, two diagonals) the neighbour differences G of pred
    and of target are compared: x = G_pred - G_target, penalised by `modified_huber(x, delta)`;
    a difference counts only where both of its pixels are valid. The result is the mean over all
    usable differences of the batch, the 4 directions pooled. Invariant to a constant offset of
    pred. delta (space units; D3epth does not state its value, default 1.0 makes the small-error
    branch an unscaled L1) must be > 0.

    `scales` > 1 is multi-scale supervision as in MiDaS's gradient-matching loss (Ranftl et al.
    2020): the same loss on every 2nd, 4th, ... pixel too (subsampled, not averaged, so an edge
    stays a step), the scales' means averaged. Coarse scales compare differences over 2, 4, ...
    pixels: the extent of a step, not only its first pixel.
    """
    if not delta > 0:
        raise ValueError(f"gradient_huber delta={delta!r} must be > 0.")
    if not (isinstance(scales, int) and scales >= 1):
        raise ValueError(f"gradient_huber scales={scales!r} must be an integer >= 1.")

    def one_scale(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        total = _zero_with_graph(pred)
        count = torch.zeros((), dtype=torch.float32, device=pred.device)
        for gp, gt, ok in zip(_four_direction_differences(pred), _four_direction_differences(target),
                              _pair_valid(valid)):
            per_pair = modified_huber(gp - gt, delta)
            total = total + torch.where(ok, per_pair, torch.zeros_like(per_pair)).sum()
            count = count + ok.sum()
        return total / count.clamp_min(1)

    def loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred, target, valid = _prepare(pred, target, valid)
        steps = [2 ** s for s in range(scales) if min(pred.shape[-2:]) >= 2 ** (s + 1)]
        return sum(one_scale(pred[..., ::k, ::k], target[..., ::k, ::k], valid[..., ::k, ::k])
                   for k in steps) / len(steps)

    return loss
