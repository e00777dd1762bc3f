"""The recovery fine-tunes (after pruning, under QAT) take their labels through training's own
supervision path: the same teacher, teacher.align=dataset scale and assistant as training."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from core.spaces import DepthSpace, ValueRange
from distill.data import build_datasets
from distill.recipes import V3, DataConfig, TeacherConfig
from distill.students import build_student
from distill.teachers import TEACHERS, Teacher
from distill.training.objective import Objective
from quant.finetune import finetune

HALF = "test-half-metric"


class HalfMetric(Teacher):
    """A metric teacher that is off by a constant factor, as DA2 metric-indoor is on NYU: 0.5 x GT."""
    name, space, range, needs_ground_truth = HALF, DepthSpace.METRIC, ValueRange(0.0, 20.0), True

    def __call__(self, batch: dict) -> torch.Tensor:
        return torch.where(batch["valid"], 0.5 * batch["depth"], torch.zeros_like(batch["depth"]))


@pytest.fixture
def half_teacher():
    TEACHERS.register(HALF, HalfMetric)
    yield
    TEACHERS._items.pop(HALF)


def test_finetune_supervises_with_the_aligned_teacher(half_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    recipe = replace(V3(), teacher=TeacherConfig(name=HALF, align="dataset"),
                     data=DataConfig(height=32, width=32, num_train=8, num_val=2))
    train_ds, _ = build_datasets(recipe.data, progress=False)
    labels = []
    scored = Objective.__call__

    def spy(self, out, batch, teacher=None):
        labels.append((batch["teacher_depth"].clone(), batch["depth"].clone(), batch["valid"].clone()))
        return scored(self, out, batch, teacher)

    monkeypatch.setattr(Objective, "__call__", spy)
    torch.manual_seed(0)
    student = build_student("mobilenetv3_small_050", decoder_channels=16)
    lines = []
    finetune(student, copy.deepcopy(student), recipe, train_ds, steps=2, lr=1e-4, batch_size=4, progress=False,
             log=lines.append)

    assert any("teacher.align=dataset" in line and "x 2.0000" in line for line in lines), lines
    assert len(labels) == 2
    for teacher_depth, depth, valid in labels:   # the fitted scale (2) undoes the teacher's half
        assert valid.any()
        torch.testing.assert_close(teacher_depth[valid], depth[valid])


def test_finetune_says_that_feature_kd_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    recipe = replace(V3(), data=DataConfig(height=32, width=32, num_train=4, num_val=2))
    recipe = replace(recipe, distill=replace(recipe.distill, feature_weight=0.5))
    train_ds, _ = build_datasets(recipe.data, progress=False)
    student = build_student("mobilenetv3_small_050", decoder_channels=16)
    # a run saved with it beside a ground-truth target (accepted before 2026-12-06, when training
    # began to refuse the pair) still fine-tunes: its export must not be refused
    for target in ("teacher", "ground_truth"):
        lines = []
        finetune(student, copy.deepcopy(student), replace(recipe, target=target), train_ds, steps=1, lr=1e-4,
                 batch_size=4, progress=False, log=lines.append)
        assert any("feature_weight=0.5 is not used" in line for line in lines), lines


def test_a_diverging_finetune_names_the_flag_of_its_learning_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    recipe = replace(V3(), data=DataConfig(height=32, width=32, num_train=4, num_val=2))
    train_ds, _ = build_datasets(recipe.data, progress=False)
    student = build_student("mobilenetv3_small_050", decoder_channels=16)
    reference = copy.deepcopy(student)
    with torch.no_grad():
        student.heads["depth"].out.bias.fill_(1e4)   # exp(1e4) metres: an overflowed student, as a too-high rate leaves
    with pytest.raises(ValueError, match=r"QAT: non-finite loss at step 0 .* at learning rate 0\.001; lower --qat-lr, "
                                         r"e\.g\. --qat-lr 0\.0001$"):
        finetune(student, reference, recipe, train_ds, steps=2, lr=1e-3, batch_size=4, progress=False,
                 desc="QAT", log=lambda _: None, lr_flag="--qat-lr")


def test_a_finite_loss_with_a_non_finite_gradient_stops_the_finetune_before_its_step(tmp_path, monkeypatch):
    """0 * sqrt(x - x) is 0 and its gradient NaN: clipping multiplied every gradient by that NaN norm and
    the step wrote NaN weights, found only by the next step's loss."""
    import quant.finetune as ft

    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    recipe = replace(V3(), data=DataConfig(height=32, width=32, num_train=4, num_val=2))
    train_ds, _ = build_datasets(recipe.data, progress=False)
    student = build_student("mobilenetv3_small_050", decoder_channels=16)
    real = ft.distillation_losses

    def poisoned(out, ref, valid):
        losses = real(out, ref, valid)
        first = next(iter(losses))
        return {**losses, first: losses[first] + 0 * torch.sqrt(losses[first] - losses[first])}

    monkeypatch.setattr(ft, "distillation_losses", poisoned)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"QAT: non-finite gradient norm at step 0 .* the weights were not updated\. "
                                         r"Lower --qat-lr"):
        finetune(student, copy.deepcopy(student), recipe, train_ds, steps=2, lr=1e-4, batch_size=4, progress=False,
                 desc="QAT", log=lambda _: None, lr_flag="--qat-lr")
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.items() if v.is_floating_point()
               and not k.endswith(("running_mean", "running_var")))
