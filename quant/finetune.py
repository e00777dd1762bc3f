"""Recovery fine-tuning after pruning or under fake quantisation: the recipe's losses plus
distillation from the unmodified float student.

loss = recipe task losses (depth vs the recipe's teacher, segmentation vs labels; unweighted sum)
     + |log d_student - log d_float| (mean over valid pixels; log because depth errors are relative)
     + KL(softmax(seg_float) || softmax(seg_student)) per pixel.
The float student's own outputs are the strongest signal here: the goal is to stay where the
trained model was, not to train further.

The recipe's labels come through the training stage's own supervision path (`supervision_for`):
the same teacher or cache, assistant and teacher.align=dataset scale as in training. D3epth's
feature KD is the exception, said at start: its projections are training-only modules, not part
of the student that is exported.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.recipes import Recipe
from distill.training import Objective, make_loader, seg_weights_for, supervision_for


def distillation_losses(out: dict, ref: dict, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    losses = {}
    if "depth" in out:
        diff = (out["depth"].clamp_min(1e-6).log() - ref["depth"].clamp_min(1e-6).log()).abs()
        losses["kd_depth"] = diff[valid].mean() if valid.any() else diff.mean()
    if "seg" in out:
        losses["kd_seg"] = F.kl_div(F.log_softmax(out["seg"], 1), F.log_softmax(ref["seg"], 1),
                                    log_target=True, reduction="none").sum(1).mean()
    return losses


def training_losses(recipe: Recipe, dataset, batch_size: int, seed: int, log):
    """The training batches (shuffled, augmented), the recipe's supervision and its objective, as
    the fine-tunes and the Taylor gradients both use them."""
    loader = make_loader(dataset, min(batch_size, len(dataset)), train=True, seed=seed, workers=0)
    # feature KD does not fine-tune (its projections are not part of the student): a run trained with
    # it, or saved with it set beside a ground-truth target, fine-tunes without it
    recipe = replace(recipe, distill=replace(recipe.distill, feature_weight=0.0))
    supervision = supervision_for(recipe, torch.device("cpu"), dataset, loader, log=log)
    return loader, supervision, Objective(recipe, seg_weights=seg_weights_for(recipe, dataset, log))


def finetune(student: torch.nn.Module, reference: torch.nn.Module, recipe: Recipe, dataset, *, steps: int,
             lr: float, batch_size: int = 16, seed: int = 0, desc: str = "fine-tune", progress: bool = True,
             log=print, lr_flag: str = "lr") -> dict[str, float]:
    """Train `student` in place for `steps` steps; returns the mean losses of the last 10% of steps.
    A non-finite loss stops it with a ValueError naming `lr_flag` (the caller's name for `lr`)."""
    if steps <= 0:
        return {}
    reference.eval()
    loader, supervision, objective = training_losses(recipe, dataset, batch_size, seed, log)
    if recipe.distill.feature_weight > 0:
        log(f"{desc}: distill.feature_weight={recipe.distill.feature_weight} is not used here (feature KD's "
            f"projections are not part of the exported student); the float model's outputs supervise instead")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    student.train()
    tail: dict[str, list[float]] = {}
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 30)   # a log file gets a line every 30 s, not per step
    for step, batch in zip(range(steps), batches(loader, dataset)):
        teacher = None
        if recipe.target == "teacher":
            batch, teacher = supervision.prepare(batch, step)
        with torch.no_grad():
            ref = reference(batch["image"])
        out = student(batch["image"])
        losses = {**objective(out, batch, teacher), **distillation_losses(out, ref, batch["valid"])}
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise ValueError(f"{desc}: non-finite loss at step {step} ({ {k: v.item() for k, v in losses.items()} }) "
                             f"at learning rate {lr:g}; lower {lr_flag}, e.g. {lr_flag} {lr / 10:g}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):   # a NaN norm would write NaN weights
            raise ValueError(f"{desc}: non-finite gradient norm at step {step} (loss {loss.item():.4g}) at learning "
                             f"rate {lr:g}; the weights were not updated. Lower {lr_flag}, e.g. {lr_flag} {lr / 10:g}")
        optimizer.step()
        scheduler.step()
        if step >= steps - max(1, steps // 10):
            for k, v in losses.items():
                tail.setdefault(k, []).append(v.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    student.eval()
    means = {k: sum(v) / len(v) for k, v in tail.items()}
    log(f"{desc}: {steps} steps, final " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
    return means


def loss_gradients(student: torch.nn.Module, recipe: Recipe, dataset, *, num_batches: int = 16,
                   batch_size: int = 16, seed: int = 0, log=print) -> None:
    """Leave in each parameter's .grad the gradient of the recipe's task losses (unweighted sum, as
    the fine-tune) summed over `num_batches` training batches: what Taylor importance multiplies with
    the weights (Molchanov et al. 2019). BatchNorm stays in eval mode: its statistics do not move."""
    loader, supervision, objective = training_losses(recipe, dataset, batch_size, seed, log)
    student.eval()
    student.zero_grad(set_to_none=True)
    for step, batch in zip(range(num_batches), batches(loader, dataset)):
        teacher = None
        if recipe.target == "teacher":
            batch, teacher = supervision.prepare(batch, step)
        losses = objective(student(batch["image"]), batch, teacher)
        loss = sum(losses.values())
        if not torch.isfinite(loss):   # a NaN gradient would rank the channels at random
            raise ValueError(f"Taylor importance: non-finite task loss on training batch {step} "
                             f"({ {k: v.item() for k, v in losses.items()} }); check the training images and "
                             f"their labels, or rank channels without gradients (--prune-importance magnitude)")
        loss.backward()
    log(f"gradients of the task losses over {num_batches} batches of {loader.batch_size} (Taylor importance)")


def batches(loader, dataset):
    """Endless batches, reshuffled per epoch (augmentation seeded per epoch as in training)."""
    for epoch in itertools.count():
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        yield from loader
