"""TFLite converter process: ONNX -> onnxsim -> XNNPACK rewrites -> onnx2tf -> .tflite, run by LiteRT.

`python -m targets.tflite JOB.json` (written by `python -m quant.export`). Imports TensorFlow,
onnx2tf and ai-edge-litert, never torch (docs/TOOLCHAIN.md: the two segfault in one process).

Why onnx2tf and not litert-torch: litert-torch's PT2E QAT path fails with torch 2.14 + torchao
0.18 (docs/TOOLCHAIN.md), and its float path would still leave int8 to a second toolchain; onnx2tf
takes the ONNX graph the ONNX target already exports and produces every precision in one pass.

Precisions:
- fp32: `*_float32.tflite`; fp16: `*_float16.tflite` (fp16 weights, dequantised at load by the
  runtime; computation stays fp32 on CPUs without fp16 arithmetic).
- int8: TFLite's converter on onnx2tf's SavedModel with the job's calibration images:
  full-integer kernels (per-channel symmetric int8 weights, per-tensor asymmetric int8
  activations calibrated by min/max, the scheme QAT simulates in quant/qat.py) with float32
  input and output, so the artefact takes and returns the same tensors as the float ones. Only
  the output tails (`output_tails`), the job's `float_ops` (DIV by default) and the ops around
  them up to the nearest convolutions (`float_islands`) stay float; `ops_by_dtype` in the result shows
  what computes in int8, and every op type.

Before onnx2tf, `targets.litert_graph` rewrites the ONNX graph into ops XNNPACK runs fast (the
same function; `graph_rewrites` in the result says what it changed).

onnx2tf 1.x downloads a sample-image file from the internet for 4-D RGB inputs unless
`calibration_image_sample_data_20x128x128x3_float32.npy` sits in the working directory: the
parent writes it from our own calibration images and this process runs there.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from core.contract import DEPTH, SEG
from edge.runners import LiteRTRunner
from targets.job import Job, check_against_reference, main, publish, source_for, tool_versions, write_result
from targets.litert_graph import shape_for_xnnpack
from targets.onnx import simplified  # folds the Shape->Resize chains onnx2tf cannot convert

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SUFFIX = {"fp32": "float32", "fp16": "float16"}
METADATA_NAME = "densekit"


def run_onnx2tf(onnx_path: Path, out_dir: Path) -> None:
    """Float conversion: writes a SavedModel and the fp32 / fp16 .tflite files into `out_dir`."""
    import onnx2tf

    # Signature defs: without them onnx2tf cannot write the SavedModel of graphs whose ONNX op
    # names contain characters TensorFlow rejects (EfficientViT's), and int8 needs that SavedModel.
    onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir),
                    output_signaturedefs=True, non_verbose=True)


def quantize_int8(saved_model: Path, calibration: str, dest: Path, float_ops: list[str]) -> None:
    """Full-integer int8 from onnx2tf's SavedModel; `float_ops` types, the ops around them up to the
    nearest convolutions (`float_islands`) and the output tails (`output_tails`) stay float.

    Every other op runs int8 kernels (per-channel symmetric weights, per-tensor activations
    calibrated by min/max on `calibration`). Keeping ops in float is TFLite's documented selective
    quantisation (dequantise -> op -> quantise). The float nodes are named as in the converter's
    own float model of the SavedModel: onnx2tf's .tflite files name the outputs differently.
    """
    import tensorflow as tf

    images = np.load(calibration).astype(np.float32)

    def representative():
        for image in images:
            yield [image[None]]

    graph = TFLiteGraph(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())
    float_nodes = float_islands(graph, float_ops) + output_tails(graph)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(float_ops), denylisted_nodes=float_nodes))
    dest.write_bytes(debugger.get_nondebug_quantized_model())


class TFLiteGraph:
    """A .tflite model's data flow: ops in execution order, each op's producer, tensor names."""

    def __init__(self, model_content: bytes):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=model_content)
        self.names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
        self.ops = interpreter._get_ops_details()
        self.producer = {int(t): op for op in self.ops for t in op["outputs"]}
        self.consumers: dict[int, list[dict]] = {}
        for op in self.ops:
            for t in op["inputs"]:
                self.consumers.setdefault(int(t), []).append(op)
        self.outputs = [int(d["index"]) for d in interpreter.get_output_details()]

    def name(self, op: dict) -> str:
        return self.names[int(op["outputs"][0])]


COMPUTE_OPS = ("BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")   # where int8 pays: they bound a float island


def float_islands(graph: TFLiteGraph, op_types: list[str]) -> list[str]:
    """Output tensor names of every op connected to an `op_types` op without crossing a weighted op
    (convolution, fully connected): the whole region around it, in float, as one island.

    Why (EfficientViT's linear attention, v4): out = (q k^T v) / (q k^T 1 + eps). The int8 DIV
    kernel rejects a divisor that quantises to its zero point, which happens wherever ReLU zeroes a
    query (docs/TOOLCHAIN.md), so DIV must run in float. What surrounds it must too, for accuracy
    and for speed:
    - timm's form takes numerator and denominator from one matmul (v padded with ones), so they
      share one int8 scale sized for the numerator (~10^4 on v4): with the DIV alone in float, PTQ
      drifted depth |d - d_float| / d_float median / p95 6.1% / 25% and segmentation agreement fell
      to 88.1% (32 validation images).
    - XNNPACK runs neither int8 BATCH_MATMUL nor int8 RELU: as one-op models on 2 threads, v4's 21
      int8 BATCH_MATMULs took 1063 us against 185 us in float, its 14 int8 RELUs 652 us against 24.
      With only the DIV and its operands' chains in float, v4's int8 file ran 1.06x its fp32 one;
      with the deploy form's separate matmuls and only the DIVs in float, 0.98x.
    So everything between the attention's qkv convolutions and its output projection runs in float,
    with QUANTIZE/DEQUANTIZE only at its edges (v4: 115 float ops, 15 + 37 at the edges of 7
    attentions and 2 output tails): int8 1.96x faster than fp32. MobileNetV3 students have no DIV.
    """
    keep: list[str] = []
    pending = [op for op in graph.ops if op["op_name"] in op_types]
    while pending:
        op = pending.pop()
        if op["op_name"] in WEIGHTED_OPS or graph.name(op) in keep:
            continue
        keep.append(graph.name(op))
        pending += [graph.producer[int(t)] for t in op["inputs"] if int(t) in graph.producer]
        pending += [c for t in op["outputs"] for c in graph.consumers.get(int(t), [])]
    return keep


def output_tails(graph: TFLiteGraph) -> list[str]:
    """Output tensor names of the ops between each graph output and the last compute op before it
    (the heads' final upsampling and the depth EXP), which an int8 file runs in float.

    Why: XNNPACK's int8 bilinear resize is slower than its float one on these tensors (1 and 13
    channels at full resolution; measured 43 vs 24 us and 63 vs 45 us on 2 threads), and requantising
    the full-resolution outputs only loses precision. In float, the int8 part ends at the heads'
    stride-4 convolutions: log-depth (uniform relative precision over the depth range) and logits.
    """
    tails: list[str] = []
    pending = list(graph.outputs)
    while pending:
        source = graph.producer.get(pending.pop())
        if source is None or source["op_name"] in COMPUTE_OPS or graph.name(source) in tails:
            continue
        tails.append(graph.name(source))
        pending += [int(t) for t in source["inputs"]]
    return tails


def finish(path: Path, metadata: dict) -> None:
    """Name the outputs, store the export metadata in the file, and share identical zero points.

    onnx2tf names outputs `Identity`, `PartitionedCall:1`, ... in an order that differs between
    float and int8 files; the depth output is the one with a single channel (NHWC).
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    for index in graph.outputs:
        tensor = graph.tensors[index]
        tensor.name = (DEPTH if int(tensor.shape[-1]) == 1 else SEG).encode()
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    path.write_bytes(serialize_sharing_zero_points(model))


def serialize_sharing_zero_points(model) -> bytes:
    """The flatbuffer with each distinct int64 vector stored once.

    TFLite stores per-channel quantisation as a float32 scale and an int64 zero point per output
    channel, for every weight and bias tensor; symmetric weights' zero points are all 0, so the
    vectors repeat. MobileNetV3's depthwise convs have only 9-25 weights per channel, which makes
    these repeated 8-byte zeros ~5% of an int8 file. Flatbuffers allow several tables to point
    at one vector, and TFLite reads them through offsets, so the file's meaning is unchanged
    (the int8 file is checked against PyTorch right after).
    """
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, values):
            if values.dtype != np.int64:
                return super().CreateNumpyVector(values)
            key = (values.shape, values.tobytes())
            if key not in self.shared:
                self.shared[key] = super().CreateNumpyVector(values)
            return self.shared[key]

    builder = SharingBuilder(1024)
    builder.shared = {}
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(path: str | Path) -> dict:
    """The metadata `embed_metadata` stored (for tests and tools; needs TensorFlow)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    raise KeyError(f"{path} has no {METADATA_NAME} metadata")


def op_precision(path: Path) -> dict:
    """Operators by output dtype, which kinds compute in float, and every op type with its count:
    proves an int8 file is int8 and shows what XNNPACK is given."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    counts: dict[str, int] = {}
    float_ops: set[str] = set()
    types: dict[str, int] = {}
    for op in interpreter._get_ops_details():
        types[op["op_name"]] = types.get(op["op_name"], 0) + 1
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") or not len(op["outputs"]):
            continue
        kind = dtypes.get(int(op["outputs"][0]), "unknown")
        counts[kind] = counts.get(kind, 0) + 1
        if kind.startswith("float"):
            float_ops.add(op["op_name"])
    return {**counts, "float_ops": sorted(float_ops), "op_types": dict(sorted(types.items()))}


def write_onnx2tf_sample(job: Job, dest: Path) -> None:
    """onnx2tf loads this file for every RGB model, even a float-only conversion, and downloads
    it when absent: the calibration set's version if there is one, else the check images."""
    if job.calibration.get("onnx2tf_sample"):
        shutil.copyfile(job.calibration["onnx2tf_sample"], dest)
        return
    images = np.load(job.check["inputs"]) if job.check else np.full((1, 3, 128, 128), 0.5, np.float32)
    rows = np.linspace(0, images.shape[2] - 1, 128).round().astype(int)
    cols = np.linspace(0, images.shape[3] - 1, 128).round().astype(int)
    sample = images[np.arange(20) % len(images)][:, :, rows][:, :, :, cols].transpose(0, 2, 3, 1)
    np.save(dest, np.ascontiguousarray(sample, np.float32))


def convert(job: Job) -> None:
    work = Path(job.work_dir)
    os.chdir(work)  # onnx2tf reads its sample-data file from the working directory
    write_onnx2tf_sample(job, work / ONNX2TF_SAMPLE)
    artefacts = []
    by_source: dict[str, list[str]] = {}
    for precision in job.precisions:
        by_source.setdefault(source_for(precision), []).append(precision)
    for source, precisions in by_source.items():
        start = time.time()
        simple = simplified(job.sources[source], work / f"{source}.sim.onnx")
        onnx_path = work / f"{source}.xnnpack.onnx"
        rewrites = shape_for_xnnpack(simple, onnx_path, int8=source == "int8")
        tf_dir = work / f"tf_{source}"
        run_onnx2tf(onnx_path, tf_dir)
        for precision in precisions:
            if precision == "int8":
                produced = tf_dir / f"{onnx_path.stem}_int8.tflite"
                quantize_int8(tf_dir, job.calibration["nhwc"], produced, job.float_ops)
            else:
                produced = tf_dir / f"{onnx_path.stem}_{SUFFIX[precision]}.tflite"
            finish(produced, {**job.metadata, "precision": precision})
            model = LiteRTRunner(produced, job.threads)
            entry = {"path": f"{job.stem}_{precision}.tflite", "format": "tflite", "precision": precision,
                     "source": source, "check": check_against_reference(job, precision, model),
                     "ops_by_dtype": op_precision(produced), "graph_rewrites": rewrites}
            publish(job, produced, entry["path"])
            artefacts.append(entry)
            print(f"tflite {precision}: {entry['path']} ({time.time() - start:.1f} s)", flush=True)
    write_result(job, artefacts, tool_versions("onnx2tf", "tensorflow", "onnx", "onnxsim", "ai-edge-litert", "numpy"))


if __name__ == "__main__":
    main(convert)
