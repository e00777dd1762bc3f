"""CoreML converter process: `python -m targets.coreml JOB.json` (contract: targets/job.py).

Path: the parent saves the float model with `torch.export.save(torch.export.export(model, (x,)))`;
this process loads that `.pt2`, runs the core-ATen decompositions and hands the ExportedProgram to
`coremltools.convert` (ML program, `.mlpackage`). The older `torch.jit.trace` path fails on our
students with coremltools 9.0 + torch 2.14 (`upsample_bilinear2d() received an invalid combination
of arguments`, docs/TOOLCHAIN.md); torch.export works for MobileNetV3 and EfficientViT.

TensorFlow is blocked on the first line: coremltools imports TensorFlow when it is installed, and
TensorFlow + torch in one process segfault (docs/TOOLCHAIN.md). So this module is a process entry point:
never import it from the parent (quant.export) or from any process that may need TensorFlow.

Precisions:
- fp32 / fp16: the program computes in float32 / float16 (inputs and outputs stay float32).
- w8: the fp16 program with int8 symmetric per-output-channel weights (constexpr_affine_dequantize).
- palette4 / palette6: the fp16 program with k-means palettized weights, a 16- / 64-entry fp16
  lookup table per tensor (constexpr_lut_to_dense; k-means runs in scikit-learn).
Every compressed op type stays in the iOS16 opset (see MINIMUM_TARGET).

Execution: every package is run on the job's check images right after it is saved and compared
with the PyTorch outputs (edge.coreml.CoreMLRunner, executor "auto"). On macOS Core ML runs it
(`MLModel.predict`) and the check also records `reference_parity`: predict against the MIL
reference executor (edge/mil.py) on the same images. Elsewhere Core ML has no runtime, so the
reference executor runs the saved MIL program op by op at the program's precision; `executor` in
the check names which one ran.

Environment: DENSEKIT_COREML_WEIGHT_THRESHOLD overrides WEIGHT_THRESHOLD (tests set it to 0 so the
tiny test models' small tensors are compressed too).
"""
import sys

sys.modules["tensorflow"] = None  # before anything imports coremltools: TF + torch segfault (docs/TOOLCHAIN.md)

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars; we print one line per precision


class _DropExpectedWarnings(logging.Filter):
    """coremltools warns at import about things that do not concern this converter: its native
    runtime is absent off macOS ("Failed to load _MLModelProxy ...") and its scikit-learn *model
    conversion* API is off for new scikit-learn versions (palettization imports sklearn.cluster
    directly and works)."""

    EXPECTED = ("Failed to load _ML", "Disabling scikit-learn conversion API")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


logging.getLogger("coremltools").addFilter(_DropExpectedWarnings())

import coremltools as ct  # noqa: E402
import coremltools.optimize.coreml as cto  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.contract import DEPTH, INPUT_NAME, SEG  # noqa: E402
from edge.coreml import CoreMLRunner  # noqa: E402
from targets.job import Job, check_against_reference, main, source_for, tool_versions, write_result  # noqa: E402

# iOS16 (macOS 13) is the oldest target that has the compressed-weight ops (constexpr_affine_dequantize,
# constexpr_lut_to_dense) and float16 ML programs with float32 I/O. iOS17 gave the identical program
# for both students (same ops, opset aside), so iOS16 only widens the devices that can run the
# packages (iOS17 drops iPhone 8 / X). Per-grouped-channel palettes and int4 blockwise weights would
# need iOS18; per-tensor palettes and per-channel int8 do not.
MINIMUM_TARGET = ct.target.iOS16
MINIMUM_TARGET_NAME = "iOS16"

# coremltools' own default: tensors with fewer than 2048 elements stay float16. Measured on the
# default student (mobilenetv3_small_100, 64-channel decoder, 256x320): compressing every tensor
# (threshold 0) made palette4's weights only 1.9% smaller (584 KB vs 595 KB) and w8's 0.5% smaller,
# while the tensors it adds (119 of 169: biases, SE layers, small depthwise kernels and the depth /
# seg output convolutions, 2.2% of the parameters) are the ones where a per-tensor palette or int8
# costs the most accuracy per byte saved. So the default keeps them float16. (Whatever the threshold,
# coremltools never compresses 1-D tensors or tensors under 10 elements: those are stored inline.)
WEIGHT_THRESHOLD = 2048
WEIGHT_THRESHOLD_ENV = "DENSEKIT_COREML_WEIGHT_THRESHOLD"

PRECISIONS = ("fp32", "fp16", "w8", "palette4", "palette6")
PALETTE_BITS = {"palette4": 4, "palette6": 6}
NOT_EXECUTED = {"executed": False, "reason": "the job has no check images"}

DESCRIPTIONS = {
    INPUT_NAME: "RGB float32 in [0, 1], NCHW, normalisation inside the model",
    DEPTH: "metric depth in metres",
    SEG: "class logits",
}
# job.metadata fields also stored as flat string keys, for tools that show user metadata (Xcode).
FLAT_KEYS = ("recipe", "version", "student", "depth_units", "classes", "input_range", "normalisation",
             "source_sha256", "created")


def weight_threshold() -> int:
    raw = os.environ.get(WEIGHT_THRESHOLD_ENV, "")
    if not raw:
        return WEIGHT_THRESHOLD
    if not raw.isdigit():
        raise ValueError(f"{WEIGHT_THRESHOLD_ENV} must be a non-negative integer, got {raw!r}")
    return int(raw)


def load_program(path: Path) -> torch.export.ExportedProgram:
    if not path.is_file():
        raise FileNotFoundError(f"float model {path} not found (the parent writes it with torch.export.save)")
    return torch.export.load(str(path)).run_decompositions({})


def convert_program(program, input_shape: list[int], compute_precision) -> "ct.models.MLModel":
    return ct.convert(
        program,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(input_shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=DEPTH, dtype=np.float32), ct.TensorType(name=SEG, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=MINIMUM_TARGET,
        compute_precision=compute_precision,
    )


def compress(fp16_model, precision: str, threshold: int):
    """w8 / palette* from the float16 program; the input model is left unchanged."""
    if precision == "w8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=threshold)
        return cto.linear_quantize_weights(fp16_model, cto.OptimizationConfig(global_config=op))
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=PALETTE_BITS[precision], granularity="per_tensor",
                                weight_threshold=threshold)
    return cto.palettize_weights(fp16_model, cto.OptimizationConfig(global_config=op))


class ModelBuilder:
    """Converts the exported program once per compute precision and derives the compressed ones."""

    def __init__(self, program, input_shape: list[int], threshold: int):
        self.program, self.input_shape, self.threshold = program, input_shape, threshold
        self._fp16 = None

    def build(self, precision: str):
        if precision == "fp32":
            return convert_program(self.program, self.input_shape, ct.precision.FLOAT32)
        if self._fp16 is None:
            self._fp16 = convert_program(self.program, self.input_shape, ct.precision.FLOAT16)
        return self._fp16 if precision == "fp16" else compress(self._fp16, precision, self.threshold)


def flat_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def describe(model, job: Job, precision: str) -> None:
    meta = job.metadata or {}
    model.user_defined_metadata["densekit"] = json.dumps(meta)
    model.user_defined_metadata["precision"] = precision
    for key in FLAT_KEYS:
        if meta.get(key) is not None:
            model.user_defined_metadata[key] = flat_value(meta[key])
    classes = meta.get("classes") or []
    what = f"{len(classes)}-class segmentation logits" if classes else "segmentation logits"
    recipe = f" (recipe {meta['recipe']})" if meta.get("recipe") else ""
    model.short_description = (f"densekit multi-task student{recipe}: metric depth in metres and {what} "
                               f"from one RGB image; {precision} weights")
    model.author = "densekit"
    model.version = job.stem
    for name, text in DESCRIPTIONS.items():
        if name == INPUT_NAME:
            model.input_description[name] = text
        else:
            model.output_description[name] = text


def save_atomically(model, target: Path, staging: Path) -> None:
    """Save into `staging` (same directory, so the rename is atomic) and rename into place: a
    failure never leaves a half-written package under the final name."""
    staging.mkdir(parents=True, exist_ok=True)
    temporary = staging / target.name  # coremltools insists on the .mlpackage suffix
    model.save(str(temporary))
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(temporary, target)


def _walk(block, counts: Counter, lut_sizes: set) -> None:
    for op in block.operations:
        if op.type.startswith("constexpr_"):
            counts[op.type] += 1
        if op.type == "constexpr_lut_to_dense":
            lut = op.attributes["lut"] if "lut" in op.attributes else None
            if lut is not None:
                dims = [d.constant.size for d in lut.type.tensorType.dimensions]
                # iOS16: lut is (2**nbits,); iOS18: (..., 2**nbits, vector_size)
                lut_sizes.add(dims[0] if len(dims) == 1 else dims[-2])
        for inner in op.blocks:
            _walk(inner, counts, lut_sizes)


def weight_ops(path: Path) -> dict:
    """Compressed-weight ops in the saved program: {"weight_ops": {op type: count}, "palette_bits": [..]}."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    counts, lut_sizes = Counter(), set()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            _walk(block, counts, lut_sizes)
    found = {"weight_ops": dict(sorted(counts.items()))}
    if lut_sizes:
        found["palette_bits"] = sorted(int(size).bit_length() - 1 for size in lut_sizes)
    return found


def predictor(path: Path, threads: int | None = None) -> CoreMLRunner:
    """The saved package as a runner `(inputs NCHW) -> (depth, seg)`: MLModel.predict on macOS, the
    MIL reference executor elsewhere (edge/coreml.py)."""
    return CoreMLRunner(path, threads=threads, executor="auto")


def execution_check(job: Job, precision: str, path: Path) -> dict:
    """Run the package on the check images: parity with PyTorch, and on macOS with the reference too."""
    if not job.check:
        return dict(NOT_EXECUTED)
    runner = predictor(path, threads=max(1, job.threads))
    report = {"executed": True, "executor": runner.executor, **check_against_reference(job, precision, runner)}
    if sys.platform == "darwin":
        report["reference_parity"] = runner.compare_executors(np.load(job.check["inputs"]))
    return report


def validate(job: Job) -> None:
    unknown = [p for p in job.precisions if p not in PRECISIONS]
    if unknown or not job.precisions:
        raise ValueError(f"coreml precisions must be a non-empty subset of {list(PRECISIONS)}, got {job.precisions}")
    if "float" not in job.sources:
        raise ValueError(f'the coreml job needs sources["float"] (a .pt2 file), got {sorted(job.sources)}')


def produce(builder: ModelBuilder, job: Job, precision: str, staging: Path) -> dict:
    """Build, describe, save and inspect one package; returns its result.json entry."""
    name = f"{job.stem}_{precision}.mlpackage"
    path = Path(job.out_dir) / name
    model = builder.build(precision)
    describe(model, job, precision)
    save_atomically(model, path, staging)
    return {"path": name, "format": "coreml", "precision": precision, "source": source_for(precision),
            "check": execution_check(job, precision, path), "deployment_target": MINIMUM_TARGET_NAME,
            "weight_threshold": builder.threshold, **weight_ops(path)}


def convert(job: Job) -> None:
    validate(job)
    torch.set_num_threads(max(1, job.threads))
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".coreml.tmp-{os.getpid()}"
    artefacts: list[dict] = []
    try:
        start = time.perf_counter()
        builder = ModelBuilder(load_program(Path(job.sources["float"])), job.input_shape, weight_threshold())
        print(f"coreml: loaded {job.sources['float']} in {time.perf_counter() - start:.1f} s", flush=True)
        if any(p != "fp32" for p in job.precisions):  # shared by fp16, w8 and palette*
            start = time.perf_counter()
            builder.build("fp16")
            print(f"coreml: float16 program converted in {time.perf_counter() - start:.1f} s", flush=True)
        for precision in job.precisions:
            start = time.perf_counter()
            artefacts.append(produce(builder, job, precision, staging))
            ops = ", ".join(f"{n} {t}" for t, n in artefacts[-1]["weight_ops"].items()) or "no compressed weights"
            print(f"coreml {precision}: {artefacts[-1]['path']} ({ops}) in {time.perf_counter() - start:.1f} s",
                  flush=True)
        write_result(job, artefacts, tool_versions("coremltools", "torch", "numpy", "scikit-learn"))
    except BaseException:
        for a in artefacts:  # all or nothing: result.json lists every package, or none is left
            shutil.rmtree(out / a["path"], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main(convert)
