"""Post-training quantisation, the baseline int8 path: a representative calibration set, written in
the forms the converters read; the converters then measure min/max activation ranges on it.

`simulate` is the same PTQ in PyTorch (fake quantisation calibrated on the set, no training). QAT
starts from it, and tests use it to predict what an int8 file will do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from calibration import Selection, select_calibration, write_calibration
from core.formats import Converter
from quant import qat


@dataclass
class CalibrationSet:
    selection: Selection
    files: dict[str, str]        # targets.job calibration forms ({} when not written)
    images: torch.Tensor         # (N, 3, H, W) normalised, as the student takes them

    def batches(self, size: int = 16):
        return [self.images[i:i + size] for i in range(0, len(self.images), size)]


def calibration_set(dataset, size: int, out_dir: Path | None, *, seed: int = 0, progress: bool = True) -> CalibrationSet:
    """Select `size` images of a non-augmenting `dataset` (the draw set by `seed`) and write them
    under `out_dir` for the converters (None: only the torch simulation reads them, nothing written)."""
    selection = select_calibration(dataset, size, seed=seed, progress=progress)
    files = write_calibration(dataset, selection, out_dir) if out_dir is not None else {}
    images = torch.stack([torch.as_tensor(dataset[i]["image"]).float() for i in selection.indices])
    return CalibrationSet(selection, files, images)


def simulate(student: torch.nn.Module, calib: CalibrationSet, converter: Converter, log_depth: bool = False,
             float_stem: int = 0) -> qat.QuantStudent:
    """The int8 model PTQ produces, simulated in PyTorch: BN folded, ranges by min/max on `calib`.
    `converter`: whose int8 file (core/formats.py: its weight grid, `int8_weight_max`, and whether
    it rounds the upsampled outputs again, `int8_requantized_outputs`: onnxruntime's files do,
    TFLite's do not); `log_depth`: the int8 file quantises log-depth and runs its final EXP in float
    (qat.QuantStudent); `float_stem`: it keeps the layers within N weighted layers of the input in
    float (qat.prepare)."""
    model = qat.prepare(student, calib.images[:1], log_depth, float_stem, converter.int8_weight_max,
                        converter.int8_requantized_outputs)
    qat.calibrate(model, calib.batches())
    return model

