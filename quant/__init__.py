"""Compression and export: pruning, QAT / PTQ, conversion through targets/, drift validation and bench.

Python API (keyword-only options; names import on first use):

    from quant import export_run, validate_artefact
    result = export_run("runs/v3-...", target="tflite", qat_steps=0)   # -> ExportResult (int8 by PTQ)
    report = validate_artefact(result.path / "v3-..._int8.tflite", reference=student, data=val_dataset)
"""
from core.lazy import lazy_exports

_HOMES = {"export_run": "export", "ExportOptions": "export", "ExportResult": "export",
          "validate_artefact": "validate", "DriftReport": "validate", "ValidationData": "validate"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
