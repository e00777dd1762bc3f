"""Pre-flight: check units and ranges on a few real batches before the first optimisation step.

Seed 000: v1 trained for hours on relative [0, 1] targets and was evaluated in metres (75 m
RMSE). One printed line of target statistics would have caught it. Pre-flight prints and saves
min / max / mean / median of the inputs, the teacher's output, the ground truth and the
student's initial prediction, each with its declared space, and refuses to train when

- the training target's space differs from the evaluation space,
- any value is non-finite, or a teacher's output leaves its declared range,
- no pre-flight batch has a valid depth pixel (a batch without one, beside batches with them, passes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core.spaces import DepthSpace, ValueRange


class PreflightError(RuntimeError):
    """Training refused; the message names the problem and the fix."""
    exit_code = 3


@dataclass
class Check:
    name: str
    ok: bool
    message: str


@dataclass
class PreflightReport:
    stats: dict[str, dict] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict:
        """JSON's own values: a statistic of a tensor with no finite value is null, not NaN (which
        strict JSON readers refuse)."""
        stats = {name: {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in s.items()}
                 for name, s in self.stats.items()}
        return {"passed": not self.failures, "stats": stats, "checks": [c.__dict__ for c in self.checks]}

    def table(self) -> str:
        rows = [f"{'tensor':<18}{'space':<11}{'min':>9}{'max':>9}{'mean':>9}{'median':>9}  declared"]
        for name, s in self.stats.items():
            rows.append(f"{name:<18}{s['space']:<11}{s['min']:>9.3g}{s['max']:>9.3g}{s['mean']:>9.3g}"
                        f"{s['median']:>9.3g}  {s.get('declared_range', '')}")
        rows += [("  ok   " if c.ok else "  FAIL ") + c.message for c in self.checks]
        return "\n".join(rows)


def describe(x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """min / max / mean / median over `mask` (all if None) and the count of non-finite values."""
    x = x.detach().float()
    values = x[mask.expand_as(x)] if mask is not None else x.flatten()
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan"), "median": float("nan"),
                "count": 0, "non_finite": int(values.numel())}
    return {"min": finite.min().item(), "max": finite.max().item(), "mean": finite.mean().item(),
            "median": finite.median().item(), "count": int(values.numel()),
            "non_finite": int(values.numel() - finite.numel())}


def run_preflight(batches: list[dict], predictions: list[torch.Tensor], *, target: str, target_space: DepthSpace,
                  target_range: ValueRange, eval_space: DepthSpace, teacher_name: str,
                  target_masks: list[torch.Tensor] | None = None, assistant_name: str = "",
                  assistant_range: ValueRange | None = None) -> PreflightReport:
    """Check a few batches (with `teacher_depth` attached when a teacher labels them, and
    `assistant_depth` when an assistant teacher labels some steps: same space, its own range).

    `predictions`: the student's initial depth per batch. `target`: "teacher" or "ground_truth".
    `target_masks`: where the training target supervises, per batch (default: the ground truth's
    `valid`); a teacher supervises unlabelled images too.
    """
    report = PreflightReport()
    cat = lambda key: torch.cat([b[key].float() for b in batches])  # noqa: E731
    valid = torch.cat([b["valid"] for b in batches])
    supervised = torch.cat(target_masks) if target_masks is not None else valid
    report.stats["input_image"] = {"space": "normalised", **describe(cat("image"))}
    report.stats["ground_truth"] = {"space": DepthSpace.METRIC.value, **describe(cat("depth"), valid)}
    labels = {"teacher_depth": (teacher_name, target_range), "assistant_depth": (assistant_name, assistant_range)}
    labels = {key: named for key, named in labels.items() if key in batches[0]}
    for key, (name, declared) in labels.items():   # where it supervises or GT exists, and any non-finite value
        values = cat(key)
        report.stats[key] = {"space": target_space.value, "declared_range": str(declared), "teacher": name,
                             **describe(values, valid | supervised | ~torch.isfinite(values))}
    pred_space = target_space if target == "teacher" else DepthSpace.METRIC
    report.stats["student_initial"] = {"space": pred_space.value, **describe(torch.cat(predictions), supervised)}

    report.checks.append(space_check(target, pred_space, eval_space, teacher_name))
    for name, s in report.stats.items():
        report.checks.append(Check(f"finite:{name}", s["non_finite"] == 0,
                                   f"{name}: {s['non_finite']} non-finite values" if s["non_finite"]
                                   else f"{name}: all {s['count']} values finite"))
    report.checks.append(Check("valid_pixels", bool(supervised.any()),
                               f"{int(supervised.sum())} supervised depth pixels in {len(batches)} batches"
                               if supervised.any() else "no supervised depth pixel in the pre-flight batches: "
                                                        "check the dataset's depth files or the teacher's output "
                                                        "(0 or NaN everywhere?)"))
    for key, (name, declared) in labels.items():
        s, role = report.stats[key], key.split("_")[0]
        inside = s["count"] == 0 or declared.contains(s["min"], s["max"])
        report.checks.append(Check(f"{role}_range", inside,
                                   f"{role} output [{s['min']:.4g}, {s['max']:.4g}] within declared {declared}"
                                   if inside else
                                   f"{role} {name} output [{s['min']:.4g}, {s['max']:.4g}] leaves its declared "
                                   f"range {declared}: wrong units, or a broken checkpoint or cache"))
    return report


def space_check(target: str, train_space: DepthSpace, eval_space: DepthSpace, teacher_name: str) -> Check:
    if train_space == eval_space:
        return Check("units", True, f"training target space ({train_space.value}) matches evaluation "
                                    f"space ({eval_space.value})")
    return Check("units", False,
                 f"training target space is {train_space.value} ({train_space.describe()}; from teacher "
                 f"{teacher_name}) but the evaluation space is {eval_space.value} ({eval_space.describe()}). "
                 f"A student trained on these targets cannot produce {eval_space.value} depth (seed 000: "
                 f"75 m RMSE). Fix: use a {eval_space.value} teacher (teacher.name=synthetic-metric, or Depth "
                 f"Anything 3 Metric on real data), or supervise with ground truth (target=ground_truth); "
                 f"pass preflight=warn only to reproduce the failure on purpose.")


def enforce(report: PreflightReport, mode: str) -> list[str]:
    """Raise PreflightError in strict mode when a check failed; return warnings in warn mode."""
    failures = [c.message for c in report.failures]
    if failures and mode == "strict":
        raise PreflightError("pre-flight refused to train:\n  - " + "\n  - ".join(failures))
    return failures
