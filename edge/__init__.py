"""Running artefacts in their own runtimes: runners (LiteRT, ONNX Runtime, Core ML and its MIL
reference executor), `python -m edge.run`, latency (`python -m edge.bench`) and the device kit.

Python API (names import on first use; nothing here imports torch or TensorFlow up front):

    from edge import bench_side_by_side, run_artefact
    result = bench_side_by_side(["m_fp32.tflite", "m_int8.tflite"], threads=2, runs=200)
"""
from core.lazy import lazy_exports

_HOMES = {"run_artefact": "run", "open_runner": "runners", "bench_artefact": "bench",
          "bench_side_by_side": "bench"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
