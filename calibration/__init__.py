"""Calibration images for post-training int8 quantisation.

`select_calibration(dataset, size)` picks images stratified by median depth and covering every
class (calibration.select explains why and how); `write_calibration(dataset, selection, out_dir)`
writes them in the forms the converters read (targets/job.py) plus the sample file onnx2tf
loads from its working directory (calibration.store).
"""
from .select import PRESENCE, Selection, select_calibration
from .store import ONNX2TF_SAMPLE, write_calibration

__all__ = ["ONNX2TF_SAMPLE", "PRESENCE", "Selection", "select_calibration", "write_calibration"]
