"""TFLite converter process: ONNX -> onnxsim -> onnx2tf -> .tflite, run by the LiteRT interpreter.

`python -m targets.tflite JOB.json` (written by `python -m quant.export`). Imports TensorFlow,
onnx2tf and ai-edge-litert, never torch (TOOLCHAIN.md: the two segfault in one process).

Why onnx2tf and not litert-torch: litert-torch's PT2E QAT path fails with torch 2.14 + torchao
0.18 (TOOLCHAIN.md), and its float path would still leave int8 to a second toolchain; onnx2tf
takes the ONNX graph the ONNX target already exports and produces every precision in one pass.

Precisions:
- fp32: `*_float32.tflite`; fp16: `*_float16.tflite` (fp16 weights, dequantised at load by the
  runtime; computation stays fp32 on CPUs without fp16 arithmetic).
- int8: `*_integer_quant.tflite`: full-integer kernels (TFLITE_BUILTINS_INT8: per-channel symmetric
  int8 weights, per-tensor asymmetric int8 activations) with float32 input and output, so the
  artefact takes and returns the same tensors as the float ones. Activation ranges are calibrated
  on the job's calibration images (min/max, the scheme QAT simulates in quant/qat.py).

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

from targets.job import DEPTH, INPUT_NAME, SEG, Job, check_against_reference, main, source_for, tool_versions, write_result

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SUFFIX = {"fp32": "float32", "fp16": "float16", "int8": "integer_quant"}
METADATA_NAME = "densekit"


def simplify(onnx_path: str, out_path: Path) -> Path:
    """onnx-simplifier folds the Shape->Resize chains onnx2tf cannot convert (TOOLCHAIN.md)."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(onnx_path))
    if not ok:
        raise RuntimeError(f"onnx-simplifier could not validate the simplified {onnx_path}")
    onnx.save(model, out_path)
    return out_path


def run_onnx2tf(onnx_path: Path, out_dir: Path, calibration: str | None) -> None:
    import onnx2tf

    options = {}
    if calibration:
        zeros, ones = np.zeros((1, 1, 1, 3), np.float32), np.ones((1, 1, 1, 3), np.float32)
        # Inputs are already RGB in [0, 1] (normalisation is inside the model): mean 0, std 1.
        options = {"output_integer_quantized_tflite": True,
                   "custom_input_op_name_np_data_path": [[INPUT_NAME, calibration, zeros, ones]]}
    onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir),
                    non_verbose=True, **options)


def finish(path: Path, metadata: dict) -> None:
    """Name the outputs and store the export metadata in the .tflite file itself.

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
    flatbuffer_utils.write_model(model, str(path))


def read_metadata(path: str | Path) -> dict:
    """The metadata `embed_metadata` stored (for tests and tools; needs TensorFlow)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    raise KeyError(f"{path} has no {METADATA_NAME} metadata")


class LiteRTModel:
    """A .tflite file behind `__call__(images NCHW float32) -> (depth NCHW, seg NCHW)`."""

    def __init__(self, path: str | Path, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = {d["name"]: d for d in self.interpreter.get_output_details()}

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        depth, seg = [], []
        for image in images:  # the artefact has batch 1
            self.interpreter.set_tensor(self.input["index"], image.transpose(1, 2, 0)[None].astype(np.float32))
            self.interpreter.invoke()
            out = {name: self.interpreter.get_tensor(d["index"]) for name, d in self.outputs.items()}
            depth.append(out[DEPTH].transpose(0, 3, 1, 2))
            seg.append(out[SEG].transpose(0, 3, 1, 2))
        return np.concatenate(depth), np.concatenate(seg)


def op_precision(path: Path) -> dict:
    """Counts of operators by output dtype: proves an int8 file computes in int8."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    counts: dict[str, int] = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") or not len(op["outputs"]):
            continue
        kind = dtypes.get(int(op["outputs"][0]), "unknown")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def convert(job: Job) -> None:
    work, out = Path(job.work_dir), Path(job.out_dir)
    os.chdir(work)  # onnx2tf reads its sample-data file from the working directory
    if job.calibration.get("onnx2tf_sample"):
        shutil.copyfile(job.calibration["onnx2tf_sample"], work / ONNX2TF_SAMPLE)
    artefacts = []
    by_source: dict[str, list[str]] = {}
    for precision in job.precisions:
        by_source.setdefault(source_for(precision), []).append(precision)
    for source, precisions in by_source.items():
        start = time.time()
        onnx_path = simplify(job.sources[source], work / f"{source}.sim.onnx")
        tf_dir = work / f"tf_{source}"
        run_onnx2tf(onnx_path, tf_dir, job.calibration["nhwc"] if "int8" in precisions else None)
        for precision in precisions:
            produced = tf_dir / f"{onnx_path.stem}_{SUFFIX[precision]}.tflite"
            finish(produced, {**job.metadata, "precision": precision})
            model = LiteRTModel(produced, job.threads)
            entry = {"path": f"{job.stem}_{precision}.tflite", "format": "tflite", "precision": precision,
                     "source": source, "check": check_against_reference(job, precision, model),
                     "ops_by_dtype": op_precision(produced)}
            tmp = out / f".{entry['path']}.tmp-{os.getpid()}"
            shutil.copyfile(produced, tmp)
            os.replace(tmp, out / entry["path"])
            artefacts.append(entry)
            print(f"tflite {precision}: {entry['path']} ({time.time() - start:.1f} s)", flush=True)
    write_result(job, artefacts, tool_versions("onnx2tf", "tensorflow", "onnx", "onnxsim", "ai-edge-litert", "numpy"))


if __name__ == "__main__":
    main(convert)
