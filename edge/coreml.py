"""The Core ML runner: an .mlpackage run by `MLModel.predict` on macOS, by the MIL reference executor elsewhere.

    runner = CoreMLRunner("exports/.../v3-..._fp16.mlpackage")          # executor="auto"
    depth, seg = runner(images)        # (N, 3, H, W) float32 RGB in [0, 1] -> (N, 1, H, W), (N, C, H, W)

Executors:
- "predict": coremltools' `MLModel.predict` with compute units ALL (Core ML chooses CPU, GPU or the
  Neural Engine). macOS only: Core ML has no Linux runtime. `threads` does not apply (Core ML
  schedules its own work).
- "reference": `edge.mil.MILProgram`, which executes the saved MIL program op by op in numpy/torch
  at the program's precision (fp16 storage between ops). Runs anywhere; it checks what the package
  computes, not how fast Core ML computes it (its latency says nothing about a device), and it does
  not model fp16 accumulation on the GPU / Neural Engine (edge/mil.py says how that bounds it).
  `threads`: torch's intra-op threads while it runs (None: torch's default).
- "auto": "predict" on macOS, "reference" elsewhere, and on a macOS too old to load the package
  (iOS18 packages, the w4block / palette4g / sparse-palette4 / w8a8 precisions, need macOS 15;
  `REQUIRED_MACOS`): there the executor's name says why.

The shared runner interface (edge/runners.py): `format`, `executor` (in words), `input_shape`,
`__call__(images)`, `invoke_fn(image)`. `compare_executors(images)` (macOS) runs both executors on
the same images and returns core.contract.compare's parity dict of predict against the reference,
with the package's deployment target and the compressed ops it compares through (`ops`): for w8a8
this is where Core ML's int8 activation arithmetic meets the reference's quantize / dequantize.

This module imports torch and coremltools (with TensorFlow hidden), never TensorFlow.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.contract import DEPTH, INPUT_NAME, SEG, compare
from core.formats import FORMATS
from edge.mil import MILProgram, import_coremltools
from edge.mil_ops import HandlerError, UnsupportedOpError
from edge.runners import check_images, find_outputs, loading, threads_text

EXECUTORS = FORMATS["coreml"].executors

ON_MACOS = sys.platform == "darwin"
# Core ML specification version of a package -> (the deployment target, the oldest macOS that loads it)
REQUIRED_MACOS = {6: ("iOS15", (12,)), 7: ("iOS16", (13,)), 8: ("iOS17", (14,)), 9: ("iOS18", (15,))}
COMPRESSION_OPS = ("quantize", "dequantize")   # besides the constexpr_* ops, what compare_executors lists


def macos_version() -> tuple[int, ...]:
    """This Mac's macOS version, e.g. (15, 1); () off macOS."""
    release = platform.mac_ver()[0] if ON_MACOS else ""
    return tuple(int(part) for part in release.split(".") if part.isdigit())


def package_target(path: Path) -> tuple[str, tuple[int, ...]]:
    """(deployment target, oldest macOS that loads it) of the package at `path`, from its specification
    version; a version this table does not know requires nothing here (Core ML's load says if it can't)."""
    version = import_coremltools().utils.load_spec(str(path)).specificationVersion
    return REQUIRED_MACOS.get(version, (f"specification {version}", ()))


def resolve_executor(executor: str, path: Path | None = None) -> tuple[str, str]:
    """("predict" or "reference", why the reference runs where "auto" would predict: "" or a reason) for
    `executor` on the package at `path`; raises ValueError (unknown) or RuntimeError (predict off macOS,
    or on a macOS older than the package needs)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown Core ML executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "predict" and not ON_MACOS:
        raise RuntimeError(f"MLModel.predict needs macOS; this is {sys.platform}, where Core ML has no runtime: "
                           "use executor='reference' (the MIL reference executor, edge/mil.py; --executor reference)")
    if executor == "reference" or not ON_MACOS:
        return "reference", ""
    target, needs = package_target(path) if path is not None else ("", ())
    if macos_version() >= needs:
        return "predict", ""
    reason = (f"{Path(path).name} is an {target} package; MLModel.predict needs macOS "
              f"{'.'.join(map(str, needs))} or later to load it, this is macOS {platform.mac_ver()[0]}")
    if executor == "predict":
        raise RuntimeError(f"{reason}: use executor='reference', or a precision for iOS16 (fp16, w8, palette4/6)")
    return "reference", reason


class ThreadsFor:
    """Context: torch's intra-op threads set to `threads` (None: unchanged), restored afterwards."""

    def __init__(self, threads: int | None):
        self.threads, self.saved = threads, None

    def __enter__(self):
        if self.threads is not None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)


class CoreMLRunner:
    """An .mlpackage, executed by MLModel.predict (macOS) or the MIL reference executor.

    path: the package directory; threads: the reference executor's torch threads (None: default);
    executor: "auto" | "predict" | "reference" (see the module docstring).
    """

    format = "coreml"
    import_runtime = staticmethod(import_coremltools)

    def __init__(self, path: str | Path, *, threads: int | None = None, executor: str = "auto"):
        self.path, self.threads = Path(path), threads
        if self.path.suffix.lower() != ".mlpackage" or not self.path.is_dir():
            raise ValueError(f"{self.path} is not an .mlpackage directory; Core ML artefacts from "
                             "python -m quant.export --target coreml are <stem>_<precision>.mlpackage")
        self.kind, self.fallback = resolve_executor(executor, self.path)
        self._model = self._program = None
        if self.kind == "predict":
            with loading(self.path, "coremltools"):
                self._model = import_coremltools().models.MLModel(str(self.path))   # compute units ALL
                spec = self._model.get_spec()
            inputs = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.description.input}
            outputs = [o.name for o in spec.description.output]
            self.runtime = f"Core ML (coremltools {import_coremltools().__version__})"
            self.executor = f"MLModel.predict (macOS {platform.mac_ver()[0]}, compute units ALL)"
        else:   # an op without a handler is the executor's gap, not a damaged package
            with loading(self.path, "coreml-reference (edge/mil.py)", keep=(UnsupportedOpError, HandlerError)):
                self._program = MILProgram(self.path)
            inputs = {name: kind.shape for name, kind in self._program.inputs.items()}
            outputs = self._program.output_names
            self.runtime = "coreml-reference (edge/mil.py)"
            self.executor = (f"coreml-reference (numpy/torch, {self._program.precision} per op, "
                             f"{threads_text(threads)}" + (f"; {self.fallback}" if self.fallback else "") + ")")
        find_outputs(outputs, self.path)
        if INPUT_NAME not in inputs:
            raise ValueError(f"{self.path} has inputs {sorted(inputs)} but no {INPUT_NAME!r}: artefacts from "
                             "python -m quant.export take 'image'; re-export the model")
        self.input_shape = tuple(int(s) for s in inputs[INPUT_NAME])

    def _predict_one(self, image: np.ndarray) -> dict:
        return self._model.predict({INPUT_NAME: np.ascontiguousarray(image, np.float32)})

    def _reference_one(self, image: np.ndarray) -> dict:
        with ThreadsFor(self.threads):
            return self._program({INPUT_NAME: np.ascontiguousarray(image, np.float32)})

    def _one(self) -> Callable[[np.ndarray], dict]:
        return self._predict_one if self.kind == "predict" else self._reference_one

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images (N, 3, H, W) float32 RGB in [0, 1] -> depth (N, 1, H, W) metres, seg (N, C, H, W) logits."""
        check_images(images, self)
        run = self._one()
        outs = [run(image[None]) for image in images]   # the artefact has batch 1
        return (np.concatenate([np.asarray(o[DEPTH], np.float32) for o in outs]),
                np.concatenate([np.asarray(o[SEG], np.float32) for o in outs]))

    def invoke_fn(self, image: np.ndarray) -> Callable[[], None]:
        """fn() runs one inference on `image` (1, 3, H, W), prepared once (for latency timing)."""
        check_images(image, self)
        prepared, run = np.ascontiguousarray(image, np.float32), self._one()

        def invoke() -> None:
            run(prepared)
        return invoke

    def compare_executors(self, images: np.ndarray) -> dict:
        """macOS: core.contract.compare of MLModel.predict's outputs against the reference executor's
        on `images` (N, 3, H, W): how far Core ML's real arithmetic is from the reference's. Also
        "deployment_target" and "ops": the package's compressed-weight and activation-quantisation
        op types with their counts (what the comparison covers besides the float ops). Every
        precision goes through the same comparison; an iOS18 package needs macOS 15 (RuntimeError
        before, naming it)."""
        if not ON_MACOS:
            raise RuntimeError(f"compare_executors runs MLModel.predict, which needs macOS; this is {sys.platform}. "
                               "Off macOS only the reference executor runs (executor='reference')")
        predict = self if self.kind == "predict" else CoreMLRunner(self.path, executor="predict")
        reference = self if self.kind == "reference" else CoreMLRunner(self.path, threads=self.threads,
                                                                       executor="reference")
        report = compare(*predict(images), *reference(images))
        report["reference"] = "coreml-reference"
        report["deployment_target"] = package_target(self.path)[0]
        report["ops"] = {op: n for op, n in sorted(reference._program.ops_used.items())
                         if op.startswith("constexpr_") or op in COMPRESSION_OPS}
        return report
