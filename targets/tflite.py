"""TFLite converter process: ONNX -> onnxsim -> XNNPACK rewrites -> onnx2tf -> .tflite, run by LiteRT.

`python -m targets.tflite JOB.json` (written by `python -m quant.export`). Imports TensorFlow,
onnx2tf and ai-edge-litert, never torch (docs/TOOLCHAIN.md: the two segfault in one process).

The default TFLite converter; `--converter litert-torch` (targets/litert.py) is the other. Measured
on v3 and v4 (README, "TFLite: two converters"), both give one XNNPACK partition and the same
int8 speed; this one's int8 files drift a little less from the float model and convert in about
half the time.

Precisions:
- fp32: `<stem>_fp32.tflite`; fp16: `<stem>_fp16.tflite` (onnx2tf's `*_float32` / `*_float16`
  files, renamed; fp16 weights, dequantised at load by the runtime; computation stays fp32 on CPUs
  without fp16 arithmetic).
- int8: TFLite's converter on onnx2tf's SavedModel with the job's calibration images:
  full-integer kernels (per-channel symmetric int8 weights, per-tensor asymmetric int8
  activations calibrated by min/max, the scheme QAT simulates in quant/qat.py) with float32
  input and output, so the artefact takes and returns the same tensors as the float ones. Only
  the input stem through the job's `float_stem` convolutions (`input_stem`), the output tails
  (`output_tails`), the job's `float_ops` (DIV by default) and the ops around them up to the
  nearest convolutions (`float_islands`) stay float; `ops_by_dtype` in the result shows
  what computes in int8, and every op type.

Before onnx2tf, `targets.litert_graph` rewrites the ONNX graph into ops XNNPACK runs fast (the
same function; `graph_rewrites` in the result says what it changed).

onnx2tf 1.x downloads a sample-image file from the internet for 4-D RGB inputs unless
`calibration_image_sample_data_20x128x128x3_float32.npy` sits in the working directory: the
parent writes it from our own calibration images and this process runs there.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from targets.job import Job, main, precisions_by_source, tool_versions, write_result
from targets.litert_graph import shape_for_xnnpack
from targets.onnx import simplified  # folds the Shape->Resize chains onnx2tf cannot convert
from targets.tflite_file import TFLiteGraph, deliver, float_nodes

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SUFFIX = {"fp32": "float32", "fp16": "float16"}


def run_onnx2tf(onnx_path: Path, out_dir: Path) -> None:
    """Float conversion: writes a SavedModel and the fp32 / fp16 .tflite files into `out_dir`."""
    import onnx2tf

    # Signature defs: without them onnx2tf cannot write the SavedModel of graphs whose ONNX op
    # names contain characters TensorFlow rejects (EfficientViT's), and int8 needs that SavedModel.
    # not_use_onnxsim: the graph is simplified already (`simplified`); onnx2tf would run the `onnxsim`
    # command on it again, in place, only where that command is on PATH (an activated venv), and
    # say nothing where it is not: the same export made other files in another shell.
    onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir),
                    output_signaturedefs=True, non_verbose=True, not_use_onnxsim=True)


def quantize_int8(saved_model: Path, calibration: str, dest: Path, float_ops: list[str], stem_layers: int) -> None:
    """Full-integer int8 from onnx2tf's SavedModel; the input stem within its first `stem_layers`
    weighted layers (`input_stem`), `float_ops` types, the ops around them up to the nearest
    convolutions (`float_islands`) and the output tails (`output_tails`) stay float.

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
    in_float = float_nodes(graph, float_ops, stem_layers)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(float_ops), denylisted_nodes=in_float))
    dest.write_bytes(debugger.get_nondebug_quantized_model())


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
    for source, precisions in precisions_by_source(job).items():
        start = time.time()
        simple = simplified(job.sources[source], work / f"{source}.sim.onnx")
        onnx_path = work / f"{source}.xnnpack.onnx"
        rewrites = shape_for_xnnpack(simple, onnx_path, int8=source == "int8")
        tf_dir = work / f"tf_{source}"
        run_onnx2tf(onnx_path, tf_dir)
        for precision in precisions:
            if precision == "int8":
                produced = tf_dir / f"{onnx_path.stem}_int8.tflite"
                quantize_int8(tf_dir, job.calibration["nhwc"], produced, job.float_ops, job.float_stem)
            else:
                produced = tf_dir / f"{onnx_path.stem}_{SUFFIX[precision]}.tflite"
            artefacts.append(deliver(job, produced, precision, source, start, converter="onnx2tf",
                                     graph_rewrites=rewrites))
            start = time.time()   # the next file's time is its own, the shared conversion counted once
    write_result(job, artefacts, tool_versions("onnx2tf", "tensorflow", "onnx", "onnxsim", "ai-edge-litert", "numpy"))


if __name__ == "__main__":
    main(convert, toolchain=("onnx2tf", "tensorflow"))
