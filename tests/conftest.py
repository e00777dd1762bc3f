"""Shared fixtures: tiny real artefacts, made once per session by the real converter processes.

`tiny_artefacts` converts a randomly initialised tiny student (mobilenetv3_small_050, 16-channel
decoder, 64x96 input) to TFLite fp32 + int8 and ONNX fp32 + int8 (int8 by PTQ on random images),
exactly as `quant.export` does, and returns {"tflite_fp32": Path, "tflite_int8": ..., "onnx_fp32":
..., "onnx_int8": ..., "inputs": Path to (4, 3, 64, 96) float32 [0, 1] images, "depth"/"seg":
the PyTorch model's outputs on them, "student": the PyTorch student itself}. Tests that run, bench
or validate an artefact start from these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

HEIGHT, WIDTH = 64, 96


def _job(fmt, precisions, onnx_path, out, work, calibration, check):
    from targets.job import Job
    return Job(format=fmt, precisions=precisions, sources={"float": str(onnx_path), "int8": str(onnx_path)},
               out_dir=str(out), work_dir=str(work), stem="tiny", input_shape=[1, 3, HEIGHT, WIDTH],
               metadata={"producer": "densekit", "recipe": "test", "depth_units": "metres"},
               calibration=calibration, check=check, threads=2)


@pytest.fixture(scope="session")
def tiny_artefacts(tmp_path_factory) -> dict[str, Path]:
    from distill.students import build_student
    from quant import artefacts
    from targets import deploy

    root = tmp_path_factory.mktemp("tiny_artefacts")
    torch.manual_seed(0)
    student = build_student("mobilenetv3_small_050", decoder_channels=16).eval()
    onnx_path, _ = deploy.export_onnx(student, root / "float.onnx", HEIGHT, WIDTH)

    rng = np.random.default_rng(0)
    calib = rng.random((8, 3, HEIGHT, WIDTH), dtype=np.float32)
    inputs = rng.random((4, 3, HEIGHT, WIDTH), dtype=np.float32)
    np.save(root / "nchw.npy", calib)
    np.save(root / "nhwc.npy", np.ascontiguousarray(calib.transpose(0, 2, 3, 1)))
    np.save(root / "inputs.npy", inputs)
    depth, seg = deploy.reference_outputs(student, torch.from_numpy(inputs))
    np.save(root / "float_depth.npy", depth.numpy())
    np.save(root / "float_seg.npy", seg.numpy())
    calibration = {"nchw": str(root / "nchw.npy"), "nhwc": str(root / "nhwc.npy")}
    check = {"inputs": str(root / "inputs.npy"), "float_depth": str(root / "float_depth.npy"),
             "float_seg": str(root / "float_seg.npy"), "int8_depth": str(root / "float_depth.npy"),
             "int8_seg": str(root / "float_seg.npy")}

    found = {"inputs": root / "inputs.npy", "depth": root / "float_depth.npy", "seg": root / "float_seg.npy"}
    for fmt in ("tflite", "onnx"):
        out, work = root / fmt, root / f"{fmt}_work"
        out.mkdir()
        work.mkdir()
        job = _job(fmt, ["fp32", "int8"], onnx_path, out, work, calibration, check)
        artefacts.run_converter(job, work, log=lambda line: None)
        for precision in ("fp32", "int8"):
            found[f"{fmt}_{precision}"] = out / f"tiny_{precision}.{fmt}"
    found["student"] = student
    return found
