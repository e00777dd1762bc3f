"""Batches and validation: the loaders every loop uses and the metrics of summary.json."""
from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from distill.data.classes import IGNORE_INDEX, NYU13_NAMES
from distill.metrics import DepthBoundaryMetrics, DepthMetrics, SegBoundaryMetrics, SegMetrics, gap_closed
from distill.recipes import Recipe
from distill.teachers import Teacher
from distill.training.distributed import to_device

TEACHER_KEYS = ("abs_rel", "rmse", "d1", "silog", "abs_rel_aligned", "dbe_acc", "dbe_comp")
FIT_KEYS = ("abs_rel", "abs_rel_aligned", "d1", "miou")   # `train_<key>`: the student on images it trained on


def make_loader(ds: Dataset, batch_size: int, *, train: bool, seed: int, workers: int,
                rank: int = 0, world: int = 1) -> DataLoader:
    """Training: shuffled as a function of (seed, epoch) only, so a resumed run sees exactly the
    batches it would have seen. Under torchrun each of `world` ranks takes every world-th index of
    the same permutation with `batch_size` = global batch / world, so step k's batches of all ranks
    together are the single-process run's batch k."""
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed) if train else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=train,
                      num_workers=workers)  # not persistent: workers must see set_epoch


def depth_meters(recipe: Recipe) -> tuple[DepthMetrics, DepthBoundaryMetrics]:
    """The depth metrics and boundary errors of the recipe's evaluation range."""
    ec = recipe.eval
    return (DepthMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop),
            DepthBoundaryMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth))


@torch.no_grad()
def evaluate(model, loader: DataLoader, device: torch.device, amp: torch.dtype | None, recipe: Recipe) -> dict:
    """Validation metrics with the keys of summary.json."""
    model.eval()
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
    model.train()
    metrics = {**depth_m.compute(), **edges_m.compute()} if "depth" in model.tasks else {}
    if "seg" in model.tasks:
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
