"""Drift of an artefact against the float model, measured by executing the artefact itself.

    report = validate_artefact("exports/v3-.../tflite/v3-..._int8.tflite", reference=float_student, data=val_dataset)
    report.passed, report.delta["abs_rel"], report.failures()

The artefact runs in its own runtime, in a child process (`python -m edge.run`: LiteRT, ONNX
Runtime, CoreML's predict on macOS or the MIL reference executor elsewhere), never in PyTorch. The
float PyTorch model runs here on the same images. Both are scored against the ground truth with
the training metrics (distill/metrics.py, keys as in a run's summary.json), and the gate of the
artefact's precision (targets/profiles.py) decides pass or fail:
- abs_rel_change: |abs_rel(artefact) - abs_rel(float)| / abs_rel(float);
- miou_drop_pt: miou(float) - miou(artefact), in points;
- finite: every output value, depth and segmentation logits, is finite (a NaN never passes);
- depth_rel_p99, seg_agreement_min (float precisions): per-pixel agreement with the float model.
Per-pixel drift (relative depth difference percentiles, segmentation label agreement) is
reported for every artefact; int8 is not gated on it: a QAT model can differ per pixel from its
float parent and be as accurate.
"""
from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.formats import PRECISIONS
from distill.data.classes import IGNORE_INDEX, NYU13_NAMES
from distill.metrics import DepthMetrics, SegMetrics
from distill.recipes.base import EvalConfig

PRECISION_SUFFIXES = PRECISIONS   # an artefact file is named <stem>_<precision><suffix>
PERCENTILES = (50, 90, 95, 99)


@dataclass
class ValidationData:
    """Validation images with their ground truth, and the float model's outputs once computed.

    inputs (N, 3, H, W) float32 RGB in [0, 1] (what artefacts take); depth, valid (N, 1, H, W)
    metres and bool; seg (N, H, W) int64 class ids.
    """
    inputs: np.ndarray
    depth: torch.Tensor
    valid: torch.Tensor
    seg: torch.Tensor
    # by the model itself, not id(): a freed model's id can come back as another model's
    _float: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    @classmethod
    def from_dataset(cls, dataset, count: int | None = None) -> "ValidationData":
        """The first `count` samples (all when None) of a dataset in the project's sample schema."""
        from distill.data.transforms import unit_rgb

        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count={count!r}: validate on at least one image (None: every image of the dataset)")
        n = len(dataset) if count is None else min(count, len(dataset))
        if n == 0:
            raise ValueError("the validation dataset is empty; validation needs at least one image")
        samples = [dataset[i] for i in range(n)]
        return cls(inputs=torch.stack([unit_rgb(s["image"]) for s in samples]).numpy().astype(np.float32),
                   depth=torch.stack([s["depth"] for s in samples]), valid=torch.stack([s["valid"] for s in samples]),
                   seg=torch.stack([s["seg"] for s in samples]))

    def float_outputs(self, model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """(depth (N, 1, H, W), labels (N, H, W)) of the float PyTorch model, computed once per model."""
        from targets.deploy import reference_outputs

        if model not in self._float:
            depth, seg = reference_outputs(model, torch.from_numpy(self.inputs))
            self._float[model] = (depth.numpy(), seg.argmax(1).numpy().astype(np.uint8))
        return self._float[model]


@dataclass
class DriftReport:
    path: str
    format: str
    precision: str
    executor: str
    images: int
    float: dict[str, float]
    artefact: dict[str, float]
    delta: dict[str, float]
    per_pixel: dict[str, float]
    gates: dict[str, dict]
    passed: bool
    outputs: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # for the report's figures

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "precision": self.precision, "executor": self.executor,
                "images": self.images, "float": self.float, "artefact": self.artefact, "delta": self.delta,
                "per_pixel": self.per_pixel, "gates": self.gates, "pass": self.passed}

    def failures(self) -> list[str]:
        return [f"{self.path}: {describe_gate(name, g)}" for name, g in self.gates.items() if not g["pass"]]


def describe_gate(name: str, gate: dict) -> str:
    if name == "abs_rel_change":   # either way: an artefact better than its float model is not that model
        return (f"abs_rel changed by {100 * gate['value']:.2f}% relative (float {gate['float']:.4f} -> artefact "
                f"{gate['artefact']:.4f}); tolerance {100 * gate['tolerance']:.2f}%")
    if name == "miou_drop_pt":
        return (f"miou dropped by {gate['value']:.2f} points (float {gate['float']:.3f} -> artefact "
                f"{gate['artefact']:.3f}); tolerance {gate['tolerance']:.2f} points")
    if name == "depth_rel_p99" and gate["value"] is None:
        return f"no pixel of the depth is finite; tolerance {100 * gate['tolerance']:.3f}%"
    if name == "depth_rel_p99":
        return (f"99% of pixels within {100 * gate['value']:.3f}% of the float depth; "
                f"tolerance {100 * gate['tolerance']:.3f}%")
    if name == "seg_agreement_min":
        return f"{100 * gate['value']:.2f}% of labels agree with the float model; required {100 * gate['tolerance']:.2f}%"
    return f"{name} is {gate['value']}; required {gate['tolerance']}"


def validate_artefact(artefact: str | Path, *, reference: torch.nn.Module, data, precision: str | None = None,
                      gate: dict[str, float] | None = None, eval_config: EvalConfig | None = None,
                      count: int | None = None, threads: int | None = None, executor: str = "auto",
                      scratch: str | Path | None = None) -> DriftReport:
    """Run `artefact` in its runtime on `data` (a dataset of the sample schema, or ValidationData) and
    score it against `reference`, the float PyTorch student, on the same images. `gate` defaults to the precision's default
    gate (targets/devices.json); `precision` defaults to the one in the file name (`*_int8.tflite`).
    `scratch`: the folder for the run's inputs and outputs while it runs (default: the system's temp)."""
    from edge.runners import artefact_format
    from targets.profiles import gate_for

    artefact = Path(artefact)
    if isinstance(data, ValidationData) and count is not None:   # it would be ignored without a word
        raise ValueError("count applies to a dataset; ValidationData holds its images already: make it with "
                         "ValidationData.from_dataset(dataset, count)")
    data = data if isinstance(data, ValidationData) else ValidationData.from_dataset(data, count)
    precision = precision or precision_from_name(artefact)
    gate = gate_for(precision) if gate is None else gate
    eval_config = eval_config or EvalConfig()
    depth, labels, non_finite, executor_name = run_artefact(artefact, data.inputs, threads=threads, executor=executor,
                                                            scratch=scratch)
    ref_depth, ref_labels = data.float_outputs(reference)
    float_metrics = task_metrics(ref_depth, ref_labels, data, eval_config)
    finite = non_finite == 0   # NaN logits would argmax to some class: their labels alone look sound
    art_metrics = task_metrics(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0), labels, data, eval_config)
    per_pixel = per_pixel_drift(depth, labels, ref_depth, ref_labels)
    gates = apply_pixel_gate(gate, per_pixel, apply_gate(gate, float_metrics, art_metrics, finite))
    return DriftReport(path=artefact.name, format=artefact_format(artefact), precision=precision, executor=executor_name,
                       images=len(data.inputs), float=float_metrics, artefact=art_metrics,
                       delta={k: art_metrics[k] - float_metrics[k] for k in float_metrics},
                       per_pixel=per_pixel, gates=gates,
                       passed=all(g["pass"] for g in gates.values()), outputs=(depth, labels))


def precision_from_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    for precision in PRECISION_SUFFIXES:
        if stem.endswith(f"_{precision}"):
            return precision
    raise ValueError(f"cannot tell the precision of {path.name} from its name (expected *_<precision> with one "
                     f"of {', '.join(PRECISION_SUFFIXES)}); pass precision=")


def run_artefact(path: Path, inputs: np.ndarray, *, threads: int | None = None, executor: str = "auto",
                 scratch: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(depth, labels, the count of NaN or infinite values among depth and the logits, executor
    name) from `python -m edge.run` in a child process: each runtime
    imports only its own toolchain (TensorFlow and torch must not share a process, docs/TOOLCHAIN.md)."""
    from quant.artefacts import run_module

    threads_args = ["--threads", str(threads)] if threads else []
    with tempfile.TemporaryDirectory(prefix="densekit-validate-", dir=scratch) as tmp:
        np.save(Path(tmp) / "inputs.npy", inputs)
        run_module("edge.run", str(path), "--inputs", str(Path(tmp) / "inputs.npy"), "--out",
                   str(Path(tmp) / "outputs.npz"), "--executor", executor, *threads_args)
        with np.load(Path(tmp) / "outputs.npz") as out:
            return out["depth"].astype(np.float32), out["labels"], int(out["non_finite"]), str(out["executor"])


def task_metrics(depth: np.ndarray, labels: np.ndarray, data: ValidationData, ec: EvalConfig) -> dict[str, float]:
    """The scalar training metrics (summary.json keys) of predictions against the ground truth."""
    dm = DepthMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop)
    sm = SegMetrics(len(NYU13_NAMES), ignore_index=IGNORE_INDEX, class_names=list(NYU13_NAMES))
    dm.update(torch.from_numpy(np.ascontiguousarray(depth, np.float32)), data.depth, data.valid)
    sm.update(torch.from_numpy(np.asarray(labels, np.int64)), data.seg)
    metrics = {**dm.compute(), **(sm.compute() if sm.labelled_pixels else {})}   # no labels: no miou gate
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not k.startswith("n_") and v is not None}


def apply_gate(gate: dict[str, float], float_metrics: dict, art_metrics: dict, finite: bool) -> dict[str, dict]:
    """{gate name: {"value", "tolerance", "pass"}} for every gate key plus "finite"."""
    results = {"finite": {"value": finite, "tolerance": True, "pass": finite}}
    if "abs_rel_change" in gate:
        change = abs(art_metrics["abs_rel"] - float_metrics["abs_rel"]) / max(float_metrics["abs_rel"], 1e-12)
        results["abs_rel_change"] = {"value": change, "tolerance": gate["abs_rel_change"],
                                     "pass": finite and change <= gate["abs_rel_change"],
                                     "float": float_metrics["abs_rel"], "artefact": art_metrics["abs_rel"]}
    if "miou_drop_pt" in gate and "miou" in float_metrics:
        drop = 100 * (float_metrics["miou"] - art_metrics["miou"])
        results["miou_drop_pt"] = {"value": drop, "tolerance": gate["miou_drop_pt"],
                                   "pass": drop <= gate["miou_drop_pt"],
                                   "float": float_metrics["miou"], "artefact": art_metrics["miou"]}
    return results


def apply_pixel_gate(gate: dict[str, float], per_pixel: dict, results: dict) -> dict[str, dict]:
    """Add the per-pixel gates (float precisions) to `results`."""
    if "depth_rel_p99" in gate:
        value = per_pixel["depth_rel_p99"]
        results["depth_rel_p99"] = {"value": value, "tolerance": gate["depth_rel_p99"],
                                    "pass": not per_pixel["depth_non_finite"] and value <= gate["depth_rel_p99"]}
    if "seg_agreement_min" in gate:
        value = per_pixel["seg_agreement"]
        results["seg_agreement_min"] = {"value": value, "tolerance": gate["seg_agreement_min"],
                                        "pass": value >= gate["seg_agreement_min"]}
    return results


def per_pixel_drift(depth, labels, ref_depth, ref_labels) -> dict[str, float]:
    """Percentiles of |d - d_float| / d_float over the finite pixels, the share of non-finite ones,
    and the fraction of pixels with the float model's label."""
    rel = relative_difference(depth, ref_depth)
    finite = rel[np.isfinite(rel)]
    # None when no pixel is finite: JSON has no infinity (drift.json stays readable by any parser)
    out = {f"depth_rel_p{q}": float(np.percentile(finite, q)) if finite.size else None for q in PERCENTILES}
    out["depth_rel_max"] = float(finite.max()) if finite.size else None
    out["depth_non_finite"] = 1.0 - finite.size / rel.size
    out["seg_agreement"] = float((labels == ref_labels).mean())
    return out


def relative_difference(depth: np.ndarray, ref_depth: np.ndarray) -> np.ndarray:
    diff = np.abs(depth.astype(np.float64) - ref_depth) / np.maximum(np.abs(ref_depth), 1e-6)
    return np.where(np.isfinite(diff), diff, np.inf)

