"""Write a `Selection` as the converters' calibration files (targets/job.py), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.io import atomic_path
from distill.data.transforms import unit_rgb

from .select import Selection

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _save(path: Path, array: np.ndarray) -> str:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save(path) would append ".npy"
        np.save(f, array)
    return str(path)


def write_calibration(dataset, selection: Selection, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write under `out_dir` (each file atomically) and return {"nhwc", "nchw", "onnx2tf_sample"}.

    nhwc.npy (N, H, W, 3), nchw.npy (N, 3, H, W): float32 RGB in [0, 1], the dataset's images
    de-normalised (image * std + mean, clipped); every exported model normalises inside.
    ONNX2TF_SAMPLE, which onnx2tf 1.x loads from its working directory instead of downloading it
    (docs/TOOLCHAIN.md): (20, 128, 128, 3) float32, the first 20 selected images (repeated cyclically
    if fewer) resized bilinearly with antialiasing.
    """
    if not selection.indices:
        raise ValueError("the selection is empty; run select_calibration with size >= 1.")
    nchw = torch.stack([unit_rgb(torch.as_tensor(dataset[i]["image"]).float()) for i in selection.indices])
    first = nchw[[k % len(nchw) for k in range(20)]]
    sample = F.interpolate(first, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
    out = Path(out_dir)
    return {
        "nhwc": _save(out / "nhwc.npy", np.ascontiguousarray(nchw.permute(0, 2, 3, 1).numpy(), np.float32)),
        "nchw": _save(out / "nchw.npy", np.ascontiguousarray(nchw.numpy(), np.float32)),
        "onnx2tf_sample": _save(out / ONNX2TF_SAMPLE, np.ascontiguousarray(
            sample.clamp(0, 1).permute(0, 2, 3, 1).numpy(), np.float32)),
    }
