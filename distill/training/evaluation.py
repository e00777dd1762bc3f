"""Batches and validation: the loaders every loop uses, the metrics of summary.json, and a finished
run measured again on any validation split (`evaluate_run`, `python -m distill.evaluate`)."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from core import io
from core.config import ConfigError, apply_overrides, override_list, to_dict
from core.spaces import DepthSpace
from distill.data import build_datasets, check_sources
from distill.data.classes import IGNORE_INDEX, NYU13_NAMES
from distill.metrics import (DepthBoundaryMetrics, DepthMetrics, SegBoundaryMetrics, SegMetrics, baseline_abs_rel,
                             gap_closed)
from distill.recipes import Recipe, check_values, renders
from distill.recipes.base import SHUFFLE_STRIDE
from distill.teachers import TEACHERS, Teacher, teacher_for
from distill.training.distributed import pick_device, to_device
from distill.training.runs import load_run

TEACHER_KEYS = ("abs_rel", "rmse", "d1", "silog", "abs_rel_aligned", "dbe_acc", "dbe_comp")
FIT_KEYS = ("abs_rel", "abs_rel_aligned", "d1", "miou")   # `train_<key>`: the student on images it trained on


def make_loader(ds: Dataset, batch_size: int, *, train: bool, seed: int, workers: int,
                rank: int = 0, world: int = 1, shuffle_stride: int = SHUFFLE_STRIDE) -> DataLoader:
    """Training: shuffled as a function of (seed, epoch) only, so a resumed run sees exactly the
    batches it would have seen. torch's sampler seeds epoch e with seed + e, so seed s + 1 replayed
    seed s's batch orders one epoch earlier (what `shuffle_stride=1` still does, for runs saved
    before 2026-12-07); seed s takes s * shuffle_stride instead, and seed 0 shuffles as it did.
    Under torchrun each of `world` ranks takes every world-th index of the same permutation with `batch_size` = global batch / world, so step k's batches of all ranks
    together are the single-process run's batch k. The sampler drops the permutation's tail rather
    than padding it with repeated images, so every world size takes floor(len / global batch) steps."""
    sampler = (DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, drop_last=True,
                                  seed=seed * shuffle_stride % 2 ** 62) if train else None)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=train,
                      num_workers=workers)  # not persistent: workers must see set_epoch


def depth_meters(recipe: Recipe) -> tuple[DepthMetrics, DepthBoundaryMetrics]:
    """The depth metrics and boundary errors of the recipe's evaluation range."""
    ec = recipe.eval
    return (DepthMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop),
            DepthBoundaryMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop))


@torch.no_grad()
def evaluate(model, loader: DataLoader, device: torch.device, amp: torch.dtype | None, recipe: Recipe) -> dict:
    """Validation metrics with the keys of summary.json; the model comes back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, loader, device, amp, recipe)
    finally:
        model.train(was_training)


def _evaluate(model, loader: DataLoader, device: torch.device, amp: torch.dtype | None, recipe: Recipe) -> dict:
    depth_m, edges_m = depth_meters(recipe)
    seg_m = SegMetrics(model.num_classes, ignore_index=IGNORE_INDEX, class_names=list(NYU13_NAMES))
    seg_edges_m = SegBoundaryMetrics(ignore_index=IGNORE_INDEX)
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(batch["image"])
        if "depth" in out:
            depth_m.update(out["depth"].float(), batch["depth"], batch["valid"])
            edges_m.update(out["depth"].float(), batch["depth"], batch["valid"])
        if "seg" in out:
            labels = out["seg"].argmax(1)
            seg_m.update(labels, batch["seg"])
            seg_edges_m.update(labels, batch["seg"])
    metrics = {**depth_m.compute(), **edges_m.compute()} if "depth" in model.tasks else {}
    if "seg" in model.tasks and seg_m.labelled_pixels:   # a split without labels has no seg metrics
        metrics.update({**seg_m.compute(), **seg_edges_m.compute()})
    return metrics


@torch.no_grad()
def evaluate_teacher(teacher: Teacher, loader: DataLoader, device: torch.device, recipe: Recipe) -> dict:
    """The teacher's own depth metrics against ground truth on the validation split, as
    `teacher_<key>` for `TEACHER_KEYS`: the student's ceiling. The teacher must output metres."""
    depth_m, edges_m = depth_meters(recipe)
    for batch in loader:
        batch = to_device(batch, device)
        depth = teacher(batch).float()
        depth_m.update(depth, batch["depth"], batch["valid"])
        edges_m.update(depth, batch["depth"], batch["valid"])
    metrics = {**depth_m.compute(), **edges_m.compute()}
    return {f"teacher_{k}": metrics[k] for k in TEACHER_KEYS}


def seen_images(train_ds: Dataset, count: int) -> Dataset | None:
    """`count` evenly spaced training items as stored, without augmentation: the images the student
    fitted. None when the set has no ground-truth depth (an unlabelled image folder)."""
    if len(train_ds) == 0 or not bool(torch.as_tensor(train_ds[0]["valid"]).any()):
        return None
    plain = copy.copy(train_ds)   # the same files and decoded cache; only the flag differs
    plain.augment = False
    indices = torch.linspace(0, len(train_ds) - 1, min(count, len(train_ds))).round().long().unique()
    return Subset(plain, indices.tolist())


def evaluate_fit(model, train_ds: Dataset, count: int, batch_size: int, device: torch.device,
                 amp: torch.dtype | None, recipe: Recipe) -> dict:
    """The student's metrics on `count` of its own training images, as `train_<key>` for `FIT_KEYS`:
    beside the validation metrics, what the student fitted and how much of it carries to new
    images. {} without ground truth to measure."""
    seen = seen_images(train_ds, count)
    if seen is None:
        return {}
    loader = make_loader(seen, batch_size, train=False, seed=0, workers=0)
    metrics = evaluate(model, loader, device, amp, recipe)
    return {f"train_{k}": metrics[k] for k in FIT_KEYS if k in metrics}


def with_references(val: dict, baseline_abs_rel: float, teacher: dict) -> dict:
    """Validation metrics beside the constant predictor, the teacher and the share of the gap
    between them that the student closed."""
    out = {**val, "baseline_abs_rel": baseline_abs_rel, **teacher}
    if "abs_rel" in val and teacher.get("teacher_abs_rel") is not None:
        out["gap_closed"] = gap_closed(val["abs_rel"], baseline_abs_rel, teacher["teacher_abs_rel"])
    return out


def constant_baseline(depth: float, loader: DataLoader, recipe: Recipe) -> float:
    """AbsRel of `depth` metres everywhere (the training set's median) on the loader's images."""
    ec = recipe.eval
    return baseline_abs_rel(depth, ((b["depth"], b["valid"]) for b in loader),
                            min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop)


def teacher_reference(teacher: Teacher, val_loader: DataLoader, device: torch.device, recipe: Recipe, log) -> dict:
    """The teacher's metrics on the validation split (`eval.teacher`), or {} with the reason said:
    a teacher that does not output metres has no metric error, and a cache holds training labels only."""
    if not recipe.eval.teacher:
        return {}
    why_not = ("it outputs " + teacher.space.value + " depth" if teacher.space is not DepthSpace.METRIC else
               "teacher.cache holds training-split labels only" if recipe.teacher.cache else "")
    if why_not:
        log(f"teacher metrics: not measured ({why_not}); gap_closed needs them")
        return {}
    t0 = time.time()
    metrics = evaluate_teacher(teacher, val_loader, device, recipe)
    log(f"teacher {teacher.name} on the validation split: abs_rel {metrics['teacher_abs_rel']:.4f}, "
        f"d1 {metrics['teacher_d1']:.3f} ({time.time() - t0:.0f} s; eval.teacher=false skips this)")
    return metrics


EVALUATION_SECTIONS = ("data.", "eval.")   # what may differ from the run's own evaluation


def check_evaluation_keys(overrides: Sequence[str]) -> None:
    for item in override_list(overrides):
        if not item.startswith(EVALUATION_SECTIONS):
            raise ConfigError(f"{item}: an evaluation changes only data.* and eval.* keys (the split and the metric "
                              f"range); the student is the run's. Drop it, or train a run with it")


def evaluation_recipe(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """`recipe` with an evaluation's overrides, checked (keys, types, values) before any image renders.
    Another `data.dataset` is measured on its own validation split, not on the run's `data.val_dataset`."""
    check_evaluation_keys(overrides)
    keys = {item.split("=", 1)[0] for item in overrides}
    if "data.dataset" in keys and "data.val_dataset" not in keys:
        overrides = [*overrides, "data.val_dataset="]
    recipe = apply_overrides(recipe, list(overrides))
    check_values(recipe)
    d = recipe.data
    unsized = [f"data.{k}=None" for k in ("num_val", "height", "width") if getattr(d, k) is None]
    if unsized and renders(d.val_dataset or d.dataset):   # files keep all their images at their own size
        raise ConfigError(f"{' '.join(unsized)}: SynthRooms renders the validation split at a size it must be "
                          f"given, e.g. data.num_val=200 data.height=128 data.width=160")
    try:   # a mistyped path fails now, not after an ablation's training
        check_sources(recipe.data)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return recipe


def evaluate_run(run_dir: str | Path, *, overrides: Sequence[str] = (), device: str = "auto", progress: bool = True,
                 log=print) -> dict:
    """A finished run's best weights (checked against their recorded sha256) on a validation split:
    the run's own, or the one `data.*` overrides describe (`data.seed=1 data.num_val=1000`: rooms the
    run never saw; `data.dataset=nyu:/data/nyu`), with `eval.*` overrides for the metric range.
    SynthRooms renders only the validation split; NYU's test pairs alone suffice (a download of the
    test split: distill/data/nyu.py `AbsentSplit`). Returns the metrics under summary.json's keys, with
    the teacher's, and the constant baseline and `gap_closed` when the run recorded its training
    median depth (`baseline_depth`, runs since 2026-12-04), beside `run`, `weights_sha256`,
    `overrides` and `images`."""
    check_evaluation_keys(overrides)   # a training key is refused before the run is even read
    run = load_run(run_dir)
    recipe = evaluation_recipe(run.recipe, overrides)
    dev = pick_device(device, key="--device")
    # One training image: SynthRooms renders each split's scenes from (seed, split, index), so the
    # validation images do not depend on num_train, and the training split is never read here.
    _, val_ds = build_datasets(replace(recipe.data, num_train=1), progress=progress)
    loader = make_loader(val_ds, recipe.train.batch_size, train=False, seed=0, workers=0)
    t0 = time.time()
    metrics = evaluate(run.model.to(dev), loader, dev, None, recipe)
    log(f"{run.name} on {len(val_ds)} validation images: abs_rel {metrics.get('abs_rel', float('nan')):.4f}, "
        f"miou {metrics.get('miou', float('nan')):.3f} ({time.time() - t0:.0f} s)")
    teacher = {}
    why_not = teacher_skipped(recipe, asked=any(o.split("=", 1)[0] == "eval.teacher" for o in overrides))
    if why_not:
        log(f"teacher metrics: not measured ({why_not}); gap_closed needs them")
    elif recipe.eval.teacher:
        teacher = teacher_reference(teacher_for(recipe.teacher).to(dev), loader, dev, recipe, log)
    baseline_depth = recorded_baseline_depth(run.path)
    if baseline_depth is None:
        log("baseline_abs_rel and gap_closed: not measured (the run recorded no baseline_depth, the training median "
            "that finished runs since 2026-12-04 keep in summary.json: it did not finish, or it is older)")
        metrics = {**metrics, **teacher}
    else:
        metrics = with_references(metrics, constant_baseline(baseline_depth, loader, recipe), teacher)
        metrics["baseline_depth"] = baseline_depth
    return {"run": str(run.path), "weights_sha256": run.weights_sha256, "overrides": list(overrides),
            "images": len(val_ds), "data": to_dict(recipe.data), **metrics}


def teacher_skipped(recipe: Recipe, *, asked: bool) -> str:
    """Why an evaluation leaves the teacher out ("" when it measures it). An embedded teacher costs
    a second; a real one loads its weights (from the hub if the run named a hub id) and runs a ViT
    on every image, so it is measured only when asked for by name."""
    tc = recipe.teacher
    if not recipe.eval.teacher:
        return ""
    if tc.cache:
        return "teacher.cache holds training-split labels only"
    if tc.align == "dataset":
        return ("teacher.align=dataset: training fitted the teacher's scale on its training split, "
                "which is not read here")
    if not TEACHERS.get(tc.name).needs_ground_truth and not asked:
        return f"{tc.name} loads its weights and runs on every image; add eval.teacher=true to measure it"
    return ""


def recorded_baseline_depth(run_dir: Path) -> float | None:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    return io.read_json(summary, "restore it from a copy").get("baseline_depth")
