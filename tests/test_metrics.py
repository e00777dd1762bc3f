"""Depth and segmentation metrics: hand-computed values on tiny tensors, and properties."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distill.data.classes import IGNORE_INDEX
from distill.metrics import (
    DBE_MAX_PX,
    MIOU_AVERAGING,
    SILOG_VARIANT,
    DepthBoundaryMetrics,
    DepthMetrics,
    SegBoundaryMetrics,
    SegMetrics,
    baseline_abs_rel,
    depth_edges,
    gap_closed,
    label_boundaries,
)


def image(*values: float, h: int = 2) -> torch.Tensor:
    """A (1, 1, h, N/h) depth map in metres."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, h, -1)


def all_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def evaluate(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
             **options) -> dict:
    metrics = DepthMetrics(**options)
    metrics.update(pred, gt, all_valid(gt) if valid is None else valid)
    return metrics.compute()


def test_depth_metrics_hand_values_2x2():
    gt, pred = image(1, 2, 2, 4), image(1, 1, 4, 4)
    out = evaluate(pred, gt)
    # diff [0, -1, 2, 0]; |diff| / gt = [0, .5, 1, 0]; diff^2 / gt = [0, .5, 2, 0]
    assert out["abs_rel"] == pytest.approx(0.375)
    assert out["sq_rel"] == pytest.approx(0.625)
    assert out["rmse"] == pytest.approx(math.sqrt(1.25))
    # ratios max(p/g, g/p) = [1, 2, 2, 1]: only two below 1.25, 1.25^2 and 1.25^3 (= 1.95)
    assert (out["d1"], out["d2"], out["d3"]) == pytest.approx((0.5, 0.5, 0.5))
    ln2 = math.log(2)  # log errors g = [0, -ln2, ln2, 0], mean 0
    assert out["rmse_log"] == pytest.approx(ln2 / math.sqrt(2))
    assert out["log10"] == pytest.approx(math.log10(2) / 2)
    assert out["silog"] == pytest.approx(ln2 / math.sqrt(2))
    # medians: gt 2, pred 2.5 -> s* = 0.8; 0.8 * pred = [.8, .8, 3.2, 3.2] -> rel [.2, .6, .6, .2]
    assert out["s_star"] == pytest.approx(0.8)
    assert out["abs_rel_aligned"] == pytest.approx(0.4)
    assert out["pred_std"] == pytest.approx(1.5)
    assert out["gt_std"] == pytest.approx(math.sqrt(1.1875))
    assert (out["pred_min"], out["pred_max"], out["gt_min"], out["gt_max"]) == (1, 4, 1, 4)
    assert (out["n_images"], out["n_pixels"]) == (1, 4)
    # per range: gt 1 -> [0, 2) rel 0; gt 2, 2, 4 -> [2, 5) rel .5, 1, 0; nothing in [5, 10]
    assert out["abs_rel_0_2"] == pytest.approx(0.0)
    assert out["abs_rel_2_5"] == pytest.approx(0.5)
    assert out["abs_rel_5_10"] is None
    # ratios pred / gt: [0, 2) 1 / 1; [2, 5) 1 / 2, 4 / 2, 4 / 4 -> geometric mean (1/2 * 2 * 1)^(1/3) = 1
    assert out["ratio_0_2"] == pytest.approx(1.0)
    assert out["ratio_2_5"] == pytest.approx(1.0)
    assert out["ratio_5_10"] is None
    json.dumps(out, allow_nan=False)


def test_silog_variant_is_named():
    assert "0.5" in SILOG_VARIANT and "x100" in SILOG_VARIANT
    gt = image(1, 1, 1, 1)
    out = evaluate(2 * gt, gt)  # g = ln 2 everywhere: sqrt(ln2^2 - 0.5 ln2^2) = ln2 / sqrt 2
    assert out["silog"] == pytest.approx(math.log(2) / math.sqrt(2))


def test_metrics_are_averaged_over_images_not_pixels():
    gt = torch.ones(2, 1, 2, 2)
    pred = gt.clone()
    pred[1] = 2.0  # image 1: abs_rel 1, but only one valid pixel
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[1] = False
    valid[1, 0, 0, 0] = True
    out = evaluate(pred, gt, valid)
    assert out["abs_rel"] == pytest.approx(0.5)  # (0 + 1) / 2 images; pixel pooling gives 0.2
    assert out["d1"] == pytest.approx(0.5)
    assert (out["n_images"], out["n_pixels"]) == (2, 5)
    split = DepthMetrics()
    split.update(pred[:1], gt[:1], valid[:1])
    split.update(pred[1:], gt[1:], valid[1:])
    assert split.compute() == out


def test_scale_diagnostics_for_twice_too_far_prediction():
    gt = torch.rand(3, 1, 4, 4) * 4 + 0.5  # 2 * gt stays below max_depth (no clamping)
    out = evaluate(2 * gt, gt)
    assert out["s_star"] == pytest.approx(0.5)  # < 1: predictions too large
    assert out["abs_rel_aligned"] == pytest.approx(0.0, abs=1e-6)
    assert out["abs_rel"] == pytest.approx(1.0)
    assert out["pred_std"] == pytest.approx(2 * out["gt_std"])


def test_per_range_abs_rel_is_pooled_over_pixels():
    gt = image(1.0, 3.0, 6.0, 10.0, 9.0, 2.0)
    pred = image(1.5, 3.0, 3.0, 5.0, 9.0, 3.0)
    out = evaluate(pred, gt, max_depth=10.0)  # gt 10 is outside the open range (1e-3, 10)
    assert out["abs_rel_0_2"] == pytest.approx(0.5)
    assert out["abs_rel_2_5"] == pytest.approx((0 + 0.5) / 2)
    assert out["abs_rel_5_10"] == pytest.approx((0.5 + 0) / 2)
    assert out["n_pixels"] == 5
    # geometric means of pred / gt: [0, 2) 1.5; [2, 5) sqrt(1 * 1.5); [5, 10] sqrt(0.5 * 1)
    assert out["ratio_0_2"] == pytest.approx(1.5)
    assert out["ratio_2_5"] == pytest.approx(math.sqrt(1.5))
    assert out["ratio_5_10"] == pytest.approx(math.sqrt(0.5))


def test_per_range_ratio_shows_regression_to_the_mean():
    # near pixels predicted 2x too far and far ones 2x too near: s* (1.5) says only 'too near overall'
    gt = image(1.0, 1.0, 8.0, 8.0)
    pred = image(2.0, 2.0, 4.0, 4.0)
    out = evaluate(pred, gt)
    assert out["s_star"] == pytest.approx(4.5 / 3.0)
    assert (out["ratio_0_2"], out["ratio_2_5"], out["ratio_5_10"]) == (pytest.approx(2.0), None, pytest.approx(0.5))


def test_prediction_is_clamped_and_out_of_range_gt_ignored():
    gt = image(5.0, 1.0, 0.0, 12.0)
    pred = image(20.0, -1.0, 3.0, 3.0)
    out = evaluate(pred, gt)  # evaluated: gt 5 (pred -> 10) and gt 1 (pred -> 1e-3)
    assert out["n_pixels"] == 2
    assert out["abs_rel"] == pytest.approx((1.0 + 0.999) / 2)
    assert (out["pred_min"], out["pred_max"]) == (-1.0, 20.0)  # raw prediction range
    assert (out["gt_min"], out["gt_max"]) == (1.0, 5.0)


def test_nan_gt_holes_are_skipped_and_nan_pred_raises():
    gt = image(1.0, float("nan"), 2.0, 4.0)
    out = evaluate(image(1.0, 1.0, 2.0, 4.0), gt)
    assert out["n_pixels"] == 3 and out["abs_rel"] == 0.0
    with pytest.raises(ValueError, match="NaN/inf"):
        evaluate(image(1.0, 1.0, float("nan"), 4.0), gt)


def test_eigen_crop_refuses_other_sizes():
    gt = torch.ones(1, 1, 240, 320)
    with pytest.raises(ValueError, match=r"480x640 only, got 240x320.*eigen_crop=False"):
        evaluate(gt, gt, eigen_crop=True)


def test_eigen_crop_at_480x640():
    gt = torch.full((1, 1, 480, 640), 2.0)
    pred = torch.full_like(gt, 9.0)
    pred[..., 45:471, 41:601] = 2.0  # exact inside the crop, wrong outside
    out = evaluate(pred, gt, eigen_crop=True)
    assert out["abs_rel"] == pytest.approx(0.0)
    assert out["n_pixels"] == (471 - 45) * (601 - 41)
    assert evaluate(pred, gt)["abs_rel"] > 0.0


def test_constant_predictor_baseline():
    gt = image(1.0, 2.0, 4.0, 0.0)  # the 0 is outside the evaluated range
    # constant 2: |2 - 1| / 1, 0, |2 - 4| / 4 -> (1 + 0 + 0.5) / 3
    assert baseline_abs_rel(2.0, [(gt, all_valid(gt))]) == pytest.approx(0.5)
    metrics = DepthMetrics()
    metrics.update(torch.full_like(gt, 2.0), gt, all_valid(gt))
    out = metrics.compute()
    assert out["abs_rel"] == pytest.approx(0.5) and out["pred_std"] == 0.0
    assert out["s_star"] == pytest.approx(1.0)  # median gt 2 / 2


def test_depth_metrics_errors():
    metrics = DepthMetrics()
    with pytest.raises(ValueError, match="no pixel was evaluated"):
        metrics.compute()
    gt = image(1.0, 2.0)
    with pytest.raises(ValueError, match="bool"):
        metrics.update(gt, gt, torch.ones_like(gt))
    with pytest.raises(ValueError, match="min_depth"):
        DepthMetrics(min_depth=10.0, max_depth=1.0)


# ----------------------------------------------------------------------------- segmentation

def test_seg_metrics_nanmean_miou_and_ignore_index():
    assert "present" in MIOU_AVERAGING
    names = ("wall", "floor", "window")
    metrics = SegMetrics(3, class_names=names)
    target = torch.tensor([[[0, 0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 0, 1, 1, 2]]])  # the "window" prediction lies on an ignored pixel
    metrics.update(pred, target)
    out = metrics.compute()
    # wall: 2 / (3 + 2 - 2) = 2/3; floor: 1 / (1 + 2 - 1) = 1/2; window absent from both
    assert out["iou_per_class"]["wall"] == pytest.approx(2 / 3)
    assert out["iou_per_class"]["floor"] == pytest.approx(0.5)
    assert out["iou_per_class"]["window"] is None
    assert out["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # not / 3
    assert out["pixel_acc"] == pytest.approx(3 / 4)
    assert out["seg_pixels"] == 4   # named apart from the depth metrics' n_pixels, which a run reports beside it
    json.dumps(out, allow_nan=False)


def test_seg_metrics_accumulate_over_dataset_and_accept_logits():
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    metrics = SegMetrics(2)
    metrics.update(logits, target)
    metrics.update(torch.tensor([[[0, 0], [0, 0]]]), torch.tensor([[[0, 0], [0, 1]]]))
    # confusion rows gt, cols pred: [[3, 1], [1, 3]] -> IoU 3/5 each
    out = metrics.compute()
    assert torch.equal(metrics.confusion, torch.tensor([[3, 1], [1, 3]]))
    assert out["miou"] == pytest.approx(0.6)
    assert out["iou_per_class"] == pytest.approx({"0": 0.6, "1": 0.6})
    assert out["pixel_acc"] == pytest.approx(6 / 8)


def test_seg_metrics_errors():
    metrics = SegMetrics(3)
    with pytest.raises(ValueError, match="class id 7 outside"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="no labelled pixel"):
        metrics.compute()
    with pytest.raises(ValueError, match="class_names"):
        SegMetrics(3, class_names=["a", "b"])


def test_a_split_without_labels_has_depth_metrics_and_no_seg_ones():
    """NYU's BTS and h5 layouts carry no labels: a depth + seg student is measured on depth alone,
    in training and at the export's gates, instead of failing after its first epoch."""
    from distill.recipes import get_recipe
    from distill.students import build_student
    from distill.training.evaluation import evaluate
    from quant.validate import ValidationData, task_metrics

    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", decoder_channels=16).eval()
    image = torch.rand(2, 3, 64, 96)
    depth = torch.full((2, 1, 64, 96), 2.0)
    batch = {"image": image, "depth": depth, "valid": torch.ones_like(depth, dtype=torch.bool),
             "seg": torch.full((2, 64, 96), IGNORE_INDEX, dtype=torch.long)}
    recipe = get_recipe("v3")
    metrics = evaluate(model, [batch], torch.device("cpu"), None, recipe)
    assert metrics["abs_rel"] > 0 and "miou" not in metrics and "seg_boundary_f1" not in metrics
    assert SegMetrics(3).labelled_pixels == 0

    data = ValidationData(inputs=image.numpy(), depth=depth, valid=batch["valid"], seg=batch["seg"])
    labels = torch.zeros(2, 64, 96, dtype=torch.long).numpy()
    found = task_metrics(depth.numpy() * 1.1, labels, data, recipe.eval)
    assert found["abs_rel"] == pytest.approx(0.1) and "miou" not in found


# --- boundaries: hand-made steps whose edges and distances can be counted by eye ---

def step(h: int = 8, w: int = 8, at: int = 4, near: float = 2.0, far: float = 4.0) -> torch.Tensor:
    """(1, 1, h, w) depth: `near` metres left of column `at`, `far` from it on."""
    depth = torch.full((1, 1, h, w), near)
    depth[..., at:] = far
    return depth


def boundary_errors(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    metrics = DepthBoundaryMetrics()
    metrics.update(pred, gt, all_valid(gt) if valid is None else valid)
    return metrics.compute()


def test_depth_edges_are_the_two_columns_of_a_step():
    gt = step()   # |Sobel(ln)| = ln 2 / 2 on columns 3 and 4, zero elsewhere
    edges = depth_edges(gt, all_valid(gt))[0, 0]
    assert edges.any(dim=0).nonzero().flatten().tolist() == [3, 4]
    assert int(edges.sum()) == 16
    small = step(near=2.0, far=2.1)   # ln 1.05 / 2 = 0.024 < 0.05: not an edge
    assert not depth_edges(small, all_valid(small)).any()


def test_a_hole_beside_an_edge_does_not_thin_it_away():
    """5 m left of column 10, 10 m from it, one invalid pixel at (5, 12). At (5, 10) |Sobel(ln)| =
    ln 2 / 2 = 0.347; its neighbour (5, 11) reads the hole (filled with 1 m): 2 ln 10 / 8 = 0.576.
    That neighbour is outside the eroded mask, so it must not suppress (5, 10) as a larger peak."""
    gt = torch.full((1, 1, 11, 20), 5.0)
    gt[..., 10:] = 10.0
    valid = all_valid(gt)
    valid[0, 0, 5, 12] = False
    with_hole, without = depth_edges(gt, valid)[0, 0], depth_edges(gt, all_valid(gt))[0, 0]
    assert with_hole[3:8, 10].tolist() == without[3:8, 10].tolist() == [True] * 5


def test_depth_boundary_errors_hand_values():
    gt = step()
    assert boundary_errors(gt, gt) == {"dbe_acc": 0.0, "dbe_comp": 0.0, "dbe_images": 1}
    # edges on columns 5, 6 against 3, 4: predicted -> GT distances 1, 2; GT -> predicted 2, 1
    shifted = boundary_errors(step(at=6), gt)
    assert (shifted["dbe_acc"], shifted["dbe_comp"]) == pytest.approx((1.5, 1.5))
    # a prediction without edges (the blurred student's failure) scores the truncation in both
    assert boundary_errors(torch.full_like(gt, 3.0), gt)["dbe_acc"] == DBE_MAX_PX
    assert boundary_errors(torch.full_like(gt, 3.0), gt)["dbe_comp"] == DBE_MAX_PX


def test_depth_boundary_errors_skip_holes_and_edgeless_images():
    gt = torch.full((1, 1, 8, 8), 2.0)
    valid = all_valid(gt)
    valid[..., 4:] = False        # a hole is not a depth edge, whatever the depth there
    gt[..., 4:] = 0.0
    assert not depth_edges(gt, valid).any()
    assert boundary_errors(step(), gt, valid) == {"dbe_acc": None, "dbe_comp": None, "dbe_images": 0}



def test_depth_boundary_errors_keep_to_the_eigen_crop_as_the_depth_metrics_do():
    """NYU at 480x640 with eval.eigen_crop: an edge in the white border (columns < 41) is not counted."""
    gt = step(480, 640, at=20)                       # GT edge at columns 19-20, outside the crop
    gt[..., 300:] = 8.0                              # and one at columns 299-300, inside it
    pred = step(480, 640, at=20, far=2.0)            # only the edge inside the crop predicted
    pred[..., 300:] = 8.0
    whole, cropped = DepthBoundaryMetrics(), DepthBoundaryMetrics(eigen_crop=True)
    for metrics in (whole, cropped):
        metrics.update(pred, gt, all_valid(gt))
    assert whole.compute()["dbe_comp"] == pytest.approx(5.0) and cropped.compute()["dbe_comp"] == 0.0   # half the GT edge truncated at 10 px
    with pytest.raises(ValueError, match="0 < min_depth < max_depth"):
        DepthBoundaryMetrics(min_depth=5, max_depth=2)


def labels(h: int, w: int, at: int) -> torch.Tensor:
    """(1, h, w) class 0 left of column `at`, class 1 from it on."""
    out = torch.zeros(1, h, w, dtype=torch.long)
    out[..., at:] = 1
    return out


def boundary_f1(pred: torch.Tensor, target: torch.Tensor, **options) -> dict:
    metrics = SegBoundaryMetrics(**options)
    metrics.update(pred, target)
    return metrics.compute()


def test_seg_boundary_f1_hand_values():
    target = labels(4, 8, 4)      # boundary pixels: columns 3 and 4
    assert label_boundaries(target)[0].any(dim=0).nonzero().flatten().tolist() == [3, 4]
    assert boundary_f1(target, target)["seg_boundary_f1"] == 1.0
    # predicted boundary on columns 6, 7: with 2 px tolerance column 6 meets column 4 and column 4
    # meets column 6, the others are 3 px away -> precision 1/2, recall 1/2
    out = boundary_f1(labels(4, 8, 7), target, tolerance_px=2)
    assert (out["seg_boundary_precision"], out["seg_boundary_recall"], out["seg_boundary_f1"]) == (0.5, 0.5, 0.5)
    assert boundary_f1(labels(4, 8, 7), target)["seg_boundary_f1"] == 0.0   # default: 1 px here
    no_boundary = boundary_f1(torch.zeros_like(target), target)
    assert no_boundary["seg_boundary_precision"] is None and no_boundary["seg_boundary_f1"] == 0.0


def test_seg_boundaries_ignore_unlabelled_pixels():
    target = torch.zeros(1, 4, 8, dtype=torch.long)
    target[..., 4:] = IGNORE_INDEX   # labelled next to unlabelled is no boundary
    assert not label_boundaries(target).any()
    out = boundary_f1(labels(4, 8, 6), target)   # the prediction's boundary lies in the ignored part
    assert out["seg_boundary_precision"] is None and out["seg_boundary_recall"] is None


def test_gap_closed():
    assert gap_closed(0.2, baseline_abs_rel=0.4, teacher_abs_rel=0.0) == pytest.approx(0.5)
    assert gap_closed(0.03, baseline_abs_rel=0.38, teacher_abs_rel=0.03) == pytest.approx(1.0)
    assert gap_closed(0.2, baseline_abs_rel=0.1, teacher_abs_rel=0.3) is None


def test_seg_boundary_tolerance_zero_asks_for_exact_pixels():
    """0 is a tolerance (exact boundary pixels), not "use the default"; negative ones are refused."""
    gt, shifted = labels(8, 8, 4), labels(8, 8, 5)
    exact, default = SegBoundaryMetrics(tolerance_px=0), SegBoundaryMetrics()   # default: 1 px at 8x8
    for metrics in (exact, default):
        metrics.update(shifted, gt)
    assert exact.compute()["seg_boundary_f1"] < default.compute()["seg_boundary_f1"] == 1.0
    with pytest.raises(ValueError, match="tolerance_px=-1 must be >= 0"):
        SegBoundaryMetrics(tolerance_px=-1)


def test_boundary_kernels_live_on_the_labels_device(monkeypatch):
    """The disk kernel of the boundary match is built on the labels' device: on a GPU a CPU kernel
    stopped the first validation of every run with a segmentation head. (meta: no data, any host.)"""
    import distill.metrics as metrics

    real = metrics.F.conv2d

    def same_device_conv(x, weight, **kwargs):   # CUDA refuses a mix; the meta kernels would not
        assert weight.device == x.device, (weight.device, x.device)
        return real(x, weight, **kwargs)

    monkeypatch.setattr(metrics.F, "conv2d", same_device_conv)
    assert metrics._within(torch.zeros(2, 8, 8, dtype=torch.bool, device="meta"), 2).device.type == "meta"
