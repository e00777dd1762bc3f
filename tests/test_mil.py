"""edge/mil.py (the MIL reference executor) and edge/coreml.py (the Core ML runner).

Two tiny students (mobilenetv3_small_050 and efficientvit_b0, 16-channel decoder, 64x96) are
converted by the real converter process (`python -m targets.coreml`, one job per student with all
five precisions, every weight tensor compressed) and executed here op by op. Their BatchNorm
statistics are measured on random images first, so that activations and outputs have the ranges
of a trained network (depth ~1-6 m, logits of a few units) rather than a random network's
near-constant outputs, which would hide precision errors.

Bounds, with u = 2**-11 (float16's unit roundoff: 11 significant bits), and what the two
students measured on the two test images (worst of the two):
- fp32 package vs the PyTorch model: depth relative <= 1e-5, seg logits <= 1e-5 * max|logit|,
  agreement >= 99.9%: float32 round-off of the same ops in another order (measured 2.4e-6 and 4.9e-6
  with max|logit| 2.0; agreement 100%).
- fp16 package vs the PyTorch model: every op's output is rounded to fp16, a relative error of at
  most u. The path from image to output has ~20 stages (stem, 11 encoder blocks, 4 decoder levels,
  the head), each adding at most ~2u relative (its output and the residual sum or resize after it)
  to activations that BatchNorm keeps at unit scale. So: 40u (2.0e-2) relative on the worst depth
  pixel (depth = exp(log-depth): relative depth error = absolute log-depth error) and 40u * max|logit|
  on the logits, 4u (2.0e-3) on the median pixel, and >= 99% of pixels keep their class (only
  near-ties flip). Measured: depth max 6.0e-3, median 7.3e-4; logits 1.15e-2 (max|logit| 2.0);
  agreement 99.7%.
- Compressed weights vs the fp16 package (random weights, every tensor compressed, including the
  output convolutions that the default threshold keeps in fp16): per-channel int8 moves each weight
  by at most half a step (max|w_channel| / 254); a per-tensor k-means palette moves it to the
  nearest of 64 / 16 values. Bounds on the depth relative error (median / p99) and seg agreement:
  w8 0.02 / 0.10 / 0.90 (measured 0.0084 / 0.046 / 0.941), palette6 0.06 / 0.25 / 0.75 (0.036 /
  0.164 / 0.811), palette4 0.15 / 0.60 / 0.50 (0.078 / 0.463 / 0.590), and the error must grow as
  the bits shrink (fp16 < w8 < palette6 < palette4). These bound the compression, not the executor:
  the exact check of the decoding is the weight comparison against coremltools' own decoder and
  the test's own unpacking.
- A package whose stem convolution weights are negated in weight.bin: depth median >= 10x the fp16
  median bound and max >= 10x the fp16 max bound away from the intact package (measured 0.14 and
  1.64; agreement 27%).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_target_coreml import Image01Student, tensorflow_blocked

from core.contract import compare
from distill.students import build_student
from edge import mil
from edge.coreml import CoreMLRunner
from edge.mil import (
    HANDLERS,
    HandlerError,
    MILProgram,
    UnsupportedOpError,
    import_coremltools,
    run_op,
    source_coords,
    spatial_pads,
)
from edge.runners import open_runner
from targets.job import RESULT_FILE, Job

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [1, 3, 64, 96]
STUDENTS = ("mobilenetv3_small_050", "efficientvit_b0")
PRECISIONS = ["fp32", "fp16", "w8", "palette4", "palette6"]
U = 2.0 ** -11
ON_MAC = sys.platform == "darwin"
COMPRESSED_BOUNDS = {"w8": (0.02, 0.10, 0.90), "palette6": (0.06, 0.25, 0.75), "palette4": (0.15, 0.60, 0.50)}


# ----------------------------------------------------------------------------- fixtures

def trained_like_student(name: str) -> torch.nn.Module:
    """The tiny student with BatchNorm statistics measured on 8 random images (eval mode)."""
    torch.manual_seed(0)
    model = Image01Student(build_student(name, decoder_channels=16))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None   # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.rand(8, *SHAPE[1:]))
    return model.eval()


def start_conversion(name: str, model: torch.nn.Module, root: Path) -> tuple[subprocess.Popen, Job]:
    root.mkdir()
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (torch.rand(*SHAPE),)), root / "float.pt2")
    (root / "work").mkdir()
    np.save(root / "calibration.npy", torch.rand(2, *SHAPE[1:]).numpy())   # the palettes' bias correction
    # no check images: this file executes the packages itself; one thread each, both run at once
    job = Job(format="coreml", precisions=PRECISIONS, sources={"float": str(root / "float.pt2")},
              out_dir=str(root / "out"), work_dir=str(root / "work"), stem=name, input_shape=SHAPE, threads=1,
              calibration={"nchw": str(root / "calibration.npy")})
    job.save(root / "job.json")
    proc = subprocess.Popen([sys.executable, "-m", "targets.coreml", str(root / "job.json")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DENSEKIT_COREML_WEIGHT_THRESHOLD": "0"})
    return proc, job


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict:
    """{student: {"model", "packages": {precision: Path}, "inputs" (2, 3, 64, 96), "depth", "seg" (the
    PyTorch model's outputs), "outputs": {precision: (depth, seg) from the reference executor}}}."""
    tmp = tmp_path_factory.mktemp("mil")
    rng = np.random.default_rng(1)
    inputs = rng.random((2, *SHAPE[1:]), dtype=np.float32)
    models = {name: trained_like_student(name) for name in STUDENTS}
    started = {name: start_conversion(name, model, tmp / name) for name, model in models.items()}
    found = {}
    for name, (proc, job) in started.items():
        model = models[name]
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        assert json.loads((Path(job.work_dir) / RESULT_FILE).read_text())["artefacts"]
        with torch.no_grad():
            depth, seg = (t.numpy() for t in model(torch.from_numpy(inputs)))
        packages = {p: Path(job.out_dir) / f"{name}_{p}.mlpackage" for p in PRECISIONS}
        outputs = {p: run_package(MILProgram(path), inputs) for p, path in packages.items()}
        found[name] = {"model": model, "packages": packages, "inputs": inputs, "depth": depth, "seg": seg,
                       "outputs": outputs}
    return found


def run_package(program: MILProgram, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [program({"image": image[None]}) for image in inputs]
    return np.concatenate([o["depth"] for o in outs]), np.concatenate([o["seg"] for o in outs])


# ----------------------------------------------------------------------------- op handlers vs torch

RNG = np.random.default_rng(0)


def rand(*shape, low=-2.0, high=2.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


X4 = rand(2, 6, 9, 11)
W33, B6 = rand(6, 3, 3, 3, low=-0.5, high=0.5), rand(6)
T = torch.from_numpy


def conv_case(pad_type, pad, strides, dilations, groups, x, w, b, expected_pads):
    """MIL conv vs torch conv2d on input padded by `expected_pads` ((top, bottom), (left, right)),
    written out by hand from TF's SAME rule where pad_type is same / same_lower."""
    inputs = {"x": x, "weight": w, "pad_type": pad_type, "pad": np.array(pad, np.int32),
              "strides": np.array(strides, np.int32), "dilations": np.array(dilations, np.int32),
              "groups": np.int32(groups), **({"bias": b} if b is not None else {})}
    (top, bottom), (left, right) = expected_pads

    def reference(x, weight, bias=None, **_):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride=strides, dilation=dilations,
                        groups=groups)
    return inputs, reference


CASES = {
    "add": ({"x": X4, "y": rand(1, 6, 1, 1)}, lambda x, y: x + y),
    "sub": ({"x": X4, "y": rand(1, 6, 1, 1)}, lambda x, y: x - y),
    "mul": ({"x": X4, "y": rand(9, 11)}, lambda x, y: x * y),
    "real_div": ({"x": X4, "y": rand(1, 6, 1, 1, low=0.5, high=2.0)}, lambda x, y: x / y),
    "maximum": ({"x": X4, "y": rand(1, 6, 1, 1)}, lambda x, y: torch.maximum(x, y)),
    "minimum": ({"x": X4, "y": rand(1, 6, 1, 1)}, lambda x, y: torch.minimum(x, y)),
    "relu": ({"x": X4}, torch.relu),
    "relu6": ({"x": X4 * 4}, lambda x: F.relu6(x)),
    "sigmoid": ({"x": X4}, torch.sigmoid),
    "tanh": ({"x": X4}, torch.tanh),
    "exp": ({"x": X4}, torch.exp),
    "sqrt": ({"x": np.abs(X4)}, torch.sqrt),
    "abs": ({"x": X4}, torch.abs),
    "silu": ({"x": X4}, lambda x: F.silu(x)),
    "clip": ({"x": X4, "alpha": np.float32(-0.5), "beta": np.float32(1.0)}, lambda x, **_: x.clamp(-0.5, 1.0)),
    "sigmoid_hard": ({"x": X4 * 3, "alpha": np.float32(1 / 6), "beta": np.float32(0.5)},
                     lambda x, **_: F.hardsigmoid(x)),
    "thresholded_relu": ({"x": X4, "alpha": np.float32(-1.0)},
                         lambda x, **_: torch.where(x >= -1.0, x, torch.zeros_like(x))),
    "softmax": ({"x": X4, "axis": np.int32(1)}, lambda x, **_: torch.softmax(x, 1)),
    "reduce_mean": ({"x": X4, "axes": np.array([2, 3], np.int32), "keep_dims": True},
                    lambda x, **_: x.mean((2, 3), keepdim=True)),
    "reduce_sum": ({"x": X4, "axes": np.array([1], np.int32)}, lambda x, **_: x.sum(1)),
    "reduce_max": ({"x": X4, "axes": np.array([-1], np.int32), "keep_dims": True},
                   lambda x, **_: x.amax(-1, keepdim=True)),
    "conv": conv_case("custom", [1, 1, 1, 1], [2, 2], [1, 1], 2, X4, W33, B6, ((1, 1), (1, 1))),
    "conv/depthwise-dilated": conv_case("custom", [2, 2, 2, 2], [1, 1], [2, 2], 6, X4, rand(6, 1, 3, 3), B6,
                                        ((2, 2), (2, 2))),
    "conv/valid-1x1": conv_case("valid", [0, 0, 0, 0], [1, 1], [1, 1], 1, X4, rand(4, 6, 1, 1), None, ((0, 0), (0, 0))),
    # SAME, stride 2, sizes 9 x 11, kernel 3: out 5 x 6, total pad max(0, 2*5 - 9 + 3 - 2) = 2 -> (1, 1);
    # width: 2*6 - 11 + 3 - 2 = 2 -> (1, 1). Kernel 4, stride 1: total 3, the odd pixel after (same) or before.
    "conv/same-stride2": conv_case("same", [0] * 4, [2, 2], [1, 1], 1, X4, rand(4, 6, 3, 3), None, ((1, 1), (1, 1))),
    "conv/same-even": conv_case("same", [0] * 4, [1, 1], [1, 1], 1, X4, rand(4, 6, 4, 4), None, ((1, 2), (1, 2))),
    "conv/same_lower-even": conv_case("same_lower", [0] * 4, [1, 1], [1, 1], 1, X4, rand(4, 6, 4, 4), None,
                                      ((2, 1), (2, 1))),
    "avg_pool": ({"x": X4, "kernel_sizes": np.array([3, 3], np.int32), "strides": np.array([2, 2], np.int32),
                  "pad_type": "custom", "pad": np.array([1, 1, 1, 1], np.int32), "exclude_padding_from_average": True},
                 lambda x, **_: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)),
    "avg_pool/include-padding": ({"x": X4, "kernel_sizes": np.array([3, 3], np.int32),
                                  "strides": np.array([2, 2], np.int32), "pad_type": "custom",
                                  "pad": np.array([1, 1, 1, 1], np.int32)},
                                 lambda x, **_: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=True)),
    "max_pool": ({"x": X4, "kernel_sizes": np.array([3, 3], np.int32), "strides": np.array([2, 2], np.int32),
                  "pad_type": "custom", "pad": np.array([1, 1, 1, 1], np.int32)},
                 lambda x, **_: F.max_pool2d(x, 3, 2, padding=1)),
    "max_pool/ceil": ({"x": X4, "kernel_sizes": np.array([2, 2], np.int32), "strides": np.array([2, 2], np.int32),
                       "ceil_mode": True}, lambda x, **_: F.max_pool2d(x, 2, 2, ceil_mode=True)),
    # 9 rows padded 1 + 1: a sixth window would start in the after-padding, which MIL (and torch) drop
    "max_pool/ceil-padded": ({"x": X4, "kernel_sizes": np.array([2, 2], np.int32),
                              "strides": np.array([2, 2], np.int32), "pad_type": "custom",
                              "pad": np.array([1, 1, 1, 1], np.int32), "ceil_mode": True},
                             lambda x, **_: F.max_pool2d(x, 2, 2, padding=1, ceil_mode=True)),
    "matmul": ({"x": rand(2, 3, 7, 5), "y": rand(2, 3, 7, 4), "transpose_x": True},
               lambda x, y, **_: x.transpose(-1, -2) @ y),
    "matmul/transpose_y": ({"x": rand(3, 7, 5), "y": rand(4, 5), "transpose_y": True}, lambda x, y, **_: x @ y.T),
    "matmul/1d": ({"x": rand(5), "y": rand(4, 5), "transpose_x": True, "transpose_y": True},   # no effect on 1-D x
                  lambda x, y, **_: x @ y.T),
    "upsample_bilinear": ({"x": X4, "scale_factor_height": np.float32(2), "scale_factor_width": np.float32(4),
                           "align_corners": False},
                          lambda x, **_: F.interpolate(x, scale_factor=(2, 4), mode="bilinear", align_corners=False)),
    "upsample_bilinear/align_corners": ({"x": X4, "scale_factor_height": np.float32(2),
                                         "scale_factor_width": np.float32(2), "align_corners": True},
                                        lambda x, **_: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                     align_corners=True)),
    "upsample_bilinear/fractional": ({"x": X4, "scale_factor_height": np.float32(1.5),
                                      "scale_factor_width": np.float32(1.5), "align_corners": False},
                                     lambda x, **_: F.interpolate(x, size=(13, 16), mode="bilinear",
                                                                  align_corners=False)),
    # coremltools sizes it in float32: floor(float32(0.7) * 10) = 7 (6 in float64)
    "upsample_bilinear/float32-size": ({"x": rand(1, 2, 10, 10), "scale_factor_height": np.float32(0.7),
                                        "scale_factor_width": np.float32(0.7), "align_corners": True},
                                       lambda x, **_: F.interpolate(x, size=(7, 7), mode="bilinear",
                                                                    align_corners=True)),
    "resize_bilinear": ({"x": X4, "target_size_height": np.int32(5), "target_size_width": np.int32(20),
                         "sampling_mode": "UNALIGN_CORNERS"},
                        lambda x, **_: F.interpolate(x, size=(5, 20), mode="bilinear", align_corners=False)),
    "resize_bilinear/strict": ({"x": X4, "target_size_height": np.int32(5), "target_size_width": np.int32(20),
                                "sampling_mode": "STRICT_ALIGN_CORNERS"},
                               lambda x, **_: F.interpolate(x, size=(5, 20), mode="bilinear", align_corners=True)),
    "concat": ({"values": [X4, rand(2, 2, 9, 11)], "axis": np.int32(1)}, lambda values, **_: torch.cat(values, 1)),
    "reshape": ({"x": X4, "shape": np.array([0, 3, -1, 0], np.int32)}, lambda x, **_: x.reshape(2, 3, -1, 11)),
    "reshape/rank": ({"x": X4, "shape": np.array([2, -1, 11], np.int32)}, lambda x, **_: x.reshape(2, -1, 11)),
    "transpose": ({"x": X4, "perm": np.array([0, 1, -1, -2], np.int32)}, lambda x, **_: x.transpose(-1, -2)),
    "squeeze": ({"x": rand(2, 1, 5, 1), "axes": np.array([1], np.int32)}, lambda x, **_: x.squeeze(1)),
    "expand_dims": ({"x": rand(2, 5), "axes": np.array([1, -1], np.int32)}, lambda x, **_: x[:, None, :, None]),
    "pad": ({"x": X4, "pad": np.array([0, 0, 0, 0, 1, 2, 0, 3], np.int32), "mode": "constant",
             "constant_val": np.float32(0.5)}, lambda x, **_: F.pad(x, (0, 3, 1, 2), value=0.5)),
    "pad/reflect": ({"x": X4, "pad": np.array([2, 1, 1, 2], np.int32), "mode": "reflect"},
                    lambda x, **_: F.pad(x, (1, 2, 2, 1), mode="reflect")),
    "pad/replicate": ({"x": X4, "pad": np.array([2, 1, 1, 2], np.int32), "mode": "replicate"},
                      lambda x, **_: F.pad(x, (1, 2, 2, 1), mode="replicate")),
    # the efficientvit attention's two slices: x[..., :16] and x[..., -1:]
    "slice_by_index": ({"x": X4, "begin": np.array([0, 0, 0, 0], np.int32), "end": np.array([2, 6, 9, 8], np.int32),
                        "end_mask": np.array([True, True, True, False])}, lambda x, **_: x[..., :8]),
    "slice_by_index/negative": ({"x": X4, "begin": np.array([0, 1, 0, -1], np.int32),
                                 "end": np.array([2, 6, 9, 1], np.int32), "stride": np.array([1, 2, 1, 1], np.int32),
                                 "end_mask": np.array([True, True, True, True])}, lambda x, **_: x[:, 1::2, :, -1:]),
    "slice_by_index/squeeze": ({"x": X4, "begin": np.array([0, 2, 0, 0], np.int32),
                                "end": np.array([2, 3, 9, 11], np.int32),
                                "squeeze_mask": np.array([False, True, False, False])}, lambda x, **_: x[:, 2]),
    # one entry of a shape vector, as coremltools reads it: a scalar, not (1,)
    "slice_by_index/scalar": ({"x": rand(3, 4), "begin": np.array([1, 2], np.int32), "end": np.array([2, 3], np.int32),
                               "squeeze_mask": np.array([True, True])}, lambda x, **_: x[1, 2]),
    "slice_by_index/squeeze-from-start": ({"x": rand(3, 4), "begin": np.array([2, 0], np.int32),
                                           "end": np.array([3, 4], np.int32), "begin_mask": np.array([True, False]),
                                           "squeeze_mask": np.array([True, False])}, lambda x, **_: x[0]),
    "slice_by_size/negative-begin": ({"x": rand(3, 5), "begin": np.array([0, -2], np.int32),
                                      "size": np.array([-1, 2], np.int32)}, lambda x, **_: x[:, -2:]),
    "cast": ({"x": X4 * 100, "dtype": "int32"}, lambda x, **_: x.to(torch.int32)),
    "identity": ({"x": X4}, lambda x: x),
}
SPLIT_CASES = {
    "split": ({"x": X4, "split_sizes": np.array([1, 2, 3], np.int32), "axis": np.int32(1)},
              lambda x, **_: torch.split(x, [1, 2, 3], 1)),
    "split/num_splits": ({"x": X4, "num_splits": np.int32(3), "axis": np.int32(-3)},
                         lambda x, **_: torch.chunk(x, 3, -3)),
}


def torch_reference(fn, inputs: dict):
    """fn applied to the float inputs as torch float32 tensors (other inputs passed as they are)."""
    def convert(value):
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim:
            return T(value.astype(np.float32))
        return value
    result = fn(**{k: convert(v) for k, v in inputs.items()})
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    return [r.numpy() for r in results]


def as_fp16(inputs: dict) -> dict:
    """The float tensor inputs rounded to float16 (the data tensors of an fp16 program)."""
    def convert(value):
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value.astype(np.float16) if isinstance(value, np.ndarray) and value.dtype == np.float32 else value
    return {k: convert(v) for k, v in inputs.items()}


def run_case(case_id: str, inputs: dict, dtype: str):
    op_type = case_id.split("/")[0]
    if op_type == "split":
        return run_op(op_type, inputs, dtype=dtype, outputs=3)
    out_dtype = "int32" if op_type == "cast" else dtype
    return [run_op(op_type, inputs, dtype=out_dtype)]


@pytest.mark.parametrize("case_id", [*CASES, *SPLIT_CASES])
def test_handler_matches_torch_fp32(case_id):
    inputs, fn = {**CASES, **SPLIT_CASES}[case_id]
    for got, want in zip(run_case(case_id, inputs, "fp32"), torch_reference(fn, inputs), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=case_id)


@pytest.mark.parametrize("case_id", [c for c in [*CASES, *SPLIT_CASES] if c != "cast"])
def test_handler_rounds_to_fp16(case_id):
    """fp16 program: inputs stored in fp16, computed in fp32, the output rounded once to fp16; so
    the result is torch's float32 result on the fp16 inputs, rounded, within one fp16 ulp (a
    different float32 summation order can land on the other side of a rounding boundary; near
    zero, where fp16's ulp is finer than float32 round-off of O(1) data, within 1e-6)."""
    inputs, fn = {**CASES, **SPLIT_CASES}[case_id]
    half = as_fp16(inputs)
    for got, want in zip(run_case(case_id, half, "fp16"), torch_reference(fn, half), strict=True):
        assert got.dtype == np.float16 and got.shape == want.shape
        expected = want.astype(np.float16)
        ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32) + 1e-6
        assert (np.abs(got.astype(np.float32) - expected.astype(np.float32)) <= ulp).all(), case_id
        assert np.mean(got == expected) > 0.99, case_id   # almost all exactly torch's rounded result


def test_hardswish_decomposition():
    """coremltools writes torch's hardswish as thresholded_relu(x, -3), sigmoid_hard(1/6, 0.5), mul."""
    x = rand(4, 8, 5, 5, low=-5, high=5)
    relu = run_op("thresholded_relu", {"x": x, "alpha": np.float32(-3)})
    gate = run_op("sigmoid_hard", {"x": relu, "alpha": np.float32(1 / 6), "beta": np.float32(0.5)})
    np.testing.assert_allclose(run_op("mul", {"x": relu, "y": gate}), F.hardswish(T(x)).numpy(), atol=1e-6)


DIRECT_OPS = ("ceil", "fill", "logical_and", "logical_or", "logical_xor", "logical_not")   # tested just below


def test_ops_no_coremltools_op_test_runs():
    """ceil, fill and the logical ops, which coremltools' op tests (tests/test_mil_optests.py) never
    leave in a program: ceil is folded, fill becomes a constant, logical ops have no test."""
    x = np.array([-1.5, -0.2, 0.0, 0.3, 2.0], np.float32)
    np.testing.assert_array_equal(run_op("ceil", {"x": x}), np.ceil(x))
    np.testing.assert_array_equal(run_op("fill", {"shape": np.array([2, 3], np.int32), "value": np.float32(1.5)}),
                                  np.full((2, 3), 1.5))
    p, q = np.array([True, True, False, False]), np.array([True, False, True, False])
    for op, expected in {"logical_and": p & q, "logical_or": p | q, "logical_xor": p ^ q}.items():
        np.testing.assert_array_equal(run_op(op, {"x": p, "y": q}, dtype="bool"), expected, err_msg=op)
    np.testing.assert_array_equal(run_op("logical_not", {"x": p}, dtype="bool"), ~p)


def test_cast_rounds_and_truncates():
    x = np.array([1.0001, -2.7, 65504.0, 3.14159], np.float32)
    np.testing.assert_array_equal(run_op("cast", {"x": x, "dtype": "fp16"}, dtype="fp16"), x.astype(np.float16))
    np.testing.assert_array_equal(run_op("cast", {"x": x, "dtype": "int32"}, dtype="int32"), [1, -2, 65504, 3])


def test_spatial_pads_follow_tf_same():
    assert spatial_pads("same", [], [8], [3], [2], [1]) == [(0, 1)]        # total 1: the odd pixel after
    assert spatial_pads("same_lower", [], [8], [3], [2], [1]) == [(1, 0)]  # ... or before
    assert spatial_pads("same", [], [7], [3], [2], [1]) == [(1, 1)]
    assert spatial_pads("same", [], [7], [3], [1], [2]) == [(2, 2)]        # dilation 2: effective kernel 5
    assert spatial_pads("custom", [1, 2, 3, 4], [7, 7], [3, 3], [1, 1], [1, 1]) == [(1, 2), (3, 4)]
    with pytest.raises(UnsupportedOpError, match="pad_type 'wrap'.*valid, custom, same, same_lower"):
        spatial_pads("wrap", [], [7], [3], [1], [1])


@pytest.mark.parametrize("mode, n_out, expected", [
    # the grids from coremltools' resize_bilinear documentation, input size 2
    ("UNALIGN_CORNERS", 5, [0, 0.1, 0.5, 0.9, 1]), ("STRICT_ALIGN_CORNERS", 5, [0, 0.25, 0.5, 0.75, 1]),
    ("DEFAULT", 5, [0, 0.4, 0.8, 1, 1]), ("OFFSET_CORNERS", 5, [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("UNALIGN_CORNERS", 6, [0, 0, 1 / 3, 2 / 3, 1, 1]), ("DEFAULT", 6, [0, 1 / 3, 2 / 3, 1, 1, 1]),
    ("OFFSET_CORNERS", 6, [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12]),
])
def test_source_coords_match_coremltools_grids(mode, n_out, expected):
    np.testing.assert_allclose(source_coords(2, n_out, mode), expected, atol=1e-12)


def pack_lsb_first(values: np.ndarray, nbits: int) -> np.ndarray:
    """The test's own packer: bit b of value i goes to stream bit k = i * nbits + b, which is bit
    k % 8 of byte k // 8."""
    packed = np.zeros((values.size * nbits + 7) // 8, np.uint8)
    for i, value in enumerate(values.tolist()):
        for b in range(nbits):
            if (value >> b) & 1:
                k = i * nbits + b
                packed[k // 8] |= 1 << (k % 8)
    return packed


def unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """The test's own unpacking, by stream bit position (no np.unpackbits)."""
    k = np.arange(count)[:, None] * nbits + np.arange(nbits)[None, :]
    bits = (packed[k // 8].astype(np.int64) >> (k % 8)) & 1
    return (bits << np.arange(nbits)).sum(1)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_constexpr_lut_to_dense(nbits):
    indices = RNG.integers(0, 2 ** nbits, 5 * 7)
    lut = rand(2 ** nbits).astype(np.float16)
    packed = pack_lsb_first(indices, nbits)
    dense = run_op("constexpr_lut_to_dense", {"lut": lut, "indices": packed, "shape": np.array([5, 7], np.uint32)},
                   dtype="fp16")
    np.testing.assert_array_equal(dense, lut[indices].reshape(5, 7))
    np.testing.assert_array_equal(unpack_lsb_first(packed, nbits, indices.size), indices)
    assert mil.unpack_bits(np.array([0b11100100, 0b00000011], np.uint8), 2, 5).tolist() == [0, 1, 2, 3, 3]


def test_quantize_of_an_fp16_tensor_rounds_its_quotient_in_fp16_as_mil_does():
    """coremltools divides in the input's dtype: x / scale = 95.49 is 95.5 in fp16, which rounds half
    to even to 96; the quotient kept in float32 rounded to 95, an int8 step off on 1.5% of w8a8's values."""
    x, scale = np.array([35.33, 8.695, -31.28, 1.0], np.float16), np.float16(0.37)
    assert float(np.float32(x[0]) / np.float32(scale)) < 95.5 and x[0] / scale == np.float16(95.5)
    q = run_op("quantize", {"input": x, "scale": scale, "zero_point": np.int8(0), "output_dtype": "int8"}, dtype="int8")
    np.testing.assert_array_equal(q, np.rint((x / scale).astype(np.float32)).astype(np.int8))
    assert q.tolist()[:3] == [96, 24, -84]


def test_constexpr_affine_dequantize_and_cast():
    q = RNG.integers(-128, 128, (4, 3, 2, 2)).astype(np.int8)
    scale, zero = rand(4, low=0.01, high=0.1).astype(np.float16), np.array([0, 1, -2, 3], np.int8)
    dense = run_op("constexpr_affine_dequantize", {"quantized_data": q, "zero_point": zero, "scale": scale,
                                                   "axis": np.int32(0)}, dtype="fp16")
    expected = (T(q).float() - T(zero).float().view(4, 1, 1, 1)) * T(scale).float().view(4, 1, 1, 1)
    np.testing.assert_array_equal(dense, expected.numpy().astype(np.float16))
    scalar = run_op("constexpr_affine_dequantize", {"quantized_data": q.astype(np.uint8), "zero_point": np.uint8(128),
                                                    "scale": np.float32(0.5), "axis": np.int32(1)})
    np.testing.assert_array_equal(scalar, (q.astype(np.uint8).astype(np.float32) - 128) * 0.5)
    np.testing.assert_array_equal(run_op("constexpr_cast", {"source_val": scale, "output_dtype": "fp32"}),
                                  scale.astype(np.float32))
    np.testing.assert_array_equal(run_op("const", {"val": scale}, dtype="fp16"), scale)


def test_unknown_op_type_is_named():
    with pytest.raises(UnsupportedOpError, match="no handler for MIL op type 'lstm'; supported: .*conv"):
        run_op("lstm", {"x": X4})


def test_a_handlers_error_or_refusal_names_the_op():
    with pytest.raises(HandlerError, match=r"^conv op 'run_op:conv' failed in the reference executor \(RuntimeError"):
        run_op("conv", {"x": X4, "weight": rand(4, 5, 3, 3)})   # 6 input channels, the weight takes 5
    # Core ML pads reflect by at most D - 1 per side (11 columns: 10); numpy would reflect on and hide the bad program
    with pytest.raises(UnsupportedOpError, match=r"^pad op 'run_op:pad': pad reflect by \[11, 0\] .* at most D - 1"):
        run_op("pad", {"x": X4, "pad": np.array([11, 0], np.int32), "mode": "reflect"})
    assert run_op("pad", {"x": X4, "pad": np.array([10, 0], np.int32), "mode": "reflect"}).shape == (2, 6, 9, 21)
    assert run_op("pad", {"x": X4, "pad": np.array([11, 0], np.int32), "mode": "replicate"}).shape == (2, 6, 9, 22)


def test_l2_pool_sums_whole_windows_in_ceil_mode():
    x = rand(1, 1, 5, 5)
    got = run_op("l2_pool", {"x": x, "kernel_sizes": np.array([2, 2], np.int32),
                             "strides": np.array([2, 2], np.int32), "ceil_mode": True})
    want = np.array([[np.sqrt((x[0, 0, r:r + 2, c:c + 2] ** 2).sum()) for c in (0, 2, 4)] for r in (0, 2, 4)])
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)   # the last row and column: one pixel deep


def test_a_ceil_mode_window_wholly_past_the_input_is_refused_by_name():
    """kernel 1, stride 3 over 5 pixels, no padding: MIL keeps a third window that starts at 6, past the
    end, whose value Core ML leaves unspecified; the executor gave 2 windows and a bare shape error."""
    with pytest.raises(UnsupportedOpError, match=r"ceil_mode with a last window past the input's end \(length 5, "
                                                 r"kernel 1, stride 3, no padding\).*use ceil_mode=False"):
        run_op("max_pool", {"x": rand(1, 1, 5, 5), "kernel_sizes": np.array([1, 1], np.int32),
                            "strides": np.array([3, 3], np.int32), "pad_type": "valid", "ceil_mode": True})


def test_resize_over_the_last_axis_leaves_the_others_alone():
    x = rand(2, 3, 4, 5)
    got = run_op("resize", {"x": x, "shape": np.array([8], np.int32), "resized_dims": np.uint32(1),
                            "sampling_mode": "OFFSET_CORNERS"})
    delta = (5 - 1) / 8                                    # OFFSET_CORNERS' spacing, its first sample at delta / 2
    grid = 0.5 * delta + np.arange(8) * delta
    want = np.apply_along_axis(lambda row: np.interp(grid, np.arange(5), row), -1, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_package_of_any_specification_has_a_macos_requirement():
    from edge.coreml import REQUIRED_MACOS
    assert REQUIRED_MACOS[6] == ("iOS15", (12,))   # an iOS15 ML program predicts on macOS 12


# ----------------------------------------------------------------------------- real packages

def test_every_op_of_both_students_has_a_handler(students):
    for name, found in students.items():
        for precision, path in found["packages"].items():
            program = MILProgram(path)
            assert set(program.ops_used) <= set(HANDLERS), (name, precision)
            assert program.precision == ("fp32" if precision == "fp32" else "fp16")
            constexpr = {t for t in program.ops_used if t.startswith("constexpr_")}
            assert constexpr == {"w8": {"constexpr_affine_dequantize"}, "palette4": {"constexpr_lut_to_dense"},
                                 "palette6": {"constexpr_lut_to_dense"}}.get(precision, set())
            depth, seg = found["outputs"][precision]
            assert depth.shape == (2, 1, 64, 96) and seg.shape == (2, 13, 64, 96)
            assert np.isfinite(depth).all() and np.isfinite(seg).all() and (depth > 0).all()
    ops = {name: set(MILProgram(f["packages"]["fp32"]).ops_used) for name, f in students.items()}
    mobilenet = {"conv", "upsample_bilinear", "sigmoid_hard", "thresholded_relu", "reduce_mean"}
    assert mobilenet <= ops["mobilenetv3_small_050"]
    assert {"matmul", "split", "pad", "slice_by_index", "real_div", "concat"} <= ops["efficientvit_b0"]


def test_fp32_package_matches_torch(students):
    for name, found in students.items():
        report = compare(*found["outputs"]["fp32"], found["depth"], found["seg"])
        assert report["depth_rel_max"] <= 1e-5, (name, report)
        assert report["seg_max_abs"] <= 1e-5 * np.abs(found["seg"]).max(), (name, report)
        assert report["seg_agreement"] >= 0.999, (name, report)


def test_fp16_package_matches_torch_within_fp16_bound(students):
    for name, found in students.items():
        report = compare(*found["outputs"]["fp16"], found["depth"], found["seg"])
        assert report["depth_rel_max"] <= 40 * U and report["depth_rel_median"] <= 4 * U, (name, report)
        assert report["seg_max_abs"] <= 40 * U * np.abs(found["seg"]).max(), (name, report)
        assert report["seg_agreement"] >= 0.99, (name, report)
        assert report["depth_rel_median"] > 1e-5   # really computed in fp16, not in fp32


def load_pymil(ct, path: Path):
    """coremltools' own reader of a saved program (its native blob reader, its op definitions)."""
    from coremltools.converters.mil.frontend.milproto.load import load
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return load(spec, spec.specificationVersion, model.weights_dir).functions["main"]


def test_compressed_weights_decode_like_coremltools(students):
    """Every constexpr output equals coremltools' decoding (materialized_val_inference over its own
    blob reader); LUT indices also equal the test's own unpacking, and the decoded weights are the
    fp16 weights moved to the nearest entry of coremltools' k-means palette, scaled to keep the
    tensor's norm (as targets/coreml.py scales the palettes) / within half an int8 step."""
    with tensorflow_blocked():
        import coremltools as ct
        from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight
    found = students["mobilenetv3_small_050"]
    fp16 = MILProgram(found["packages"]["fp16"])
    for precision in ("w8", "palette4", "palette6"):
        program, checked = MILProgram(found["packages"][precision]), 0
        for op in load_pymil(ct, found["packages"][precision]).operations:
            if not op.op_type.startswith("constexpr_"):
                continue
            dense = program.constant(op.outputs[0].name)
            np.testing.assert_array_equal(dense, op.materialized_val_inference())
            original = fp16.constant(op.outputs[0].name.rsplit("_", 1)[0]).astype(np.float32)  # .._to_fp16
            if precision == "w8":
                shape = [1] * dense.ndim
                shape[int(op.axis.val)] = -1
                scale = op.scale.val.astype(np.float32).reshape(shape)
                step = 0.5 * scale * 1.01 + 1e-3 * np.abs(original)   # half an int8 step, fp16 rounding
                assert (np.abs(dense.astype(np.float32) - original) <= step).all()
            else:
                lut, nbits = op.lut.val, int(op.lut.val.size).bit_length() - 1
                indices = unpack_lsb_first(op.indices.val, nbits, dense.size)
                np.testing.assert_array_equal(dense.reshape(-1), lut[indices])
                # coremltools' own k-means palette (the same clusters), scaled by the one factor that
                # keeps the tensor's norm (targets/coreml.py, `norm_kept_palette`); k-means assigns
                # each weight the nearest entry
                kmeans_lut, kmeans_indices = _get_kmeans_lookup_table_and_weight(nbits, original.astype(np.float16))
                kmeans_lut = kmeans_lut.reshape(-1).astype(np.float16).astype(np.float64)
                np.testing.assert_array_equal(np.asarray(kmeans_indices).reshape(-1), indices)
                scale = np.linalg.norm(original.astype(np.float64)) / np.linalg.norm(kmeans_lut[indices])
                np.testing.assert_allclose(lut.astype(np.float64), kmeans_lut * scale, rtol=2e-3, atol=1e-7)
                nearest = np.abs(original.reshape(-1, 1) - kmeans_lut[None]).argmin(1)
                assert np.mean(nearest == indices) > 0.99
            checked += 1
        assert checked == program.ops_used[f"constexpr_{'affine_dequantize' if precision == 'w8' else 'lut_to_dense'}"]


def test_compressed_packages_stay_near_fp16(students):
    for name, found in students.items():
        medians = {"fp16": compare(*found["outputs"]["fp16"], found["depth"], found["seg"])["depth_rel_median"]}
        for precision, (median, p99, agreement) in COMPRESSED_BOUNDS.items():
            report = compare(*found["outputs"][precision], *found["outputs"]["fp16"])
            assert report["finite"], (name, precision)
            assert report["depth_rel_median"] <= median and report["depth_rel_p99"] <= p99, (name, precision, report)
            assert report["seg_agreement"] >= agreement, (name, precision, report)
            medians[precision] = compare(*found["outputs"][precision], found["depth"], found["seg"])["depth_rel_median"]
        assert medians["fp16"] < medians["w8"] < medians["palette6"] < medians["palette4"], (name, medians)


def first_conv_weight_blob(ct, package: Path) -> int:
    """Byte offset in weight.bin of the record of the first conv's weight."""
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    first = next(op for op in block.operations if op.type == "conv")
    return consts[first.inputs["weight"].arguments[0].name].attributes["val"].blobFileValue.offset


def weight_file(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def test_corrupted_weights_change_outputs(students, tmp_path):
    """The fp16 package with the stem convolution's weights negated in weight.bin (sign bits
    flipped, so every value stays finite) runs, and its outputs move far outside the fp16 bound."""
    with tensorflow_blocked():
        import coremltools as ct
    found = students["mobilenetv3_small_050"]
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(found["packages"]["fp16"], broken)
    data = bytearray(weight_file(broken).read_bytes())
    _, _, size, start = struct.unpack_from("<IIQQ", data, first_conv_weight_blob(ct, broken))
    for i in range(start + 1, start + size, 2):   # little-endian fp16: the sign is bit 7 of the second byte
        data[i] ^= 0x80
    weight_file(broken).write_bytes(bytes(data))
    report = compare(*run_package(MILProgram(broken), found["inputs"]), *found["outputs"]["fp16"])
    assert report["finite"]
    assert report["depth_rel_median"] > 10 * 4 * U and report["depth_rel_max"] > 10 * 40 * U, report


def test_corrupted_blob_record_is_refused(students, tmp_path):
    with tensorflow_blocked():
        import coremltools as ct
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(students["mobilenetv3_small_050"]["packages"]["fp16"], broken)
    data = bytearray(weight_file(broken).read_bytes())
    offset = first_conv_weight_blob(ct, broken)
    data[offset:offset + 4] = b"\0\0\0\0"
    weight_file(broken).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^const op \(output '[^']+'\): .*weight.bin at offset {offset}: blob "
                                         r"sentinel is 0x0, expected 0xdeadbeef"):   # the op whose weights broke
        MILProgram(broken)


def test_a_package_without_main_is_the_executors_gap_not_a_damaged_file(students, tmp_path):
    """A multifunction package (ct.utils.save_multifunction) is valid; it was reported as damaged or
    truncated, with the advice to export it again."""
    with tensorflow_blocked():
        import coremltools as ct
    renamed = tmp_path / "multi.mlpackage"
    shutil.copytree(students["mobilenetv3_small_050"]["packages"]["fp16"], renamed)
    spec = ct.models.MLModel(str(renamed), skip_model_load=True).get_spec()
    spec.mlProgram.functions["fast"].CopyFrom(spec.mlProgram.functions["main"])
    del spec.mlProgram.functions["main"]
    spec.description.defaultFunctionName = "fast"
    described = spec.description.functions.add(name="fast")   # what save_multifunction writes
    described.input.extend(spec.description.input)
    described.output.extend(spec.description.output)
    (renamed / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    with pytest.raises(UnsupportedOpError, match=r"has functions \['fast'\] and no 'main': the reference executor"):
        MILProgram(renamed)


def test_missing_handler_names_op_and_package(students, monkeypatch):
    path = students["efficientvit_b0"]["packages"]["fp16"]
    monkeypatch.delitem(HANDLERS, "matmul")
    message = rf"{path.name}: MIL op type\(s\) matmul have no handler.*supported: .*conv"
    with pytest.raises(UnsupportedOpError, match=message):
        MILProgram(path)


def test_not_a_package_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an .mlpackage"):
        MILProgram(tmp_path)


# ----------------------------------------------------------------------------- the runner

@pytest.mark.skipif(ON_MAC, reason="off macOS only")
def test_runner_uses_the_reference_off_macos(students):
    found = students["efficientvit_b0"]
    runner = open_runner(found["packages"]["fp16"], threads=1)
    assert isinstance(runner, CoreMLRunner) and runner.format == "coreml" and runner.input_shape == tuple(SHAPE)
    assert runner.executor == "coreml-reference (numpy/torch, fp16 per op, 1 thread)"
    # one thread here, torch's default in the fixture: another float32 summation order inside the
    # convolutions, so other fp16 roundings downstream, within the fp16 bound (not bit-identical)
    report = compare(*runner(found["inputs"]), *found["outputs"]["fp16"])
    assert report["depth_rel_max"] <= 40 * U and report["seg_agreement"] >= 0.99, report
    assert runner.invoke_fn(found["inputs"][:1])() is None
    with pytest.raises(ValueError, match=r"images have shape \(2, 3, 32, 32\)"):
        runner(np.zeros((2, 3, 32, 32), np.float32))
    for call in (lambda: CoreMLRunner(found["packages"]["fp16"], executor="predict"),
                 lambda: open_runner(found["packages"]["fp16"], executor="predict")):
        with pytest.raises(RuntimeError, match="MLModel.predict needs macOS; .*use executor='reference'"):
            call()
    with pytest.raises(RuntimeError, match="compare_executors runs MLModel.predict, which needs macOS"):
        runner.compare_executors(found["inputs"])
    with pytest.raises(ValueError, match="unknown Core ML executor 'fast'"):
        CoreMLRunner(found["packages"]["fp16"], executor="fast")


@pytest.mark.skipif(not ON_MAC, reason="MLModel.predict runs only on macOS")
def test_compare_executors_on_macos(students):
    """Core ML's own arithmetic (compute units ALL) against the reference: within the fp16 bound."""
    found = students["efficientvit_b0"]
    runner = CoreMLRunner(found["packages"]["fp16"])
    assert runner.executor.startswith("MLModel.predict")
    report = runner.compare_executors(found["inputs"])
    assert report["images"] == 2 and report["finite"] and report["reference"] == "coreml-reference"
    assert report["depth_rel_max"] <= 40 * U and report["seg_agreement"] >= 0.99, report


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "uint8", "int8", "int16", "uint16", "int32", "uint32"])
def test_blob_reader_reads_what_coremltools_blob_writer_writes(dtype, tmp_path):
    """iOS18 programs store int32 (and 16-bit) weights; the reader knew only four dtype codes."""
    import_coremltools()
    from coremltools.libmilstoragepython import _BlobStorageWriter

    from edge.mil import BlobFile
    from edge.mil_ops import DTYPES

    values = np.arange(-3, 4).astype(DTYPES[dtype]) if dtype[0] != "u" else np.arange(7).astype(DTYPES[dtype])
    method = {"fp16": "write_fp16_data", "fp32": "write_float_data"}.get(dtype, f"write_{dtype}_data")
    writer = _BlobStorageWriter(str(tmp_path / "weight.bin"))
    offset = getattr(writer, method)(values.view(np.uint16) if dtype == "fp16" else values)
    del writer   # flushes the file
    np.testing.assert_array_equal(BlobFile(tmp_path / "weight.bin").read(offset, dtype, len(values)), values)


# ----------------------------------------------------------------------------- flexible input shapes

def _flexible_package(tmp_path: Path, shape) -> Path:
    """A one-conv ML program (iOS16) whose input "x" takes `shape` (a ct.EnumeratedShapes or a
    shape with ct.RangeDim dims), saved as an .mlpackage."""
    ct = mil.import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, get_new_symbol(), get_new_symbol()))],
                opset_version=ct.target.iOS16)
    def program(x):
        return mb.relu(x=mb.conv(x=x, weight=weight, pad_type="same"), name="y")

    model = ct.convert(program, inputs=[ct.TensorType(name="x", shape=shape)], convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    path = tmp_path / "flexible.mlpackage"
    model.save(str(path))
    return path


def _conv_relu(x: np.ndarray) -> np.ndarray:
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return F.relu(F.conv2d(T(x), T(weight), padding=1)).numpy()


def test_enumerated_input_shapes(tmp_path):
    ct = mil.import_coremltools()
    program = MILProgram(_flexible_package(tmp_path, ct.EnumeratedShapes(shapes=[(1, 3, 8, 8), (1, 3, 16, 12)])))
    for shape in [(1, 3, 8, 8), (1, 3, 16, 12)]:
        x = rand(*shape)
        np.testing.assert_allclose(program({"x": x})["y"], _conv_relu(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"input 'x' has shape \(1, 3, 10, 10\).*\(1, 3, 16, 12\)"):
        program({"x": rand(1, 3, 10, 10)})


def test_range_input_shapes(tmp_path):
    ct = mil.import_coremltools()
    shape = (1, 3, ct.RangeDim(4, 32, default=8), ct.RangeDim(4, 32, default=8))
    program = MILProgram(_flexible_package(tmp_path, shape))
    assert program.input_shapes["x"] == ((1, 1), (3, 3), (4, 32), (4, 32))
    x = rand(1, 3, 20, 6)
    np.testing.assert_allclose(program({"x": x})["y"], _conv_relu(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input 'x' has shape"):
        program({"x": rand(1, 3, 40, 8)})
