"""Evaluation metrics accumulated over a dataset: metric depth and semantic segmentation.

Depth (`DepthMetrics`): the community's names (`abs_rel, sq_rel, rmse, rmse_log, log10, silog,
d1, d2, d3`), computed per image and averaged over images as Depth-Anything-V2's metric-depth
evaluation does (with BTS's clamping of the prediction to the range, which DA2 leaves out), plus
the diagnostics of seed 001 (median scale ratio s*, scale-aligned AbsRel, AbsRel per GT depth
range, prediction and GT ranges and spreads). Segmentation (`SegMetrics`): confusion-matrix mIoU, pixel accuracy and per-class IoU. Boundaries (`DepthBoundaryMetrics`,
`SegBoundaryMetrics`): iBims-1's depth boundary errors and a boundary F1 of the label map, defined
in `BOUNDARY_DEFINITION`. `compute()` dicts are JSON-serialisable
(floats, ints, None for "no pixel to measure").
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.spaces import check_depth_tensors
from distill.data.classes import IGNORE_INDEX

SILOG_VARIANT = ("da2: sqrt(mean(g^2) - 0.5 * mean(g)^2), g = ln(pred) - ln(gt), per image then "
                 "averaged over images, no x100 (BTS/AdaBins report lambda=1 and x100)")
MIOU_AVERAGING = ("dataset-nanmean: intersection and union summed over the whole dataset, IoU "
                  "averaged over classes present in prediction or ground truth (mmseg)")
EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, cols 41:601 of a 480x640 NYU frame
EIGEN_CROP_SIZE = (480, 640)
DEPTH_RANGES: tuple[tuple[str, float, float], ...] = (("0_2", 0.0, 2.0), ("2_5", 2.0, 5.0), ("5_10", 5.0, 10.0))
"""GT depth bins in metres for per-range AbsRel and ratio: [0, 2), [2, 5), [5, 10] (the last one closed)."""

_PER_IMAGE_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3",
                   "s_star", "abs_rel_aligned", "pred_std", "gt_std")


def check_depth_range(min_depth: float, max_depth: float) -> None:
    """ValueError unless 0 < min_depth < max_depth: the range every depth metric evaluates in."""
    if not 0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, "
                         f"max_depth={max_depth} (NYU uses 1e-3 and 10 m).")


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


def in_depth_range(gt: Tensor, valid: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """Valid pixels whose GT lies in the open range (min_depth, max_depth); NaN GT compares False."""
    return valid & (gt > min_depth) & (gt < max_depth)


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
    before the accuracy metrics, as BTS does (DA2's evaluation does not clamp; its figures differ
    where a prediction leaves the range).

    `compute()` keys:
      - `abs_rel, sq_rel, rmse, rmse_log, log10, silog, d1, d2, d3`: computed per image and averaged
        over images (Depth-Anything-V2's eval); `silog` is the variant named in `SILOG_VARIANT`.
      - `s_star`: per-image median(gt) / median(pred) (true medians, clamped pred), averaged over
        images. > 1 means predictions
        are too small (too near), < 1 too large. `abs_rel_aligned`: AbsRel after multiplying each
        image's prediction by its s* (what is left once global scale is fixed: structure error).
      - `abs_rel_0_2, abs_rel_2_5, abs_rel_5_10`: AbsRel pooled over all pixels of the dataset whose
        GT lies in [0, 2), [2, 5), [5, 10] m; None when a range has no pixel.
      - `ratio_0_2, ratio_2_5, ratio_5_10`: the prediction's geometric-mean ratio to GT over the same
        pixels, exp(mean(ln(pred / gt))): 1.2 = that range is predicted 20% too far on average, 0.8
        20% too near. A student that regresses to the mean depth shows > 1 near and < 1 far, which
        AbsRel alone does not tell (nor s*, the inverse convention over whole images).
      - `pred_min, pred_max`: range of the raw (unclamped) prediction, `gt_min, gt_max`, over all
        evaluated pixels. `pred_std, gt_std`: mean over images of the per-image (population) std in
        metres, prediction unclamped — a near-constant head shows a tiny pred_std.
      - `n_images` (images with at least one evaluated pixel), `n_pixels`.
    A constant predictor is evaluated with `update(torch.full_like(gt, c), gt, valid)`, see
    `baseline_abs_rel`.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False):
        check_depth_range(min_depth, max_depth)
        self.min_depth, self.max_depth, self.eigen_crop = float(min_depth), float(max_depth), eigen_crop
        self.reset()

    def reset(self) -> None:
        self._sums = {k: 0.0 for k in _PER_IMAGE_KEYS}
        self._range_sums = {name: [0.0, 0.0, 0] for name, _, _ in DEPTH_RANGES}  # sum |d|/g, sum ln(p/g), count
        self._extrema = {"pred_min": math.inf, "pred_max": -math.inf,
                         "gt_min": math.inf, "gt_max": -math.inf}
        self.n_images = 0
        self.n_pixels = 0

    def evaluated_mask(self, gt: Tensor, valid: Tensor) -> Tensor:
        """(B, 1, H, W) bool: pixels that count (valid, GT inside the open depth range, crop)."""
        mask = in_depth_range(gt, valid, self.min_depth, self.max_depth)
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
        rel, log_ratio = (p - g).abs() / g, torch.log(p / g)
        for i, (name, low, high) in enumerate(DEPTH_RANGES):
            upper = g <= high if i == len(DEPTH_RANGES) - 1 else g < high
            in_range = (g >= low) & upper
            sums = self._range_sums[name]
            sums[0] += float(rel[in_range].sum())
            sums[1] += float(log_ratio[in_range].sum())
            sums[2] += int(in_range.sum())
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
        for name, (rel, log_ratio, count) in self._range_sums.items():
            out[f"abs_rel_{name}"] = rel / count if count else None
            out[f"ratio_{name}"] = math.exp(log_ratio / count) if count else None
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
    GT), `seg_pixels` (labelled pixels; named apart from the depth metrics' `n_pixels`, which a run
    reports beside it).
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

    @property
    def labelled_pixels(self) -> int:
        """Pixels counted so far: 0 for a split without labels (NYU's BTS and h5 layouts)."""
        return int(self.confusion.sum())

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
            "seg_pixels": int(total),
        }


# --- Boundaries: where a blurred student loses most (AR occlusion, obstacle edges) ---

DBE_MAX_PX = 10.0
"""Truncation of the depth boundary errors in pixels (iBims-1's theta)."""
DEPTH_EDGE_THRESHOLD = 0.05
"""A depth edge is a local maximum of |Sobel(ln depth)| above this: 0.05 per pixel is a 10%
depth step spread over two pixels, or a 30% step blurred over about five."""
BOUNDARY_DEFINITION = (
    "depth: iBims-1 depth boundary errors (Koch et al., ECCV-W 2018), dbe_acc = mean distance (px) "
    "from predicted edges within 10 px of a GT edge to the nearest GT edge, dbe_comp = mean distance "
    "from GT edges to the nearest predicted edge truncated at 10 px (one way; the authors' evaluation "
    "script averages both ways over both edge sets, so its dbe_comp is not this one), per image then "
    "averaged; edges "
    "of GT and prediction alike are non-max-suppressed |Sobel(ln depth)| > 0.05, ties kept, so an "
    "exact step's edge is two pixels wide (iBims annotates GT edges by hand and runs Canny on the "
    "prediction). seg: boundary F1 (Csurka et al., BMVC 2013; class-agnostic), label-change pixels "
    "(both sides of a change) matched within 0.75% of the image diagonal, pooled over the dataset")

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x (B, 1, H, W) moved so that out[y, x] = in[y + dy, x + dx], zeros outside."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def depth_edges(depth: Tensor, mask: Tensor, threshold: float = DEPTH_EDGE_THRESHOLD) -> Tensor:
    """(B, 1, H, W) bool: pixels on a depth edge, inside `mask` eroded by one pixel (no gradient
    across holes). An edge pixel has |Sobel(ln depth)| > threshold and is no smaller than its two
    neighbours along the gradient direction (non-maximum suppression, four directions)."""
    log_depth = torch.log(torch.where(mask, depth, torch.ones_like(depth)).clamp_min(1e-6)).double()
    padded = F.pad(log_depth, (1, 1, 1, 1), mode="replicate")
    kx = _SOBEL_X.to(log_depth).view(1, 1, 3, 3)
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))
    interior = -F.max_pool2d(-mask.double(), 3, stride=1, padding=1) > 0.5
    # zero outside: a gradient into a hole (filled with 1 m) must not out-peak a real edge beside it
    magnitude = torch.where(interior, torch.hypot(gx, gy), 0.0)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180   # direction of the gradient, in [0, 180)
    sector = ((angle + 22.5) // 45).long() % 4        # 0: x, 1: diagonal, 2: y, 3: anti-diagonal
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        peak = (magnitude >= _shift(magnitude, dy, dx)) & (magnitude >= _shift(magnitude, -dy, -dx))
        keep |= (sector == k) & peak
    return keep & (magnitude > threshold) & interior


def _nearest_distance(points: Tensor, targets: Tensor, max_entries: int = 1 << 24) -> Tensor:
    """(N,) Euclidean distance from each of points (N, 2) to the nearest of targets (M, 2), M > 0,
    in chunks of at most `max_entries` distances (128 MB in float64): a 480x640 depth map has tens
    of thousands of edge pixels, and one 4096-point chunk against them took about a gigabyte."""
    chunk = max(1, max_entries // len(targets))
    return torch.cat([torch.cdist(part, targets).min(dim=1).values for part in points.split(chunk)])


class DepthBoundaryMetrics:
    """iBims-1 depth boundary errors over a dataset (`BOUNDARY_DEFINITION`): `dbe_acc` (are the
    predicted edges where GT edges are?) and `dbe_comp` (is every GT edge predicted?), in pixels,
    lower is better, at most `DBE_MAX_PX`. A prediction without any edge near a GT edge scores
    the maximum in both. Images without a GT edge are skipped; `dbe_images` counts the others.
    `eigen_crop`: only edges inside NYU's Eigen crop, the pixels `DepthMetrics` measures (480x640)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, max_px: float = DBE_MAX_PX,
                 eigen_crop: bool = False):
        check_depth_range(min_depth, max_depth)
        if not max_px > 0:
            raise ValueError(f"depth boundary errors need max_px > 0, got {max_px}")
        self.min_depth, self.max_depth, self.max_px, self.eigen_crop = min_depth, max_depth, max_px, eigen_crop
        self.reset()

    def reset(self) -> None:
        self.acc_sum = self.comp_sum = 0.0
        self.n_images = 0

    @torch.no_grad()
    def update(self, pred: Tensor, gt: Tensor, valid: Tensor) -> None:
        """pred, gt: (B, 1, H, W) metres; valid: (B, 1, H, W) bool."""
        check_depth_tensors(pred, gt, valid, target_name="gt")
        mask = in_depth_range(gt, valid, self.min_depth, self.max_depth)
        if self.eigen_crop:
            mask = mask & eigen_crop_mask(gt.shape, gt.device)
        gt_edges = depth_edges(gt, mask)
        pred_edges = depth_edges(pred.clamp(self.min_depth, self.max_depth), mask)
        for b in range(gt.shape[0]):
            gt_points = gt_edges[b, 0].nonzero().double()
            if len(gt_points) == 0:
                continue
            pred_points = pred_edges[b, 0].nonzero().double()
            acc = comp = self.max_px
            if len(pred_points):
                to_gt = _nearest_distance(pred_points, gt_points)
                near = to_gt < self.max_px
                if bool(near.any()):
                    acc = float(to_gt[near].mean())
                    comp = float(_nearest_distance(gt_points, pred_points).clamp(max=self.max_px).mean())
            self.acc_sum += acc
            self.comp_sum += comp
            self.n_images += 1

    def compute(self) -> dict[str, float | int | None]:
        if self.n_images == 0:
            return {"dbe_acc": None, "dbe_comp": None, "dbe_images": 0}
        return {"dbe_acc": self.acc_sum / self.n_images, "dbe_comp": self.comp_sum / self.n_images,
                "dbe_images": self.n_images}


def label_boundaries(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, H, W) bool: labelled pixels with a 4-neighbour of another (labelled) class."""
    x = labels.unsqueeze(1).double()
    labelled = labels.unsqueeze(1) != ignore_index
    edge = torch.zeros_like(labelled)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        other = _shift(x, dy, dx)
        other_labelled = _shift(labelled.double(), dy, dx) > 0.5
        edge |= labelled & other_labelled & (other != x)
    return edge[:, 0]


def _within(points: Tensor, radius: int) -> Tensor:
    """(B, H, W) bool: pixels within Euclidean `radius` of a True pixel of points (B, H, W)."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float64, device=points.device)
    disk = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius ** 2).double()
    hits = F.conv2d(points.unsqueeze(1).double(), disk.view(1, 1, *disk.shape), padding=radius)
    return hits[:, 0] > 0.5


class SegBoundaryMetrics:
    """Class-agnostic boundary F1 of a label map (`BOUNDARY_DEFINITION`): a predicted boundary
    pixel is correct within `tolerance_px` of a GT boundary (default 0.75% of the image diagonal,
    at least 1 px), a GT boundary pixel is found within as much of a predicted one. Counts are
    pooled over the dataset. `compute()`: `seg_boundary_precision`, `_recall`, `_f1`."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, tolerance_px: int | None = None):
        if tolerance_px is not None and tolerance_px < 0:
            raise ValueError(f"tolerance_px={tolerance_px} must be >= 0 (0 = the boundary pixels themselves; None = 0.75% "
                             f"of the image diagonal)")
        self.ignore_index, self.tolerance_px = ignore_index, tolerance_px
        self.reset()

    def reset(self) -> None:
        self.counts = {"pred": 0, "pred_hit": 0, "gt": 0, "gt_hit": 0}

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (B, H, W) class ids; pred pixels where target is ignored do not count."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                             "(B, H, W) class ids")
        h, w = target.shape[-2:]
        radius = max(1, round(0.0075 * math.hypot(h, w))) if self.tolerance_px is None else self.tolerance_px
        pred = torch.where(target == self.ignore_index, self.ignore_index, pred)
        pred_b, gt_b = label_boundaries(pred, self.ignore_index), label_boundaries(target, self.ignore_index)
        self.counts["pred"] += int(pred_b.sum())
        self.counts["pred_hit"] += int((pred_b & _within(gt_b, radius)).sum())
        self.counts["gt"] += int(gt_b.sum())
        self.counts["gt_hit"] += int((gt_b & _within(pred_b, radius)).sum())

    def compute(self) -> dict[str, float | None]:
        c = self.counts
        precision = c["pred_hit"] / c["pred"] if c["pred"] else None
        recall = c["gt_hit"] / c["gt"] if c["gt"] else None
        if recall is None:       # no GT boundary: nothing to find
            f1 = None
        else:                    # no predicted boundary at all finds none of them
            f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        return {"seg_boundary_precision": precision, "seg_boundary_recall": recall, "seg_boundary_f1": f1}


def gap_closed(abs_rel: float, baseline_abs_rel: float, teacher_abs_rel: float) -> float | None:
    """Share of the way from the constant predictor to the teacher that the student went:
    (baseline - student) / (baseline - teacher); 1 = as good as the teacher, 0 = no better than a
    constant. None when the teacher is not better than the constant (no gap to close)."""
    gap = baseline_abs_rel - teacher_abs_rel
    return (baseline_abs_rel - abs_rel) / gap if gap > 0 else None
