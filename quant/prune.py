"""Structured channel pruning of a `MultiTaskStudent` with torch-pruning's dependency graph (DepGraph).

What is pruned: output channels of the Conv2d layers of the encoder, the decoder and the heads.
DepGraph removes each coupled group as one unit (a conv's outputs, its BatchNorm, the depthwise conv
and squeeze-excite convs that follow, the next layers' inputs, every branch of a residual or FPN
addition), so the pruned model is a smaller dense model, not a masked one. Groups are ranked by the
L2 norm of their weights, and every group loses the same fraction of its channels (local pruning:
a global ranking compares magnitudes across layers of different scale and can empty single layers).

Protected, and why:
- the heads' final `out` convs (`heads[name].out`): their output channels ARE the task outputs
  (1 depth channel, `num_classes` logits). Their input channels still shrink with the layer before.
- the stem's input: the image has 3 channels. DepGraph never prunes a graph input, so nothing to do.
- EfficientViT's LiteMLA `qkv` and `aggreg` convs: the attention reshapes their channels into
  (heads, 3 * dim) with a fixed `dim`, and `aggreg`'s grouped conv has groups = 3 * heads, so any
  channel removed there breaks the head layout (unprotected, torch-pruning 1.6.1 even fails inside
  its importance computation). torch-pruning's `num_heads` option cannot replace this: it expects
  a Linear qkv (it reads `out_features`) laid out ViT style ([q | k | v], each split into heads),
  not LiteMLA's conv with per-head [q k v] blocks plus the extra multi-scale heads. The input channels of `qkv` and the output
  channels of `proj` (the residual stream) and all MBConv channels stay prunable.

Rounding: every pruned group keeps a multiple of `round_to` channels, rounded down (torch-pruning's
`round_to`): mobile kernels (XNNPACK, GPU delegates) vectorise over channels in blocks of 4 or 8. So any
ratio > 0 takes a group of 64 down to 56 at least, and a group that would keep no channel is left
whole (a 16-channel tiny decoder drops to 8 at ratio 0.05; an 8-channel layer never shrinks).

MAC targets are met iteratively: the channel ratio grows in steps of `RATIO_STEP` on a copy of the
model until `count_macs` is within the budget, then the copy's pruned modules replace the model's.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from timm.models.efficientvit_mit import LiteMLA
from torch import nn

from distill.students import count_macs, count_params

RATIO_STEP = 0.05   # channel ratio added per iteration for MAC targets
MAX_RATIO = 0.9     # beyond this a student keeps too little to fine-tune back
_FORMS = ('a channel ratio "0.3" (0 < r < 1), a MAC budget "macs=80M" or "80M" (suffix K/M/G), '
          'or a fraction of the current MACs "macs=0.5x" (0 < x <= 1)')
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass
class PruneTarget:
    ratio: float | None = None   # fraction of channels removed per prunable layer group, 0 < r < 1
    macs: float | None = None    # MAC budget: absolute (> 1, e.g. 80e6) or a fraction of the current MACs (0 < x <= 1)

    def __post_init__(self):
        if (self.ratio is None) == (self.macs is None):
            raise ValueError(f"give exactly one of ratio or macs, got ratio={self.ratio}, macs={self.macs}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"pruning ratio must be in (0, 1), got {self.ratio}")
        if self.macs is not None and not self.macs > 0:
            raise ValueError(f"MAC budget must be > 0, got {self.macs}")

    @classmethod
    def parse(cls, text: str) -> PruneTarget:
        match = re.fullmatch(r"(macs=)?(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)([kmgx]?)", text.strip().lower())
        if not match:
            raise ValueError(f'cannot parse prune target "{text}": use {_FORMS}')
        prefix, number, suffix = match.groups()
        value = float(number)
        if not prefix and not suffix:
            if not 0 < value < 1:
                raise ValueError(f'prune ratio "{text}" must be in (0, 1); for a MAC budget use {_FORMS}')
            return cls(ratio=value)
        if suffix == "x":
            if not 0 < value <= 1:
                raise ValueError(f'MAC fraction "{text}" must be in (0, 1]; use {_FORMS}')
            return cls(macs=value)
        if not value > 0:
            raise ValueError(f'MAC budget "{text}" must be > 0; use {_FORMS}')
        return cls(macs=value * _SUFFIX[suffix])


def protected_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose output channels must not change (see the module docstring), by name."""
    protected = {f"heads.{name}.out": head.out for name, head in model.heads.items()}
    for name, module in model.named_modules():
        if isinstance(module, LiteMLA):
            protected[f"{name}.qkv"], protected[f"{name}.aggreg"] = module.qkv, module.aggreg
    return protected


def _make_pruner(model: nn.Module, ratio: float, steps: int, input_size: tuple[int, int],
                 round_to: int) -> tp.pruner.BasePruner:
    example = torch.randn(1, 3, *input_size, device=next(model.parameters()).device)
    return tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, iterative_steps=steps, round_to=round_to,
        ignored_layers=list(protected_modules(model).values()))


def _prune_to_macs(model: nn.Module, budget: float, input_size: tuple[int, int], round_to: int,
                   log: Callable[[str], None]) -> float:
    """Prune a copy step by step until its MACs fit `budget`; move its modules into `model`."""
    trial = copy.deepcopy(model)   # an unreachable budget must leave the caller's model untouched
    steps = round(MAX_RATIO / RATIO_STEP)
    pruner = _make_pruner(trial, MAX_RATIO, steps, input_size, round_to)
    for step in range(1, steps + 1):
        pruner.step()
        ratio = round(pruner.per_step_pruning_ratio[pruner.current_step], 4)
        macs = count_macs(trial, *input_size)
        log(f"prune step {step}/{steps}: channel ratio {ratio:.2f}, {macs / 1e6:.2f}M MACs "
            f"(budget {budget / 1e6:.2f}M)")
        if macs <= budget:
            for name, child in trial.named_children():
                setattr(model, name, child)
            return ratio
    raise ValueError(f"MAC budget {budget / 1e6:.2f}M is unreachable: the smallest reached is "
                     f"{macs / 1e6:.2f}M at channel ratio {MAX_RATIO} with round_to={round_to}; "
                     f"raise the budget, lower round_to, or pick a smaller student")


def _weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_student(model: nn.Module, target: PruneTarget, input_size: tuple[int, int], *,
                  round_to: int = 8, log: Callable[[str], None] = print) -> dict:
    """Prune `model` in place for images of `input_size` (H, W); return a report.

    Report: params_before/after, macs_before/after (one (1, 3, H, W) forward), ratio (the channel
    ratio finally used), round_to, ignored (protected module names), pruned_layers (Conv2d/Linear
    layers whose weight shape changed). Optimizers built before must be rebuilt: parameters are new.
    """
    was_training = model.training
    model.eval()   # tracing runs a forward: in train mode it would move BatchNorm running stats
    try:
        shapes, params_before = _weight_shapes(model), count_params(model)
        macs_before = count_macs(model, *input_size)
        if target.ratio is not None:
            ratio = target.ratio
            _make_pruner(model, ratio, 1, input_size, round_to).step()
        else:
            budget = target.macs if target.macs > 1 else target.macs * macs_before
            ratio = 0.0 if macs_before <= budget else _prune_to_macs(model, budget, input_size, round_to, log)
        after = _weight_shapes(model)
        report = {"params_before": params_before, "params_after": count_params(model),
                  "macs_before": macs_before, "macs_after": count_macs(model, *input_size),
                  "ratio": ratio, "round_to": round_to, "ignored": sorted(protected_modules(model)),
                  "pruned_layers": sum(after[name] != shape for name, shape in shapes.items())}
    finally:
        model.train(was_training)
    log(f"pruned {report['pruned_layers']} layers at channel ratio {ratio:.2f}: "
        f"MACs {macs_before / 1e6:.2f}M -> {report['macs_after'] / 1e6:.2f}M, "
        f"params {params_before / 1e6:.3f}M -> {report['params_after'] / 1e6:.3f}M")
    return report
