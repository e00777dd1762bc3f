"""Distill Any Depth's normalisations, shared crops, local-global loss and assistant schedule;
D3epth's feature distiller; all wired into a training run."""
import json

import numpy as np
import pytest
import torch

from distill.cross_context import (AssistantSchedule, crop_batch, local_global_loss, overlapping_patches,
                                   sample_shared_crop)
from distill.losses.feature_kd import FeatureDistiller
from distill.losses.normalization import normalized_l1
from distill.run import main
from distill.teachers import TeacherErrorModel, build_teacher

MODES = ("global", "hybrid", "local")


def scene(b=2, h=24, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 1, h, w, generator=g) * 6 + 0.5
    valid = torch.rand(b, 1, h, w, generator=g) > 0.1
    pred = target + 0.2 * torch.randn(b, 1, h, w, generator=g)
    return pred, target, valid


@pytest.mark.parametrize("mode", MODES)
def test_normalised_modes_ignore_per_image_scale_and_shift(mode):
    pred, target, valid = scene()
    base = normalized_l1(pred, target, valid, mode)
    scale = torch.tensor([2.0, 0.3]).view(2, 1, 1, 1)
    assert base > 0.01
    assert torch.allclose(normalized_l1(pred * scale + 1.5, target, valid, mode), base, rtol=1e-4)
    assert torch.allclose(normalized_l1(pred, target * 3 - 0.2, valid, mode), base, rtol=1e-4)
    assert normalized_l1(target, target, valid, mode) < 1e-5


def test_none_is_plain_l1_and_not_invariant():
    pred, target, valid = scene()
    assert torch.allclose(normalized_l1(pred, target, valid, "none"), (pred - target).abs()[valid].mean())
    assert normalized_l1(pred * 2, target, valid, "none") > 2 * normalized_l1(pred, target, valid, "none")


def test_local_contexts_are_independent_of_each_other():
    # A per-context affine change of the student (its far half rescaled) is invisible to local
    # normalisation (each depth segment normalised alone) but not to global or hybrid.
    pred, target, valid = scene(b=1, h=16, w=16)
    valid = torch.ones_like(valid)
    far = target > target.median()                        # segments 2 and 3 of 4 (equal counts)
    warped = torch.where(far, pred * 2.0 + 1.0, pred)
    assert torch.allclose(normalized_l1(warped, target, valid, "local"), normalized_l1(pred, target, valid, "local"),
                          rtol=1e-4)
    for mode in ("global", "hybrid"):
        assert normalized_l1(warped, target, valid, mode) > 1.2 * normalized_l1(pred, target, valid, mode)


def test_invalid_pixels_ignored_and_empty_mask_keeps_graph():
    pred, target, valid = scene()
    changed = torch.where(valid, pred, torch.full_like(pred, 1e6))
    for mode in ("none", *MODES):
        assert torch.allclose(normalized_l1(changed, target, valid, mode), normalized_l1(pred, target, valid, mode))
    p = pred.clone().requires_grad_()
    loss = normalized_l1(p, target, torch.zeros_like(valid), "hybrid")
    loss.backward()
    assert loss.item() == 0 and torch.all(p.grad == 0)
    with pytest.raises(ValueError, match="normalization 'median'"):
        normalized_l1(pred, target, valid, "median")


def test_hybrid_gradients_finite():
    pred, target, valid = scene()
    p = pred.clone().requires_grad_()
    normalized_l1(p, target, valid, "hybrid").backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def batch_of(h=32, w=40):
    g = torch.Generator().manual_seed(3)
    depth = torch.rand(2, 1, h, w, generator=g) * 5 + 1
    return {"image": torch.randn(2, 3, h, w, generator=g), "depth": depth, "valid": depth > 0,
            "seg": torch.randint(0, 13, (2, h, w), generator=g),
            "intrinsics": torch.tensor([[30.0, 31.0, 19.5, 15.5]] * 2), "index": torch.tensor([0, 1]),
            "flipped": torch.tensor([False, False])}


def test_crop_preserves_rays_and_keeps_aspect():
    rng = np.random.default_rng(0)
    for _ in range(20):
        top, left, h, w = sample_shared_crop(32, 40, min_frac=0.5, rng=rng)
        assert 0 <= top <= 32 - h and 0 <= left <= 40 - w and abs(h / w - 0.8) < 0.1 and h >= 16
    batch = batch_of()
    out = crop_batch(batch, (8, 10, 16, 20), (32, 40))
    assert out["image"].shape == (2, 3, 32, 40) and out["seg"].dtype == torch.long
    fx, fy, cx, cy = batch["intrinsics"][0]
    fx2, fy2, cx2, cy2 = out["intrinsics"][0]
    u, v = 15.0, 12.0                                     # a pixel of the original image ...
    u2, v2 = (u + 0.5 - 10) * 2 - 0.5, (v + 0.5 - 8) * 2 - 0.5   # ... where the crop shows it
    assert torch.isclose((u - cx) / fx, (u2 - cx2) / fx2) and torch.isclose((v - cy) / fy, (v2 - cy2) / fy2)
    assert torch.equal(out["depth"][..., ::2, ::2], batch["depth"][..., 8:24, 10:30])


def test_patches_cover_and_overlap():
    boxes = overlapping_patches(48, 64, 2)
    cover = torch.zeros(48, 64)
    for t, l, h, w in boxes:
        cover[t:t + h, l:l + w] += 1
    assert len(boxes) == 4 and cover.min() >= 1 and cover.max() == 4


def test_local_global_loss_zero_for_exact_student_and_grads_reach_student_only():
    exact = build_teacher("synthetic-metric", errors=TeacherErrorModel(blur_sigma=0.0001, far_compression=0,
                                                                      scale_sigma=0, noise_sigma=0))
    batch = batch_of()   # a smooth scene (a ramp): resampling patches back and forth is near exact
    batch["depth"] = (1 + torch.linspace(0, 4, 40).view(1, 1, 1, 40) + torch.linspace(0, 1, 32).view(1, 1, 32, 1)).expand(2, 1, 32, 40).clone()
    batch["valid"] = batch["depth"] > 0
    l1 = lambda p, t, v: (p - t).abs()[v].mean()  # noqa: E731
    patches = overlapping_patches(32, 40, 2)
    assert local_global_loss(batch["depth"], batch, exact, patches, l1) < 0.05
    student = (batch["depth"] * 1.3).requires_grad_()
    loss = local_global_loss(student, batch, exact, patches, l1)
    loss.backward()
    assert loss > 0.5 and student.grad.abs().sum() > 0


def test_assistant_schedule_ratio_and_determinism():
    schedule = AssistantSchedule(0.3, seed=7)
    picks = [schedule.use_assistant(s) for s in range(10000)]
    assert abs(np.mean(picks) - 0.3) < 0.02
    assert picks == [AssistantSchedule(0.3, seed=7).use_assistant(s) for s in range(10000)]
    with pytest.raises(ValueError, match="assistant_ratio"):
        AssistantSchedule(1.5, 0)


def test_feature_distiller_learns_the_teacher_features():
    torch.manual_seed(0)
    student = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    teacher = [torch.randn(2, 12, 4, 4), torch.randn(2, 12, 4, 4), torch.randn(2, 12, 4, 4)]
    kd = FeatureDistiller([8, 16], [12, 12, 12])
    opt = torch.optim.Adam(kd.parameters(), lr=0.05)
    first = kd(student, teacher).item()
    for _ in range(50):
        opt.zero_grad()
        kd(student, teacher).backward()
        opt.step()
    assert kd(student, teacher).item() < 0.7 * first
    s = [x.clone().requires_grad_() for x in student]
    kd(s, teacher).backward()
    assert all(x.grad.abs().sum() > 0 for x in s)
    with pytest.raises(ValueError, match="2 pairs"):
        kd(student[:1], teacher)


TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
        "data.num_train=32", "data.num_val=8", "train.batch_size=8", "eval.preview_images=1", "train.epochs=1"]


def test_training_with_every_distill_any_depth_option(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["v3", *TINY, f"out_dir={tmp_path}", "distill.normalization=hybrid", "distill.shared_crop=1",
                 "distill.local_global_weight=0.5", "teacher.assistant=synthetic-assistant", "--quiet"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("v3")]
    assert json.loads((run / "summary.json").read_text())["abs_rel"] < 1


def test_online_only_options_refuse_a_cache(tmp_path, capsys):
    assert main(["v3", *TINY, f"out_dir={tmp_path}", f"teacher.cache={tmp_path}", "distill.shared_crop=0.5",
                 "--quiet"]) == 2
    assert "distill.shared_crop need(s) the teacher online" in capsys.readouterr().err
