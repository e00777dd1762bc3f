"""The training stage: the loop (`train`), its objective, supervision, pre-flight, evaluation and report,
and finished runs read back (`find_run`, `load_run`).

Only the commands (`distill.run`, `distill.evaluate`, `distill.ablate`, `distill.cache_teacher`),
the API (`distill.train_recipe`, `distill.evaluate_run`) and `quant/` (whose fine-tunes reuse the
objective and supervision) import this package; `targets/`, `edge/` and `calibration/` never do
(tests/test_layering.py).
Names resolve on first use, so an error class does not import the whole loop (torch, timm).
"""
from core.lazy import lazy_exports

_HOMES = {"train": "loop", "ADAPTED_TO_DATA": "loop", "Objective": "objective", "evaluate": "evaluation", "make_loader": "evaluation",
          "seg_weights_for": "objective", "PreflightError": "preflight", "Supervision": "supervision", "SupervisionError": "supervision",
          "supervision_for": "supervision", "find_run": "runs", "load_run": "runs", "LoadedRun": "runs",
          "RunNotFoundError": "runs", "evaluate_run": "evaluation"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
