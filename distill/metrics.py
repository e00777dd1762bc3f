"""Evaluation metrics accumulated over a dataset: metric depth and semantic segmentation.

Depth (`DepthMetrics`): the community's names (`abs_rel, sq_rel, rmse, rmse_log, log10, silog,
d1, d2, d3`), computed per image and averaged over images as Depth-Anything-V2's metric-depth
evaluation does, plus the diagnostics of seed 001 (median scale ratio s*, scale-aligned AbsRel,
AbsRel per GT depth range, prediction and GT ranges and spreads). Segmentation (`SegMetrics`):
confusion-matrix mIoU, pixel accuracy and per-class IoU. `compute()` dicts are JSON-serialisable
(floats, ints, None for "no pixel to measure").
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

from core.spaces import check_depth_tensors
from distill.data.classes import IGNORE_INDEX

SILOG_VARIANT = ("da2: sqrt(mean(g^2) - 0.5 * mean(g)^2), g = ln(pred) - ln(gt), per image then "
                 "averaged over images, no x100 (BTS/AdaBins report lambda=1 and x100)")
MIOU_AVERAGING = ("dataset-nanmean: intersection and union summed over the whole dataset, IoU "
                  "averaged over classes present in prediction or ground truth (mmseg)")
EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, cols 41:601 of a 480x640 NYU frame
EIGEN_CROP_SIZE = (480, 640)
DEPTH_RANGES: tuple[tuple[str, float, float], ...] = (
    ("abs_rel_0_2", 0.0, 2.0), ("abs_rel_2_5", 2.0, 5.0), ("abs_rel_5_10", 5.0, 10.0))
"""GT depth bins in metres for per-range AbsRel: [0, 2), [2, 5), [5, 10] (the last one closed)."""

_PER_IMAGE_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3",
                   "s_star", "abs_rel_aligned", "pred_std", "gt_std")


def eigen_crop_mask(shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Bool mask (B, 1, 480, 640) that is True inside the NYU Eigen crop (rows 45:471, cols
    41:601). The crop is defined at 480x640 only; any other size raises ValueError."""
    h, w = int(shape[-2]), int(shape[-1])
    if (h, w) != EIGEN_CROP_SIZE:
        raise ValueError(f"The Eigen crop (rows 45:471, cols 41:601) is defined at 480x640 only, "
                         f"got {h}x{w}. Resize pred and gt to 480x640 (e.g. F.interpolate the "
                         "prediction to the original NYU size) or set eigen_crop=False.")
    top, bottom, left, right = EIGEN_CROP
    mask = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    mask[..., top:bottom, left:right] = True
    return mask


def _median(x: Tensor) -> Tensor:
    """True median of a 1-D tensor (mean of the two middle values for an even count; torch.median
    would return the lower one)."""
    return torch.quantile(x, 0.5)


def _image_metrics(p: Tensor, g: Tensor, p_raw: Tensor) -> list[float]:
    """Per-image metrics on the evaluated pixels of one image, in `_PER_IMAGE_KEYS` order.

    p: clamped prediction (N,) metres, g: ground truth (N,) metres, p_raw: unclamped prediction.
    """
    diff = p - g
    g_log = torch.log(p) - torch.log(g)
    ratio = torch.maximum(p / g, g / p)
    s_star = _median(g) / _median(p)  # > 1: predictions too small
    values = [
        (diff.abs() / g).mean(),
        (diff ** 2 / g).mean(),
        torch.sqrt((diff ** 2).mean()),
        torch.sqrt((g_log ** 2).mean()),
        (torch.log10(p) - torch.log10(g)).abs().mean(),
        torch.sqrt(((g_log ** 2).mean() - 0.5 * g_log.mean() ** 2).clamp_min(0)),
        (ratio < 1.25).double().mean(),
        (ratio < 1.25 ** 2).double().mean(),
        (ratio < 1.25 ** 3).double().mean(),
        s_star,
        ((s_star * p - g).abs() / g).mean(),
        p_raw.std(correction=0),
        g.std(correction=0),
    ]
    return torch.stack([v.double() for v in values]).tolist()


class DepthMetrics:
    """Metric-depth evaluation accumulated over a dataset (pred and GT in metres).

    Pixels evaluated: `valid & (min_depth < gt < max_depth)`, and inside the Eigen crop when
    `eigen_crop=True` (480x640 inputs only). The prediction is clamped to [min_depth, max_depth]
    before the accuracy metrics, as DA2 and BTS do.

    `compute()` keys:
      - `abs_rel, sq_rel, rmse, rmse_log, log10, silog, d1, d2, d3`: computed per image and averaged
        over images (Depth-Anything-V2's eval); `silog` is the variant named in `SILOG_VARIANT`.
      - `s_star`: per-image median(gt) / median(pred) (true medians, clamped pred), averaged over
        images. > 1 means predictions
        are too small (too near), < 1 too large. `abs_rel_aligned`: AbsRel after multiplying each
        image's prediction by its s* (what is left once global scale is fixed: structure error).
      - `abs_rel_0_2, abs_rel_2_5, abs_rel_5_10`: AbsRel pooled over all pixels of the dataset whose
        GT lies in [0, 2), [2, 5), [5, 10] m; None when a range has no pixel.
      - `pred_min, pred_max`: range of the raw (unclamped) prediction, `gt_min, gt_max`, over all
        evaluated pixels. `pred_std, gt_std`: mean over images of the per-image (population) std in
        metres, prediction unclamped — a near-constant head shows a tiny pred_std.
      - `n_images` (images with at least one evaluated pixel), `n_pixels`.
    A constant predictor is evaluated with `update(torch.full_like(gt, c), gt, valid)`, see
    `baseline_abs_rel`.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False):
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, "
                             f"max_depth={max_depth} (NYU uses 1e-3 and 10 m).")
        self.min_depth, self.max_depth, self.eigen_crop = float(min_depth), float(max_depth), eigen_crop
        self.reset()

    def reset(self) -> None:
        self._sums = {k: 0.0 for k in _PER_IMAGE_KEYS}
        self._range_sums = {name: [0.0, 0] for name, _, _ in DEPTH_RANGES}  # sum |d|/g, count
        self._extrema = {"pred_min": math.inf, "pred_max": -math.inf,
                         "gt_min": math.inf, "gt_max": -math.inf}
        self.n_images = 0
        self.n_pixels = 0

    def evaluated_mask(self, gt: Tensor, valid: Tensor) -> Tensor:
        """(B, 1, H, W) bool: pixels that count (valid, GT inside the open depth range, crop)."""
        mask = valid & (gt > self.min_depth) & (gt < self.max_depth)  # NaN GT compares False
        if self.eigen_crop:
            mask = mask & eigen_crop_mask(gt.shape, gt.device)
        return mask

    @torch.no_grad()
    def update(self, pred: Tensor, gt: Tensor, valid: Tensor) -> None:
        """Add a batch. pred, gt: (B, 1, H, W) metres; valid: (B, 1, H, W) bool."""
        check_depth_tensors(pred, gt, valid, target_name="gt")
        pred, gt = pred.double(), gt.double()
        mask = self.evaluated_mask(gt, valid)
        for b in range(pred.shape[0]):
            m = mask[b]
            if not bool(m.any()):
                continue
            p_raw, g = pred[b][m], gt[b][m]
            if not bool(torch.isfinite(p_raw).all()):
                raise ValueError(f"prediction of image {b} in this batch has NaN/inf on evaluated "
                                 "pixels; the model output is broken (check the depth head).")
            self._add_image(p_raw, g)

    def _add_image(self, p_raw: Tensor, g: Tensor) -> None:
        p = p_raw.clamp(self.min_depth, self.max_depth)
        for key, value in zip(_PER_IMAGE_KEYS, _image_metrics(p, g, p_raw)):
            self._sums[key] += value
        rel = (p - g).abs() / g
        for i, (name, low, high) in enumerate(DEPTH_RANGES):
            upper = g <= high if i == len(DEPTH_RANGES) - 1 else g < high
            in_range = (g >= low) & upper
            self._range_sums[name][0] += float(rel[in_range].sum())
            self._range_sums[name][1] += int(in_range.sum())
        lo_hi = torch.stack([p_raw.min(), p_raw.max(), g.min(), g.max()]).tolist()
        self._extrema["pred_min"] = min(self._extrema["pred_min"], lo_hi[0])
        self._extrema["pred_max"] = max(self._extrema["pred_max"], lo_hi[1])
        self._extrema["gt_min"] = min(self._extrema["gt_min"], lo_hi[2])
        self._extrema["gt_max"] = max(self._extrema["gt_max"], lo_hi[3])
        self.n_images += 1
        self.n_pixels += g.numel()

    def compute(self) -> dict[str, float | int | None]:
        """Dataset metrics (see the class docstring). Raises ValueError if nothing was evaluated."""
        if self.n_images == 0:
            raise ValueError(f"no pixel was evaluated: call update() first, and check that valid "
                             f"GT lies in ({self.min_depth}, {self.max_depth}) m — GT in "
                             "millimetres or a wrong valid mask leaves nothing to measure.")
        out: dict[str, float | int | None] = {k: self._sums[k] / self.n_images
                                              for k in _PER_IMAGE_KEYS}
        for name, (total, count) in self._range_sums.items():
            out[name] = total / count if count else None
        out.update(self._extrema)
        out["n_images"] = self.n_images
        out["n_pixels"] = self.n_pixels
        return out


def baseline_abs_rel(constant: float, batches: Iterable[tuple[Tensor, Tensor]],
                     **metric_options) -> float:
    """AbsRel of the predictor that outputs `constant` metres everywhere (e.g. the training set's
    median depth): the number a trained model must beat. `batches` yields (gt, valid) pairs of
    (B, 1, H, W) tensors; `metric_options` go to `DepthMetrics` (min_depth, max_depth, eigen_crop).
    """
    metrics = DepthMetrics(**metric_options)
    for gt, valid in batches:
        metrics.update(torch.full_like(gt, float(constant)), gt, valid)
    return float(metrics.compute()["abs_rel"])


class SegMetrics:
    """Semantic segmentation metrics from a (C, C) confusion matrix accumulated over a dataset.

    `update(pred, target)`: pred (B, H, W) class ids or (B, C, H, W) logits (argmax over C);
    target (B, H, W) ids in [0, C) or `ignore_index`. Ignored pixels are skipped.
    `compute()`: `miou` (averaging named in `MIOU_AVERAGING`), `pixel_acc` (correct / labelled
    pixels), `iou_per_class` (class name -> IoU, None for a class absent from both prediction and
    GT), `n_pixels`.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 (NYUv2: 13 or 40).")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}; "
                             "give one name per class (e.g. distill.data.classes.NYU13_NAMES).")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [
            str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; rows of the confusion matrix are GT classes, columns predicted classes."""
        if pred.dim() == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels, expected num_classes="
                                 f"{self.num_classes}.")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both "
                             "be (B, H, W) class ids (or pred (B, C, H, W) logits).")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        c = self.num_classes
        for name, ids in (("target", t), ("pred", p)):
            bad = ids[(ids < 0) | (ids >= c)]
            if bad.numel():
                raise ValueError(f"{name} has class id {int(bad[0])} outside [0, {c}) and not "
                                 f"ignore_index={self.ignore_index}; check the label mapping.")
        counts = torch.bincount(t * c + p, minlength=c * c).reshape(c, c)
        self.confusion += counts.cpu()

    def compute(self) -> dict[str, float | int | dict[str, float | None] | None]:
        cm = self.confusion.double()
        total = cm.sum()
        if total == 0:
            raise ValueError("no labelled pixel was evaluated: call update() first, and check "
                             f"that targets are not all ignore_index={self.ignore_index}.")
        intersection = cm.diag()
        union = cm.sum(0) + cm.sum(1) - intersection
        present = union > 0
        iou = intersection / union.clamp_min(1)
        return {
            "miou": float(iou[present].mean()),
            "pixel_acc": float(intersection.sum() / total),
            "iou_per_class": {name: (float(iou[i]) if present[i] else None)
                              for i, name in enumerate(self.class_names)},
            "n_pixels": int(total),
        }
