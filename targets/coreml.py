"""CoreML converter process: `python -m targets.coreml JOB.json` (contract: targets/job.py).

Path: the parent saves the float model with `torch.export.save(torch.export.export(model, (x,)))`;
this process loads that `.pt2`, runs the core-ATen decompositions and hands the ExportedProgram to
`coremltools.convert` (ML program, `.mlpackage`). The older `torch.jit.trace` path fails on our
students with coremltools 9.0 + torch 2.14 (`upsample_bilinear2d() received an invalid combination
of arguments`, docs/TOOLCHAIN.md); torch.export works for MobileNetV3 and EfficientViT.

TensorFlow is blocked on the first line: coremltools imports TensorFlow when it is installed, and
TensorFlow + torch in one process segfault (docs/TOOLCHAIN.md). So this module is a process entry point:
never import it from the parent (quant.export) or from any process that may need TensorFlow.

Precisions (the deployment target each needs: TARGETS):
- fp32 / fp16: the program computes in float32 / float16 (inputs and outputs stay float32). iOS16.
- w8: the fp16 program with int8 symmetric per-output-channel weights (constexpr_affine_dequantize). iOS16.
- palette4 / palette6: the fp16 program with k-means palettized weights, a 16- / 64-entry fp16
  lookup table per tensor (constexpr_lut_to_dense; k-means runs in scikit-learn), each scaled to
  keep its tensor's norm, and the convolutions' biases corrected for the palettes' expected error
  on the job's calibration images (`ModelBuilder.corrected_palettes`). iOS16.
- w4block: int4 symmetric weights with one fp16 scale per block of W4_BLOCK input channels
  (constexpr_blockwise_shift_scale on int4 data). iOS18.
- palette4g: 4-bit k-means palettes, one 16-entry table per group of PALETTE_GROUP output channels
  (the iOS18 constexpr_lut_to_dense), corrected as palette4's. iOS18.
- sparse-palette4: the SPARSITY smallest-magnitude weights of each tensor set to zero, the rest
  palettized to 16 entries per PALETTE_GROUP output channels, stored jointly: a bit mask and 4-bit
  indices of the non-zeros (constexpr_lut_to_sparse -> constexpr_sparse_to_dense). iOS18.
- w8a8: w8's weights (iOS18 form: constexpr_blockwise_shift_scale) plus int8 activations: quantize /
  dequantize pairs (iOS17 ops) around every conv, add and pool outside the input stem (the job's
  float_stem, `stem_ops_of`), their scales calibrated on the job's calibration images by the
  MIL reference executor (`activation_ranges`). iOS18.
The iOS18 precisions are made from a second float16 conversion with the iOS18 target; the
iOS16 ones keep the iOS16 program, so they still run on iOS16 / macOS 13.

Execution: every package is run on the job's check images right after it is saved and compared
with the PyTorch outputs (edge.coreml.CoreMLRunner, executor "auto"). On macOS Core ML runs it
(`MLModel.predict`) and the check also records `reference_parity`: predict against the MIL
reference executor (edge/mil.py) on the same images. Elsewhere Core ML has no runtime, so the
reference executor runs the saved MIL program op by op at the program's precision; `executor` in
the check names which one ran. An iOS18 package on a macOS before 15 is run by the reference too
(`predict_skipped` says why).

Environment: DENSEKIT_COREML_WEIGHT_THRESHOLD overrides WEIGHT_THRESHOLD (tests set it to 0 so the
tiny test models' small tensors are compressed too).

W8A8 on Linux: coremltools' own `linear_quantize_activations` calibrates by `MLModel.predict` with
every intermediate tensor made an output, which exists only on macOS. `activation_ranges` gathers
the same statistics with the reference executor instead (edge/mil.py, `observe=`), and
`quantize_activations` hands them to coremltools' own insertion passes. What is assumed about
matching a Mac's calibration is in `activation_ranges`.
"""
import sys

sys.modules["tensorflow"] = None  # before anything imports coremltools: TF + torch segfault (docs/TOOLCHAIN.md)

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import ChainMap, Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

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
import torch.nn.functional as F  # noqa: E402

from core.contract import DEPTH, INPUT_NAME, SEG, precision_metadata  # noqa: E402
from core.formats import CALIBRATED_PRECISIONS, FORMATS  # noqa: E402
from core.io import fsync_tree, replace  # noqa: E402
from core.spaces import DepthSpace  # noqa: E402
from edge.coreml import CoreMLRunner  # noqa: E402
from edge.mil import Args, MILProgram, pad_spatial, window_geometry  # noqa: E402
from targets.job import Job, check_against_reference, main, source_for, tool_versions, write_result  # noqa: E402
from targets.stem import DEFAULT_FLOAT_STEM, stem_ops  # noqa: E402

# iOS16 (macOS 13) is the oldest target that has the compressed-weight ops (constexpr_affine_dequantize,
# constexpr_lut_to_dense) and float16 ML programs with float32 I/O. iOS17 gave the identical program
# for both students (same ops, opset aside), so iOS16 only widens the devices that can run the
# packages (iOS17 drops iPhone 8 / X). Per-grouped-channel palettes, int4 blockwise weights, joint
# sparse + palette weights and activation quantisation with int8 weights need iOS18 (macOS 15):
# those precisions, and only those, are converted for it.
DEPLOYMENT_TARGETS = {"iOS16": ct.target.iOS16, "iOS18": ct.target.iOS18}
IOS18_PRECISIONS = ("w4block", "palette4g", "sparse-palette4", "w8a8")
PRECISIONS = FORMATS["coreml"].precisions   # the one table (core/formats.py)
TARGETS = {p: "iOS18" if p in IOS18_PRECISIONS else "iOS16" for p in PRECISIONS}

# coremltools' own default: tensors of at most 2048 elements stay float16. Measured on the
# default student (mobilenetv3_small_100, 64-channel decoder, 256x320): compressing every tensor
# (threshold 0) made palette4's weights only 1.9% smaller (584 KB vs 595 KB) and w8's 0.5% smaller,
# while the tensors it adds (119 of 169: biases, SE layers, small depthwise kernels and the depth /
# seg output convolutions, 2.2% of the parameters) are the ones where a per-tensor palette or int8
# costs the most accuracy per byte saved. So the default keeps them float16. (Whatever the threshold,
# coremltools never compresses 1-D tensors or tensors under 10 elements: those are stored inline.)
WEIGHT_THRESHOLD = 2048
WEIGHT_THRESHOLD_ENV = "DENSEKIT_COREML_WEIGHT_THRESHOLD"

# the k-means palettes densekit corrects (the "palettes" section below); sparse-palette4 keeps
# coremltools' own k-means
PALETTE_BITS = {"palette4": 4, "palette6": 6, "palette4g": 4}
# The iOS18 precisions' sizes, measured on v3 (12 epochs, 64 validation images: package MB, per-pixel
# depth drift median, relative squared error of the compressed weights; README "Core ML precisions"):
# - W4_BLOCK, input channels per int4 scale: 16 / 32 / 64 -> 0.86 / 0.81 / 0.78 MB, 2.4 / 2.5 / 2.8%,
#   0.0079 / 0.0090 / 0.0099. 16 pays 7% in bytes for 4% less drift, 64 saves 4% for 11% more.
# - PALETTE_GROUP, output channels per 4-bit palette: 8 / 16 / 32 -> 0.78 / 0.76 / 0.75 MB, 3.4 / 3.7 /
#   3.1%, 0.0083 / 0.0092 / 0.0097 (per tensor, palette4: 0.74 MB, 3.3%, 0.0100). The drift does not
#   order with the group size (k-means outcomes vary more), the weight error does, and k-means time
#   grows with the number of groups (8 took 1.6x 16 on the v4 student): the middle.
# - SPARSITY: 0.25 / 0.3 / 0.4 / 0.5 -> 0.79 / 0.77 / 0.71 / 0.65 MB, abs_rel +3.4 / +8.1 / +23 / +62%.
#   The bit mask costs a bit per weight, so below ~0.28 the package is larger than palette4's (0.75)
#   while drifting more: no sparsity pays after training a dense student. 0.25 is the highest that a
#   dense v3 takes within its gate (5%), so that is the default; 0.5 (coremltools' default, 13%
#   smaller than palette4) needs a student trained sparse, which densekit does not train yet.
# Where a size does not divide a layer's channels, the largest divisor below it (int4_blocks).
W4_BLOCK = 32
PALETTE_GROUP = 16
SPARSITY = 0.25
SETTINGS = {           # what result.json (and so the manifest) records of each iOS18 precision
    "w4block": {"weights": "int4 symmetric", "block_input_channels": W4_BLOCK},
    "palette4g": {"weights": "4-bit k-means palette", "group_output_channels": PALETTE_GROUP},
    "sparse-palette4": {"weights": "4-bit k-means palette of the non-zeros", "sparsity": SPARSITY,
                        "group_output_channels": PALETTE_GROUP},
    "w8a8": {"weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor, min/max"},
}
OBSERVED_DTYPES = (np.float16, np.float32, np.float64, np.int32)   # w8a8 calibrates what can be an output
CALIBRATION_DIR = "coreml-calibration"   # in the job's work_dir: the packages w8a8 and the palettes calibrate on
NOT_EXECUTED = {"executed": False, "reason": "the job has no check images"}

INPUT_DESCRIPTION = "RGB float32 in [0, 1], NCHW, normalisation inside the model"
# job.metadata fields (core.contract.artefact_metadata) also stored as flat string keys, for tools
# that show user metadata (Xcode).
FLAT_KEYS = ("recipe", "run", "student", "depth_space", "depth_units", "classes", "input_layout", "input_range",
             "normalisation", "source_sha256")


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


def convert_program(program, input_shape: list[int], compute_precision, target: str = "iOS16") -> "ct.models.MLModel":
    return ct.convert(
        program,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(input_shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=DEPTH, dtype=np.float32), ct.TensorType(name=SEG, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=DEPLOYMENT_TARGETS[target],
        compute_precision=compute_precision,
    )


def compress(fp16_model, precision: str, threshold: int):
    """w8 (iOS16) and w4block / sparse-palette4 (iOS18: `fp16_model` must be the iOS18 program) from
    the float16 program; the input model is left unchanged. The k-means palettes: `ModelBuilder.corrected_palettes`."""
    if precision == "w8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=threshold)
        return cto.linear_quantize_weights(fp16_model, cto.OptimizationConfig(global_config=op))
    if precision == "w4block":
        return cto.linear_quantize_weights(fp16_model, int4_blocks(fp16_model, threshold))
    if precision == "sparse-palette4":
        pruner = cto.OpMagnitudePrunerConfig(target_sparsity=SPARSITY, weight_threshold=threshold)
        sparse = cto.prune_weights(fp16_model, cto.OptimizationConfig(global_config=pruner))
        return cto.palettize_weights(sparse, sparse_palettes(sparse), joint_compression=True)
    raise ValueError(f"{precision} is not compressed here: palettes are made by ModelBuilder.corrected_palettes")


def int4_blocks(model, threshold: int, block: int = W4_BLOCK) -> "cto.OptimizationConfig":
    """int4 with one scale per block of `block` input channels (x kernel), or per block of the largest
    divisor of the input channels up to `block` where `block` does not divide them (coremltools would
    leave those tensors fp16: 30 of the default student's 50 compressible ones at 32; depthwise
    kernels, one input channel, get a scale per output channel)."""
    def config(size: int):
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=size, weight_threshold=threshold)
    return cto.OptimizationConfig(global_config=config(block), op_name_configs={
        name: config(largest_divisor(channels, block)) for name, channels in weight_channels(model, 1).items()
        if channels % block})


def grouped_palettes(model, threshold: int, lut_function, group: int = PALETTE_GROUP) -> "cto.OptimizationConfig":
    """4-bit palettes made by `lut_function` (`norm_kept_palette`), one per `group` output channels,
    or per the largest divisor of the output channels up to `group` where `group` does not divide
    them (as int4_blocks; e.g. the 13-channel segmentation output gets one palette)."""
    return cto.OptimizationConfig(global_config=palette_config(group, threshold, lut_function), op_name_configs={
        name: palette_config(largest_divisor(channels, group), threshold, lut_function)
        for name, channels in weight_channels(model, 0).items() if channels % group})


def sparse_palettes(sparse_model, group: int = PALETTE_GROUP) -> "cto.OptimizationConfig":
    """grouped_palettes for exactly the pruned weights of `sparse_model` (joint compression). By
    name and with threshold 0: the pruner already applied the weight threshold, and the palettizer
    would test it against a pruned tensor's non-zero values only (half of it at SPARSITY 0.5)."""
    return cto.OptimizationConfig(op_name_configs={
        name: palette_config(largest_divisor(channels, group), 0)
        for name, channels in weight_channels(sparse_model, 0, "constexpr_sparse_to_dense").items()})


def palette_config(group: int, threshold: int, lut_function=None) -> "cto.OpPalettizerConfig":
    """Palettes per `group` output channels: `lut_function`'s, or coremltools' 4-bit k-means (None)."""
    if lut_function is None:
        return cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=group,
                                      weight_threshold=threshold)
    return cto.OpPalettizerConfig(mode="custom", lut_function=lut_function, granularity="per_grouped_channel",
                                  group_size=group, weight_threshold=threshold)


def weight_channels(model, axis: int, holder: str = "const") -> dict[str, int]:
    """{name of the `holder` op that holds a conv / linear weight: the weight's size along `axis`}
    (0: output channels, 1: input channels, the axes coremltools' compression passes use for these
    ops). `holder`: "const", or in a pruned program "constexpr_sparse_to_dense" (its inputs are
    stored inline in the saved program, so coremltools' passes find the config by this op's name).
    Keyed by the weight's op rather than the conv, since one bias const can feed several convs."""
    found = {}
    for op in model._mil_program.functions["main"].operations:   # the program coremltools built
        weight = op.inputs.get("weight") if op.op_type in ("conv", "linear") else None
        if weight is not None and weight.op is not None and weight.op.op_type == holder and weight.rank > axis:
            found[weight.op.name] = int(weight.shape[axis])
    return found


def largest_divisor(channels: int, limit: int) -> int:
    return max(d for d in range(1, min(channels, limit) + 1) if channels % d == 0)


# ----------------------------------------------------------------------------- palettes

# A k-means palette entry is the mean of the weights it stands for, so a palettised tensor is
# smaller than the original (|Q|^2 = |W|^2 - |W - Q|^2), and with batch norm folded into the
# convolutions nothing restores the activations' size downstream: on v3 students trained with
# Muon, coremltools' own 16-value palettes shrank the predicted depth by 3-9% and failed the drift
# gate (docs/EXPORT.md, "Palettes that keep the weights' size"). Two corrections, both free at run
# time:
# 1. each palette is scaled so that its tensor (or group) keeps its norm (`norm_kept_palette`);
# 2. each palettised convolution's bias absorbs the expected change of its output, (W - Q) E[x]:
#    the bias correction of Nagel et al. 2019 ("Data-Free Quantization Through Weight Equalization
#    and Bias Correction", section 4.2), with E[x] measured on the calibration images by the
#    reference executor on the float16 program instead of derived from batch-norm statistics: the
#    mean of what each kernel tap reads, per input channel, over every output position, so the
#    zero padding that border taps read counts as the zeros it is (`conv_tap_means`). The shift is
#    then exactly the mean change of the convolution's output over the calibration images.
# Only convolutions are corrected; `bias_shifts` refuses a palettised weight that another op reads.
CALIBRATED = tuple(p for p in CALIBRATED_PRECISIONS if p in PRECISIONS)   # need the job's calibration images


def norm_kept_palette(nbits: int):
    """A coremltools `lut_function`: coremltools' own k-means palette of `nbits` bits for one
    tensor or group, scaled so that the palettised values keep the original's norm."""
    # coremltools' private k-means (what its mode="kmeans" runs), so that the clusters are exactly
    # coremltools'; the version is pinned (pyproject.toml)
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    def lut_function(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lut, indices = _get_kmeans_lookup_table_and_weight(nbits, weight)
        indices = np.asarray(indices).astype(np.uint8)
        palettised = np.linalg.norm(lut[indices].astype(np.float64))
        original = np.linalg.norm(weight.astype(np.float64))
        scale = original / palettised if palettised > 0 else 1.0
        return (lut * scale).astype(weight.dtype), indices
    return lut_function


def observe_images(program: MILProgram, images: np.ndarray, observe) -> None:
    """Run `program` on each of `images` (N, 3, H, W), calling `observe(op, name, value)` for the
    input (op None) and for every value the program computes (MILProgram's observer)."""
    for image in images:
        feed = np.ascontiguousarray(image[None], np.float32)
        observe(None, INPUT_NAME, feed)
        program({INPUT_NAME: feed}, observe=observe)


def conv_tap_means(program: MILProgram, images: np.ndarray) -> dict[str, np.ndarray]:
    """{conv op name: (C_in, kh, kw), the mean over `images` and over the convolution's output
    positions of what each kernel tap reads from each input channel}, zero where a tap reads the
    padding; computed by the reference executor on `program` (the float16 program). A convolution
    with weight W then outputs on average (W * means).sum() per output channel (its group's channels)."""
    readers: dict[str, list] = {}   # only 2-D convolutions with a constant weight: the ones a palette replaces
    for op in program.ops:
        weight = op.inputs["weight"][0] if op.type == "conv" else None
        if (isinstance(weight, str) and weight in program.constants and program.constant(weight).ndim == 4
                and isinstance(op.inputs["x"][0], str)):
            readers.setdefault(op.inputs["x"][0], []).append(op)
    sums: dict[str, np.ndarray] = {}

    def observe(_op, name: str, value: np.ndarray) -> None:
        for conv in readers.get(name, []):
            x = torch.from_numpy(np.ascontiguousarray(value)).double()
            sums[conv.name] = sums.get(conv.name, 0) + tap_means(program, conv, x)

    observe_images(program, images, observe)
    return {conv: total / len(images) for conv, total in sums.items()}


def tap_means(program: MILProgram, conv, x: torch.Tensor) -> np.ndarray:
    """(C_in, kh, kw): what each tap of the 2-D convolution `conv` reads from `x` (N, C_in, H, W),
    averaged over N and the output positions, the padding read as zeros. The strides, dilations and
    padding are the reference executor's own reading of the op (edge/mil_ops/conv.py)."""
    kernel = list(program.constant(conv.inputs["weight"][0]).shape[2:])
    strides, dilations, pads = window_geometry(Args(conv, ChainMap({conv.inputs["x"][0]: x}, program.constants)),
                                               kernel)
    patches = F.unfold(pad_spatial(x, pads), kernel, dilation=dilations, stride=strides)   # (N, C_in*kh*kw, L)
    return patches.mean(dim=(0, 2)).reshape(x.shape[1], *kernel).numpy()


def bias_shifts(dense: MILProgram, palettised: MILProgram, means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{conv op name: (W - Q) E[x] per output channel, E[x] its `conv_tap_means`} for every
    convolution whose weight the palettised program decodes from a palette
    (constexpr_lut_to_dense); `dense` is the float16 program it was made from. Raises when a
    palettised weight has no such convolution to correct, so that the correction never goes
    missing silently."""
    palette_outputs = {name for op in palettised.ops if op.type == "constexpr_lut_to_dense" for name, _ in op.outputs}
    dense_convs = {op.name: op for op in dense.ops if op.type == "conv"}
    shifts, corrected = {}, set()
    for op in palettised.ops:
        if op.type != "conv" or op.inputs["weight"][0] not in palette_outputs:
            continue
        if op.name not in dense_convs or op.name not in means:
            raise RuntimeError(f"palette bias correction: conv {op.name!r} has no float16 twin or tap means in "
                               f"{dense.path.name}; the two programs no longer match by op name")
        q = palettised.constant(op.inputs["weight"][0]).astype(np.float64)
        w = dense.constant(dense_convs[op.name].inputs["weight"][0]).astype(np.float64)
        groups = int(Args(op, palettised.constants).scalar("groups", 1))   # as the executor's conv reads it
        out_channels, per_group = w.shape[0], w.shape[1]
        mean = means[op.name].reshape(groups, 1, per_group, -1)   # E[x] of each group's input channels, per tap
        error = (w - q).reshape(groups, out_channels // groups, per_group, -1)
        shifts[op.name] = (error * mean).sum(axis=(2, 3)).reshape(out_channels)
        corrected.add(op.inputs["weight"][0])
    read_elsewhere = {name for op in palettised.ops if op.type != "conv" for bindings in op.inputs.values()
                      for name in bindings if isinstance(name, str) and name in palette_outputs}
    uncorrected = read_elsewhere | (palette_outputs - corrected)
    if uncorrected:
        raise RuntimeError(f"palette bias correction covers convolutions only, and {palettised.path.name} has "
                           f"palettised weights that other ops read: {', '.join(sorted(uncorrected)[:5])}")
    return shifts


def shift_biases(model, shifts: dict[str, np.ndarray]):
    """`model` with each named convolution's bias moved by its shift (a bias made where none was),
    stored in the convolution's weight dtype (MIL's conv takes bias and weight of one type), by a
    graph pass over its MIL program. Each conv gets its own new const: a bias const may be shared."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    class ShiftBiases(AbstractGraphPass):
        def apply(self, prog):
            block = prog.functions["main"]
            with block:
                for op in list(block.operations):
                    if op.op_type != "conv" or op.name not in shifts:
                        continue
                    dtype = types.nptype_from_builtin(op.weight.dtype)
                    old = op.bias.val.astype(np.float64) if op.bias is not None else 0.0
                    bias = mb.const(val=(old + shifts[op.name]).astype(dtype), name=f"{op.name}_bias_corrected",
                                    before_op=op)
                    op.set_inputs(bias=bias)
            PASS_REGISTRY["common::dead_code_elimination"](prog)   # the replaced consts, not to be saved

    return ct.models.utils._apply_graph_pass(model, ShiftBiases(), pymil_load_func=milproto.load,
                                            skip_model_load=True)


def palettise(fp16_model, precision: str, threshold: int):
    """palette4 / palette6 (iOS16) or palette4g (iOS18: `fp16_model` must be the iOS18 program),
    norm-kept k-means palettes; the biases are corrected by `shift_biases`."""
    lut_function = norm_kept_palette(PALETTE_BITS[precision])
    if precision == "palette4g":
        return cto.palettize_weights(fp16_model, grouped_palettes(fp16_model, threshold, lut_function))
    config = cto.OpPalettizerConfig(mode="custom", lut_function=lut_function, granularity="per_tensor",
                                    weight_threshold=threshold)
    return cto.palettize_weights(fp16_model, cto.OptimizationConfig(global_config=config))


# ----------------------------------------------------------------------------- W8A8

def activation_ranges(program: MILProgram, images: np.ndarray) -> dict[str, dict[str, float]]:
    """The activation statistics coremltools' calibration collects, measured by the MIL reference
    executor: {tensor name: {"rmin", "rmax"}} for the program's input and every value a computing
    op produces (the outputs excepted), over all `images` (N, 3, H, W) float32 in [0, 1].

    What coremltools 9.0 does (optimize/coreml/experimental/_post_training_quantization.py,
    `_get_activation_calibration_stats`, and `_model_debugger.py`): every non-const op output that
    can be a model output (float or int32; not bool) and is not one already, plus the inputs, gets
    the min and max of its values; then every concat's inputs and output share the union of their
    ranges (so a quantized concat needs no requantisation). Here the same tensors, the same
    statistics and the same concat rule, with one deliberate difference: coremltools overwrites a
    tensor's range with each sample's before taking the min / max (`_update_tensor_range`), so its
    ranges are those of the *last* calibration image; these are the min / max over all of them,
    which is what its docstrings describe.

    Assumed about matching a Mac (not checked here: no Mac): there coremltools runs the float16
    program with `MLModel.predict` on CPU_ONLY, which may compute in float32 where this executor
    rounds every op's output to float16 (edge/mil.py). The extremes then differ by float16
    rounding along the path (relative ~1e-3), and the insertion passes round rmin / rmax to
    float16 before computing the scale, so a scale differs from a Mac's by a few float16 ulps
    (~0.1% each). A range set by one extreme pixel can differ more where an upstream float16
    rounding decides which pixel is the maximum. The drift gate, measured on validation images, is
    what the export relies on, not scale equality with a Mac; the ranges go into result.json (and
    the manifest) so that a Mac's calibration can be compared with them.
    """
    stats: dict[str, dict[str, float]] = {}
    skip = set(program.output_names)

    def update(name: str, value: np.ndarray) -> None:
        # torch, not numpy: numpy's float16 min / max is ~30x slower, the bulk of calibration's time
        low, high = (float(v) for v in torch.aminmax(torch.from_numpy(np.ascontiguousarray(value))))
        if name in stats:
            low, high = min(low, stats[name]["rmin"]), max(high, stats[name]["rmax"])
        stats[name] = {"rmin": low, "rmax": high}

    def observe(op, name: str, value: np.ndarray) -> None:
        if name not in skip and value.size and value.dtype in OBSERVED_DTYPES:
            update(name, value)

    observe_images(program, images, observe)
    for group in concat_groups(program):
        known = [stats[name] for name in group if name in stats]
        shared = {"rmin": min(s["rmin"] for s in known), "rmax": max(s["rmax"] for s in known)}
        stats.update({name: dict(shared) for name in group if name in stats})
    return stats



def concat_groups(program: MILProgram) -> list[set[str]]:
    """Sets of value names that must share one range: each concat's inputs and output, merged
    wherever two concats share a value."""
    groups: list[set[str]] = []
    for op in program.ops:
        if op.type != "concat":
            continue
        group = {b for b in op.inputs.get("values", []) if isinstance(b, str)} | {op.outputs[0][0]}
        for other in [g for g in groups if g & group]:
            group |= other
            groups.remove(other)
        groups.append(group)
    return groups


# MIL ops that hold weights (the layers targets/stem.py counts), and the activations that
# coremltools' insert_suffix_quantize_dequantize_pair quantizes with the conv before them
MIL_WEIGHTED = ("conv", "conv_transpose", "linear")
MIL_FUSED = ("relu", "relu6", "leaky_relu", "tanh", "scaled_tanh", "sigmoid", "sigmoid_hard")


def stem_ops_of(program: MILProgram, layers: int) -> list[str]:
    """The ops within the first `layers` weighted layers from the input (targets/stem.py, the rule
    the TFLite and ONNX int8 files keep in float): w8a8 gives them no quantize / dequantize pair,
    so they read and write float16.

    Why: a MobileNetV3 stem's output (the hardswish input) spans a range that one int8 scale
    resolves coarsely. On the Muon-trained seed-0 v3 student its hardswish output reached 62 on the
    calibration images, so one int8 step (0.49) left a signal-to-noise ratio of 18 dB, and the
    first depthwise layer's output was 73% off (relative L2 error) for every later layer to read:
    abs_rel +77.88% with every layer's activations int8, +1.65% with the stem convolution and that
    depthwise layer left float16 (docs/EXPORT.md).

    All the stem's ops are returned (the input's normalisation, activations); coremltools' passes
    pair only convolutions, adds and pools, so an op of another type here changes nothing."""
    ops = [(op.name, op.type, [v for values in op.inputs.values() for v in values if isinstance(v, str)],
            [name for name, _ in op.outputs]) for op in program.ops]
    return stem_ops(ops, list(program.inputs), layers, MIL_WEIGHTED, MIL_FUSED)


def quantize_activations(model, stats: dict[str, dict[str, float]], float_ops: Iterable[str] = ()):
    """Insert int8 quantize / dequantize pairs with `stats` (activation_ranges) by coremltools' own
    passes, in the order `coremltools.optimize.coreml.linear_quantize_activations` runs them: before
    every conv / add / pool input, after every conv / add / pool (or its relu-like activation), then
    drop the redundant dequantize -> quantize pairs. Symmetric int8: scale = max|range| / 127.
    `float_ops` (op names) get no pair: they read and write float16 (an op config of None)."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"),
                                    op_name_configs={name: None for name in float_ops})
    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair",
                 "compression::insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    return ct.models.utils._apply_graph_pass(model, passes, spec_version=ct._SPECIFICATION_VERSION_IOS_18,
                                            pymil_load_func=milproto.load, skip_model_load=True)


def w8a8(fp16_model, threshold: int, calibration: np.ndarray, program: MILProgram,
         float_stem: int) -> tuple["ct.models.MLModel", dict]:
    """int8 activations (calibrated on `calibration` by the reference executor) and int8 per-channel
    weights, from the iOS18 float16 program (`fp16_model`; `program`, its package in the job's
    work_dir / CALIBRATION_DIR, run by the reference executor); the first `float_stem` weighted
    layers keep float16 activations (stem_ops_of). Also returns the calibration's record for
    result.json: the ranges used ({tensor: [rmin, rmax]}, so a Mac's calibration can be compared
    with them), the package they were measured on and the convolutions left in float16."""
    stats = activation_ranges(program, calibration)
    float_ops = stem_ops_of(program, float_stem)
    quantized = quantize_activations(fp16_model, stats, float_ops)
    kinds = {op.name: op.type for op in program.ops}
    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=threshold)
    model = cto.linear_quantize_weights(quantized, cto.OptimizationConfig(global_config=op))
    return model, {"images": int(len(calibration)), "statistic": "min/max over all images",
                   "executor": "coreml-reference (edge/mil.py)",
                   "measured_on": f"the iOS18 float16 program ({CALIBRATION_DIR}/{program.path.name} in the work "
                                  "directory)",
                   "float_stem": {"layers": float_stem,
                                  "weighted_ops": [name for name in float_ops if kinds[name] in MIL_WEIGHTED]},
                   "ranges": {name: [s["rmin"], s["rmax"]] for name, s in sorted(stats.items())}}


class ModelBuilder:
    """Converts the exported program once per compute precision and target, and derives the compressed ones.

    calibration: (N, 3, H, W) float32 images for w8a8 and the palettes, or None; scratch: a directory
    for the packages their calibration runs on; float_stem: the weighted layers from the input that
    w8a8 leaves in float16 (`quant.export --float-stem`)."""

    def __init__(self, program, input_shape: list[int], threshold: int, calibration: np.ndarray | None = None,
                 scratch: Path | None = None, float_stem: int = DEFAULT_FLOAT_STEM):
        self.program, self.input_shape, self.threshold = program, input_shape, threshold
        self.calibration, self.scratch, self.float_stem = calibration, scratch, float_stem
        self._fp16: dict[str, object] = {}
        self._float_programs: dict[str, MILProgram] = {}   # per target, saved for the reference executor
        self._means: dict[str, dict[str, np.ndarray]] = {}   # per target: the convolutions' tap means
        # per precision, what its result.json entry adds (w8a8: its calibration; the palettes: their correction)
        self.notes: dict[str, dict] = {}

    def fp16(self, target: str):
        if target not in self._fp16:
            self._fp16[target] = convert_program(self.program, self.input_shape, ct.precision.FLOAT16, target)
        return self._fp16[target]

    def build(self, precision: str):
        if precision == "fp32":
            return convert_program(self.program, self.input_shape, ct.precision.FLOAT32)
        fp16 = self.fp16(TARGETS[precision])
        if precision == "fp16":
            return fp16
        if precision == "w8a8":
            model, calibration = w8a8(fp16, self.threshold, self.calibration, self.float_program("iOS18"),
                                      self.float_stem)
            self.notes["w8a8"] = {"calibration": calibration}
            return model
        if precision in PALETTE_BITS:
            return self.corrected_palettes(precision)
        return compress(fp16, precision, self.threshold)

    def float_program(self, target: str) -> MILProgram:
        """The float16 program for `target`, saved once where the calibrations run it and loaded once
        by the reference executor."""
        if target not in self._float_programs:
            package = self.scratch / f"fp16-{target.lower()}.mlpackage"
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.fp16(target).save(str(package))
            self._float_programs[target] = MILProgram(package)
        return self._float_programs[target]

    def corrected_palettes(self, precision: str):
        """Norm-kept palettes with their biases corrected on the calibration images; the tap means
        are measured once per float16 program and shared by the palette precisions that use it."""
        target = TARGETS[precision]
        dense = self.float_program(target)
        if target not in self._means:
            self._means[target] = conv_tap_means(dense, self.calibration)
        palettised = palettise(self.fp16(target), precision, self.threshold)
        package = self.scratch / f"{precision}-uncorrected.mlpackage"   # MILProgram decodes the palettes from it
        shutil.rmtree(package, ignore_errors=True)
        palettised.save(str(package))
        shifts = bias_shifts(dense, MILProgram(package), self._means[target])
        self.notes[precision] = {"correction": {
            "palettes": "k-means, scaled to keep each tensor's norm",
            "bias_correction": {"convolutions": len(shifts), "images": int(len(self.calibration)),
                                "statistic": "mean input per channel and kernel tap over the output "
                                             "positions, padding as zeros; float16 program, reference executor"}}}
        return shift_biases(palettised, shifts)


def flat_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def describe(model, job: Job, precision: str) -> None:
    """The package's metadata and the descriptions Xcode shows; the depth is described in the run's
    own space (a student of a relative teacher outputs no metres)."""
    meta = job.metadata or {}
    model.user_defined_metadata["densekit"] = json.dumps(precision_metadata(meta, precision))   # as TFLite, ONNX
    model.user_defined_metadata["precision"] = precision
    for key in FLAT_KEYS:
        if meta.get(key) is not None:
            model.user_defined_metadata[key] = flat_value(meta[key])
    depth = DepthSpace(meta.get("depth_space", DepthSpace.METRIC.value)).phrase()
    classes = meta.get("classes") or []
    what = f"{len(classes)}-class segmentation logits" if classes else "segmentation logits"
    recipe = f" (recipe {meta['recipe']})" if meta.get("recipe") else ""
    model.short_description = (f"densekit multi-task student{recipe}: {depth} and {what} "
                               f"from one RGB image; {precision} weights")
    model.author = "densekit"
    model.version = job.stem
    model.input_description[INPUT_NAME] = INPUT_DESCRIPTION
    model.output_description[DEPTH] = depth
    model.output_description[SEG] = "class logits"


def stage(model, name: str, staging: Path) -> Path:
    """Save the package under `staging` (beside the output, so publishing it is a rename) and fsync it."""
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / name  # coremltools insists on the .mlpackage suffix
    model.save(str(staged))
    fsync_tree(staged)
    return staged


def publish(staged: Path, target: Path) -> None:
    """Rename a checked package into place: nothing half-written or unchecked is under the final name."""
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    replace(staged, target)


FLOAT_TYPES = (ct.proto.MIL_pb2.DataType.FLOAT16, ct.proto.MIL_pb2.DataType.FLOAT32)
LUT_OPS = ("constexpr_lut_to_dense", "constexpr_lut_to_sparse")


def _dims(value_type) -> list[int]:
    return [d.constant.size for d in value_type.tensorType.dimensions]


def _summarise(block, threshold: int) -> tuple[Counter, Counter, set, int]:
    """(constexpr op counts, quantize / dequantize counts, LUT sizes, float weights kept dense)."""
    counts, activations, lut_sizes = Counter(), Counter(), set()
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    read_by_constexpr = set()
    for op in block.operations:
        if op.type.startswith("constexpr_"):
            counts[op.type] += 1
            read_by_constexpr |= {a.name for arg in op.inputs.values() for a in arg.arguments if a.name}
        if op.type in ("quantize", "dequantize"):
            activations[op.type] += 1
        if op.type in LUT_OPS:
            if "lut" in op.attributes:     # iOS16: an attribute, (2**nbits,)
                lut_sizes.add(_dims(op.attributes["lut"].type)[0])
            else:                          # iOS18: an input, (..., 2**nbits, vector_size)
                lut = op.inputs["lut"].arguments[0]   # a const's name, or an inline value
                lut_sizes.add(_dims(consts[lut.name].outputs[0].type if lut.name else lut.value.type)[-2])
    dense = 0
    for name, op in consts.items():
        value = op.attributes["val"]
        if (name not in read_by_constexpr and value.WhichOneof("value") == "blobFileValue"
                and value.type.tensorType.dataType in FLOAT_TYPES
                and len(_dims(value.type)) > 1 and int(np.prod(_dims(value.type))) > threshold):
            dense += 1
    return counts, activations, lut_sizes, dense


def weight_ops(path: Path, threshold: int = WEIGHT_THRESHOLD) -> dict:
    """What the saved program holds: {"weight_ops": {constexpr op type: count}, "dense_weights": float
    weight tensors in weight.bin (rank >= 2: coremltools never compresses 1-D ones) with more than
    `threshold` elements (coremltools' rule) that stayed uncompressed (in a compressed package: a block or group size
    that does not divide their channels), "palette_bits": [..] (palettes),
    "activation_ops": {"quantize": n, "dequantize": n} (w8a8)}."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    function = spec.mlProgram.functions["main"]
    counts, activations, lut_sizes, dense = _summarise(function.block_specializations[function.opset], threshold)
    found = {"weight_ops": dict(sorted(counts.items())), "dense_weights": dense}
    if lut_sizes:
        found["palette_bits"] = sorted(int(size).bit_length() - 1 for size in lut_sizes)
    if activations:
        found["activation_ops"] = dict(sorted(activations.items()))
    return found


def predictor(path: Path, threads: int | None = None) -> CoreMLRunner:
    """The saved package as a runner `(inputs NCHW) -> (depth, seg)`: MLModel.predict on macOS, the
    MIL reference executor elsewhere (edge/coreml.py)."""
    return CoreMLRunner(path, threads=threads, executor="auto")


def execution_check(job: Job, precision: str, path: Path) -> dict:
    """Run the package on the check images: parity with PyTorch, and where Core ML predicts (macOS,
    new enough for the package) parity of predict with the reference executor too."""
    if not job.check:
        return dict(NOT_EXECUTED)
    runner = predictor(path, threads=max(1, job.threads))
    report = {"executed": True, "executor": runner.executor, **check_against_reference(job, precision, runner)}
    if runner.kind == "predict":
        report["reference_parity"] = runner.compare_executors(np.load(job.check["inputs"]))
    elif runner.fallback:   # macOS too old for the package (an iOS18 one before macOS 15): the reference ran
        report["predict_skipped"] = runner.fallback
    return report


def produce(builder: ModelBuilder, job: Job, precision: str, staging: Path) -> dict:
    """Build, describe, save and inspect one package, then publish it; returns its result.json entry.
    The package is checked where it was staged, so a failing check leaves nothing in `job.out_dir`."""
    name = f"{job.stem}_{precision}.mlpackage"
    model = builder.build(precision)
    describe(model, job, precision)
    staged = stage(model, name, staging)
    notes = builder.notes.get(precision, {})
    settings = {"compression": SETTINGS[precision]} if precision in SETTINGS else {}
    entry = {"path": name, "format": "coreml", "precision": precision, "source": source_for(precision),
             "check": execution_check(job, precision, staged), "deployment_target": TARGETS[precision],
             "weight_threshold": builder.threshold, **settings, **weight_ops(staged, builder.threshold), **notes}
    publish(staged, Path(job.out_dir) / name)
    return entry


def progress_line(entry: dict, seconds: float) -> str:
    ops = {**entry["weight_ops"], **entry.get("activation_ops", {})}
    text = ", ".join(f"{n} {t}" for t, n in ops.items()) or "no compressed weights"
    if entry["weight_ops"] and entry["dense_weights"]:
        text += f", {entry['dense_weights']} weight tensors left fp16"
    return (f"coreml {entry['precision']}: {entry['path']} ({entry['deployment_target']}; {text}) "
            f"in {seconds:.1f} s")


def calibration_images(job: Job) -> np.ndarray | None:
    if not set(job.precisions) & set(CALIBRATED):
        return None
    images = np.load(job.calibration["nchw"]).astype(np.float32)
    if images.ndim != 4 or list(images.shape[1:]) != list(job.input_shape[1:]) or not len(images):
        raise ValueError(f"calibration images {job.calibration['nchw']} have shape {images.shape}; the job needs "
                         f"(N, {', '.join(map(str, job.input_shape[1:]))}) with N >= 1")
    return images


def convert(job: Job) -> None:
    torch.set_num_threads(max(1, job.threads))
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".coreml.tmp-{os.getpid()}"
    artefacts: list[dict] = []
    try:
        start = time.perf_counter()
        builder = ModelBuilder(load_program(Path(job.sources["float"])), job.input_shape, weight_threshold(),
                               calibration_images(job), Path(job.work_dir) / CALIBRATION_DIR, job.float_stem)
        print(f"coreml: loaded {job.sources['float']} in {time.perf_counter() - start:.1f} s", flush=True)
        for target in dict.fromkeys(TARGETS[p] for p in job.precisions if p != "fp32"):  # shared by its precisions
            start = time.perf_counter()
            builder.fp16(target)
            print(f"coreml: float16 program ({target}) converted in {time.perf_counter() - start:.1f} s", flush=True)
        for precision in job.precisions:
            start = time.perf_counter()
            artefacts.append(produce(builder, job, precision, staging))
            print(progress_line(artefacts[-1], time.perf_counter() - start), flush=True)
        write_result(job, artefacts, tool_versions("coremltools", "torch", "numpy", "scikit-learn"))
    except BaseException:
        for a in artefacts:  # all or nothing: result.json lists every package, or none is left
            shutil.rmtree(out / a["path"], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main(convert)
