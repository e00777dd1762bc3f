"""Depth / segmentation losses and task weightings: hand-computed values and properties."""
from __future__ import annotations

import math

import pytest
import torch

from core.registry import UnknownNameError
from distill.losses import (
    DEPTH_LOSSES,
    WEIGHTINGS,
    build_depth_loss,
    build_weighting,
    class_frequencies,
    class_weights,
    cross_entropy,
    lovasz_softmax,
    modified_huber,
    parse_berhu_threshold,
    quantile,
)


def row(*values: float) -> torch.Tensor:
    """A (1, 1, 1, N) depth map."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def mask(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool).view(1, 1, 1, -1)


def loss_and_grad(name: str, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  **options) -> tuple[torch.Tensor, torch.Tensor]:
    pred = pred.clone().requires_grad_(True)
    value = build_depth_loss(name, **options)(pred, target, valid)
    value.backward()
    return value.detach(), pred.grad


# ----------------------------------------------------------------------------- common contract

@pytest.mark.parametrize("name", DEPTH_LOSSES.names())
def test_every_depth_loss_empty_mask_gives_zero_with_graph(name):
    pred = torch.rand(2, 1, 5, 6) + 0.5
    value, grad = loss_and_grad(name, pred, torch.rand(2, 1, 5, 6) + 0.5,
                                torch.zeros(2, 1, 5, 6, dtype=torch.bool))
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("name", DEPTH_LOSSES.names())
def test_every_depth_loss_ignores_invalid_pixels_even_nan(name):
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 6, 7) + 0.5, torch.rand(2, 1, 6, 7) + 0.5
    valid = torch.rand(2, 1, 6, 7) > 0.3
    value, grad = loss_and_grad(name, pred, target, valid)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~valid] = 123.0
    target2[~valid] = float("nan")  # the sample schema allows NaN holes in depth
    value2, grad2 = loss_and_grad(name, pred2, target2, valid)
    assert torch.allclose(value, value2, atol=1e-6)
    assert torch.isfinite(grad2).all()
    assert torch.equal(grad2[~valid], torch.zeros_like(grad2[~valid]))


@pytest.mark.parametrize("name", DEPTH_LOSSES.names())
def test_every_depth_loss_bf16_inputs_compute_in_float32(name):
    pred = (torch.rand(2, 1, 4, 4) + 0.5).bfloat16()
    target = (torch.rand(2, 1, 4, 4) + 0.5).bfloat16()
    value = build_depth_loss(name)(pred, target, torch.ones(2, 1, 4, 4, dtype=torch.bool))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_depth_loss_errors_name_the_problem():
    with pytest.raises(UnknownNameError, match='Unknown depth loss "berhoo".*berhu'):
        build_depth_loss("berhoo")
    loss = build_depth_loss("mse")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*unsqueeze"):
        loss(torch.ones(2, 4, 4), torch.ones(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        loss(row(1, 2), row(1, 2), row(1, 1))
    with pytest.raises(ValueError, match="same shape"):
        loss(row(1, 2), row(1, 2, 3), mask(True, True))
    with pytest.raises(ValueError, match="berHu threshold 'q80'"):
        build_depth_loss("berhu", threshold="q80")


# ----------------------------------------------------------------------------- mse, berHu

def test_mse_hand_value():
    value, grad = loss_and_grad("mse", row(1, 2, 3, 4), row(1, 1, 1, 1), mask(1, 1, 1, 0))
    assert value.item() == pytest.approx(5 / 3)  # residuals 0, 1, 2 -> (0 + 1 + 4) / 3
    assert torch.allclose(grad, row(0, 2 / 3, 4 / 3, 0))


def test_berhu_fixed_threshold_both_sides():
    # |r| = 0.5 <= c = 1: L1 -> 0.5; |r| = 2 > c: (4 + 1) / 2 = 2.5
    value, grad = loss_and_grad("berhu", row(1.5, 3), row(1, 1), mask(1, 1), threshold=1.0)
    assert value.item() == pytest.approx(1.5)
    assert torch.allclose(grad, row(0.5 * 1, 0.5 * 2 / 1))  # slopes sign(r) and r / c, over n=2



def test_berhu_threshold_given_as_text_on_the_command_line():
    """`loss.berhu_threshold=0.5` arrives as the text "0.5" (the field holds "p80" or "laina" too)."""
    fixed = parse_berhu_threshold("0.5")(torch.tensor([1.0, 3.0]))
    assert fixed.item() == 0.5
    assert parse_berhu_threshold("p50")(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)   # still a percentile
    for bad, reason in (("-1", "must be > 0"), ("0", "must be > 0"), ("nan", "finite"), ("inf", "finite")):
        with pytest.raises(ValueError, match=reason):
            parse_berhu_threshold(bad)


def test_berhu_p80_threshold_is_quantile_of_valid_residuals():
    target = row(0, 0, 0, 0, 0, 0)
    pred = row(1, 2, 3, 4, 5, 100)  # last pixel invalid: must not move the percentile
    valid = mask(1, 1, 1, 1, 1, 0)
    c = torch.quantile(torch.tensor([1.0, 2, 3, 4, 5]), 0.8).item()
    assert c == pytest.approx(4.2)  # 0.8 * 4 = 3.2 -> 4 + 0.2 * (5 - 4)
    expected = (1 + 2 + 3 + 4 + (25 + c * c) / (2 * c)) / 5
    value, grad = loss_and_grad("berhu", pred, target, valid)  # default "p80"
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # the threshold is detached: d/dr of (r^2 + c^2) / 2c is r / c with c constant
    assert grad[0, 0, 0, 4].item() == pytest.approx(5 / c / 5, rel=1e-6)
    assert grad[0, 0, 0, 3].item() == pytest.approx(1 / 5)
    value90, _ = loss_and_grad("berhu", pred, target, valid, threshold="p90")
    c90 = torch.quantile(torch.tensor([1.0, 2, 3, 4, 5]), 0.9).item()
    assert value90.item() == pytest.approx((10 + (25 + c90 ** 2) / (2 * c90)) / 5, rel=1e-6)


def test_berhu_laina_threshold_is_fifth_of_max():
    # c = 0.2 * 5 = 1: 1 -> 1; 2 -> 2.5; 3 -> 5; 4 -> 8.5; 5 -> 13; mean 30 / 5
    value, _ = loss_and_grad("berhu", row(1, 2, 3, 4, 5), row(0, 0, 0, 0, 0), mask(1, 1, 1, 1, 1),
                             threshold="laina")
    assert value.item() == pytest.approx(6.0)


def test_berhu_relative_and_log_residuals_hand_values():
    # target 2 m: pred 1 m (near side), 2 m, 4 m; the last pixel (0, 0) is invalid
    pred, target, valid = row(1, 2, 4, 0), row(2, 2, 2, 0), mask(1, 1, 1, 0)
    value, grad = loss_and_grad("berhu", pred, target, valid, threshold=10.0, residual_kind="relative")
    assert value.item() == pytest.approx((0.5 + 0 + 1) / 3)   # below c the loss is AbsRel
    assert torch.allclose(grad, row(-1 / 2 / 3, 0, 1 / 2 / 3, 0))  # sign(r) / target / n
    value, grad = loss_and_grad("berhu", pred, target, valid, threshold=10.0, residual_kind="log")
    assert value.item() == pytest.approx(2 * math.log(2) / 3)  # |log(1/2)| = |log(4/2)|
    assert torch.allclose(grad, row(-1 / 1 / 3, 0, 1 / 4 / 3, 0))  # sign(r) / pred / n
    assert torch.isfinite(grad).all()


def test_berhu_relative_residual_weighs_near_pixels_more():
    # the same 0.5 m error: absolute weighs it equally at 1 m and 5 m, relative 5x more at 1 m
    pred, target, valid = row(1.5, 5.5), row(1, 5), mask(1, 1)
    _, grad_abs = loss_and_grad("berhu", pred, target, valid, threshold=10.0)
    _, grad_rel = loss_and_grad("berhu", pred, target, valid, threshold=10.0, residual_kind="relative")
    assert grad_abs[0, 0, 0, 0] == pytest.approx(grad_abs[0, 0, 0, 1].item())
    assert grad_rel[0, 0, 0, 0] == pytest.approx(5 * grad_rel[0, 0, 0, 1].item())


def test_berhu_unknown_residual_names_the_choices():
    with pytest.raises(ValueError, match="absolute, relative, log"):
        build_depth_loss("berhu", residual_kind="metres")


def test_berhu_zero_threshold_falls_back_to_l1():
    pred = row(0, 0, 0, 0, 0, 3)
    value, grad = loss_and_grad("berhu", pred, torch.zeros_like(pred), torch.ones_like(pred).bool())
    assert value.item() == pytest.approx(0.5)  # p80 of |r| is 0 -> c = max |r| -> L1: 3 / 6
    assert torch.isfinite(grad).all()
    zero, grad = loss_and_grad("berhu", row(1, 2), row(1, 2), mask(1, 1))
    assert zero.item() == 0.0 and torch.isfinite(grad).all()


def test_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    # distinct values, and ties on either side of the order statistics it interpolates between
    cases = [torch.rand(1001, generator=g), torch.randint(0, 4, (997,), generator=g).float(),
             torch.tensor([2.0, 1, 1, 1, 3]), torch.tensor([1.0, 1, 1, 2, 2]), torch.tensor([5.0]), torch.zeros(7)]
    for x in cases:
        for q in (0.0, 0.37, 0.5, 0.8, 0.9, 1.0):
            assert quantile(x, q).item() == pytest.approx(torch.quantile(x, q).item(), abs=1e-6), (x, q)


# ----------------------------------------------------------------------------- SILog

def test_silog_two_pixel_hand_value():
    # g = [1, 0]: mean g^2 = 0.5, mean g = 0.5 -> sqrt(0.5 - 0.85 * 0.25)
    pred, target, valid = row(math.e, 1.0), row(1.0, 1.0), mask(1, 1)
    value, _ = loss_and_grad("silog", pred, target, valid)
    assert value.item() == pytest.approx(math.sqrt(0.2875), rel=1e-6)
    bts, _ = loss_and_grad("silog", pred, target, valid, scale=10.0)
    assert bts.item() == pytest.approx(10 * math.sqrt(0.2875), rel=1e-6)


def test_silog_scaled_copy_is_free_with_lambda_one():
    target = torch.rand(2, 1, 4, 5) + 0.5
    value, grad = loss_and_grad("silog", 3.0 * target, target, torch.ones_like(target).bool(),
                                lam=1.0)
    assert value.item() == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(grad).all()  # the guarded sqrt has no inf slope at 0


def test_silog_per_image_vs_batch():
    target = torch.rand(2, 1, 3, 3) + 0.5
    pred = target.clone()
    pred[0] *= 2.0  # image 0 off by a factor 2, image 1 exact
    valid = torch.ones_like(target).bool()
    per_image, _ = loss_and_grad("silog", pred, target, valid, lam=1.0, per_image=True)
    batch, _ = loss_and_grad("silog", pred, target, valid, lam=1.0, per_image=False)
    assert per_image.item() == pytest.approx(0.0, abs=1e-5)
    # pooled g: ln 2 on half the pixels, 0 on the other half -> std = ln(2) / 2
    assert batch.item() == pytest.approx(math.log(2) / 2, rel=1e-5)


# ----------------------------------------------------------------------------- SSI

def test_ssi_hand_value():
    # p = [0, 1, 2], y = [0, 1, 3]: s = cov / var = 1 / (2/3) = 1.5, t = 4/3 - 1.5 = -1/6
    # aligned [-1/6, 4/3, 17/6] -> |residuals| 1/6, 1/3, 1/6 -> mean 2/9
    value, grad = loss_and_grad("ssi", row(0, 1, 2, 50), row(0, 1, 3, 7), mask(1, 1, 1, 0))
    assert value.item() == pytest.approx(2 / 9, rel=1e-5)
    assert torch.isfinite(grad).all()


def test_ssi_invariant_to_scale_and_shift():
    torch.manual_seed(1)
    target = torch.rand(3, 1, 6, 6) + 0.5
    pred = torch.rand(3, 1, 6, 6)
    valid = torch.rand(3, 1, 6, 6) > 0.2
    loss = build_depth_loss("ssi")
    assert loss(2.5 * target - 0.7, target, valid).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(0.3 * pred + 4.0, target, valid).item() == pytest.approx(
        loss(pred, target, valid).item(), rel=1e-4)


def test_ssi_constant_prediction_is_degenerate_not_nan():
    # var(p) = 0 -> s = 0, t = mean(y) = 4/3 -> mean |y - 4/3| = (4/3 + 1/3 + 5/3) / 3
    value, grad = loss_and_grad("ssi", row(2, 2, 2), row(0, 1, 3), mask(1, 1, 1))
    assert value.item() == pytest.approx(10 / 9, rel=1e-5)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- gradient Huber

def square(a: float, b: float, c: float, d: float) -> torch.Tensor:
    return torch.tensor([[a, b], [c, d]], dtype=torch.float32).view(1, 1, 2, 2)


def test_gradient_huber_hand_value_2x2():
    # target [[0, 1], [2, 3]], pred 0: differences h 1, 1; v 2, 2; diag 3; anti-diag 2 - 1 = 1
    # delta = 1: |x| <= 1 -> |x|; else 0.5 x^2 + 0.5 -> 1 + 1 + 2.5 + 2.5 + 5 + 1 = 13 over 6
    target, pred = square(0, 1, 2, 3), torch.zeros(1, 1, 2, 2)
    all_valid = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    value, grad = loss_and_grad("gradient_huber", pred, target, all_valid, delta=1.0)
    assert value.item() == pytest.approx(13 / 6)
    assert torch.isfinite(grad).all()
    # bottom-right invalid: only h-top (1), v-left (2), anti-diagonal (1) remain -> 4.5 / 3
    partly = all_valid.clone()
    partly[0, 0, 1, 1] = False
    value, _ = loss_and_grad("gradient_huber", pred, target, partly, delta=1.0)
    assert value.item() == pytest.approx(1.5)


def test_gradient_huber_scales_average_the_subsampled_losses():
    # target 4x4 with rows 0, 0, 1, 1 (a step between rows 1 and 2), pred 0, delta 1:
    # scale 1: h 0 (12x); v: rows 0-1 0 (4x), 1-2 1 (4x), 2-3 0 (4x); diag and anti-diag 3 each
    #   of 0, 1, 0 per row pair -> |x| = 1 on 4 + 3 + 3 = 10 of the 12 + 12 + 9 + 9 = 42 differences
    # scale 2 (rows 0 and 2, columns 0 and 2): target [[0, 0], [1, 1]] -> h 0, 0; v 1, 1; diag 1,
    #   anti-diag 1 -> 4 / 6
    target = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 4, 1).expand(1, 1, 4, 4).contiguous()
    pred, valid = torch.zeros_like(target), torch.ones_like(target).bool()
    one = build_depth_loss("gradient_huber", delta=1.0)(pred, target, valid)
    two = build_depth_loss("gradient_huber", delta=1.0, scales=2)(pred, target, valid)
    assert one.item() == pytest.approx(10 / 42)
    assert two.item() == pytest.approx((10 / 42 + 4 / 6) / 2)
    # a scale the image is too small for (a 4x4 map has no 8-pixel step) is left out
    assert build_depth_loss("gradient_huber", delta=1.0, scales=5)(pred, target, valid).item() == pytest.approx(
        two.item())
    with pytest.raises(ValueError, match="scales"):
        build_depth_loss("gradient_huber", scales=0)


def test_gradient_huber_zero_for_identical_and_offset_maps():
    target = torch.rand(2, 1, 5, 5)
    valid = torch.ones_like(target).bool()
    loss = build_depth_loss("gradient_huber", delta=0.1)
    assert loss(target.clone(), target, valid).item() == 0.0
    assert loss(target + 1.7, target, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_modified_huber_continuous_at_delta():
    delta, eps = 0.3, 1e-4
    below, at, above = modified_huber(torch.tensor([delta - eps, delta, delta + eps]), delta)
    assert at.item() == pytest.approx(delta ** 2)
    assert below.item() == pytest.approx(delta ** 2, abs=1e-4)
    assert above.item() == pytest.approx(delta ** 2, abs=1e-4)
    assert modified_huber(torch.tensor([-2.0]), 1.0).item() == pytest.approx(2.5)


# ----------------------------------------------------------------------------- cross-entropy

def test_cross_entropy_hand_value_and_ignore_index():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 0, 0, 0] = 2.0
    target = torch.tensor([[[0, 255]]])
    value = cross_entropy(logits, target)
    assert value.item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)), rel=1e-6)
    logits[0, :, 0, 1] = torch.tensor([9.0, -9.0, 3.0])  # ignored pixel: no effect
    assert cross_entropy(logits, target).item() == pytest.approx(value.item())
    uniform = cross_entropy(torch.zeros(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)))
    assert uniform.item() == pytest.approx(math.log(3), rel=1e-6)


def test_weighted_cross_entropy_is_the_weighted_mean_and_matches_torch():
    logits = torch.zeros(1, 2, 1, 3)            # uniform: every labelled pixel costs ln 2
    logits[0, 0, 0, 0] = 1.0                    # pixel 0 (class 0) costs ln(1 + e^-1)
    target = torch.tensor([[[0, 1, 255]]])
    weight = torch.tensor([1.0, 3.0])
    expected = (math.log(1 + math.e ** -1) + 3 * math.log(2)) / 4
    assert cross_entropy(logits, target, weight=weight).item() == pytest.approx(expected, rel=1e-6)
    logits, target = torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))
    target[0, 0] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    torch_value = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert cross_entropy(logits, target, weight=weight).item() == pytest.approx(torch_value.item(), rel=1e-5)


def test_hard_fraction_keeps_only_the_hardest_labelled_pixels():
    # four labelled pixels, 2 classes; their losses: ln(1 + e^-2), ln 2, ln(1 + e^2), ln(1 + e^4)
    logits = torch.zeros(1, 2, 1, 5)
    logits[0, 0, 0, :4] = torch.tensor([2.0, 0.0, -2.0, -4.0])
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    losses = [math.log(1 + math.e ** -2), math.log(2), math.log(1 + math.e ** 2), math.log(1 + math.e ** 4)]
    half = cross_entropy(logits, target, hard_fraction=0.5)
    assert half.item() == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-6)
    assert cross_entropy(logits, target, hard_fraction=0.3).item() == pytest.approx(
        (losses[2] + losses[3]) / 2, rel=1e-6)   # ceil(0.3 * 4) = 2 pixels
    assert cross_entropy(logits, target, hard_fraction=1.0).item() == pytest.approx(sum(losses) / 4, rel=1e-6)
    weight = torch.tensor([2.0, 1.0])            # one class: the weights cancel in the weighted mean
    assert cross_entropy(logits, target, weight=weight, hard_fraction=0.5).item() == pytest.approx(half.item())
    logits.requires_grad_(True)
    cross_entropy(logits, target, hard_fraction=0.5).backward()
    assert logits.grad[0, :, 0, :2].abs().sum() == 0 and logits.grad[0, :, 0, 2:4].abs().sum() > 0
    assert cross_entropy(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255), hard_fraction=0.5).item() == 0.0
    with pytest.raises(ValueError, match="hard_fraction"):
        cross_entropy(logits, target, hard_fraction=0.0)


def one_hot_logits(labels: list[int], num_classes: int) -> torch.Tensor:
    """(1, C, 1, N) logits whose softmax is (numerically) one-hot on `labels`."""
    return 100.0 * torch.nn.functional.one_hot(torch.tensor(labels), num_classes).T.float().view(1, num_classes, 1, -1)


def test_lovasz_softmax_is_one_minus_iou_on_hard_predictions():
    # labels 0 0 1 1 (ignored), predicted 0 1 1 1 0: IoU of class 0 = 1/2, of class 1 = 2/3;
    # class 2 is predicted nowhere and labelled nowhere: absent, it does not count
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    value = lovasz_softmax(one_hot_logits([0, 1, 1, 1, 0], 3), target)
    assert value.item() == pytest.approx(((1 - 1 / 2) + (1 - 2 / 3)) / 2, abs=1e-6)
    assert lovasz_softmax(one_hot_logits([0, 0, 1, 1, 2], 3), target).item() == pytest.approx(0.0, abs=1e-6)


def test_lovasz_softmax_hand_value_on_soft_predictions():
    # two pixels labelled 0 and 1, p(class 0) = 0.8 and 0.3. Class 0: errors 0.2 (foreground), 0.3
    # (background); sorted 0.3, 0.2, Jaccard losses 1/2 then 1: 0.3 * 0.5 + 0.2 * 0.5 = 0.25.
    # Class 1: errors 0.3 (foreground), 0.2; Jaccard losses 1 then 1: 0.3 * 1 + 0.2 * 0 = 0.3.
    p0 = torch.tensor([0.8, 0.3])
    logits = torch.stack([p0.log(), (1 - p0).log()]).view(1, 2, 1, 2).requires_grad_(True)
    value = lovasz_softmax(logits, torch.tensor([[[0, 1]]]))
    assert value.item() == pytest.approx((0.25 + 0.3) / 2, rel=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_lovasz_softmax_stride_ignore_and_errors():
    target = torch.tensor([[[0, 255, 1, 255]]])            # stride 2 keeps pixels 0 and 2 only
    logits = one_hot_logits([0, 1, 1, 0], 2)
    assert lovasz_softmax(logits, target, stride=2).item() == pytest.approx(0.0, abs=1e-6)
    assert lovasz_softmax(logits, target.clone().fill_(0), stride=2).item() == pytest.approx(0.5, abs=1e-6)
    empty = torch.randn(1, 3, 2, 2, requires_grad=True)
    value = lovasz_softmax(empty, torch.full((1, 2, 2), 255))
    value.backward()
    assert value.item() == 0.0 and torch.equal(empty.grad, torch.zeros_like(empty))
    with pytest.raises(ValueError, match="stride"):
        lovasz_softmax(logits, target, stride=0)
    with pytest.raises(ValueError, match="squeeze"):
        lovasz_softmax(logits, target.unsqueeze(1))


def test_objective_adds_the_lovasz_term_to_the_seg_loss():
    from core.config import apply_overrides
    from distill.recipes import get_recipe
    from distill.training.objective import LOVASZ_STRIDE, Objective

    logits, target = torch.randn(2, 13, 8, 8), torch.randint(0, 13, (2, 8, 8))
    batch = {"seg": target}
    plain = Objective(get_recipe("v3"))({"seg": logits}, batch)["seg"]
    lovasz_recipe = apply_overrides(get_recipe("v3"), ["loss.seg_lovasz_weight=0.5"])
    with_lovasz = Objective(lovasz_recipe)({"seg": logits}, batch)["seg"]
    expected = plain + 0.5 * lovasz_softmax(logits, target, stride=LOVASZ_STRIDE)
    assert plain.item() == pytest.approx(cross_entropy(logits, target).item())
    assert with_lovasz.item() == pytest.approx(expected.item()) and with_lovasz.item() > plain.item()


def test_class_weights_from_frequencies():
    frequencies = torch.tensor([0.64, 0.32, 0.04, 0.0], dtype=torch.float64)
    assert torch.allclose(class_weights(frequencies, 0.0), torch.ones(4))      # plain cross-entropy
    w = class_weights(frequencies, 0.5)                   # 1/sqrt: 1.25, 1.77, 5 before scaling
    assert w[1] / w[0] == pytest.approx(2 ** 0.5, rel=1e-5) and w[2] / w[0] == pytest.approx(4.0, rel=1e-5)
    assert float((w.double() * frequencies).sum()) == pytest.approx(1.0)     # the average pixel weighs 1
    assert w[3] == w.max()                                # a class never seen gets the largest weight
    inverse = class_weights(frequencies, 1.0)             # 16x apart: clipped to 10x the smallest
    assert inverse[2] / inverse[0] == pytest.approx(10.0, rel=1e-5)


def test_class_frequencies_count_labelled_pixels():
    items = [{"seg": torch.tensor([[0, 0], [1, 255]])}, {"seg": torch.tensor([[2, 2], [2, 2]])}]
    assert class_frequencies(items, 4).tolist() == pytest.approx([2 / 7, 1 / 7, 4 / 7, 0.0])
    assert class_frequencies([{"seg": torch.full((2, 2), 255)}], 4).tolist() == [0.0] * 4   # an image folder
    with pytest.raises(ValueError, match=r"training item 0's segmentation holds ids \[-1, 4\] outside 0-3"):
        class_frequencies([{"seg": torch.tensor([[0, 4], [-1, 255]])}], 4)   # e.g. NYU's 40 classes unmapped


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 13, 4, 4, requires_grad=True)
    value = cross_entropy(logits, torch.full((2, 4, 4), 255))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="squeeze"):
        cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))


# ----------------------------------------------------------------------------- weightings

TASKS = {"depth": "regression", "seg": "classification"}


def test_weighting_registry_and_errors():
    assert WEIGHTINGS.names() == ["dwa", "fixed", "kendall"]
    with pytest.raises(UnknownNameError, match="kendal.*kendall"):
        build_weighting("kendal", TASKS)
    with pytest.raises(ValueError, match="'depth' has kind 'regresion'"):
        build_weighting("fixed", {"depth": "regresion"})
    weighting = build_weighting("fixed", TASKS)
    with pytest.raises(ValueError, match=r"missing \['seg'\]"):
        weighting({"depth": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unknown tasks"):
        build_weighting("fixed", TASKS, weights={"normals": 2.0})


def test_fixed_weighting():
    weighting = build_weighting("fixed", TASKS, weights={"seg": 0.5})
    total, weights = weighting({"depth": torch.tensor(2.0), "seg": torch.tensor(4.0)})
    assert total.item() == pytest.approx(4.0) and weights == {"depth": 1.0, "seg": 0.5}
    assert list(weighting.parameters()) == []


def test_kendall_values_and_gradients():
    weighting = build_weighting("kendall", TASKS)
    params = list(weighting.parameters())
    assert len(params) == 1 and params[0].requires_grad and params[0].tolist() == [0.0, 0.0]
    losses = {"depth": torch.tensor(2.0), "seg": torch.tensor(3.0)}
    total, weights = weighting(losses)  # s = 0: 0.5 * 2 + 1 * 3
    assert total.item() == pytest.approx(4.0) and weights == {"depth": 0.5, "seg": 1.0}
    total.backward()  # d/ds: regression -0.5 e^-s L + 0.5 = -0.5; classification -e^-s L + 0.5
    assert weighting.log_vars.grad.tolist() == pytest.approx([-0.5, -2.5])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([math.log(2.0), -1.0]))
    total, weights = weighting(losses)
    expected = (0.5 * 0.5 * 2 + 0.5 * math.log(2.0)) + (math.e * 3 - 0.5)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert weights["depth"] == pytest.approx(0.25) and weights["seg"] == pytest.approx(math.e)


def test_kendall_regression_form_for_all_tasks():
    weighting = build_weighting("kendall", {"depth": "regression", "seg": "regression"})
    total, _ = weighting({"depth": torch.tensor(2.0), "seg": torch.tensor(3.0)})
    assert total.item() == pytest.approx(2.5)


def test_dwa_weights_follow_the_formula():
    weighting = build_weighting("dwa", TASKS)  # T = 2
    losses = {"depth": torch.tensor(1.0), "seg": torch.tensor(1.0)}
    assert weighting(losses)[1] == {"depth": 1.0, "seg": 1.0}  # epoch 1
    weighting.epoch_end({"depth": 2.0, "seg": 1.0})
    assert weighting(losses)[1] == {"depth": 1.0, "seg": 1.0}  # epoch 2
    weighting.epoch_end({"depth": 1.0, "seg": 1.0})  # w = [0.5, 1.0]
    total, weights = weighting({"depth": torch.tensor(3.0), "seg": torch.tensor(5.0)})
    norm = math.exp(0.25) + math.exp(0.5)
    assert weights["depth"] == pytest.approx(2 * math.exp(0.25) / norm, rel=1e-6)
    assert weights["seg"] == pytest.approx(2 * math.exp(0.5) / norm, rel=1e-6)
    assert sum(weights.values()) == pytest.approx(2.0)
    assert total.item() == pytest.approx(3 * weights["depth"] + 5 * weights["seg"], rel=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        weighting.epoch_end({"depth": float("nan"), "seg": 1.0})


def test_dwa_state_dict_round_trip_continues_identically():
    tasks = {"depth": "regression", "seg": "classification", "grad": "regression"}
    history = [{"depth": 3.0, "seg": 2.0, "grad": 1.0}, {"depth": 2.0, "seg": 1.9, "grad": 1.2},
               {"depth": 1.5, "seg": 1.8, "grad": 0.7}]
    original = build_weighting("dwa", tasks, temperature=2.0)
    for losses in history:
        original.epoch_end(losses)
    resumed = build_weighting("dwa", tasks, temperature=2.0)
    resumed.load_state_dict(original.state_dict())
    for module in (original, resumed):
        module.epoch_end({"depth": 1.4, "seg": 1.0, "grad": 0.9})
    batch = {t: torch.tensor(1.0) for t in tasks}
    assert original(batch)[1] == resumed(batch)[1]
    assert sum(original(batch)[1].values()) == pytest.approx(3.0)


def test_kendall_state_dict_round_trip():
    original = build_weighting("kendall", TASKS)
    with torch.no_grad():
        original.log_vars.copy_(torch.tensor([0.3, -0.2]))
    resumed = build_weighting("kendall", TASKS)
    resumed.load_state_dict(original.state_dict())
    losses = {"depth": torch.tensor(2.0), "seg": torch.tensor(3.0)}
    assert original(losses)[0].item() == resumed(losses)[0].item()


def test_deep_supervision_targets_average_log_depth_over_valid_pixels():
    from distill.training.objective import downsample_depth

    depth = torch.tensor([[1.0, 4.0, 2.0, 2.0], [7.0, 16.0, 2.0, 2.0]]).view(1, 1, 2, 4)
    valid = torch.tensor([[True, True, False, False], [False, True, True, False]]).view(1, 1, 2, 4)
    low, ok = downsample_depth(depth, valid, 2)
    assert low.shape == ok.shape == (1, 1, 1, 2)
    assert low[0, 0, 0, 0].item() == pytest.approx(4.0)   # geometric mean of 1, 4, 16 (7 is invalid)
    assert ok.flatten().tolist() == [True, False]            # 3 of 4 valid, then 1 of 4
    # an invalid pixel may hold inf or NaN (an online teacher's): it counts for nothing, not NaN
    poisoned = depth.clone()
    poisoned[0, 0, 1, 0], poisoned[0, 0, 1, 2] = float("inf"), float("nan")
    valid[0, 0, 1, 2] = False
    low, ok = downsample_depth(poisoned, valid, 2)
    assert low[0, 0, 0, 0].item() == pytest.approx(4.0) and torch.isfinite(low).all()


def test_deep_supervision_adds_the_coarse_levels_losses_at_their_weight():
    """loss.aux_weight: each task's loss on `out["aux"]`, averaged over the levels, times the weight."""
    from dataclasses import replace

    from distill.recipes.history import V3
    from distill.training.objective import Objective, downsample_depth

    torch.manual_seed(0)
    recipe = replace(V3(), loss=replace(V3().loss, aux_weight=0.0))
    target = torch.rand(2, 1, 8, 8) * 4 + 1
    batch = {"teacher_depth": target, "seg": torch.randint(0, 13, (2, 8, 8))}
    out = {"depth": torch.rand(2, 1, 8, 8) + 1, "seg": torch.randn(2, 13, 8, 8),
           "aux": [{"depth": torch.rand(2, 1, 2, 2) + 1, "seg": torch.randn(2, 13, 2, 2)},
                   {"depth": torch.rand(2, 1, 4, 4) + 1, "seg": torch.randn(2, 13, 4, 4)}]}
    plain = Objective(recipe)(out, batch)
    supervised = Objective(replace(recipe, loss=replace(recipe.loss, aux_weight=0.5)))(out, batch)
    objective = Objective(recipe)
    valid = torch.ones_like(target, dtype=torch.bool)
    depth_terms = [objective.pixel_loss(a["depth"], *downsample_depth(target, valid, 8 // a["depth"].shape[-1]))
                   for a in out["aux"]]
    seg_terms = [torch.nn.functional.cross_entropy(a["seg"], batch["seg"][:, k // 2::k, k // 2::k])
                 for a, k in zip(out["aux"], (4, 2))]
    assert supervised["depth"].item() == pytest.approx(plain["depth"].item() + 0.5 * sum(depth_terms).item() / 2, rel=1e-5)
    assert supervised["seg"].item() == pytest.approx(plain["seg"].item() + 0.5 * sum(seg_terms).item() / 2, rel=1e-5)


def test_surface_normals_of_a_wall_a_floor_and_a_depth_edge():
    """Normals of the back-projected target (central differences), facing the camera: a wall in
    front is (0, 0, -1), a floor below the camera (y points down) (0, -1, 0); none across a depth edge."""
    from distill.losses import surface_normals

    h, w = 16, 20
    intrinsics = torch.tensor([[16.0, 16.0, 10.0, 8.0]])   # pixel centres at u + 0.5
    wall = torch.full((1, 1, h, w), 3.0)
    wall[..., 10:] = 1.5   # a box in front of the wall's right half
    normals, defined = surface_normals(wall, wall > 0, intrinsics)
    assert torch.allclose(normals[0, :, 4, 4], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(normals[0, :, 4, 15], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert not defined[0, 0, :, 9:11].any() and defined[0, 0, 1:-1, 1:9].all()   # the edge, and the image border
    assert not defined[0, 0, 0].any() and not defined[0, 0, :, -1].any()
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1) + 0.5
    below = (rows - 8.0) / 16.0   # y / z of each row's rays
    floor = torch.where(below > 0, 1.5 / below.clamp_min(1e-6), torch.zeros(())).expand(1, 1, h, w).contiguous()
    normals, defined = surface_normals(floor, floor > 0, intrinsics, max_log_step=1.0)
    assert defined[0, 0, 12, 1:-1].all()
    assert torch.allclose(normals[0, :, 12, 10], torch.tensor([0.0, -1.0, 0.0]), atol=1e-5)
    tilted = 3.0 + 0.1 * (torch.arange(w, dtype=torch.float32) + 0.5 - 10.0).view(1, 1, 1, w) / 16.0 * 3.0
    normals, _ = surface_normals(tilted.expand(1, 1, h, w).contiguous(), torch.ones(1, 1, h, w, dtype=torch.bool), intrinsics)
    # depth rising by 0.3 m per unit of x / z: near the optical axis dZ/dX = 0.3 / 3, so the normal is (0.1, 0, -1) normalised
    assert torch.allclose(normals[0, :, 8, 10], torch.tensor([0.1, 0.0, -1.0]) / 1.01 ** 0.5, atol=2e-3)


def test_normal_loss_is_one_minus_the_cosine_where_the_target_has_a_normal():
    from distill.training.objective import normal_loss

    depth = torch.full((2, 1, 16, 20), 3.0)
    valid = torch.ones_like(depth, dtype=torch.bool)
    intrinsics = torch.tensor([[16.0, 16.0, 10.0, 8.0]] * 2)
    facing = torch.tensor([0.0, 0.0, -2.0]).view(1, 3, 1, 1).expand(2, 3, 4, 5)   # any length: normalised
    assert normal_loss(facing, depth, valid, intrinsics).item() == pytest.approx(0.0, abs=1e-6)
    sideways = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 5)   # 45 degrees off
    assert normal_loss(sideways, depth, valid, intrinsics).item() == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    assert normal_loss(facing, depth, torch.zeros_like(valid), intrinsics).item() == 0.0   # nothing defined: no term


def test_the_normal_term_joins_the_depth_loss_at_its_weight():
    from dataclasses import replace

    from distill.recipes.history import V3
    from distill.training.objective import Objective, normal_loss, weighted_total, weighting_for

    torch.manual_seed(0)
    recipe = replace(V3(), loss=replace(V3().loss, normal_weight=0.0))
    target = torch.rand(2, 1, 16, 20) * 4 + 1
    batch = {"teacher_depth": target, "seg": torch.randint(0, 13, (2, 16, 20)),
             "intrinsics": torch.tensor([[16.0, 16.0, 10.0, 8.0]] * 2)}
    out = {"depth": torch.rand(2, 1, 16, 20) + 1, "seg": torch.randn(2, 13, 16, 20),
           "normals": torch.randn(2, 3, 4, 5, requires_grad=True)}
    plain = Objective(recipe)({k: v for k, v in out.items() if k != "normals"}, batch)
    with_normals = Objective(replace(recipe, loss=replace(recipe.loss, normal_weight=0.7)))(out, batch)
    term = normal_loss(out["normals"], target, torch.ones_like(target, dtype=torch.bool), batch["intrinsics"])
    assert with_normals["depth"].item() == pytest.approx(plain["depth"].item() + 0.7 * term.item(), rel=1e-6)
    # beside the weighting (`loss.normal_weighting=fixed`): the depth task as without the head, and
    # the term added to the weighted total at its own weight, where Kendall's weights leave it alone
    beside = replace(recipe, loss=replace(recipe.loss, normal_weight=0.7, normal_weighting="fixed"))
    losses = Objective(beside)(out, batch)
    assert losses["depth"].item() == pytest.approx(plain["depth"].item(), rel=1e-6)
    assert losses["normals"].item() == pytest.approx(0.7 * term.item(), rel=1e-6)
    weighting = weighting_for(beside)
    total, weights = weighted_total(weighting, losses)
    assert set(weights) == {"depth", "seg"}
    assert total.item() == pytest.approx(weighting(plain)[0].item() + 0.7 * term.item(), rel=1e-5)
    target[0, 0, :4, :4] = float("nan")   # an invalid pixel's NaN reaches neither the term nor its gradient
    valid = torch.isfinite(target)
    normal_loss(out["normals"], target, valid, batch["intrinsics"]).backward()
    assert torch.isfinite(out["normals"].grad).all()


def test_segmentation_is_weighted_when_any_probed_image_has_labels():
    """One image without labels of its own (all ignored) does not take segmentation out of the
    weighting; a set where none of the probed images has any does."""
    from distill.data.classes import IGNORE_INDEX
    from distill.recipes import get_recipe
    from distill.training.objective import labelled_tasks

    recipe = get_recipe("v3")
    unlabelled = {"seg": torch.full((4, 4), IGNORE_INDEX)}
    labelled = {"seg": torch.zeros(4, 4, dtype=torch.long)}
    said = []
    assert labelled_tasks(recipe, [unlabelled, labelled], said.append) == ("depth", "seg") and not said
    assert labelled_tasks(recipe, [unlabelled, unlabelled], said.append) == ("depth",) and len(said) == 1
