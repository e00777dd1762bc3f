"""Calibration images for post-training int8 quantisation.

`select_calibration(dataset, size)` picks images stratified by median depth and covering every
class (calibration.select explains why and how); `write_calibration(dataset, selection, out_dir)`
writes them in the forms the converters read (targets/job.py) plus the sample file onnx2tf
loads from its working directory (calibration.store).
"""
from core.lazy import lazy_exports

_HOMES = {"CANDIDATES": "select", "PRESENCE": "select", "Selection": "select", "select_calibration": "select",
          "check_calibration_size": "select",
          "ONNX2TF_SAMPLE": "store", "write_calibration": "store"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
