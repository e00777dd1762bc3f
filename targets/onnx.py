"""ONNX converter process: the parent's ONNX graph as fp32, and int8 QDQ via onnxruntime.quantization.

`python -m targets.onnx JOB.json`. Imports onnx and onnxruntime only.

- fp32: the exported graph, simplified (onnxsim folds constant chains), with metadata_props.
- int8: static QDQ quantisation (QuantizeLinear/DequantizeLinear around each op, which
  onnxruntime fuses into int8 kernels): per-channel symmetric int8 weights, per-tensor asymmetric
  int8 activations with min/max ranges from the job's calibration images — the same scheme as
  TFLite's int8 and as quant/qat.py's fake quantisation, so a QAT model converts as trained.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from targets.job import (INPUT_NAME, Job, check_against_reference, main, publish, source_for, tool_versions,
                         write_result)


class OrtModel:
    """An .onnx file behind `__call__(images NCHW float32) -> (depth, seg)`."""

    def __init__(self, path: str | Path, threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = [self.session.run(["depth", "seg"], {INPUT_NAME: image[None].astype(np.float32)}) for image in images]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def simplified(source: str, dest: Path) -> Path:
    """onnx-simplifier: folds constant chains (and the Shape->Resize chains onnx2tf cannot convert)."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(source))
    if not ok:
        raise RuntimeError(f"onnx-simplifier could not validate the simplified {source}")
    onnx.save(model, dest)
    return dest


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over an (N, 3, H, W) array, one image per call."""

    def __init__(self, path: str):
        self.images = np.load(path).astype(np.float32)
        self.position = 0

    def get_next(self):
        if self.position >= len(self.images):
            return None
        self.position += 1
        return {INPUT_NAME: self.images[self.position - 1][None]}

    def rewind(self):
        self.position = 0


def quantize_int8(source: Path, dest: Path, calibration: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name(source.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(dest), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def set_metadata(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    entries = {"densekit": json.dumps(metadata, sort_keys=True)}
    entries.update({k: str(v) for k, v in metadata.items() if isinstance(v, (str, int, float))})
    del model.metadata_props[:]
    for key, value in sorted(entries.items()):
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "densekit"
    onnx.save(model, str(path))


def convert(job: Job) -> None:
    work = Path(job.work_dir)
    artefacts = []
    for precision in job.precisions:
        start = time.time()
        source = source_for(precision)
        produced = simplified(job.sources[source], work / f"{source}.sim.onnx")
        if precision == "int8":
            produced, float_graph = work / f"{source}.int8.onnx", produced
            quantize_int8(float_graph, produced, job.calibration["nchw"])
        set_metadata(produced, {**job.metadata, "precision": precision})
        entry = {"path": f"{job.stem}_{precision}.onnx", "format": "onnx", "precision": precision, "source": source,
                 "check": check_against_reference(job, precision, OrtModel(produced, job.threads))}
        publish(job, produced, entry["path"])
        artefacts.append(entry)
        print(f"onnx {precision}: {entry['path']} ({time.time() - start:.1f} s)", flush=True)
    write_result(job, artefacts, tool_versions("onnx", "onnxruntime", "onnxsim", "numpy"))


if __name__ == "__main__":
    main(convert)
