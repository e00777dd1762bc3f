"""Recipe registry: `get_recipe("v3")` returns the V3 dataclass with its defaults.

A recipe is a frozen dataclass (see `base.Recipe`); a version is a subclass with other defaults
and a docstring that says why it exists. `dataclasses.replace(V3(), ...)` composes new ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.config import ConfigError, from_dict
from core.registry import Registry
from distill.recipes.base import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    Recipe,
    TeacherConfig,
    TrainConfig,
    check_values,
    renders,
    resolve_for_device,
)
from distill.recipes.history import V1, V2, V3, V4, V5, V6

RECIPES: Registry = Registry("recipe")
DEFAULT_RECIPE = "v3"   # whose newest run the commands that read runs take when none is named
for _cls in (V1, V2, V3, V4, V5, V6):
    RECIPES.register(_cls.name, _cls)


def get_recipe(name: str) -> Recipe:
    return RECIPES.get(name)()


# (section, key, value) of defaults that changed: a run saved before the key existed trained with `value`.
LEGACY_DEFAULTS = (("loss", "seg_balance", 0.0), ("model", "output_stride", 4), ("model", "separable", False),
                   ("train", "channels_last", False), ("loss", "berhu_residual", "absolute"),
                   ("model", "fine_convs", "separable"), ("loss", "aux_weight", 0.0), ("loss", "normal_weight", 0.0),
                   ("train", "optimizer", "adamw"), ("train", "muon_rms", 0.2), ("train", "shuffle_stride", 1))


def load_saved(run_dir: str | Path, cls: type[Recipe] | None = None) -> Recipe:
    """The resolved recipe a run saved in its config.json, as `cls` (default: the class of the
    recipe it names)."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as a run's config ({type(exc).__name__}: {exc}); restore it from "
                          f"a copy, or start a new run") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("name"), str):
        raise ConfigError(f"{path} is not a run's config (no recipe name); restore it from a copy, or start a new run")
    for key in ("device", "processes"):   # recorded next to the recipe, not recipe fields
        saved.pop(key, None)
    if isinstance(saved.get("teacher"), str):   # runs before the teacher section existed
        saved["teacher"] = {"name": saved["teacher"]}
    for section, key, before in LEGACY_DEFAULTS:   # a default changed: older runs trained with the old value
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(key, before)
    try:
        return from_dict(cls or RECIPES.get(saved["name"]), saved)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; restore it from a copy, or start a new run") from None


def recipe_summary(name: str) -> str:
    """First docstring line of a recipe, for `--list`."""
    return (RECIPES.get(name).__doc__ or "").strip().splitlines()[0]


__all__ = ["RECIPES", "DEFAULT_RECIPE", "get_recipe", "load_saved", "recipe_summary", "Recipe", "DataConfig",
           "ModelConfig", "LossConfig", "TrainConfig", "EvalConfig", "TeacherConfig", "DistillConfig", "check_values",
           "renders", "resolve_for_device"]
