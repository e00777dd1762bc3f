"""python -m quant.export end to end on a tiny trained run: every artefact is produced by its real
converter, executed by its real runtime and compared with the PyTorch model.

Bounds (relative depth difference |d - d_torch| / d_torch, logits absolute):
- fp32: 1e-4 (float reassociation only; measured ~2e-7).
- fp16 weights: 2e-3 (fp16 has 11 significant bits, 4.9e-4 relative rounding per weight; the
  errors of ~20 layers partly cancel; measured ~2.5e-4).
- int8: median 2% and segmentation agreement >= 90% against the model the int8 file was made
  from (QAT's or the float one). One int8 step of an activation is 1/255 of its range, and the
  depth output's range spans ~0.5-10 m: a step is 4% of 1 m at worst, ~1% typically
  (measured: median 0.1-0.2%, agreement 97-98% on this barely trained model).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.manifest import verify_export
from distill.run import main as train_main
from edge.host import describe_cpu
from quant.compression import main as compression_main
from quant.export import main as export_main

TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
        "data.num_train=48", "data.num_val=8", "train.batch_size=8", "eval.preview_images=1", "train.epochs=1"]
# The tiny run is barely trained (one epoch on 48 images), so int8 activations (int8, Core ML w8a8)
# move its abs_rel by more than a trained model's gates (2 %, 4 %): the tests widen those gates,
# and test that a gate fails. (Its w8a8 file drifted -4.58% once v3 trained with deep supervision.)
FAST = ["--calib", "8", "--check", "4", "--batch-size", "4", "--quiet", "--bench-runs", "0",
        "--tolerance", "int8.abs_rel_change=0.5", "--tolerance", "int8.miou_drop_pt=50",
        "--tolerance", "w8a8.abs_rel_change=0.5", "--tolerance", "w8a8.miou_drop_pt=50"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSEKIT_CACHE", str(root / "cache"))
        assert train_main(["v3", *TINY, f"out_dir={root / 'runs'}", "--quiet"]) == 0
        yield next((root / "runs").glob("v3-*"))


@pytest.fixture(autouse=True)
def cache(run_dir, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(run_dir.parent.parent / "cache"))


def export(run_dir, out, *args) -> int:
    return export_main(["--run", str(run_dir), "--out", str(out), *FAST, *args])


def manifest_of(out: Path, run_dir: Path, target: str) -> dict:
    return json.loads((out / run_dir.name / target / "manifest.json").read_text())


def by_precision(manifest: dict) -> dict:
    return {a["precision"]: a for a in manifest["artefacts"]}


@pytest.fixture(scope="module")
def tflite_export(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSEKIT_CACHE", str(run_dir.parent.parent / "cache"))
        mp.chdir(root)  # the default, relative --out (the converters change their working directory)
        assert export(run_dir, "exports", "--target", "tflite", "--qat-steps", "6", "--bench-runs", "2") == 0
    return root / "exports"


def test_tflite_artefacts_run_and_match_torch(tflite_export, run_dir):
    manifest = manifest_of(tflite_export, run_dir, "tflite")
    arts = by_precision(manifest)
    assert set(arts) == {"fp32", "fp16", "int8"}
    assert arts["fp32"]["check"]["depth_rel_max"] < 1e-4
    assert arts["fp32"]["check"]["seg_max_abs"] < 1e-4
    assert arts["fp16"]["check"]["depth_rel_max"] < 2e-3
    assert arts["int8"]["check"]["depth_rel_median"] < 0.02
    assert arts["int8"]["check"]["seg_agreement"] > 0.9
    assert arts["int8"]["check"]["reference"] == "int8" and arts["int8"]["source"] == "int8"  # the QAT model
    # int8 kernels throughout but the input stem and the heads' final upsampling and EXP
    # (targets/tflite_file.py), in ops XNNPACK takes: no RELU_0_TO_1 (hardsigmoid) or int8
    # HARD_SWISH (targets/litert_graph.py)
    ops = arts["int8"]["ops_by_dtype"]
    assert set(ops["float_ops"]) == {*STEM_FLOAT_OPS, "EXP", "RESIZE_BILINEAR"} and ops["int8"] > 50
    assert not {"HARD_SWISH", "RELU_0_TO_1"} & set(ops["op_types"]) and ops["op_types"]["DEQUANTIZE"] == 2
    assert "RELU_0_TO_1" not in arts["fp32"]["ops_by_dtype"]["op_types"]
    assert arts["int8"]["graph_rewrites"]["sixth_deferred"] > 10
    assert arts["int8"]["bytes"] < 0.5 * arts["fp32"]["bytes"]
    assert biases_off_their_input_scale(tflite_export / run_dir.name / "tflite" / arts["int8"]["path"]) == []
    for a in arts.values():  # executed, scored against ground truth next to the float model, gated, timed
        v = a["validation"]
        assert {"abs_rel", "rmse", "d1", "miou"} <= set(v["float"]) and v["pass"] and v["images"] == 4
        assert "ai-edge-litert" in v["executor"] and v["gates"]["abs_rel_change"]["pass"]
        assert a["bench"]["latency_ms"]["p50"] > 0 and a["bench"]["runs"] == 2
        assert a["bench"]["efficiency"]["peak"] == ("int8" if a["precision"] == "int8" else "fp32")
    assert arts["fp16"]["validation"]["gates"]["abs_rel_change"]["tolerance"] == 0.002   # the default fp16 gate
    assert manifest["config"]["int8"]["method"] == "qat"
    assert any(chain["depthwise"] for chain in manifest["config"]["int8"]["equalized"])   # quant/equalize.py
    assert manifest["config"]["source_checkpoint"]["sha256"]
    exporters = manifest["config"]["source_exporter"]      # torch's maintained ONNX exporter made both graphs
    assert set(exporters) == {"float", "int8"} and all(e.startswith("torch.export") for e in exporters.values())
    assert {"onnx2tf", "tensorflow", "torch"} <= set(manifest["tools"])


# v3's input stem in float: normalisation, the stem convolution, hardswish (ADD, MUL), and the layer
# that reads it: the first depthwise convolution (a stride-2 decoder's lateral too: tests/test_qat.py)
STEM_FLOAT_OPS = {"ADD", "MUL", "PAD", "CONV_2D", "DEPTHWISE_CONV_2D"}
STEM_CONVS = ["CONV_2D", "DEPTHWISE_CONV_2D"]


def float_convs(path: Path) -> list[str]:
    """The weighted ops of a .tflite file that compute in float, in execution order."""
    from ai_edge_litert.interpreter import Interpreter

    from targets.tflite_file import WEIGHTED_OPS
    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    return [op["op_name"] for op in interpreter._get_ops_details()
            if op["op_name"] in WEIGHTED_OPS and dtypes[int(op["outputs"][0])] == np.float32]


def test_int8_file_keeps_the_input_stem_in_float(tflite_export, run_dir, tmp_path):
    """The ops within two weighted layers of the input (v3: the stem convolution, its hardswish and
    the convolution that reads it) run in float; every later convolution is int8 (`--float-stem`)."""
    from targets.tflite_file import TFLiteGraph, input_stem
    export_dir = tflite_export / run_dir.name / "tflite"
    arts = by_precision(manifest_of(tflite_export, run_dir, "tflite"))
    graph = TFLiteGraph((export_dir / arts["fp32"]["path"]).read_bytes())
    kinds = {graph.name(op): op["op_name"] for op in graph.ops}
    stem = input_stem(graph, 2)
    assert [kinds[n] for n in stem if kinds[n] in ("CONV_2D", "DEPTHWISE_CONV_2D")] == STEM_CONVS
    assert {kinds[n] for n in stem} <= STEM_FLOAT_OPS | {"HARD_SWISH"} and input_stem(graph, 0) == []
    assert float_convs(export_dir / arts["int8"]["path"]) == STEM_CONVS
    assert manifest_of(tflite_export, run_dir, "tflite")["config"]["int8"]["float_stem"] == 2
    # --float-stem 0: the whole graph int8 from the image on, as before the option existed
    assert export(run_dir, tmp_path, "--target", "tflite", "--precision", "int8", "--qat-steps", "0",
                  "--float-stem", "0", "--bench-runs", "0") == 0
    manifest = manifest_of(tmp_path, run_dir, "tflite")
    art = by_precision(manifest)["int8"]
    assert float_convs(tmp_path / run_dir.name / "tflite" / art["path"]) == []
    assert list(manifest["config"]["source_exporter"]) == ["int8"]   # an int8-only export makes no float graph
    assert art["ops_by_dtype"]["float_ops"] == ["EXP", "RESIZE_BILINEAR"]


def test_an_island_is_what_connects_to_its_seed_short_of_the_weighted_ops():
    """targets/stem.py, `island_ops`: qkv conv -> relu -> (sum, div) -> proj conv -> residual add."""
    from targets.stem import island_ops
    ops = [("qkv", "CONV", ["x"], ["a"]), ("relu", "RELU", ["a"], ["r"]), ("sum", "SUM", ["r"], ["s"]),
           ("div", "DIV", ["r", "s"], ["d"]), ("proj", "CONV", ["d"], ["p"]), ("add", "ADD", ["p", "x"], ["y"])]
    assert sorted(island_ops(ops, {"div"}, {"qkv", "proj"})) == ["div", "relu", "sum"]
    assert island_ops(ops, set(), {"qkv", "proj"}) == []
    assert sorted(island_ops(ops, {"div"}, {"qkv"})) == ["add", "div", "proj", "relu", "sum"]   # up to the graph's end


def test_int8_tensors_under_a_fused_relu6_keep_its_range(tflite_export, run_dir):
    """The hardswish gates, relu6(x + 3) as an ADD with a fused RELU6, are int8 over at most [0, 6]:
    TensorFlow's quantiser gave them the scale of the MUL reading them, 14-19 levels for the gate
    (targets/tflite_file.py, `tighten_activation_ranges`)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    arts = by_precision(manifest_of(tflite_export, run_dir, "tflite"))
    graph = flatbuffer_utils.read_model(str(tflite_export / run_dir.name / "tflite" / arts["int8"]["path"])).subgraphs[0]
    ranges = []
    for op in graph.operators:
        tensor = graph.tensors[op.outputs[0]]
        if (getattr(op.builtinOptions, "fusedActivationFunction", None) == schema.ActivationFunctionType.RELU6
                and tensor.type == schema.TensorType.INT8):
            scale, zero = float(tensor.quantization.scale[0]), int(tensor.quantization.zeroPoint[0])
            ranges.append(((-128 - zero) * scale, (127 - zero) * scale))
    assert len(ranges) > 10 and all(low > -1e-6 and high < 6 + 1e-4 for low, high in ranges), ranges
    assert arts["int8"]["activation_ranges_tightened"] > 10 and arts["fp32"]["activation_ranges_tightened"] == 0

    from targets.tflite_file import rescalable_int8_outputs, tighten_activation_ranges
    model = flatbuffer_utils.read_model(str(tflite_export / run_dir.name / "tflite" / arts["int8"]["path"]))
    assert tighten_activation_ranges(model) == 0   # the exported file has none left
    gate = next(model.subgraphs[0].tensors[index].quantization for op, _, index in rescalable_int8_outputs(model)
                if getattr(op.builtinOptions, "fusedActivationFunction", None) == schema.ActivationFunctionType.RELU6)
    gate.zeroPoint = np.array([127], np.int64)   # [-255 s, 0]: nothing of [0, 6] in it (a zero-width range crashed)
    assert tighten_activation_ranges(model) == 0 and int(gate.zeroPoint[0]) == 127


def test_op_profile_times_an_fp16_file_op_for_op_like_its_fp32_twin(tflite_export, run_dir):
    """An fp16 file dequantizes its float16 weights with DEQUANTIZE ops of constants: cut out alone,
    the first one had no input and XNNPACK refused it (the whole profile exited 1); its readers'
    weights became random inputs. Each is now cut out with its reader and listed with none."""
    from edge.op_profile import profile

    files = {a["precision"]: tflite_export / run_dir.name / "tflite" / a["path"]
             for a in manifest_of(tflite_export, run_dir, "tflite")["artefacts"]}
    fp16, fp32 = (profile(files[p], threads=1, runs=2) for p in ("fp16", "fp32"))
    assert fp16["weight_dequantizes"] > 50 and fp32["weight_dequantizes"] == 0
    assert [op["op"] for op in fp16["ops"]] == [op["op"] for op in fp32["ops"]]
    conv16, conv32 = ([op for op in result["ops"] if op["op"] == "CONV_2D"] for result in (fp16, fp32))
    assert [op["inputs"] for op in conv16] == [op["inputs"] for op in conv32]   # the weights stay constant


RUN_UNDER_XNNPACK = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()   # applies the XNNPACK delegate
interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                       np.zeros(interpreter.get_input_details()[0]["shape"], np.float32))
interpreter.invoke()
print(sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details()))
"""


def test_an_int8_output_too_fine_for_xnnpack_gets_the_finest_scale_it_takes(tflite_export, run_dir, tmp_path):
    """A convolution whose output never left a tiny range (a squeeze-excite ReLU dead on every
    calibration image: scale 3.9e-9, accumulator step / output step 12,800 on a v3 run) made an int8
    file XNNPACK refuses; LiteRT 2.3 then aborted with a double free. `finish` widens such a scale
    to a 255th of the accumulator step (targets/tflite_file.py, `widen_too_fine_output_scales`)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from targets.tflite_file import (refuse_too_fine_output_scales, rescalable_int8_outputs, serialize_sharing_zero_points,
                                     widen_too_fine_output_scales)
    arts = by_precision(manifest_of(tflite_export, run_dir, "tflite"))
    model = flatbuffer_utils.read_model(str(tflite_export / run_dir.name / "tflite" / arts["int8"]["path"]))
    assert widen_too_fine_output_scales(model) == 0   # the exported file has none left
    graph = model.subgraphs[0]
    conv, output = next((op, graph.tensors[index].quantization) for op, kind, index in rescalable_int8_outputs(model)
                        if kind == "CONV_2D")
    step = float(graph.tensors[conv.inputs[0]].quantization.scale[0] * graph.tensors[conv.inputs[1]].quantization.scale.max())
    output.scale, output.zeroPoint = np.array([step / 12800], np.float32), np.array([-128], np.int64)   # range [0, 0.02 steps]
    assert widen_too_fine_output_scales(model) == 1
    assert output.scale[0] == pytest.approx(step / 255, rel=1e-6) and int(output.zeroPoint[0]) == -128   # low end 0 kept
    assert widen_too_fine_output_scales(model) == 0
    widened = tmp_path / "widened.tflite"
    widened.write_bytes(serialize_sharing_zero_points(model))
    ran = subprocess.run([sys.executable, "-c", RUN_UNDER_XNNPACK, str(widened)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert int(ran.stdout.split()[-1]) >= 1   # XNNPACK took the graph
    refuse_too_fine_output_scales(model)   # none left
    # one that cannot be widened (its reader needs its scale: RESIZE_BILINEAR) is named, not left to abort XNNPACK
    output.scale = np.array([step / 12800], np.float32)
    name = graph.tensors[conv.outputs[0]].name.decode()
    with pytest.raises(ValueError, match=r"would abort XNNPACK: calibrate on more images \(--calib N\) or keep the "
                                         rf"readers in float \(--float-ops\); 1 convolution outputs .*{re.escape(name)} "
                                         r"\(12800x\)$"):
        refuse_too_fine_output_scales(model)


def biases_off_their_input_scale(path) -> list[int]:
    """Indices of the int8 convolutions of a file whose int32 bias is not on input scale x weight
    scale, the unit the kernels read it in (TFLite's quantisation spec)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edge.op_profile import op_name
    from targets.tflite_file import BIASED_READERS
    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]

    def scale(index):
        q = graph.tensors[index].quantization
        return None if q is None or q.scale is None or not len(q.scale) else np.asarray(q.scale, np.float64)

    off = []
    for i, op in enumerate(graph.operators):
        if op_name(model, op) in BIASED_READERS and len(op.inputs) > 2 and op.inputs[2] >= 0:
            inputs, weights, bias = (scale(int(t)) for t in op.inputs[:3])
            if inputs is not None and bias is not None and not np.allclose(bias, inputs[0] * weights, rtol=1e-4):
                off.append(i)
    return off


READER_ERRORS = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
tensor, readers, depths = int(sys.argv[1]), [], []
for path in sys.argv[2:]:
    interpreter = Interpreter(model_path=path, num_threads=1, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    image = interpreter.get_input_details()[0]
    interpreter.set_tensor(image["index"], np.random.default_rng(0).random(image["shape"], np.float32))
    interpreter.invoke()
    readers.append(interpreter.get_tensor(tensor).astype(np.float32))   # in steps: one scale in every file
    depth = min(interpreter.get_output_details(), key=lambda o: np.prod(o["shape"]))   # 1 channel against 13
    depths.append(interpreter.get_tensor(depth["index"]))
for out, depth in zip(readers[1:], depths[1:]):
    print(float(np.abs(out - readers[0]).mean()), float(np.median(np.abs(depth - depths[0]) / depths[0])))
"""


def test_a_rescaled_int8_tensor_keeps_the_biases_of_the_convolutions_reading_it(tflite_export, run_dir, tmp_path):
    """An int8 convolution reads its int32 bias in units of input scale x weight scale, so the passes
    that rescale a tensor (`tighten_activation_ranges`, `widen_too_fine_output_scales`) re-express
    the bias of each convolution reading it. A widened squeeze-excite input whose reader kept its
    bias made that gate's bias 25x too large: a v3 file drifted 1.8% per pixel instead of 1.0%."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edge.op_profile import op_name
    from targets.tflite_file import (BIASED_READERS, REQUANTIZING_OPS, bias_values, rescalable_int8_outputs,
                                     rescale_int8_tensor, serialize_sharing_zero_points)
    arts = by_precision(manifest_of(tflite_export, run_dir, "tflite"))
    exported = tflite_export / run_dir.name / "tflite" / arts["int8"]["path"]

    def bias_in_output_steps(model, reader) -> float:   # how far a bias left as it was moves the reader
        graph = model.subgraphs[0]
        bias = graph.tensors[reader.inputs[2]]
        output_scale = graph.tensors[reader.outputs[0]].quantization.scale[0]
        return float(np.abs(bias_values(model, bias) * bias.quantization.scale).max() / output_scale)

    # The convolution output (what the passes rescale) whose biased reader shows a wrong bias most
    # clearly: the first one found moved a tiny student's depth less than the coarser tensor did.
    model = flatbuffer_utils.read_model(str(exported))
    graph = model.subgraphs[0]
    index, at = max(((index, at) for _, kind, index in rescalable_int8_outputs(model) if kind in REQUANTIZING_OPS
                     for at, op in enumerate(graph.operators)
                     if op_name(model, op) in BIASED_READERS and int(op.inputs[0]) == index and op.inputs[2] >= 0),
                    key=lambda candidate: bias_in_output_steps(model, graph.operators[candidate[1]]))
    files = {}
    for fix_biases in (True, False):
        model = flatbuffer_utils.read_model(str(exported))
        graph = model.subgraphs[0]
        reader = graph.operators[at]
        q, bias = graph.tensors[index].quantization, graph.tensors[reader.inputs[2]]
        meant = bias_values(model, bias) * bias.quantization.scale
        if fix_biases:
            assert rescale_int8_tensor(model, index, 2 * float(q.scale[0]), int(q.zeroPoint[0]))
            weight_scale = graph.tensors[reader.inputs[1]].quantization.scale
            np.testing.assert_allclose(bias.quantization.scale, q.scale[0] * weight_scale, rtol=1e-6)
            np.testing.assert_allclose(bias_values(model, bias) * bias.quantization.scale, meant,
                                       atol=float(bias.quantization.scale.max()))
        else:   # what the passes did before: the scale alone
            q.scale = q.scale * 2
        files[fix_biases] = tmp_path / f"rescaled_{fix_biases}.tflite"
        files[fix_biases].write_bytes(serialize_sharing_zero_points(model))
    ran = subprocess.run([sys.executable, "-c", READER_ERRORS, str(int(reader.outputs[0])), str(exported),
                          str(files[True]), str(files[False])], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    # per file: the reader's mean error in steps of its output, and the depth's median relative drift
    (kept, kept_depth), (broken, _) = (map(float, line.split()) for line in ran.stdout.splitlines()[-2:])
    assert kept_depth < 0.01, kept_depth   # one input one bit coarser leaves the depth where it was
    assert broken > 5 * max(kept, 0.1), (kept, broken)   # one input one bit coarser; against a bias doubled


def test_sensitivity_ranks_the_tensors_of_a_runs_int8_drift(run_dir, capsys):
    from quant.sensitivity import main as sensitivity_main
    assert sensitivity_main(["--run", str(run_dir), "--images", "4", "--calib", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "quantisers on" in out and "tensors, 4 validation images, 8 calibration images" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 3 and "int8 simulation: depth drift" in out
    assert "tflite int8 (weights in [-127, 127])" in out
    # onnxruntime's coarser weight grid (core/formats.py) makes another simulation. On this tiny run
    # activations dominate, so the overall depth drift can tie at two decimals (1.31% and 1.31% on an
    # AVX2 host; 1.00% and 0.98% on an AVX-512 one): the whole table, every tensor's row, differs
    assert sensitivity_main(["--run", str(run_dir), "--images", "4", "--calib", "8", "--top", "3",
                             "--format", "onnx"]) == 0
    onnx_out = capsys.readouterr().out
    assert "onnx int8 (weights in [-64, 64])" in onnx_out
    tables = [o.split("int8 simulation: depth drift ")[1] for o in (out, onnx_out)]
    assert tables[1] != tables[0]
    # more calibration images than the run can give: refused naming the flag, as the export does
    assert sensitivity_main(["--run", str(run_dir), "--calib", "100000"]) == 2
    assert "error: --calib 100000: the calibration images are drawn from 48 candidates" in capsys.readouterr().err


def test_a_float_stem_that_leaves_nothing_to_quantise_is_refused_before_the_work(run_dir, tmp_path, capsys):
    """--float-stem 99 calibrated, ran QAT, then the converter failed (exit 1, in its own words)."""
    assert export(run_dir, tmp_path, "--target", "tflite", "--precision", "int8", "--float-stem", "99") == 2
    err = capsys.readouterr().err
    assert "error: --float-stem 99: every convolution of the student (" in err and "give a smaller number" in err
    assert not any(p.suffix in (".tflite", ".json") for p in tmp_path.rglob("*")), "wrote before refusing"
    assert export(run_dir, tmp_path, "--target", "tflite", "--precision", "fp32", "--float-stem", "99") == 0   # idle there


def test_export_directory_holds_the_proof(tflite_export, run_dir):
    export_dir = tflite_export / run_dir.name / "tflite"
    drift = json.loads((export_dir / "drift.json").read_text())
    assert [a["precision"] for a in drift["artefacts"]] == ["fp32", "fp16", "int8"]
    assert all(a["pass"] for a in drift["artefacts"])
    bench = json.loads((export_dir / "benchmark.json").read_text())
    assert bench["host_peak"]["fp32_gflops"] > 0 and bench["host_peak"]["int8_gops"] > 0
    report = (export_dir / "report.md").read_text()
    cpu = describe_cpu(bench["host_peak"]["cpu"])   # the CPU beside every ratio (edge/peak.py)
    assert f"Host: {cpu}, " in report and f"A desktop CPU, {cpu}, not a phone" in (export_dir / "README.md").read_text()
    assert "## Benchmark" in report and "## Drift against the float model" in report
    for name in ("drift_histogram.png", "errors_int8.png", "device/linux_bench.py", "device/android_bench.py",
                 "device/COMMANDS.md"):
        assert (export_dir / name).is_file(), name
    assert f"device/linux_bench.py {run_dir.name}_int8.tflite" in (export_dir / "device/COMMANDS.md").read_text()


def card_parts(export_dir: Path) -> tuple[dict, str]:
    """(front matter, body) of the export's model card."""
    import yaml

    _, head, body = (export_dir / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(head), body


def table_rows(body: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under `## heading`, header and rule left out."""
    section = body.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def run_card_snippet(export_dir: Path, tmp_path: Path) -> str:
    """Execute the card's Python snippet on a real image in the export directory; its stdout."""
    from PIL import Image

    _, body = card_parts(export_dir)
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "room.jpg")
    code = code.replace('"room.jpg"', repr(str(tmp_path / "room.jpg")))
    code += "\nprint(depth_m.shape, labels.shape, float(depth_m.min()) > 0)\n"
    return subprocess.run([sys.executable, "-c", code], cwd=export_dir, capture_output=True, text=True,
                          check=True).stdout


def test_model_card_matches_the_export(tflite_export, run_dir, tmp_path):
    export_dir = tflite_export / run_dir.name / "tflite"
    meta, body = card_parts(export_dir)
    assert {"depth-estimation", "image-segmentation", "tflite", "int8"} <= set(meta["tags"])
    assert meta["library_name"] == "densekit" and meta["license"] == "apache-2.0"
    assert (meta["student"], meta["teacher"], meta["run"]) == ("mobilenetv3_small_050", "synthetic-metric", run_dir.name)
    assert meta["input_layout"] == "NHWC" and meta["depth_space"] == "metric"
    assert "int8 by qat, weights in [-127, 127]" in body
    # the outputs' shapes as the file returns them (the card said (1, 1, H, W) beside an NHWC layout)
    assert "- `depth`: (1, 64, 96, 1) depth (NHWC, as the input), metric" in body
    assert "- `seg`: (1, 64, 96, 13) class logits; argmax over the last axis" in body
    manifest = manifest_of(tflite_export, run_dir, "tflite")
    files = {row[0]: row for row in table_rows(body, "Files")}
    for a in manifest["artefacts"]:
        assert files[a["path"]][3].strip("`") == a["sha256"][:16]
    assert "`python -m quant.verify <this folder>`" in body   # how to check the copies: the column is not the digest
    drift = json.loads((export_dir / "drift.json").read_text())["artefacts"]
    rows = table_rows(body, "Accuracy against the float model")
    assert [r[0] for r in rows] == [a["path"] for a in drift]
    for row, a in zip(rows, drift):
        assert row[4] == f"{a['float']['abs_rel']:.4f} -> {a['artefact']['abs_rel']:.4f}"
        assert row[5] == f"{100 * a['delta']['abs_rel'] / a['float']['abs_rel']:+.2f}%"
        assert row[7] == f"{100 * a['delta']['miou']:+.2f}" and row[8] == "pass"
    bench = json.loads((export_dir / "benchmark.json").read_text())
    latency = {r[0]: r for r in table_rows(body, "Latency on the export host")}
    for path, b in bench["artefacts"].items():
        assert latency[path][2] == f"{b['latency_ms']['p50']:.2f}"
    assert [r[1] for r in table_rows(body, "Outputs")][:2] == ["bed", "books"]   # ids and names, NYU13 order
    assert manifest["config"]["source_checkpoint"]["sha256"] in body
    assert run_card_snippet(export_dir, tmp_path).strip() == "(64, 96) (64, 96) True"
    assert "## The float model on its validation split at 64x96, its training size" in body
    assert "not at the size the model trained at" not in body


def test_model_card_says_when_the_run_s_figures_are_not_the_exported_size_s():
    """An export at 256x320 of a run trained at 128x160 showed the run's abs_rel (0.202) beside a
    model that measures 0.367 at its size (README's measurement), with no word of the difference."""
    from types import SimpleNamespace

    from quant.model_card import size_note

    run = SimpleNamespace(input_size=(128, 160), recipe=SimpleNamespace(name="v3"))
    drift = {"artefacts": [{"float": {"abs_rel": 0.367}}]}
    assert size_note(run, (128, 160), drift) == []
    (note,) = size_note(run, (256, 320), drift)
    assert "This export runs at 256x320, not at the size the model trained at: the float model measures abs_rel " \
           "0.3670 there" in note and "python -m distill.run v3 data.height=256 data.width=320" in note



def test_the_export_log_says_when_it_runs_at_another_size_than_the_run_trained_at(tmp_path):
    from types import SimpleNamespace

    from quant.export import size_warning

    (tmp_path / "summary.json").write_text(json.dumps({"abs_rel": 0.202}))
    run = SimpleNamespace(name="v3-x", path=tmp_path, input_size=(128, 160), recipe=SimpleNamespace(name="v3"))
    reports = [SimpleNamespace(float={"abs_rel": 0.367})]
    assert size_warning(run, (128, 160), reports) == "" and size_warning(run, (256, 320), []) == ""
    assert size_warning(run, (256, 320), reports) == (
        "warning: v3-x was trained at 128x160 (abs_rel 0.2020); at 256x320 the float model itself has abs_rel "
        "0.3670. For this target, train at its size: python -m distill.run v3 data.height=256 data.width=320")


def test_manifest_hashes_match_and_detect_tampering(tflite_export, run_dir, tmp_path):
    export_dir = tflite_export / run_dir.name / "tflite"
    assert verify_export(export_dir) == []
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for a in manifest["artefacts"]:
        assert (export_dir / a["path"]).stat().st_size == a["bytes"]
    victim = export_dir / manifest["artefacts"][0]["path"]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert verify_export(export_dir) == [f"{victim.name}: sha256 differs from the manifest"]
    finally:
        victim.write_bytes(original)


def test_a_flipped_byte_is_refused_by_name_where_the_artefact_is_used(tflite_export, run_dir, tmp_path, capsys):
    """edge.run, edge.bench, the profilers and quant.verify check an exported artefact against its manifest."""
    from edge.bench import main as bench_main
    from edge.op_profile import main as op_profile_main
    from edge.run import main as run_main
    from edge.section_profile import main as section_profile_main
    from quant.verify import main as verify_main

    export_dir = tflite_export / run_dir.name / "tflite"
    victim = export_dir / f"{run_dir.name}_int8.tflite"
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32))
    assert verify_main([str(export_dir)]) == 0
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
        capsys.readouterr()
        assert verify_main([str(export_dir)]) == 2
        assert f"{victim.name}: sha256 differs from the manifest" in capsys.readouterr().err
        assert run_main([str(victim), "--inputs", str(inputs), "--out", str(tmp_path / "o.npz")]) == 2
        assert bench_main([str(victim), "--runs", "1", "--warmup", "0"]) == 2
        assert op_profile_main([str(victim), "--runs", "1"]) == 2
        assert section_profile_main([str(export_dir / f"{run_dir.name}_fp32.tflite"), str(victim), "--runs", "1"]) == 2
        assert not (tmp_path / "o.npz").exists()
        err = capsys.readouterr().err
        assert err.count(f"{victim} differs from the sha256 recorded in") == 4 and "--no-verify" in err
        capsys.readouterr()
        # --no-verify runs it (its output may be nonsense: a flipped byte; or the runtime refuses it, exit 1)
        assert run_main([str(victim), "--inputs", str(inputs), "--out", str(tmp_path / "o.npz"), "--no-verify"]) in (0, 1)
        assert "differs from the sha256" not in capsys.readouterr().err
        # the Python API names its own keyword, not the commands' flag
        from edge import bench_artefact, run_artefact
        from edge.op_profile import profile
        for call in (lambda: run_artefact(victim, np.load(inputs)), lambda: bench_artefact(victim, runs=1),
                     lambda: profile(victim, runs=1)):
            with pytest.raises(ValueError, match="differs from the sha256 .*pass verify=False to run it anyway"):
                call()
    finally:
        victim.write_bytes(original)
    assert verify_main([str(tmp_path)]) == 2   # nothing was exported here
    assert f"{tmp_path} is not an export directory (no manifest.json in it or below)" in capsys.readouterr().err
    for folder in (export_dir.parent, tflite_export):   # a run's folder of exports, and exports/ itself
        assert verify_main([str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder} holds exports, not one; pass one of: " in err and str(export_dir) in err
    lost = tmp_path / "lost"   # an export whose manifest was deleted: that is what it is told
    lost.mkdir()
    (lost / "m_int8.tflite").write_bytes(b"x")
    assert verify_main([str(lost)]) == 2
    assert f"{lost}/manifest.json is missing or unreadable" in capsys.readouterr().err


def test_tflite_metadata_is_embedded(tflite_export, run_dir):
    from targets.tflite_file import read_metadata  # the flatbuffer schema of ai-edge-litert: no TensorFlow

    meta = read_metadata(tflite_export / run_dir.name / "tflite" / f"{run_dir.name}_int8.tflite")
    assert meta["depth_units"] == "metres" and meta["precision"] == "int8"
    assert meta["input_layout"] == "NHWC" and meta["input_shape"] == [1, 64, 96, 3]
    assert len(meta["classes"]) == 13 and meta["recipe"] == "v3"


def test_existing_export_is_never_clobbered(tflite_export, run_dir, capsys):
    export_dir = tflite_export / run_dir.name / "tflite"
    before = (export_dir / "manifest.json").read_bytes()
    assert export(run_dir, tflite_export, "--target", "tflite") == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite, but the export fails before converting (bad calibration size): nothing replaced
    assert export_main(["--run", str(run_dir), "--out", str(tflite_export), "--target", "tflite",
                        "--calib", "100000", "--overwrite", "--quiet"]) == 2
    assert "error: --calib 100000: the calibration images are drawn from 48 candidates" in capsys.readouterr().err
    assert (export_dir / "manifest.json").read_bytes() == before
    assert not list(export_dir.parent.glob(".tflite.staging-*")) and not list(export_dir.parent.glob(".tflite.work-*"))


def test_a_mac_budget_that_prunes_nothing_or_cannot_be_reached_is_refused_before_any_work(run_dir, tmp_path, capsys):
    for budget, message in (("1G", "a budget of 1000.0M MACs prunes nothing: the student has "),
                            ("macs=0.01x", "is out of reach: with every channel group at 8 channels the student still has ")):
        assert export(run_dir, tmp_path, "--target", "onnx", "--precision", "fp32", "--prune", budget) == 2
        assert f"error: --prune {budget}: " in (err := capsys.readouterr().err) and message in err, err
    assert {p.suffix for p in tmp_path.glob(f"{run_dir.name}/*")} == {".lock"}   # no export, no staging left


def test_a_depth_only_run_is_refused_before_any_work(tmp_path, capsys):
    """model.tasks=depth trains (an ablation axis), but every artefact has a depth and a segmentation
    output: the export said KeyError 'seg' (exit 1) after pruning or QAT; now exit 2 at once."""
    from targets.deploy import reference_outputs

    assert train_main(["v3", *TINY, "model.tasks=depth", f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 0
    (depth_only,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert export(depth_only, tmp_path / "exports", "--target", "onnx", "--precision", "int8") == 2
    assert (f"error: run {depth_only.name}: the student predicts depth only (model.tasks=depth); artefacts have a "
            f"depth and a segmentation output: export a run trained with model.tasks=depth,seg\n") in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()
    from distill.students import build_student   # the Python API's path to the same contract
    with pytest.raises(ValueError, match=r"the student predicts depth only"):
        reference_outputs(build_student("mobilenetv3_small_050", tasks=("depth",)), torch.rand(1, 3, 64, 96))


def test_onnx_fp32_fp16_and_int8(run_dir, tmp_path):
    assert export(run_dir, tmp_path, "--target", "onnx", "--qat-steps", "0", "--no-equalize") == 0
    manifest = manifest_of(tmp_path, run_dir, "onnx")
    assert "equalized" not in manifest["config"]["int8"]   # the student as trained (quant/equalize.py)
    arts = by_precision(manifest)
    assert arts["fp32"]["check"]["depth_rel_max"] < 1e-4 and arts["fp32"]["check"]["seg_max_abs"] < 1e-4
    assert arts["fp16"]["check"]["depth_rel_median"] < 2e-3 and arts["fp16"]["bytes"] < 0.6 * arts["fp32"]["bytes"]
    assert arts["fp16"]["validation"]["pass"]
    assert arts["int8"]["check"]["depth_rel_median"] < 0.02 and arts["int8"]["check"]["seg_agreement"] > 0.9
    assert manifest["config"]["int8"]["method"] == "ptq"

    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(tmp_path / run_dir.name / "onnx" / arts["int8"]["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops   # a QDQ graph, int8 kernels in onnxruntime
    activations = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    zero_points = [i for i in model.graph.initializer if i.name in activations]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)   # U8S8: x86's fast path
    # 7-bit weights, [-64, 64]: exact in the 16-bit pair sums of x86 CPUs without VNNI (core/formats.py)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64
    assert manifest["config"]["int8"]["weight_range"] == [-64, 64]
    # the input stem stays float (--float-stem 2): its two convolutions read float weights, every later one int8
    weights_dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                           and n.input[0] in {i.name for i in model.graph.initializer}}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    in_float = [c for c in convs if c.input[1] not in weights_dequantized]
    assert len(in_float) == len(STEM_CONVS) and convs[0] in in_float and len(convs) > 20
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["densekit"])["source_sha256"] == manifest["config"]["source_checkpoint"]["sha256"]
    export_dir = tmp_path / run_dir.name / "onnx"    # the card's onnxruntime snippet runs as written
    assert json.loads(props["densekit"])["int8_method"] == manifest["config"]["int8"]["method"] == "ptq"
    floats = [onnx.load(p) for p in export_dir.glob("*_fp*.onnx")]   # no integer activations: no int8 method
    assert floats and all(json.loads({p.key: p.value for p in m.metadata_props}["densekit"])["int8_method"] == ""
                          for m in floats)
    meta, body = card_parts(export_dir)
    assert meta["input_layout"] == "NCHW" and "int8 by ptq, weights in [-64, 64]" in body
    assert "- `seg`: (1, 13, 64, 96) class logits; argmax over the second axis" in body
    assert run_card_snippet(export_dir, tmp_path).strip() == "(64, 96) (64, 96) True"


def test_onnx_float16_keeps_a_graph_whose_output_another_node_reads(tmp_path):
    """targets/onnx.py's to_float16 renames each output's producer; a node that also reads that output
    read the float32 Cast appended at the end, and the checker refused the unsorted graph."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from targets.onnx import to_float16

    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 3, 3]) for name in ("image", "depth", "seg")]
    nodes = [helper.make_node("Relu", ["image"], ["depth"]), helper.make_node("Neg", ["depth"], ["seg"])]
    graph = helper.make_graph(nodes, "reads_an_output", values[:1], values[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "a.onnx"))
    to_float16(tmp_path / "a.onnx", tmp_path / "b.onnx")
    image = np.random.default_rng(0).uniform(-1, 1, (1, 2, 3, 3)).astype(np.float32)
    depth, seg = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image})
    assert depth.dtype == seg.dtype == np.float32
    np.testing.assert_allclose(depth, np.maximum(image, 0), atol=1e-3)
    np.testing.assert_allclose(seg, -np.maximum(image, 0), atol=1e-3)


def test_coreml_through_export(run_dir, tmp_path):
    """fp16 and w8 (iOS16), and w8a8 (iOS18), whose activation ranges the converter measures on
    the export's calibration set (taken without QAT: no int8 is asked for)."""
    assert export(run_dir, tmp_path, "--target", "coreml", "--precision", "fp16", "w8", "w8a8", "--calib", "8") == 0
    manifest = manifest_of(tmp_path, run_dir, "coreml")
    arts = by_precision(manifest)
    assert set(arts) == {"fp16", "w8", "w8a8"}
    assert arts["w8"]["bytes"] < arts["fp16"]["bytes"]
    assert arts["w8"]["weight_ops"]                      # compressed-weight ops in the program
    w8a8 = arts["w8a8"]
    assert w8a8["deployment_target"] == "iOS18" and arts["fp16"]["deployment_target"] == "iOS16"
    assert w8a8["activation_ops"].get("quantize", 0) > 0 and w8a8["activation_ops"].get("dequantize", 0) > 0
    assert w8a8["calibration"]["images"] == 8 and w8a8["calibration"]["executor"].startswith("coreml-reference")
    assert all(low <= high for low, high in w8a8["calibration"]["ranges"].values())
    stem = w8a8["calibration"]["float_stem"]        # --float-stem's default reached the converter
    assert stem["layers"] == 2 and len(stem["weighted_ops"]) == 2
    assert "int8" not in manifest["config"]        # the calibration set came without QAT
    assert verify_export(tmp_path / run_dir.name / "coreml") == []
    meta, body = card_parts(tmp_path / run_dir.name / "coreml")
    assert {"coreml", "w8a8"} <= set(meta["tags"]) and meta["input_layout"] == "NCHW"
    assert "ct.models.MLModel" in body and "Xcode" in body


def test_pruned_float_only_tflite_export(tflite_export, run_dir, capsys):
    damaged = tflite_export / run_dir.name / "onnx-damaged"   # a sibling whose manifest cannot be read
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{")
    # float only: no calibration set, yet onnx2tf must find its sample file (offline here)
    assert export(run_dir, tflite_export, "--target", "tflite", "--precision", "fp32", "--prune", "macs=0.6x",
                  "--prune-steps", "3", "--prune-stages", "2") == 0
    manifest = manifest_of(tflite_export, run_dir, "tflite-pruned-0.6x")   # beside the unpruned export, not over it
    prune = manifest["config"]["prune"]
    assert 0.54 <= prune["macs_after"] / prune["macs_before"] <= 0.6 and prune["params_after"] < prune["params_before"]
    assert set(prune["val_after"]) >= {"abs_rel", "miou"} and prune["importance"] == "taylor"
    assert prune["stages"] == 2 and prune["finetune_steps"] == 3 and 0 < prune["ratio"] < 1
    assert by_precision(manifest)["fp32"]["check"]["depth_rel_max"] < 1e-4
    # Its report's compression table holds the run's unpruned export too, unpruned rows first.
    report = (tflite_export / run_dir.name / "tflite-pruned-0.6x" / "report.md").read_text()
    table = report.split("## Compression")[1]
    assert "onnx-damaged" not in table   # another format's export is not this table's
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| tflite")]
    assert [(r[0], r[1]) for r in rows] == [("| tflite", "fp32"), ("| tflite", "fp16"), ("| tflite", "int8"),
                                            ("| tflite-pruned-0.6x", "fp32")], table
    assert float(rows[3][2]) / float(rows[0][2]) == pytest.approx(prune["macs_after"] / prune["macs_before"], abs=0.02)
    card = card_parts(tflite_export / run_dir.name / "tflite-pruned-0.6x")[1]   # the run's figures, labelled
    assert f"The run's unpruned model. The files come from it pruned to {prune['macs_after'] / 1e6:.0f} M MACs" in card
    assert f"abs_rel {prune['val_after']['abs_rel']:.4f}" in card
    # The card's rebuild command is the export's own, every option that made it included (not the
    # recipe's QAT steps filled in for the user: idle in an fp32 export, whose rebuild then warned)
    rebuild = next(line for line in card_parts(tflite_export / run_dir.name / "tflite-pruned-0.6x")[1].splitlines()
                   if line.startswith("- rebuild: "))
    assert rebuild == (f"- rebuild: `python -m quant.export --target tflite --run {run_dir} --precision fp32 "
                       f"--prune macs=0.6x --prune-steps 3 --prune-stages 2 --calib 8 --check 4 "
                       f"--tolerance int8.abs_rel_change=0.5 --tolerance int8.miou_drop_pt=50 "
                       f"--tolerance w8a8.abs_rel_change=0.5 --tolerance w8a8.miou_drop_pt=50 --bench-runs 0 "
                       f"--batch-size 4`")
    # FAST's int8 and w8a8 gates: an fp32 export runs neither, and says so
    assert "--tolerance for int8, w8a8: this export makes no int8 or w8a8; those gates apply to nothing" in \
        capsys.readouterr().out
    assert compression_main([str(tflite_export / run_dir.name)]) == 0   # the same table, printed
    printed = capsys.readouterr()
    assert table.split("\n\n")[1] in printed.out and "onnx-damaged" not in printed.out
    assert f"warning: {damaged} left out: its manifest cannot be read" in printed.err
    # one level too low (the export itself) or too high (every run's exports): the level to pass
    assert compression_main([str(tflite_export / run_dir.name / "tflite")]) == 2
    assert f"tflite is one export; pass the run's folder that holds it: {tflite_export / run_dir.name}\n" in \
        capsys.readouterr().err
    assert compression_main([str(tflite_export)]) == 2
    assert f"holds the exports of runs, not of one; pass one run's folder: {tflite_export / run_dir.name}\n" in \
        capsys.readouterr().err


def test_options_an_export_never_uses_are_said():
    """Each flag set away from its default that the plan leaves idle gets one line naming why;
    a plan that uses them gets none."""
    from quant.export import ExportOptions, idle_options, plan_for

    fp32 = ExportOptions(precisions=("fp32",), prune_lr=1e-3, calib=8, float_stem=3, equalize=False, batch_size=4)
    assert idle_options(fp32, plan_for("tflite", fp32), 300) == [
        "--prune-lr: no --prune, so nothing is pruned or fine-tuned after pruning",
        "--float-stem: for int8 files and Core ML's w8a8, and this export makes fp32",
        "--no-equalize: for int8 files, and this export makes fp32",
        "--calib: calibration images serve int8, w8a8, palette4, palette6, palette4g; this export makes fp32",
        "--batch-size: the fine-tune batch size, and this export fine-tunes nothing (no --prune, no QAT)"]
    ptq = ExportOptions(precisions=("int8",), qat_steps=0, qat_lr=1e-3)
    assert idle_options(ptq, plan_for("tflite", ptq), 300) == [
        "--qat-lr: --qat-steps 0 runs no QAT (post-training quantisation only)"]
    v4 = ExportOptions(precisions=("int8",), qat_lr=1e-3, batch_size=8)   # v4's recipe: no QAT steps
    assert idle_options(v4, plan_for("tflite", v4), 0) == [
        "--qat-lr: --qat-steps 0 (the recipe's) runs no QAT (post-training quantisation only)",
        "--batch-size: the fine-tune batch size, and this export fine-tunes nothing (no --prune, no QAT)"]
    used = ExportOptions(precisions=("int8",), prune="0.3", prune_lr=1e-3, calib=8, float_stem=3, batch_size=4)
    assert idle_options(used, plan_for("tflite", used), 300) == []
    w8a8 = ExportOptions(precisions=("w8a8",), float_stem=0)   # Core ML's int8 activations leave the stem float too
    assert idle_options(w8a8, plan_for("coreml", w8a8), 300) == []
    onnx = ExportOptions(precisions=("fp32", "int8"), float_ops=("DIV", "MEAN"))   # a script's flags for every target
    assert idle_options(onnx, plan_for("onnx", onnx), 300) == [
        "--float-ops: TFLite op types, and this export writes onnx files (their int8 files keep their first layers "
        "in float with --float-stem N)"]
    float_only = ExportOptions(precisions=("fp32",), float_ops=("MEAN",))   # said once, not twice
    assert [n for n in idle_options(float_only, plan_for("onnx", float_only), 300) if "--float-ops" in n] == [
        "--float-ops: TFLite op types, and this export writes onnx files (their int8 files keep their first layers "
        "in float with --float-stem N)"]


def test_an_export_that_lost_its_manifest_is_reported_not_skipped(tmp_path):
    """quant.compression lists exports by their manifest: a format's directory without one is named
    as unreadable; staging (hidden) and folders that are no export's are left alone."""
    from quant.compression import exports

    for name in ("tflite", "onnx-pruned-0.5x", "notes", ".tflite.staging-1", "renamed", "pixel8", "jetson-orin"):
        (tmp_path / name).mkdir()
    (tmp_path / "report.txt").write_text("not a directory")
    for damaged in ("renamed", "pixel8"):   # an export moved to a name of no target; a device's export (tflite)
        (tmp_path / damaged / "manifest.json").write_text("{")
    found, unreadable = exports(tmp_path)
    assert found == {} and [p.name for p in unreadable] == [
        "jetson-orin", "onnx-pruned-0.5x", "pixel8", "renamed", "tflite"]
    assert unreadable[tmp_path / "tflite"] == "it has no manifest.json (re-export it with --overwrite)"
    assert list(exports(tmp_path, "tflite")[1]) == [tmp_path / "pixel8", tmp_path / "tflite"]   # not other formats'
    assert list(exports(tmp_path, "onnx")[1]) == [tmp_path / "jetson-orin", tmp_path / "onnx-pruned-0.5x"]


def test_the_rebuild_flags_parse_back_to_the_same_options():
    from quant.export import ExportOptions, command_flags, options_from_args, parse_args

    options = ExportOptions(precisions=("fp32", "int8"), converter="litert-torch", layout="NCHW", prune="macs=0.5x",
                            prune_steps=10, prune_importance="magnitude", prune_lr=1e-3, prune_stages=2, qat_steps=0,
                            qat_lr=3e-5, float_ops=("DIV", "EXP"), float_stem=0, equalize=False, calib=32,
                            input_size="96x128", check=50, tolerances={"int8": {"abs_rel_change": 0.03}},
                            bench_runs=5, bench_warmup=1, batch_size=8, seed=2, threads=1)
    assert options_from_args(parse_args(["--target", "tflite", *command_flags(options)])) == options
    assert command_flags(ExportOptions(out="elsewhere", overwrite=True, progress=False)) == []
    # the recipe's QAT steps, filled in before the manifest is written, are not a flag the user gave
    # (an fp32 rebuild command carried --qat-steps 300, and running it warned the flag idle)
    assert command_flags(ExportOptions(precisions=("fp32",), qat_steps=300), recipe_qat_steps=300) == ["--precision", "fp32"]
    assert command_flags(ExportOptions(qat_steps=0), recipe_qat_steps=300) == ["--qat-steps", "0"]


def test_compression_table_takes_an_artefact_that_was_not_timed():
    """Core ML is not timed off macOS: its bench entry says why and has no latency (a KeyError once)."""
    from quant.compression import markdown, rows

    validation = {"images": 8, "pass": True, "float": {"abs_rel": 0.2, "miou": 0.4},
                  "artefact": {"abs_rel": 0.21, "miou": 0.39}}
    manifest = {"config": {"model": {"macs": 112e6, "params": 1.1e6}},
                "artefacts": [{"path": "m_fp16.mlpackage", "precision": "fp16", "format": "coreml", "bytes": 2e6,
                               "validation": validation, "bench": {"skipped": "Core ML predicts only on macOS"}}]}
    (row,) = rows({"coreml": manifest})
    assert row["p50_ms"] is None and row["abs_rel_change"] == pytest.approx(0.05)
    assert "| coreml | fp16 | 112.0 | 1.100 | 2.00 | — | 8 |" in markdown([row])
    assert "taken at different times on the export host;" in markdown([row])

    listed = [{**a, "sha256": "0" * 64} for a in manifest["artefacts"]]   # as quant.export records each
    assert _readable_rows({"config": {**manifest["config"], "format": "coreml"}, "artefacts": listed}) == [row]
    # one damaged export (config.model edited away) is listed as unreadable; it does not stop the table
    assert _readable_rows({"config": {"format": "coreml"}, "artefacts": listed}) == []


def _readable_rows(manifest: dict) -> list:
    """The rows quant.compression.exports finds for an export whose manifest.json is `manifest`."""
    import tempfile

    from quant.compression import exports, rows
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "coreml").mkdir()
        (Path(tmp) / "coreml" / "manifest.json").write_text(json.dumps(manifest))
        for listed in manifest["artefacts"]:
            (Path(tmp) / "coreml" / listed["path"]).mkdir()   # a package is a folder
        found, unreadable = exports(Path(tmp))
        assert [p.name for p in unreadable] == ([] if found else ["coreml"])
        # named by the key it lacks: quant.verify, which checks the files' hashes, finds such an export intact
        assert list(unreadable.values()) == ([] if found else [
            "its manifest lacks config.model, which the table needs (re-export it with --overwrite)"])
        return rows(found)


def test_model_card_of_a_student_that_is_not_metric_promises_no_metres():
    from quant.model_card import depth_phrase, usage

    relative = {"depth_space": "relative", "depth_units": "affine-invariant, unitless"}
    assert depth_phrase(relative) == "relative depth (affine-invariant, unitless)"
    assert depth_phrase({"depth_space": "metric", "depth_units": "metres"}) == "metric depth"
    for fmt in ("tflite", "onnx", "coreml"):
        code = usage(fmt, "m.file", 64, 96, depth_units=relative["depth_units"])
        assert "metres" not in code and "depth_m" not in code and "(64, 96) affine-invariant, unitless" in code, fmt
        assert "depth_m = " in usage(fmt, "m.file", 64, 96) and "(64, 96) metres" in usage(fmt, "m.file", 64, 96)


def test_compression_table_names_the_cpus_of_its_latencies():
    """Exports benched on two CPUs (a copied exports directory): the table says which is which."""
    from quant.compression import markdown, rows

    def manifest(processor: str, int8_dot: list[str]) -> dict:
        device = {"name": "host", "processor": processor, "simd": ["avx2"], "int8_dot": int8_dot}
        bench = {"latency_ms": {"p50": 1.0}, "device": device}
        return {"config": {"model": {"macs": 112e6, "params": 1.1e6}},
                "artefacts": [{"path": "m_int8.tflite", "precision": "int8", "format": "tflite", "bytes": 1e6,
                               "validation": {}, "bench": bench}]}

    same = markdown(rows({"tflite": manifest("AMD EPYC", []), "tflite-pruned-0.5x": manifest("AMD EPYC", [])}))
    assert "taken at different times on AMD EPYC (avx2; no int8 dot-product instructions);" in same
    mixed = markdown(rows({"tflite": manifest("AMD EPYC", []), "tflite-pruned-0.5x": manifest("Xeon", ["amx_int8"])}))
    assert ("on DIFFERENT CPUs, whose latencies do not compare: AMD EPYC (avx2; no int8 dot-product instructions) "
            "(tflite); Xeon (avx2; int8 dot products: amx_int8) (tflite-pruned-0.5x);") in mixed
    assert "DIFFERENT weights" not in mixed   # neither records its source: nothing to compare


def test_compression_table_warns_when_exports_came_from_different_weights(tmp_path, capsys):
    """An export made from a checkpoint while the run trained, another after it finished: the
    accuracy columns differ by more than compression, and the table and the command say so."""
    from quant.compression import main, markdown, rows

    def manifest(sha: str) -> dict:
        return {"config": {"format": "tflite", "model": {"macs": 112e6, "params": 1.1e6},
                           "source_checkpoint": {"path": "best.safetensors", "sha256": sha}},
                "artefacts": [{"path": "m_int8.tflite", "sha256": "c" * 64, "precision": "int8", "format": "tflite",
                               "bytes": 1e6, "validation": {}, "bench": None}]}

    same = markdown(rows({"tflite": manifest("a" * 64), "tflite-pruned-0.5x": manifest("a" * 64)}))
    assert "DIFFERENT weights" not in same
    unknown = manifest("a" * 64)
    del unknown["config"]["source_checkpoint"]   # an export from before the record: not known to differ
    assert "DIFFERENT weights" not in markdown(rows({"tflite": manifest("a" * 64), "tflite-pruned-0.5x": unknown}))
    mixed = markdown(rows({"tflite": manifest("a" * 64), "tflite-pruned-0.5x": manifest("b" * 64)}))
    assert ("made from DIFFERENT weights of the run**, so their accuracy differences are not what compression cost: "
            f"sha256 {'a' * 12} (tflite); sha256 {'b' * 12} (tflite-pruned-0.5x)") in mixed
    for name, sha in (("tflite", "a" * 64), ("tflite-pruned-0.5x", "b" * 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest(sha)))
        (tmp_path / name / "m_int8.tflite").write_bytes(b"")
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "DIFFERENT weights" in out and "warning: the tflite exports of" in err
    # an artefact deleted after its export: its row would read as a finished file
    (tmp_path / "tflite" / "m_int8.tflite").unlink()
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert (f"warning: {tmp_path / 'tflite'} left out: it lists m_int8.tflite, which is not there (restore it, "
            f"or re-export with --overwrite)") in err and "| tflite |" not in out and "| tflite-pruned-0.5x |" in out
    (tmp_path / "tflite-pruned-0.5x" / "m_int8.tflite").unlink()
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path}: no finished export there (2 left out, see the warnings above)" in capsys.readouterr().err


def test_device_target_runs_the_whole_chain(run_dir, tmp_path):
    """rpi5 = TFLite int8 at 128x160 (targets/devices.json): the tiny run (trained at 64x96) is exported,
    calibrated and validated at the profile's size, and the kit holds the Linux script."""
    assert export(run_dir, tmp_path, "--target", "rpi5", "--qat-steps", "2") == 0
    manifest = manifest_of(tmp_path, run_dir, "rpi5")
    (art,) = manifest["artefacts"]
    assert art["path"].endswith("_int8.tflite") and art["validation"]["pass"]
    # the tests' gates are loose (FAST): the file against the float model at the profile's size
    assert art["check"]["depth_rel_median"] < 0.02 and art["check"]["seg_agreement"] > 0.9
    assert manifest["config"]["device"] == "rpi5" and manifest["config"]["input_size"] == [128, 160]
    assert "rpi5" in (tmp_path / run_dir.name / "rpi5" / "device" / "COMMANDS.md").read_text()
    report = (tmp_path / run_dir.name / "rpi5" / "report.md").read_text()   # the reference moved: said loudly
    assert "was trained at 64x96" in report and "data.height=128 data.width=160" in report


def test_gate_failure_exits_non_zero_naming_metric_value_and_tolerance(run_dir, tmp_path, capsys):
    assert export(run_dir, tmp_path, "--target", "onnx", "--precision", "int8", "--qat-steps", "0",
                  "--tolerance", "int8.abs_rel_change=0") == 3
    err = capsys.readouterr().err
    assert f"{run_dir.name}_int8.onnx: abs_rel changed by " in err and "tolerance 0.00%" in err
    assert "(--qat-steps N)" in err   # the fix, named
    from core.formats import PRECISIONS
    from quant.export import FAILURE_HINTS   # every lossy precision names its own
    assert set(PRECISIONS) - set(FAILURE_HINTS) == {"fp32", "fp16"}
    drift = json.loads((tmp_path / run_dir.name / "onnx" / "drift.json").read_text())
    assert drift["artefacts"][0]["pass"] is False   # written, and marked


def test_bad_requests_name_the_fix(run_dir, tmp_path, capsys):
    assert export(run_dir, tmp_path, "--target", "tflit") == 2
    assert 'Did you mean "tflite"' in capsys.readouterr().err
    assert export(run_dir, tmp_path, "--target", "pixel9") == 2
    err = capsys.readouterr().err
    assert 'Did you mean "pixel8"' in err and "jetson-orin" in err
    assert export(run_dir, tmp_path, "--target", "pixel8", "--precision", "fp16") == 2
    assert "--target tflite --precision" in capsys.readouterr().err
    assert export(run_dir, tmp_path, "--target", "tflite", "--input-size", "100x160") == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert export(run_dir, tmp_path, "--target", "onnx", "--precision", "palette4") == 2
    assert "onnx cannot produce palette4" in capsys.readouterr().err
    assert export_main(["--target", "onnx", "--runs-dir", str(tmp_path / "none")]) == 2
    assert "python -m distill.run v3" in capsys.readouterr().err
    assert export(run_dir, tmp_path, "--target", "tflite", "--converter", "litert") == 2
    assert "no converter 'litert'; its converters are onnx2tf, litert-torch" in capsys.readouterr().err
    assert export(run_dir, tmp_path, "--target", "tflite", "--layout", "nchw") == 2
    assert "the onnx2tf converter writes NHWC; --converter litert-torch writes NCHW" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:   # a machine without the litert extra: told before any work
        from core.formats import Converter

        mp.setattr(Converter, "missing", lambda self: list(self.needs[:1]))
        assert export(run_dir, tmp_path, "--target", "tflite", "--converter", "litert-torch") == 2
        assert "needs litert_torch, which is not installed: pip install -e '.[litert]'" in capsys.readouterr().err
        for target in ("tflite", "onnx", "coreml"):   # the export extra's toolchains, too (they had no needs)
            assert export(run_dir, tmp_path, "--target", target) == 2
            assert "which is not installed: pip install -e '.[export]'" in capsys.readouterr().err, target
    assert not (tmp_path / run_dir.name).exists()


def test_linear_attention_deploy_form_computes_the_same_function(monkeypatch):
    from timm.models.efficientvit_mit import LiteMLA

    from distill.students import build_student
    from targets.deploy import DeployModel, LinearAttention

    torch.manual_seed(0)
    student = build_student("efficientvit_b0", decoder_channels=16, num_classes=13).eval()
    deploy = DeployModel(student).eval()
    assert not any(isinstance(m, LiteMLA) for m in deploy.modules())
    assert sum(isinstance(m, LinearAttention) for m in deploy.modules()) == sum(
        isinstance(m, LiteMLA) for m in student.modules()) > 0
    assert any(isinstance(m, LiteMLA) for m in student.modules()), "the trained student is left as it was"
    x = torch.rand(2, 3, 64, 96)
    # the rescaling for fp16 alone (below) is exact; its floor on den (TINY) changes only rows whose
    # den is below it, which this untrained student has many of (trained v4 students: 4 and 115 of
    # 409,600 rows on 64 validation images, zero queries included; depth within 6e-7 of the student)
    monkeypatch.setattr(LinearAttention, "TINY", 0.0)
    with torch.no_grad():
        want, (depth, seg) = student((x - deploy.mean) / deploy.std), deploy(x)
    assert torch.allclose(depth, want["depth"], rtol=1e-5) and torch.allclose(seg, want["seg"], atol=1e-5)


@pytest.mark.parametrize("scale", [150, 600, 4000])
def test_linear_attention_stays_in_fp16_range(scale):
    """q, k and v up to `scale`: 150 as on the 9-epoch v4 (raw k^T v ~1e5-1e6), 600 as on its deep-
    supervised successor, which overflowed fixed scales (q / 256, k / N), and beyond. timm's one
    matmul overflows fp16; the deploy form's attention stays finite and within fp16 rounding, a row
    of zero queries included."""
    from targets.deploy import LinearAttention
    torch.manual_seed(0)
    q, k, v = (torch.rand(1, 4, 80, 16, dtype=torch.float64) * scale for _ in range(3))
    q[0, 0, 0] = 0
    want = (q @ (k.transpose(-1, -2) @ v)) / (q @ k.transpose(-1, -2).sum(-1, keepdim=True) + 1e-5)
    got = LinearAttention.attend(q.half(), k.half(), v.half()).double()
    assert torch.isfinite(got).all() and ((got - want).abs() / want.abs().clamp(min=1)).max() < 5e-3
    assert torch.equal(got[0, 0, 0], torch.zeros(16, dtype=torch.float64))
    ones = torch.ones_like(v[..., :1])
    assert not torch.isfinite(q.half() @ (k.half().transpose(-1, -2) @ torch.cat([v, ones], -1).half())).all()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_litert_torch_route(run_dir, tmp_path, layout):
    """TFLite through litert-torch and the LiteRT quantizer: the same gates and checks as onnx2tf's
    files, and int8 as one XNNPACK partition (the torch-side deploy form: targets/xnnpack_form.py)."""
    from targets.tflite_file import read_metadata

    precisions = ["fp32", "fp16", "int8"] if layout == "NHWC" else ["fp32"]   # NCHW: the layout only
    assert export(run_dir, tmp_path, "--target", "tflite", "--converter", "litert-torch", "--layout", layout,
                  "--precision", *precisions, "--qat-steps", "6") == 0
    name = "tflite-litert-torch" + ("-nchw" if layout == "NCHW" else "")
    export_dir = tmp_path / run_dir.name / name
    manifest = manifest_of(tmp_path, run_dir, name)
    assert (manifest["config"]["converter"], manifest["config"]["layout"]) == ("litert-torch", layout)
    assert {"litert-torch", "ai-edge-quantizer"} <= set(manifest["tools"])
    arts = by_precision(manifest)
    assert list(arts) == precisions and arts["fp32"]["check"]["depth_rel_max"] < 1e-4
    assert arts["fp32"]["check"]["seg_max_abs"] < 1e-4
    assert all(a["validation"]["pass"] for a in arts.values())
    meta = read_metadata(export_dir / arts["fp32"]["path"])
    shape = [1, 64, 96, 3] if layout == "NHWC" else [1, 3, 64, 96]
    assert meta["input_layout"] == layout and meta["input_shape"] == shape
    assert card_parts(export_dir)[0]["input_layout"] == layout
    assert card_parts(export_dir)[0]["converter"] == "litert-torch"
    assert run_card_snippet(export_dir, tmp_path).strip() == "(64, 96) (64, 96) True"
    assert "--converter litert-torch" in card_parts(export_dir)[1]   # the rebuild command names it
    assert device_script_matches_edge_run(export_dir / arts["fp32"]["path"], tmp_path)   # either layout
    if layout == "NHWC":
        assert arts["fp16"]["check"]["depth_rel_max"] < 2e-3 and arts["fp16"]["bytes"] < 0.6 * arts["fp32"]["bytes"]
        assert arts["int8"]["check"]["depth_rel_median"] < 0.02 and arts["int8"]["check"]["seg_agreement"] > 0.9
        assert arts["int8"]["check"]["reference"] == "int8"   # the QAT model's weights went in
        ops = arts["int8"]["ops_by_dtype"]
        assert ops["xnnpack_partitions"] == 1 and ops["int8"] > 50
        assert set(ops["float_ops"]) == {*STEM_FLOAT_OPS, "EXP", "RESIZE_BILINEAR"}
        assert float_convs(export_dir / arts["int8"]["path"]) == STEM_CONVS
        assert not {"HARD_SWISH", "RELU_0_TO_1"} & set(ops["op_types"])
        assert arts["int8"]["bytes"] < 0.5 * arts["fp32"]["bytes"]


def device_script_matches_edge_run(model: Path, tmp_path: Path) -> bool:
    """edge/device/linux_bench.py (what runs on a board, without densekit) gives the outputs of
    `python -m edge.run` for the same file and images."""
    images = np.random.default_rng(1).random((2, 3, 64, 96), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    root = Path(__file__).resolve().parents[1]
    for command in ([str(root / "edge" / "device" / "linux_bench.py"), str(model), "--runs", "1", "--warmup", "0",
                     "--inputs", "images.npy", "--outputs", "device.npz"],
                    ["-m", "edge.run", str(model), "--inputs", "images.npy", "--out", "host.npz", "--no-verify"]):
        subprocess.run([sys.executable, *command], cwd=tmp_path, check=True, capture_output=True)
    device, host = np.load(tmp_path / "device.npz"), np.load(tmp_path / "host.npz")
    assert device["depth"].shape == host["depth"].shape == (2, 1, 64, 96)
    return np.allclose(device["depth"], host["depth"], rtol=1e-6) and np.array_equal(device["labels"], host["labels"])


def test_xnnpack_deploy_form_computes_the_same_function():
    """Hard activations in relu6 forms, their 1/6 moved into the convolutions that read them."""
    from distill.students import build_student
    from targets.deploy import DeployModel
    from targets.xnnpack_form import Relu6HardSigmoid, Relu6HardSwish, defer_sixths, xnnpack_form

    torch.manual_seed(0)
    student = build_student("mobilenetv3_small_050", decoder_channels=16, num_classes=13).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        want = DeployModel(student).eval()(x)
    for int8, kinds in ((False, (Relu6HardSigmoid,)), (True, (Relu6HardSigmoid, Relu6HardSwish))):
        model = DeployModel(xnnpack_form(student, int8=int8), rows_width=96).eval()
        count = {k: sum(isinstance(m, k) for m in model.modules()) for k in (Relu6HardSigmoid, Relu6HardSwish)}
        assert all(count[k] > 0 for k in kinds) and (int8 or count[Relu6HardSwish] == 0)
        assert defer_sixths(model, x[:1]) == sum(count.values())   # every reader here is a convolution
        with torch.no_grad():
            depth, seg = model(x)
        assert torch.allclose(depth, want[0], rtol=1e-4) and torch.allclose(seg, want[1], atol=1e-4)
    assert not any(isinstance(m, Relu6HardSwish) for m in student.modules()), "the student is left as it was"


def test_a_factor_is_not_deferred_past_an_addition():
    from targets.xnnpack_form import Relu6HardSigmoid, defer_sixths

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.conv_b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
            self.gate_a, self.gate_b = Relu6HardSigmoid(), Relu6HardSigmoid()

        def forward(self, x):
            return self.conv_a(self.gate_a(x)), self.gate_b(x) + x   # b's readers include an ADD

    net = Net().eval()
    weight = net.conv_a.weight.detach().clone()
    assert defer_sixths(net, torch.rand(1, 3, 4, 4)) == 1
    assert net.gate_a.deferred and not net.gate_b.deferred
    assert torch.allclose(net.conv_a.weight, weight / 6)


def test_a_factor_is_deferred_past_zero_padding_only():
    from targets.xnnpack_form import Relu6HardSigmoid, defer_sixths

    class Net(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.conv, self.gate, self.value = torch.nn.Conv2d(3, 3, 3), Relu6HardSigmoid(), value

        def forward(self, x):   # constant_pad_nd(input, pad, value): its third argument is the value
            return self.conv(torch.constant_pad_nd(self.gate(x), (1, 1, 1, 1), self.value))

    for value, deferred in ((0.0, 1), (1.0, 0)):   # 6 * pad(y / 6, 1) is not pad(y, 1)
        assert defer_sixths(Net(value).eval(), torch.rand(1, 3, 6, 6)) == deferred, value


def test_efficientvit_int8_files_keep_each_attention_in_float(tmp_path):
    """v4's student family: each linear attention runs in float as one island, from its qkv
    convolutions to its output projection (XNNPACK has no int8 BATCH_MATMUL or RELU), in TFLite and
    ONNX; every convolution runs int8. Its int8 files come by PTQ unless told."""
    tiny_v4 = [a if not a.startswith("model.student=") else "model.student=efficientvit_b0" for a in TINY]
    assert train_main(["v4", *tiny_v4, f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 0
    run = next((tmp_path / "runs").glob("v4-*"))
    assert export(run, tmp_path / "exports", "--target", "tflite", "--precision", "int8", "--qat-steps", "2") == 0
    art = by_precision(manifest_of(tmp_path / "exports", run, "tflite"))["int8"]
    ops = art["ops_by_dtype"]
    assert {"DIV", "BATCH_MATMUL", "RELU", "SUM", "REDUCE_MAX"} <= set(ops["float_ops"]), ops
    # float: the input stem, the attentions (with their rescaling for fp16: targets/deploy.py), the tails
    attention = {"BATCH_MATMUL", "RELU", "SUM", "REDUCE_MAX", "MAXIMUM", "DIV", "MUL", "RESHAPE", "TRANSPOSE",
                 "CONCATENATION"}
    assert set(ops["float_ops"]) <= STEM_FLOAT_OPS | attention | {"RESIZE_BILINEAR", "EXP"}, ops
    assert ops["int8"] > ops["float32"], ops
    export_dir = tmp_path / "exports" / run.name / "tflite"
    assert float_convs(export_dir / art["path"]) == ["CONV_2D", "DEPTHWISE_CONV_2D"]   # the input stem only
    assert biases_off_their_input_scale(export_dir / art["path"]) == []
    assert art["check"]["finite"] and art["check"]["depth_rel_median"] < 0.02 and art["check"]["seg_agreement"] > 0.9
    # ONNX int8 keeps the same islands (targets/onnx.py, attention_islands): no matmul or division
    # of the attention reads a dequantised tensor; its convolutions are int8
    import onnx
    assert export(run, tmp_path / "exports", "--target", "onnx", "--precision", "int8") == 0
    manifest = manifest_of(tmp_path / "exports", run, "onnx")
    assert manifest["config"]["int8"]["method"] == "ptq"   # v4's default (Recipe.int8_qat_steps)
    art = by_precision(manifest)["int8"]
    graph = onnx.load(str(tmp_path / "exports" / run.name / "onnx" / art["path"])).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    constants = {t.name for t in graph.initializer}
    attention = [n for n in graph.node if n.op_type in ("MatMul", "Div") and not constants & set(n.input)]
    assert attention and all(producer.get(i) != "DequantizeLinear" for n in attention for i in n.input)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 20
    assert art["check"]["finite"] and art["check"]["depth_rel_median"] < 0.02


def test_a_second_export_of_the_same_run_and_target_is_refused_while_the_first_runs(run_dir, tmp_path, capsys):
    from test_lock import hold

    out = tmp_path / "exports"
    holder = hold(out / run_dir.name / ".tflite.lock")   # the first export, mid-way
    try:
        assert export(run_dir, out, "--target", "tflite") == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"being written by process {holder.pid}" in capsys.readouterr().err
    assert not (out / run_dir.name / "tflite").exists()


def test_export_refuses_best_weights_that_differ_from_the_runs_record(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    data = bytearray((copy / "best.safetensors").read_bytes())
    data[-5] ^= 0x40   # still loads: only the record can tell
    (copy / "best.safetensors").write_bytes(bytes(data))
    assert export(copy, tmp_path / "exports", "--target", "onnx") == 2
    err = capsys.readouterr().err
    assert f"{copy / 'best.safetensors'} differs from the sha256 its run recorded" in err
    assert not (tmp_path / "exports" / run_dir.name / "onnx").exists()


class DataDependentStudent(torch.nn.Module):
    """A branch on a value: torch.export refuses it, TorchScript's tracer records one side."""

    def forward(self, image):
        depth = image[:, :1] + 1.0
        if float(image.mean()) > 2.0:
            depth = depth * 2
        return {"depth": depth, "seg": image.repeat(1, 4, 1, 1)}


def test_onnx_comes_from_torch_export_and_the_legacy_fallback_says_why(tmp_path):
    import onnxruntime as ort

    from distill.students import build_student
    from targets.deploy import export_onnx

    _, how = export_onnx(build_student("mobilenetv3_small_050", decoder_channels=16).eval(), tmp_path / "a.onnx", 64, 96)
    assert how.startswith("torch.export")
    path, how = export_onnx(DataDependentStudent(), tmp_path / "b.onnx", 32, 32)
    assert how.startswith("torchscript (legacy fallback") and "torch.export failed" in how
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    depth, seg = session.run(None, {"image": np.zeros((1, 3, 32, 32), np.float32)})
    assert depth.shape == (1, 1, 32, 32) and seg.shape == (1, 12, 32, 32)
