"""The recipe's losses of one step: what a training or fine-tuning step minimises, per task.

Training (loop.py) and the recovery fine-tunes after pruning and under QAT (quant/finetune.py)
build their objective here, so both optimise the same depth and segmentation terms.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from distill.data.classes import IGNORE_INDEX, NYU13_NAMES
from distill.losses import (
    build_depth_loss,
    build_weighting,
    class_frequencies,
    class_weights,
    cosine_distance,
    cross_entropy,
    lovasz_softmax,
    surface_normals,
)
from distill.losses.normalization import normalized_l1
from distill.recipes import Recipe
from distill.teachers import Teacher
from distill.training.cross_context import local_global_loss, overlapping_patches

# The Lovasz term sorts each class's pixels: every 4th pixel along both axes (20 k per batch of 16
# at 128x160) keeps it at a few percent of a CPU step; the cross-entropy keeps full resolution.
LOVASZ_STRIDE = 4


def depth_target(batch: dict, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, valid) of the depth loss: the teacher's pseudo-label or the ground truth."""
    if recipe.target == "teacher":  # wherever the teacher has an opinion: unlabelled images too
        target = batch["teacher_depth"]
        return target, (target > 0) & torch.isfinite(target)
    return batch["depth"], batch["valid"]


class Objective:
    """The recipe's losses per task: depth (metric term, Distill Any Depth's normalised and
    local-global terms, D3epth's feature term: all depth distillation) and segmentation; with
    `loss.normal_weighting="fixed"` also "normals", a term that stands beside the task weighting
    (`weighted_total`) instead of inside the depth task."""

    def __init__(self, recipe: Recipe, feature_kd: torch.nn.Module | None = None, *,
                 seg_weights: torch.Tensor | None = None):
        lc, self.dc = recipe.loss, recipe.distill
        self.recipe, self.feature_kd, self.seg_weights = recipe, feature_kd, seg_weights
        self.depth_loss = build_depth_loss(lc.depth, **depth_loss_options(lc))
        self.grad_loss = build_depth_loss(
            "gradient_huber", delta=lc.gradient_delta, scales=lc.gradient_scales) if lc.gradient_weight > 0 else None

    def pixel_loss(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Depth loss of (B, 1, H, W) prediction and target: metres, plus the normalised term."""
        loss = self.dc.metric_weight * self.depth_loss(pred, target, valid)
        if self.grad_loss is not None:
            loss = loss + self.recipe.loss.gradient_weight * self.grad_loss(pred, target, valid)
        if self.dc.normalization != "none":
            loss = loss + self.dc.normalized_weight * normalized_l1(pred, target, valid, self.dc.normalization)
        return loss

    def __call__(self, out: dict, batch: dict, teacher: Teacher | None = None) -> dict[str, torch.Tensor]:
        """`teacher`: the step's teacher, for the local-global term (skipped without one)."""
        losses, lc = {}, self.recipe.loss
        aux = out.get("aux") if lc.aux_weight > 0 else None
        if "depth" in out:
            target, valid = depth_target(batch, self.recipe)
            pred = out["depth"].float()
            losses["depth"] = self.pixel_loss(pred, target, valid)
            if self.dc.local_global_weight > 0 and teacher is not None:
                patches = overlapping_patches(*pred.shape[-2:], self.dc.local_global_grid)
                losses["depth"] = losses["depth"] + self.dc.local_global_weight * local_global_loss(
                    pred, batch, teacher, patches, self.pixel_loss)
            if self.feature_kd is not None and "teacher_features" in batch:
                losses["depth"] = losses["depth"] + self.dc.feature_weight * self.feature_kd(
                    out["features"], batch["teacher_features"])
            if aux:
                losses["depth"] = losses["depth"] + lc.aux_weight * self.aux_depth_loss(aux, target, valid)
            if "normals" in out:
                term = lc.normal_weight * normal_loss(out["normals"].float(), target, valid, batch["intrinsics"])
                if lc.normal_weighting == "fixed":   # beside the task weighting: Kendall's weight of depth leaves it alone
                    losses["normals"] = term
                else:
                    losses["depth"] = losses["depth"] + term
        if "seg" in out:
            losses["seg"] = cross_entropy(out["seg"].float(), batch["seg"], ignore_index=IGNORE_INDEX,
                                          weight=self.seg_weights, hard_fraction=lc.seg_hard_fraction)
            if lc.seg_lovasz_weight > 0:
                losses["seg"] = losses["seg"] + lc.seg_lovasz_weight * lovasz_softmax(
                    out["seg"], batch["seg"], ignore_index=IGNORE_INDEX, stride=LOVASZ_STRIDE)
            if aux:
                losses["seg"] = losses["seg"] + lc.aux_weight * self.aux_seg_loss(aux, batch["seg"])
        return losses

    # Deep supervision (`loss.aux_weight`): each task's loss on the decoder's coarser outputs
    # (`out["aux"]`), against targets brought down to their resolution, averaged over the levels.
    # At the levels' own resolution the terms cost ~2% of a CPU step; upsampled to the image, 40-55%.
    def aux_depth_loss(self, aux: list[dict], target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        terms = [self.pixel_loss(a["depth"].float(),
                                 *downsample_depth(target, valid, target.shape[-1] // a["depth"].shape[-1]))
                 for a in aux]
        return sum(terms) / len(terms)

    def aux_seg_loss(self, aux: list[dict], labels: torch.Tensor) -> torch.Tensor:
        terms = []
        for a in aux:
            k = labels.shape[-1] // a["seg"].shape[-1]   # labels at each k x k block's centre
            terms.append(cross_entropy(a["seg"].float(), labels[:, k // 2::k, k // 2::k],
                                       ignore_index=IGNORE_INDEX, weight=self.seg_weights))
        return sum(terms) / len(terms)


def downsample_depth(depth: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) depth and mask -> (B, 1, H/k, W/k): each k x k block's mean log-depth over its
    valid pixels (a scale-fair average: log-depth is what the depth head predicts), valid where
    more than half of the block is."""
    weights = valid.float()
    count = F.avg_pool2d(weights, k)
    # where, not a product: an invalid pixel may hold inf or NaN (an online teacher's), and 0 * inf is NaN
    log_depth = torch.where(valid.bool(), torch.log(depth.clamp_min(1e-6)), 0.0)
    log_depth = F.avg_pool2d(log_depth, k) / count.clamp_min(1e-6)
    return torch.exp(log_depth), count > 0.5


def normal_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """`loss.normal_weight`'s term: the predicted normals against those of the target depth, brought
    to the prediction's resolution first (block means of log-depth, the intrinsics scaled with it)."""
    k = target.shape[-1] // pred.shape[-1]
    target = torch.where(valid, target, torch.ones_like(target))   # no NaN from invalid pixels, not even in a gradient
    depth, depth_valid = downsample_depth(target, valid, k) if k > 1 else (target, valid)
    normals, defined = surface_normals(depth, depth_valid, intrinsics / k)
    return cosine_distance(pred, normals, defined)


def seg_weights_for(recipe: Recipe, train_ds, log=print) -> torch.Tensor | None:
    """`loss.seg_balance` > 0: class weights from the training set's label frequencies (said once)."""
    power = recipe.loss.seg_balance
    if power <= 0 or "seg" not in recipe.model.tasks:
        return None
    frequencies = class_frequencies(train_ds, len(NYU13_NAMES))
    if frequencies.sum() == 0:   # unlabelled images (a folder): the seg loss has nothing to weigh
        log(f"loss.seg_balance={power}: the training set has no segmentation label; class weights off")
        return None
    weights = class_weights(frequencies, power)
    log(f"loss.seg_balance={power}: class weights " + ", ".join(
        f"{name} {w:.2f} ({100 * f:.1f}%)" for name, w, f in zip(NYU13_NAMES, weights.tolist(), frequencies.tolist())))
    return weights


def depth_loss_options(lc) -> dict:
    return {"berhu": {"threshold": lc.berhu_threshold, "residual_kind": lc.berhu_residual},
            "silog": {"lam": lc.silog_lambda, "per_image": lc.silog_per_image},
            "gradient_huber": {"delta": lc.gradient_delta, "scales": lc.gradient_scales}}.get(lc.depth, {})


def weighted_total(weighting, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """A step's loss: the task weighting over the tasks' losses, plus every other term as it is
    (the normal term under `loss.normal_weighting="fixed"`); and the tasks' weights."""
    total, weights = weighting({k: v for k, v in losses.items() if k in weighting.tasks})
    return total + sum(v for k, v in losses.items() if k not in weighting.tasks), weights


def labelled_tasks(recipe: Recipe, samples: Sequence[dict], log=print) -> tuple[str, ...]:
    """The tasks the weighting balances: segmentation only where the training images carry labels
    (`samples`: a few spread over the set, as one image may have none of its own). NYU's BTS and h5
    layouts and image folders have none; Kendall's log-variance of a loss that is always 0 falls by
    about the learning rate each step until exp(-s) overflows into a NaN loss."""
    tasks = tuple(recipe.model.tasks)
    if "seg" in tasks and not any(bool((torch.as_tensor(s["seg"]) != IGNORE_INDEX).any()) for s in samples):
        log(f"{recipe.data.dataset}: the training images carry no segmentation labels; the seg head is not "
            f"trained and the task weighting balances {', '.join(t for t in tasks if t != 'seg')} alone")
        return tuple(t for t in tasks if t != "seg")
    return tasks


def weighting_for(recipe: Recipe, tasks: Sequence[str] | None = None):
    """The task weighting over `tasks` (default: the student's; labelled_tasks says which can be had)."""
    lc = recipe.loss
    kinds = {"depth": "regression", "seg": "classification"}
    tasks = {t: kinds[t] for t in (recipe.model.tasks if tasks is None else tasks)}
    fixed = {"depth": lc.depth_weight, "seg": lc.seg_weight}
    options = {"fixed": {"weights": {t: fixed[t] for t in tasks}},
               "dwa": {"temperature": lc.dwa_temperature}}.get(lc.weighting, {})
    return build_weighting(lc.weighting, tasks, **options)
