"""A training run read back: its directory, its recipe, its best weights.

`find_run(None)` picks the newest v3 run under `runs/` (`recipe="v4"`: the newest v4 run);
`load_run(dir)` rebuilds the student from the saved config and `best.safetensors` (the last
checkpoint if no best was kept), checked against the sha256 the run recorded, and keeps that
sha256: every export and evaluation names its weights.
The training stage writes runs, so it reads them back; `distill.evaluate` and `quant.export` use this.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core import io
from core.io import home_path
from core.weights import checked_checkpoint, latest_checkpoint, load_state, load_weights
from distill.data.classes import NYU13_NAMES
from distill.recipes import DEFAULT_RECIPE, RECIPES, Recipe, load_saved
from distill.students import MultiTaskStudent, build_student, load_weights_into, shipped_state

RUN_NAME = re.compile(r"(?P<recipe>.+)-\d{8}T\d{6}Z(-\d+)?")   # distill.training.loop.new_run_dir's names


class RunNotFoundError(FileNotFoundError):
    """No usable training run where one was asked for (exit status 2)."""
    exit_code = 2


def find_run(run: str | Path | None, runs_dir: str | Path = "runs", recipe: str | None = None, *,
             flag: str = "--run") -> Path:
    """`run` if given (checked; an unfinished run exports its best weights so far), else the newest
    finished `<recipe>-*` run under `runs_dir` (one with summary.json and weights; recipe None:
    DEFAULT_RECIPE). A recipe named beside a run must be the run's. `flag` is how the command's
    user passes a run, for the error."""
    if recipe is not None:
        RECIPES.get(recipe)   # a misspelt recipe names the valid ones, not "no run"
    if run:
        path = home_path(run)   # a shell leaves "--run=~/..." unexpanded
        if not path.exists():
            raise RunNotFoundError(f"{flag} {run}: it does not exist; pass a training run directory "
                                   f"(runs/<recipe>-<time>) made by python -m distill.run")
        if not (path / "config.json").is_file():
            raise RunNotFoundError(f"{flag} {run}: no config.json there; pass a training run directory "
                                   f"(runs/<recipe>-<time>) made by python -m distill.run")
        trained = recorded_recipe(path) if recipe is not None else None
        if trained is not None and trained != recipe:
            raise RunNotFoundError(f"{run} is a {trained} run, but the recipe asked for is {recipe} (--recipe, or "
                                   f"recipe= in Python): drop the recipe, or name {trained}")
        return path
    recipe, folder = recipe or DEFAULT_RECIPE, home_path(runs_dir)
    if folder.is_file():
        raise RunNotFoundError(f"--runs-dir {runs_dir} is a file; give the folder python -m distill.run wrote its "
                               f"runs to (runs/ by default, out_dir= when training)")
    found = folder.glob(f"{recipe}-*")
    runs = sorted(p for p in found if run_recipe(p) == recipe)   # sort by start time
    finished = newest_last(p for p in runs if is_finished(p))
    if not finished:
        started = [p for p in runs if (p / "config.json").is_file()]
        resumable = [p.name for p in started if latest_checkpoint(p / "checkpoints") is not None]
        stopped = [p.name for p in started if p.name not in resumable]   # refused or killed in their first epoch
        name_one = f"{flag} <run dir>" if flag.startswith("-") else f"the run directory as {flag}"
        others = other_recipes_finished(folder, recipe)
        raise RunNotFoundError(
            f"no finished {recipe} run under {folder.resolve()}"
            + (f" (unfinished: {', '.join(resumable[-3:])}: resume one with python -m distill.run {recipe} "
               f"resume=<run dir>, or use its best weights so far: pass {name_one})" if resumable else "")
            + (f" ({', '.join(stopped[-3:])} stopped before their first checkpoint: nothing to resume or use)"
               if stopped else "")
            + (f"; finished runs of {', '.join(others)} are there: pick that recipe with --recipe "
               f"{others[0]} (recipe= in Python)" if others else "")
            + f"; train one with `python -m distill.run {recipe}` (about 20 minutes on a 2-core laptop CPU), "
            f"or pass {name_one}")
    return finished[-1]


def recorded_recipe(run_dir: Path) -> str | None:
    """The recipe name in a run's config.json; None where it cannot be read (load_saved says why)."""
    try:
        name = json.loads((run_dir / "config.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and weights_file(run_dir) is not None


def newest_last(run_dirs) -> list[Path]:
    # newest = the last to finish: a folder's own mtime moves when an evaluation writes into an old run
    return sorted(run_dirs, key=lambda p: (p / "summary.json").stat().st_mtime)


def run_recipe(run_dir: Path) -> str | None:
    """The recipe in a run directory's name (`v4-20261201T000000Z`, or `-1` after it for a second run
    started in the same second), or None for a name `distill.run` does not make."""
    match = RUN_NAME.fullmatch(run_dir.name)
    return match["recipe"] if match else None


def other_recipes_finished(runs_dir: Path, recipe: str) -> list[str]:
    """The other recipes with a finished run under `runs_dir`, the most recently finished first."""
    runs = newest_last(p for p in runs_dir.glob("*-*")
                       if run_recipe(p) in RECIPES and run_recipe(p) != recipe and is_finished(p))
    return list(dict.fromkeys(run_recipe(p) for p in reversed(runs)))


def weights_file(run_dir: Path) -> Path | None:
    if (run_dir / "best.safetensors").is_file():
        return run_dir / "best.safetensors"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return ckpt / "model.safetensors" if ckpt else None


@dataclass
class LoadedRun:
    path: Path
    recipe: Recipe
    model: MultiTaskStudent          # eval mode, CPU
    weights: Path
    weights_sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def input_size(self) -> tuple[int, int]:
        return self.recipe.data.height, self.recipe.data.width


def build_from_recipe(recipe: Recipe) -> MultiTaskStudent:
    mc = recipe.model
    return build_student(mc.student, tasks=mc.tasks, num_classes=len(NYU13_NAMES),
                         decoder_channels=mc.decoder_channels, depth_activation=mc.depth_activation,
                         output_stride=mc.output_stride, separable=mc.separable, fine_convs=mc.fine_convs)


def load_run(run_dir: str | Path) -> LoadedRun:
    run_dir = Path(run_dir)
    weights = weights_file(run_dir)
    if weights is None:
        raise RunNotFoundError(f"{run_dir} has no best.safetensors and no complete checkpoint; "
                               f"let the run finish one epoch, or pick another run")
    finished = (run_dir / "summary.json").is_file()
    recorded = best_sha256(run_dir) if finished or weights.name == "best.safetensors" else None
    if weights.name != "best.safetensors" and finished and recorded:   # a finished run's kept weights are gone
        raise io.IntegrityError(f"{run_dir / 'best.safetensors'} is missing from this finished run (summary.json "
                                f"records sha256 {recorded[:12]}...); the last checkpoint may hold other weights "
                                f"than the ones its summary measured: restore the file, or pick another run")
    recipe = load_saved(run_dir)
    if weights.name == "best.safetensors":
        fix = ("the weights are corrupt or were replaced; pick another run, or train this one again"
               if finished else
               f"the run did not finish: resume it (python -m distill.run {recipe.name} resume={run_dir}), which "
               f"writes the kept weights again where its checkpoint holds them, or pick another run")
        digest = io.sha256(weights) if recorded is None else io.check_sha256(
            weights, recorded, record="its run recorded", fix=fix)
    else:   # no best kept: the last checkpoint's weights, checked against their own record
        digest = checked_checkpoint(weights.parent)[1] or io.sha256(weights)   # None: written before the record
    model = build_from_recipe(recipe)
    load_weights_into(model, shipped_state(load_weights(weights)),   # a checkpoint keeps deep supervision's heads
                      weights, fix=f"restore {run_dir / 'config.json'} and the weights as the run wrote them, "
                                   f"or pick another run")
    return LoadedRun(run_dir, recipe, model.eval(), weights, digest)


def best_sha256(run_dir: Path) -> str | None:
    """The sha256 the run recorded for best.safetensors: in summary.json, or for an unfinished run in
    its last checkpoint's state. None for runs made before this record."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        recorded = io.read_json(summary, "restore it from a copy, or evaluate the run's checkpoints again")
        return (recorded.get("best") or {}).get("sha256")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return (load_state(ckpt / "state.pt").get("progress", {}).get("best") or {}).get("sha256") if ckpt else None
