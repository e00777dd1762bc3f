"""Distill Any Depth's normalisations, shared crops, local-global loss and assistant schedule;
D3epth's feature distiller; all wired into a training run."""
import json

import numpy as np
import pytest
import torch

from core.spaces import DepthSpace
from distill.losses.feature_kd import FeatureDistiller
from distill.losses.normalization import normalized_l1, normalized_l1_map
from distill.run import main
from distill.teachers import Teacher, TeacherErrorModel, build_teacher
from distill.training.cross_context import (
    AssistantSchedule,
    crop_batch,
    local_global_loss,
    overlapping_patches,
    sample_shared_crop,
)

MODES = ("global", "hybrid", "local")


def scene(b=2, h=24, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 1, h, w, generator=g) * 6 + 0.5
    valid = torch.rand(b, 1, h, w, generator=g) > 0.1
    pred = target + 0.2 * torch.randn(b, 1, h, w, generator=g)
    return pred, target, valid


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("mode", MODES)
def test_normalised_modes_ignore_per_image_scale_and_shift(mode):
    pred, target, valid = scene()
    base = normalized_l1(pred, target, valid, mode)
    scale = torch.tensor([2.0, 0.3]).view(2, 1, 1, 1)     # a different affine map per image
    assert base > 0.01
    assert torch.allclose(normalized_l1(pred * scale + 1.5, target, valid, mode), base, rtol=1e-4)
    assert torch.allclose(normalized_l1(pred, target * 3 - 0.2, valid, mode), base, rtol=1e-4)
    assert normalized_l1(target, target, valid, mode) < 1e-6
    assert normalized_l1(target * scale + 0.7, target, valid, mode) < 1e-5


def test_none_is_plain_l1_and_not_invariant():
    pred, target, valid = scene()
    plain = (pred - target).abs()[valid].mean()
    assert torch.allclose(normalized_l1(pred, target, valid, "none"), plain)
    assert normalized_l1(pred * 2, target, valid, "none") > 2 * plain
    assert normalized_l1(target, target, valid, "none") == 0


def two_planes(h=8, w=16, seed=0):
    """Near plane (1.0-1.2 m) on the left half, far plane (5-6 m) on the right half; the student
    is exact on the near plane, noisy and 50% too far on the far one."""
    ramp = torch.linspace(0, 1, h * w // 2).view(h, w // 2)
    target = torch.cat([1.0 + 0.2 * ramp, 5.0 + ramp], dim=1).view(1, 1, h, w)
    noise = torch.randn(1, 1, h, w // 2, generator=torch.Generator().manual_seed(seed))
    pred = target.clone()
    pred[..., w // 2:] = pred[..., w // 2:] * 1.5 + 0.5 * noise
    near = torch.zeros(1, 1, h, w, dtype=torch.bool)
    near[..., : w // 2] = True
    return pred, target, torch.ones_like(near), near


def test_far_noise_spares_near_pixels_under_local_and_partly_under_hybrid():
    pred, target, valid, near = two_planes()
    near_loss = {m: normalized_l1_map(pred, target, valid, m)[0][near].mean() for m in MODES}
    # local: the near plane is segments 0-1 of 4, normalised alone, and the student is exact there
    assert near_loss["local"] < 1e-6
    # global: the far noise moves the image's median and deviation, so exact near pixels pay
    assert near_loss["global"] > 1e-2
    # hybrid: of a near pixel's 3 contexts only S = 1 sees the far plane (S = 2 splits at the planes)
    assert torch.isclose(near_loss["hybrid"], near_loss["global"] / 3, rtol=1e-4)
    assert not torch.isclose(normalized_l1(pred, target, valid, "hybrid"), normalized_l1(pred, target, valid, "global"))


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


def test_invalid_pixels_ignored_even_nan_and_empty_mask_keeps_graph():
    pred, target, valid = scene()
    nan = torch.full_like(pred, float("nan"))
    for mode in ("none", *MODES):
        expected = normalized_l1(pred, target, valid, mode)
        p = torch.where(valid, pred, nan).requires_grad_()
        loss = normalized_l1(p, torch.where(valid, target, nan), valid, mode)
        loss.backward()
        assert torch.allclose(loss, expected) and torch.isfinite(p.grad).all()
        assert torch.all(p.grad[~valid] == 0)
    p = torch.where(valid, pred, nan).requires_grad_()
    loss = normalized_l1(p, target, torch.zeros_like(valid), "hybrid")
    loss.backward()
    assert loss.item() == 0 and torch.all(p.grad == 0)


def test_bad_inputs_name_the_problem():
    pred, target, valid = scene()
    with pytest.raises(ValueError, match="normalization 'median' is not one of none, global, hybrid, local"):
        normalized_l1(pred, target, valid, "median")
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        normalized_l1(pred, target, valid.float(), "hybrid")
    with pytest.raises(ValueError, match=r"must be \(B, 1, H, W\)"):
        normalized_l1(pred[:, 0], target[:, 0], valid[:, 0], "hybrid")
    with pytest.raises(ValueError, match="same shape"):
        normalized_l1(pred, target[..., :-1], valid, "local")


@pytest.mark.parametrize("mode", ("none", *MODES))
def test_gradients_finite_also_on_flat_contexts_and_bf16(mode):
    pred, target, valid = scene()
    p = pred.clone().requires_grad_()
    normalized_l1(p, target, valid, mode).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    flat = torch.full_like(target, 3.0)                   # a wall: every context has zero deviation
    p = pred.clone().requires_grad_()
    loss = normalized_l1(p, flat, valid, mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    half = normalized_l1(pred.bfloat16(), target.bfloat16(), valid, mode)
    assert half.dtype == torch.float32 and torch.isfinite(half)


# ----------------------------------------------------------------------------- crops and patches

def batch_of(h=32, w=40):
    g = torch.Generator().manual_seed(3)
    depth = torch.rand(2, 1, h, w, generator=g) * 5 + 1
    return {"image": torch.randn(2, 3, h, w, generator=g), "depth": depth, "valid": depth > 0,
            "seg": torch.randint(0, 13, (2, h, w), generator=g),
            "intrinsics": torch.tensor([[30.0, 31.0, 19.5, 15.5]] * 2), "index": torch.tensor([0, 1]),
            "flipped": torch.tensor([False, False])}


def test_shared_crops_keep_the_aspect_and_fit():
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(200):
        top, left, h, w = sample_shared_crop(32, 40, min_frac=0.5, rng=rng)
        assert 0 <= top <= 32 - h and 0 <= left <= 40 - w and abs(h / w - 0.8) < 0.05 and h >= 16
        sizes.append(h)
    assert min(sizes) <= 18 and max(sizes) >= 31              # fractions spread over [0.5, 1]
    with pytest.raises(ValueError, match="distill.crop_min=0"):
        sample_shared_crop(32, 40, min_frac=0.0, rng=rng)


def test_crop_batch_cuts_every_spatial_key_and_keeps_the_rest():
    batch = batch_of()
    batch["teacher_depth"] = batch["depth"] * 1.1
    batch["teacher_features"] = [torch.zeros(2, 4, 2, 2)]
    out = crop_batch(batch, (8, 10, 16, 20), (32, 40))
    assert out["image"].shape == (2, 3, 32, 40) and out["seg"].dtype == torch.long and out["valid"].dtype == torch.bool
    for key in ("depth", "teacher_depth"):
        assert torch.equal(out[key][..., ::2, ::2], batch[key][..., 8:24, 10:30])
    assert torch.equal(out["seg"][:, 1::2, 1::2], batch["seg"][:, 8:24, 10:30])
    assert "teacher_features" not in out and "teacher_features" in batch      # input left untouched
    assert out["index"] is batch["index"] and out["flipped"] is batch["flipped"]
    with pytest.raises(ValueError, match=r"crop box .* does not lie inside the 32x40 image"):
        crop_batch(batch, (20, 0, 16, 20), (32, 40))


def test_crop_preserves_rays():
    # An image whose content is each pixel's ray (u + 0.5 - cx) / fx (pixel centres at u + 0.5, the
    # project's convention): after crop + bilinear resize the
    # content must still equal the ray the new intrinsics give for the same output pixel.
    h, w = 32, 40
    batch = batch_of(h, w)
    fx, fy, cx, cy = batch["intrinsics"][0].tolist()
    u = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    v = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    batch["image"] = torch.stack([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, torch.zeros(h, w)])[None].repeat(2, 1, 1, 1)
    for box, out_hw in (((8, 10, 16, 20), (32, 40)), ((3, 5, 20, 25), (32, 40)), ((0, 0, 32, 40), (24, 30))):
        out = crop_batch(batch, box, out_hw)
        fx2, fy2, cx2, cy2 = out["intrinsics"][0].tolist()
        oh, ow = out_hw
        u2 = torch.arange(ow, dtype=torch.float32).view(1, ow).expand(oh, ow)
        v2 = torch.arange(oh, dtype=torch.float32).view(oh, 1).expand(oh, ow)
        inner = (slice(2, -2), slice(2, -2))   # bilinear clamps at the cut's border
        assert torch.allclose(out["image"][0, 0][inner], ((u2 + 0.5 - cx2) / fx2)[inner], atol=1e-5)
        assert torch.allclose(out["image"][0, 1][inner], ((v2 + 0.5 - cy2) / fy2)[inner], atol=1e-5)


def test_patches_cover_overlap_and_have_even_sides():
    for h, w, grid in ((48, 64, 2), (64, 96, 3), (32, 40, 2)):
        boxes = overlapping_patches(h, w, grid)
        cover = torch.zeros(h, w)
        for t, l, ph, pw in boxes:
            assert ph % 2 == 0 and pw % 2 == 0 and t + ph <= h and l + pw <= w
            cover[t:t + ph, l:l + pw] += 1
        assert len(boxes) == grid * grid and cover.min() >= 1 and cover.max() == 4
        t0, l0, ph, pw = boxes[0]
        assert boxes[1][1] - l0 <= pw // 2 and boxes[grid][0] - t0 <= ph // 2   # overlap >= half
    assert overlapping_patches(48, 64, 2)[0] == (0, 0, 32, 44)                # 2/3 of each side, even
    assert overlapping_patches(48, 64, 1) == [(0, 0, 48, 64)]
    with pytest.raises(ValueError, match="distill.local_global_grid=0"):
        overlapping_patches(48, 64, 0)


class ConvTeacher(Teacher):
    """A teacher with trainable-looking parameters: depth = softplus(conv(image)) + 1."""
    name, space = "conv", DepthSpace.METRIC

    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def __call__(self, batch):
        return torch.nn.functional.softplus(self.conv(batch["image"])) + 1


def ramp_batch():
    batch = batch_of()   # a smooth scene (a ramp): resampling patches back and forth is near exact
    batch["depth"] = (1 + torch.linspace(0, 4, 40).view(1, 1, 1, 40)
                      + torch.linspace(0, 1, 32).view(1, 1, 32, 1)).expand(2, 1, 32, 40).clone()
    batch["valid"] = batch["depth"] > 0
    return batch


def l1(p, t, v):
    return (p - t).abs()[v].mean()


def test_local_global_loss_zero_for_exact_student_and_positive_otherwise():
    exact = build_teacher("synthetic-metric", errors=TeacherErrorModel(blur_sigma=0.0001, far_compression=0,
                                                                      scale_sigma=0, noise_sigma=0))
    batch = ramp_batch()
    patches = overlapping_patches(32, 40, 2)
    ph, pw = patches[0][2:]
    assert local_global_loss(batch["depth"], batch, exact, patches, l1, teacher_hw=(ph, pw)) < 1e-6
    assert local_global_loss(batch["depth"], batch, exact, patches, l1) < 0.05   # resized to 32x40 and back
    assert local_global_loss(batch["depth"] * 1.3, batch, exact, patches, l1) > 0.5


def test_local_global_gradients_reach_only_the_student_and_holes_do_not_count():
    batch, teacher = ramp_batch(), ConvTeacher()
    batch["image"].requires_grad_()
    student = (batch["depth"] * 1.3).requires_grad_()
    loss = local_global_loss(student, batch, teacher, overlapping_patches(32, 40, 2), l1)
    loss.backward()
    assert loss > 0 and student.grad.abs().sum() > 0
    assert teacher.conv.weight.grad is None and batch["image"].grad is None

    class Holey(ConvTeacher):   # no opinion (0) on the left quarter of whatever it sees
        def __call__(self, b):
            d = super().__call__(b)
            d[..., : d.shape[-1] // 4] = 0
            return d
    seen = []
    holey = Holey()

    def spy(p, t, v):
        seen.append((t, v))
        return l1(p, t, v)
    local_global_loss(student, batch, holey, overlapping_patches(32, 40, 2), spy)
    for target, valid in seen:
        assert not valid[..., :4].any() and valid[..., 8:].all() and (target[valid] > 1).all()


def test_assistant_schedule_ratio_and_determinism():
    schedule = AssistantSchedule(0.3, seed=7)
    picks = [schedule.use_assistant(s) for s in range(10000)]
    assert abs(np.mean(picks) - 0.3) < 0.02
    assert picks == [AssistantSchedule(0.3, seed=7).use_assistant(s) for s in range(10000)]
    assert picks != [AssistantSchedule(0.3, seed=8).use_assistant(s) for s in range(10000)]
    assert not any(AssistantSchedule(0.0, 0).use_assistant(s) for s in range(100))
    with pytest.raises(ValueError, match="assistant_ratio"):
        AssistantSchedule(1.5, 0)


# ----------------------------------------------------------------------------- D3epth feature KD

def test_feature_distiller_is_zero_for_matching_features():
    torch.manual_seed(0)
    student = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    teacher = [torch.randn(2, 4, 16, 16), student[0].clone(), student[1].clone()]
    kd = FeatureDistiller([8, 16], [4, 8, 16])          # last two of each: 8 -> 8, 16 -> 16
    assert kd.pairs == [(0, 1), (1, 2)]
    with torch.no_grad():
        for proj in kd.project:
            proj.weight.copy_(torch.eye(proj.weight.shape[0]).view_as(proj.weight))
            proj.bias.zero_()
    assert kd(student, teacher).abs() < 1e-5
    assert kd(student, [teacher[0], -teacher[1], teacher[2]]) > 0.9  # opposite features: 1 - cos = 2 on one pair


def test_feature_distiller_learns_the_teacher_features():
    torch.manual_seed(0)
    student = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    teacher = [torch.randn(2, 12, 4, 4), torch.randn(2, 12, 4, 4), torch.randn(2, 12, 4, 4)]
    kd = FeatureDistiller([8, 16], [12, 12, 12])
    first = kd(student, teacher).item()
    for _ in range(30):   # plain gradient descent (torch.optim's first use imports dynamo: seconds)
        kd.zero_grad()
        kd(student, teacher).backward()
        with torch.no_grad():
            for p in kd.parameters():
                p -= 0.5 * p.grad
    assert kd(student, teacher).item() < 0.7 * first
    s = [x.clone().requires_grad_() for x in student]
    t = [x.clone().requires_grad_() for x in teacher]
    kd(s, t).backward()
    assert all(x.grad.abs().sum() > 0 for x in s) and all(x.grad is None for x in t)


def test_feature_distiller_pairs_and_errors():
    kd = FeatureDistiller([8, 16], [12, 12, 12], pairs=[(0, 0), (1, 2)])
    assert [p.weight.shape[:2] for p in kd.project] == [(12, 8), (12, 16)]
    student = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    teacher = [torch.randn(1, 12, 4, 4)] * 3
    assert torch.isfinite(kd(student, teacher))
    with pytest.raises(ValueError, match="built for 2 student and 3 teacher maps, got 1 and 3"):
        kd(student[:1], teacher)
    with pytest.raises(ValueError, match="got 2 and 2"):
        kd(student, teacher[:2])
    with pytest.raises(ValueError, match=r"student maps must be \(B, C, h, w\) with C = \[8, 16\]"):
        kd([student[1], student[0]], teacher)
    with pytest.raises(ValueError, match="out of range"):
        FeatureDistiller([8], [12], pairs=[(1, 0)])
    with pytest.raises(ValueError, match="at least one pair"):
        FeatureDistiller([8], [])


# ----------------------------------------------------------------------------- in training

TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=32", "data.width=32",
        "data.num_train=16", "data.num_val=4", "train.batch_size=8", "eval.preview_images=1", "train.epochs=1"]


def test_training_with_every_distill_any_depth_option(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["v3", *TINY, f"out_dir={tmp_path}", "distill.normalization=hybrid", "distill.shared_crop=1",
                 "distill.local_global_weight=0.5", "teacher.assistant=synthetic-assistant", "eval.preview_images=0",
                 "--quiet"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("v3")]
    assert json.loads((run / "summary.json").read_text())["abs_rel"] < 1
    assert not (run / "preview.png").exists() and "## Preview" not in (run / "report.md").read_text()   # 0: none


def test_the_options_reach_the_step_supervision_and_objective():
    """What the training run above cannot show (all of it lands in loss_depth): the assistant labels
    about 30% of the steps, a shared crop changes the batch (the rays with it), and the depth term is
    the metric term + the normalised L1 + the local-global term on the same teacher."""
    from torch.utils.data import default_collate

    from core.config import apply_overrides
    from distill.data import build_datasets
    from distill.recipes import get_recipe
    from distill.students import build_student
    from distill.training.objective import Objective
    from distill.training.supervision import Supervision

    recipe = apply_overrides(get_recipe("v3"), [
        "distill.normalization=hybrid", "distill.shared_crop=1", "distill.local_global_weight=0.5",
        "teacher.assistant=synthetic-assistant", "loss.aux_weight=0", "loss.normal_weight=0", "loss.gradient_weight=0",
        "data.height=32", "data.width=32", "data.num_train=4", "data.num_val=1", "data.augment=false"])
    supervision = Supervision(recipe, torch.device("cpu"))
    assistant_steps = sum(supervision.teacher_at(step) is supervision.assistant for step in range(200))
    assert 40 <= assistant_steps <= 80   # teacher.assistant_ratio 0.3 of 200

    train, _ = build_datasets(recipe.data, progress=False)
    batch = default_collate([train[i] for i in range(4)])   # as the loader makes it
    prepared, teacher = supervision.prepare(dict(batch), step=0)
    assert prepared["image"].shape == batch["image"].shape and not torch.equal(prepared["intrinsics"], batch["intrinsics"])

    torch.manual_seed(0)
    pred = build_student("mobilenetv3_small_050", decoder_channels=16, tasks=("depth",)).eval()(prepared["image"])["depth"]
    objective = Objective(recipe)
    target, valid = prepared["teacher_depth"], (prepared["teacher_depth"] > 0) & torch.isfinite(prepared["teacher_depth"])

    def by_hand(p, t, v):   # distill.metric_weight 1 x berHu + distill.normalized_weight 1 x hybrid L1
        return objective.depth_loss(p, t, v) + normalized_l1(p, t, v, "hybrid")

    expected = by_hand(pred, target, valid) + 0.5 * local_global_loss(
        pred, prepared, teacher, overlapping_patches(32, 32, 2), by_hand)
    got = objective({"depth": pred}, prepared, teacher)["depth"]
    assert torch.allclose(got, expected) and got > by_hand(pred, target, valid)


def test_the_preview_leaves_the_teachers_tile_blank_without_a_teacher():
    """A pseudo-label cache serves training labels only: the preview shows no teacher beside a
    validation image rather than another image's labels."""
    from distill.students import build_student
    from distill.teachers import build_teacher
    from distill.training.report import COLUMNS, preview_rows

    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", decoder_channels=16)
    depth = torch.linspace(1, 4, 32 * 32).view(1, 32, 32)
    sample = {"image": torch.rand(3, 32, 32), "depth": depth, "valid": depth > 0, "index": torch.tensor(0),
              "seg": torch.zeros(32, 32, dtype=torch.long)}
    column = COLUMNS.index("teacher")
    (blank,) = preview_rows(model, None, [sample], torch.device("cpu"), 4)
    (shown,) = preview_rows(model, build_teacher("synthetic-metric"), [sample], torch.device("cpu"), 4)
    assert blank[column].shape == shown[column].shape == (32, 32, 3)
    assert not blank[column].any() and shown[column].any()


def test_online_only_options_refuse_a_cache(tmp_path, capsys):
    assert main(["v3", *TINY, f"out_dir={tmp_path}", f"teacher.cache={tmp_path}", "distill.shared_crop=0.5",
                 "--quiet"]) == 2
    assert "distill.shared_crop need(s) the teacher online" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["distill.feature_weight=0.1", "distill.normalization=hybrid",
                                    "distill.shared_crop=0.5"])
def test_teacher_options_refuse_a_ground_truth_target(tmp_path, capsys, option):
    """They shape the teacher's labels; with target=ground_truth no teacher labels a step, and the
    run would train as without them (feature_weight used to, silently)."""
    assert main(["v3", *TINY, f"out_dir={tmp_path}", "target=ground_truth", option, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert option.split("=")[0] in err and "set target=teacher or drop them" in err
    assert not any(tmp_path.iterdir())
