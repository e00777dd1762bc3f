import pytest
import torch

from core.spaces import DepthSpace, ValueRange
from distill.training.preflight import PreflightError, enforce, run_preflight


def batch(teacher_depth: torch.Tensor) -> dict:
    depth = torch.full((2, 1, 4, 4), 3.0)
    return {"image": torch.zeros(2, 3, 4, 4), "depth": depth, "valid": depth > 0, "teacher_depth": teacher_depth}


def check(teacher_depth, space=DepthSpace.METRIC, declared=ValueRange(0, 20)):
    b = batch(teacher_depth)
    return run_preflight([b], [torch.full_like(b["depth"], 2.5)], target="teacher", target_space=space,
                         target_range=declared, eval_space=DepthSpace.METRIC, teacher_name="t")


def test_clean_batch_passes_and_reports_statistics():
    report = check(torch.full((2, 1, 4, 4), 2.9))
    assert not report.failures and enforce(report, "strict") == []
    stats = report.to_json()["stats"]
    assert stats["teacher_depth"]["median"] == pytest.approx(2.9) and stats["student_initial"]["space"] == "metric"


def test_unit_mismatch_names_both_spaces_and_the_fix():
    report = check(torch.full((2, 1, 4, 4), 0.5), space=DepthSpace.RELATIVE, declared=ValueRange(0, 1))
    with pytest.raises(PreflightError) as err:
        enforce(report, "strict")
    message = str(err.value)
    assert "training target space is relative" in message and "evaluation space is metric" in message
    assert "teacher.name=synthetic-metric" in message
    assert enforce(report, "warn") == [c.message for c in report.failures]  # warn: reported, not raised


def test_non_finite_teacher_output_is_refused():
    bad = torch.full((2, 1, 4, 4), 2.9)
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(PreflightError, match="teacher_depth: 1 non-finite values"):
        enforce(check(bad), "strict")


def test_output_outside_declared_range_is_refused():
    with pytest.raises(PreflightError, match=r"leaves its declared range \[0, 20\]"):
        enforce(check(torch.full((2, 1, 4, 4), 2900.0)), "strict")  # millimetres declared as metres


def test_a_tensor_without_a_finite_value_is_null_in_the_json():
    """Its statistics are NaN in the table and null in preflight.json (strict JSON has no NaN)."""
    import json

    report = check(torch.full((2, 1, 4, 4), float("inf")))
    stats = report.to_json()["stats"]["teacher_depth"]
    assert stats["min"] is None and stats["median"] is None and stats["non_finite"] == 32
    json.dumps(report.to_json(), allow_nan=False)   # raises on NaN
    assert "nan" in report.table()


def test_the_assistant_teachers_labels_are_checked_beside_the_teachers():
    """An assistant labels some steps: its units, range and finiteness are checked on the same batches."""
    b = {**batch(torch.full((2, 1, 4, 4), 2.9)), "assistant_depth": torch.full((2, 1, 4, 4), 290.0)}
    b["assistant_depth"][0, 0, 0, 0] = float("nan")
    report = run_preflight([b], [torch.full_like(b["depth"], 2.5)], target="teacher", target_space=DepthSpace.METRIC,
                           target_range=ValueRange(0, 20), eval_space=DepthSpace.METRIC, teacher_name="t",
                           assistant_name="a", assistant_range=ValueRange(0, 80))
    failed = [c.message for c in report.failures]
    assert failed == ["assistant_depth: 1 non-finite values",
                      "assistant a output [290, 290] leaves its declared range [0, 80]: wrong units, or a broken "
                      "checkpoint or cache"], failed
    assert report.stats["assistant_depth"]["teacher"] == "a" and "assistant_depth" in report.table()
