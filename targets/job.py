"""The contract between `quant.export` (the parent, which owns torch) and each converter process.

A converter is `python -m <its module> JOB.json` (core/formats.py: e.g. targets.tflite for onnx2tf).
It imports only its own toolchain: TensorFlow and torch segfault in one process, and coremltools
imports TensorFlow when it can (docs/TOOLCHAIN.md).
The parent writes the job (sources, calibration, check data, metadata) and reads back
`result.json`, written by the child into `job.work_dir`. A child that fails exits non-zero with a
message on stderr; it never writes outside `out_dir` and `work_dir`.

This module is imported by both sides, so it imports neither torch nor any converter toolchain.
What the artefacts themselves take and return is core/contract.py.

Tensors in files are numpy `.npy`:
- check/inputs.npy: (N, 3, H, W) float32 RGB in [0, 1] (normalisation is inside every artefact).
- check/<source>_depth.npy (N, 1, H, W) depth in the run's space (metres for a metric student) and
  check/<source>_seg.npy (N, C, H, W) logits:
  the PyTorch model's outputs on those inputs, one pair per source ("float", and "int8" whenever an
  int8 precision is asked: the outputs of the int8 source model, QAT's or PTQ's equalised copy).
- calibration/nhwc.npy (N, H, W, 3) and calibration/nchw.npy (N, 3, H, W), float32 in [0, 1].
"""
from __future__ import annotations

import gc
import importlib
import json
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from core.contract import compare
from core.formats import CALIBRATED_PRECISIONS, FORMATS, INTEGER_PRECISIONS
from core.io import atomic_path, write_json
from targets.stem import DEFAULT_FLOAT_STEM

RESULT_FILE = "result.json"


@dataclass
class Job:
    format: str                          # tflite | coreml | onnx
    precisions: list[str]                # what to produce, validated by the parent
    sources: dict[str, str]              # "float" and "int8" -> model file (.onnx; .pt2 for coreml and litert-torch)
    out_dir: str                         # artefacts go here (the export's staging directory)
    work_dir: str                        # scratch space; result.json goes here
    stem: str                            # artefact file stem, e.g. "v3-20261121T101500Z"
    input_shape: list[int]               # [1, 3, H, W]
    metadata: dict = field(default_factory=dict)     # embedded in every artefact (see quant.export)
    calibration: dict[str, str] = field(default_factory=dict)   # "nhwc" / "nchw" -> .npy
    check: dict[str, str] = field(default_factory=dict)         # "inputs", "<source>_depth", "<source>_seg"
    threads: int = 2
    float_ops: list[str] = field(default_factory=lambda: ["DIV"])  # op types int8 files keep in float
    float_stem: int = DEFAULT_FLOAT_STEM  # int8 files, Core ML w8a8: the first N weighted layers stay float
    converter: str = ""                  # which of the format's converters runs it ("" = its default, core/formats.py)

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        """The job in `path`, its paths made absolute (a converter may change directory); ValueError
        when it asks for what does not exist (an unknown precision would otherwise become a file of
        another, named as asked) or lacks a file one of its precisions reads, before any conversion."""
        job = cls(**json.loads(Path(path).read_text()))
        for name in ("sources", "calibration", "check", "metadata"):
            if not isinstance(getattr(job, name), dict):
                raise ValueError(f"{name} must be an object, got {getattr(job, name)!r}")
        if job.format not in FORMATS:
            raise ValueError(f"format {job.format!r} is not one of {', '.join(FORMATS)}")
        fmt = FORMATS[job.format]
        if not job.precisions or any(p not in fmt.precisions for p in job.precisions):
            raise ValueError(f"{job.format} precisions must be a non-empty subset of {list(fmt.precisions)}, "
                             f"got {job.precisions}")
        layouts = fmt.converter(job.converter).layouts or (fmt.input_layout,)
        layout = job.metadata.get("input_layout", fmt.input_layout)
        if layout not in layouts:
            raise ValueError(f"input_layout {layout!r}: the {job.converter or 'default'} {fmt.title} converter "
                             f"writes {' or '.join(layouts)}")
        sources = sorted({source_for(p) for p in job.precisions} - set(job.sources))
        if sources:
            raise ValueError(f"the {job.format} job for {', '.join(job.precisions)} lacks "
                             + ", ".join(f'sources["{s}"] (the model file)' for s in sources))
        calibrated = [p for p in job.precisions if p in CALIBRATED_PRECISIONS]
        if calibrated and not job.calibration.get(layout.lower()):
            raise ValueError(f"calibration images are needed for {', '.join(calibrated)} (int8 and w8a8 measure "
                             f"activation ranges on them, the palettes their bias correction): the {job.format} job "
                             f'needs calibration["{layout.lower()}"] (float32 images in [0, 1], {layout}), '
                             f"got {sorted(job.calibration)}")
        return job.absolute()

    def absolute(self) -> "Job":
        """The same job with every file and directory path absolute."""
        resolve = lambda files: {k: str(Path(v).resolve()) for k, v in files.items()}   # noqa: E731
        return replace(self, out_dir=str(Path(self.out_dir).resolve()), work_dir=str(Path(self.work_dir).resolve()),
                       sources=resolve(self.sources), calibration=resolve(self.calibration), check=resolve(self.check))


def source_for(precision: str) -> str:
    """Which model a precision is converted from: integer formats from the (QAT) int8 source."""
    return "int8" if precision in INTEGER_PRECISIONS else "float"


def precisions_by_source(job: Job) -> dict[str, list[str]]:
    """The job's precisions grouped by the model they are converted from, in the job's order."""
    groups: dict[str, list[str]] = {}
    for precision in job.precisions:
        groups.setdefault(source_for(precision), []).append(precision)
    return groups


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_against_reference(job: Job, precision: str, run) -> dict:
    """Run `run(inputs NCHW float32) -> (depth NCHW, seg NCHW)` on the check images and compare."""
    if not job.check:
        return {}
    source = source_for(precision)
    inputs = np.load(job.check["inputs"])
    depth, seg = run(inputs)
    report = compare(depth, seg, np.load(job.check[f"{source}_depth"]), np.load(job.check[f"{source}_seg"]))
    report["reference"] = source
    return report


def publish(job: Job, produced: Path, name: str) -> None:
    """Copy a finished artefact file into out_dir as `name`, atomically (a temp name, fsync, then
    rename; the copy because work_dir may be on another file system)."""
    with atomic_path(Path(job.out_dir) / name) as tmp:
        shutil.copyfile(produced, tmp)


def write_result(job: Job, artefacts: list[dict], tools: dict[str, str]) -> None:
    """artefacts: [{"path" (relative to out_dir), "format", "precision", "source", "check", ...}]."""
    out = Path(job.out_dir)
    for a in artefacts:
        if not (out / a["path"]).exists():
            raise FileNotFoundError(f"converter reported {a['path']} but it is not in {out}")
    write_json(Path(job.work_dir) / RESULT_FILE, {"artefacts": artefacts, "tools": tools})


def main(convert, toolchain: tuple[str, ...] = ()) -> None:
    """Entry point of a converter module: `python -m targets.<format> JOB.json`. `toolchain`: the
    modules its conversion imports, loaded before it starts."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)   # run as `-m`, convert.__module__ is __main__
    usage = f"python -m {spec.name if spec else convert.__module__} JOB.json (written by python -m quant.export)"
    if len(sys.argv) != 2:
        print(f"error: one job file expected; usage: {usage}", file=sys.stderr)
        sys.exit(2)
    try:
        job = Job.load(sys.argv[1])
    except (OSError, ValueError, TypeError) as exc:   # missing, not JSON, or not a job's fields
        print(f"error: cannot read the job file {sys.argv[1]} ({type(exc).__name__}: {exc}); usage: {usage}",
              file=sys.stderr)
        sys.exit(2)
    try:
        for module in toolchain:
            importlib.import_module(module)
        # Each full garbage collection walks every object the toolchain loaded (millions with
        # TensorFlow): 2.5-4.7 s of each tflite job. Frozen objects are no longer walked.
        gc.freeze()
        convert(job)
    except Exception as exc:  # the parent shows this line; the traceback goes to the log above it
        import traceback
        traceback.print_exc()
        sys.exit(f"{job.format} conversion failed: {type(exc).__name__}: {exc}")
