"""Training a student: domain packages (data, teachers, students, losses, metrics, recipes), the
training stage (training/) and the commands (run, evaluate, ablate, cache_teacher).

Python API (keyword-only options; names import on first use):

    from distill import evaluate_run, train_recipe
    run_dir = train_recipe("v3", overrides=["train.epochs=3"])     # -> runs/v3-<UTC time>/
    new_rooms = evaluate_run(run_dir, overrides=["data.seed=1"])   # -> {"abs_rel": ..., "miou": ...}
"""
from core.lazy import lazy_exports

_HOMES = {"train_recipe": "run", "evaluate_run": "training.evaluation", "get_recipe": "recipes", "Recipe": "recipes"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
