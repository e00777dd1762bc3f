"""Structured channel pruning of a `MultiTaskStudent` with torch-pruning's dependency graph (DepGraph).

What is pruned: output channels of the Conv2d layers of the encoder, the decoder and the heads.
DepGraph removes each coupled group as one unit (a conv's outputs, its BatchNorm, the depthwise conv
and squeeze-excite convs that follow, the next layers' inputs, every branch of a residual or FPN
addition), so the pruned model is a smaller dense model, not a masked one. Groups are ranked by the
L2 norm of their weights (or `IMPORTANCE`'s other criteria), and every group loses the same
fraction of its channels (local pruning: a global ranking compares magnitudes across layers of
different scale and can empty single layers).

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

MAC targets are met greedily, `round_to` channels at a time: each step takes the group that keeps
the largest fraction of its original channels (the widest layers first on a tie), drops its
`round_to` least important channels, and counts the MACs again, until they fit the budget. Every
group so keeps about the same fraction, as with a ratio, but the budget is met to within one step
instead of one uniform ratio step: with a single ratio every 64-channel group rounds from 48 down
to 40 at once, which took v3 from 0.56x to 0.39x of its MACs between ratios 0.25 and 0.30.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from timm.models.efficientvit_mit import LiteMLA
from torch import nn

from distill.students import count_macs, count_params

LOG_EVERY = 10   # greedy MAC-target steps between two progress lines
IMPORTANCE = {   # how channels are ranked inside a group (python -m quant.export --prune-importance)
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),   # L2 norm over the whole group
    "bn_scale": lambda: tp.importance.BNScaleImportance(),               # |gamma| of the BatchNorms (Network Slimming)
    "taylor": lambda: tp.importance.GroupTaylorImportance(),             # |w * dL/dw|: needs gradients
}
NEEDS_GRADIENTS = {"taylor"}   # the parameters must carry .grad of the task loss (quant.finetune.loss_gradients)
_FORMS = ('a channel ratio "0.3" (0 < r < 1), a MAC budget "macs=80M" or "80M" (suffix K/M/G), '
          'or a fraction of the current MACs "macs=0.5x" (0 < x < 1)')
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_TARGET = re.compile(r"(macs=)?(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)([kmgx]?)")   # lower case


@dataclass
class PruneTarget:
    ratio: float | None = None   # fraction of channels removed per prunable layer group, 0 < r < 1
    macs: float | None = None    # MAC budget: absolute (> 1, e.g. 80e6) or a fraction of the current MACs (0 < x < 1)

    def __post_init__(self):
        if (self.ratio is None) == (self.macs is None):
            raise ValueError(f"give exactly one of ratio or macs, got ratio={self.ratio}, macs={self.macs}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError(f"pruning ratio must be in (0, 1), got {self.ratio}")
        if self.macs is not None and not self.macs > 0:
            raise ValueError(f"MAC budget must be > 0, got {self.macs}")

    @classmethod
    def parse(cls, text: str) -> PruneTarget:
        match = _TARGET.fullmatch(text.strip().lower())
        if not match:
            raise ValueError(f'cannot parse prune target "{text}": use {_FORMS}')
        prefix, number, suffix = match.groups()
        value = float(number)
        if not prefix and not suffix:
            if not 0 < value < 1:   # the fraction of channels removed: 0 removes none, 1 all
                raise ValueError(f'prune ratio "{text}" (the share of channels removed) must be in (0, 1), e.g. 0.3; '
                                 f'the other forms: {_FORMS}')
            return cls(ratio=value)
        if suffix == "x":
            if not 0 < value < 1:
                why = "1x or more prunes nothing" if value >= 1 else "0x leaves no MACs"
                raise ValueError(f'MAC fraction "{text}" must be in (0, 1): {why}; use {_FORMS}')
            return cls(macs=value)
        if not value > 0:
            raise ValueError(f'MAC budget "{text}" must be > 0; use {_FORMS}')
        if not suffix and value <= 1:   # a fraction needs its x: "0.5" alone is a channel ratio
            raise ValueError(f'MAC budget "{text}" is a count of MACs; for a fraction of the MACs write '
                             f'macs={number}x, for a channel ratio {number}; use {_FORMS}')
        return cls(macs=value * _SUFFIX[suffix])


def prune_label(text: str) -> str:
    """`--prune`'s value as the export directory names it: "0.3", "0.5x", "80m" (the number as the
    shortest text of its value, "macs=" dropped), so that "0.30" and "0.3" name one export, not two,
    and two different values never one."""
    match = _TARGET.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(f'cannot parse prune target "{text}": use {_FORMS}')
    _, number, suffix = match.groups()
    return repr(float(number)).removesuffix(".0") + suffix


def stage_targets(target: PruneTarget, macs_now: float, stages: int) -> list[PruneTarget]:
    """Absolute MAC budgets for iterative pruning (Molchanov et al. 2017, Han et al. 2015): `stages`
    steps that each remove the same fraction of the MACs, ending at `target`'s budget."""
    if stages < 1:
        raise ValueError(f"prune stages must be at least 1, got {stages}")
    if stages == 1:
        return [target]
    if target.macs is None:
        raise ValueError(f"iterative pruning ({stages} stages) needs a MAC target (macs=0.5x, macs=80M), "
                         f"not a channel ratio ({target.ratio})")
    final = target.macs if target.macs > 1 else target.macs * macs_now
    return [PruneTarget(macs=macs_now * (final / macs_now) ** (i / stages)) for i in range(1, stages + 1)]


def check_budget(target: PruneTarget, model: nn.Module, input_size: tuple[int, int], *, round_to: int = 8) -> None:
    """Refuse a MAC budget that prunes nothing or that no pruning reaches, before any work is done
    for it (the greedy search would find out only after its fine-tunes). ValueError names the
    model's MACs and, for an unreachable one, the smallest it reaches: the least budget to ask for."""
    if target.macs is None:
        return
    h, w = input_size
    now = count_macs(model, h, w)
    budget = target.macs if target.macs > 1 else target.macs * now
    if budget >= now:
        raise ValueError(f"a budget of {budget / 1e6:.1f}M MACs prunes nothing: the student has {now / 1e6:.1f}M "
                         f"at {h}x{w}; ask for less, e.g. macs=0.5x")
    floor = smallest_macs(model, input_size, round_to)
    if budget < floor:
        raise ValueError(f"a budget of {budget / 1e6:.1f}M MACs is out of reach: with every channel group at "
                         f"{round_to} channels the student still has {floor / 1e6:.1f}M at {h}x{w} (of "
                         f"{now / 1e6:.1f}M, {floor / now:.2f}x); ask for macs={math.ceil(floor / 1e5) / 10:g}M "
                         f"or more")


def smallest_macs(model: nn.Module, input_size: tuple[int, int], round_to: int = 8) -> int:
    """The MACs of a copy of `model` with every prunable group cut to `round_to` channels: the
    floor of any MAC target (the greedy search ends there whatever the order)."""
    trial, graph, width = _trial(model, input_size)
    scorer = IMPORTANCE["magnitude"]()
    for root, channels in width.items():
        if channels > round_to:
            _drop_channels(graph, root, channels, channels - round_to, scorer)
    return count_macs(trial, *input_size)


def _copy(model: nn.Module) -> nn.Module:
    """A copy of `model` to prune, with its gradients: the caller's model stays untouched until the
    pruning is accepted."""
    trial = copy.deepcopy(model).eval()   # tracing runs a forward: in train mode it would move BatchNorm statistics
    for copied, original_param in zip(trial.parameters(), model.parameters()):
        if original_param.grad is not None:   # deepcopy leaves .grad behind; Taylor importance reads it
            copied.grad = original_param.grad.clone()
    return trial


def _trial(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, tp.DependencyGraph, dict[nn.Module, int]]:
    """A copy of `model` to prune (`_copy`), its dependency graph, and the output width of every
    prunable group's root conv."""
    trial = _copy(model)
    # Protected layers stay in the traced graph (their inputs shrink); they are only never a group's root.
    graph = tp.DependencyGraph().build_dependency(trial, _example(trial, input_size))
    return trial, graph, {root: len(group[0].idxs) for root, group in _groups(graph, _ignored(trial)).items()}


def protected_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose output channels must not change (see the module docstring), by name."""
    protected = {f"heads.{name}.out": head.out for name, head in model.heads.items()}
    for name, module in model.named_modules():
        if isinstance(module, LiteMLA):
            protected[f"{name}.qkv"], protected[f"{name}.aggreg"] = module.qkv, module.aggreg
    return protected


class _Scorer(tp.importance.Importance):
    """The named importance as both pruning paths use it: a group without BatchNorm (bn_scale
    scores it None, and torch-pruning would skip it) is ranked by weight magnitude, and
    non-finite scores are refused, since argsort puts NaN last and the channels dropped would be
    arbitrary."""

    def __init__(self, name: str):
        if name not in IMPORTANCE:
            raise ValueError(f'unknown pruning importance "{name}": use one of {", ".join(IMPORTANCE)}')
        self.name, self.inner, self.fallback = name, IMPORTANCE[name](), IMPORTANCE["magnitude"]()

    def __call__(self, group: tp.Group) -> torch.Tensor:
        scores = self.inner(group)
        if scores is None:
            scores = self.fallback(group)
        if not torch.isfinite(scores).all():
            root = group[0].dep.target.module
            raise ValueError(f"pruning: non-finite channel importance in the group of {type(root).__name__} "
                             f"({len(scores)} channels): the weights or gradients hold NaN or inf; re-train or "
                             f"re-export the run, or rank by another --prune-importance than {self.name}")
        return scores


def _example(model: nn.Module, input_size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(1, 3, *input_size, device=next(model.parameters()).device)


def _ignored(model: nn.Module) -> list[nn.Module]:
    return [sub for module in protected_modules(model).values() for sub in module.modules()]


def _prune_ratio(model: nn.Module, ratio: float, input_size: tuple[int, int], round_to: int,
                 importance: str) -> None:
    """Prune a copy by `ratio` in every group; move its modules into `model` (a failure half-way
    leaves `model` as it was)."""
    trial = _copy(model)   # BasePruner traces its own graph
    tp.pruner.BasePruner(trial, _example(trial, input_size), importance=_Scorer(importance),
                         pruning_ratio=ratio, round_to=round_to, ignored_layers=_ignored(trial)).step()
    _adopt(model, trial)


def _adopt(model: nn.Module, trial: nn.Module) -> None:
    for name, child in trial.named_children():
        setattr(model, name, child)


def _groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> dict[nn.Module, tp.Group]:
    """Every prunable coupled group, by its root conv, with all of its channels as indices."""
    return {group[0].dep.target.module: group
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear))}


def _drop_channels(graph: tp.DependencyGraph, root: nn.Module, width: int, count: int,
                   scorer: _Scorer) -> None:
    """Remove the `count` least important of the `width` output channels of `root`'s group."""
    prune_out = graph.get_pruner_of_module(root).prune_out_channels
    group = graph.get_pruning_group(root, prune_out, list(range(width)))
    scores = scorer(group)
    graph.get_pruning_group(root, prune_out, scores.argsort()[:count].tolist()).prune()


def _prune_to_macs(model: nn.Module, budget: float, input_size: tuple[int, int], round_to: int,
                   importance: str, log: Callable[[str], None]) -> float:
    """Prune a copy greedily until its MACs fit `budget`; move its modules into `model`.

    Returns the fraction of the groups' channels removed.
    """
    trial, graph, width = _trial(model, input_size)   # an unreachable budget leaves `model` untouched
    scorer = _Scorer(importance)
    original = dict(width)   # pruning changes modules in place: the roots stay valid, their widths are tracked here
    macs, step = count_macs(trial, *input_size), 0
    while macs > budget:
        shrinkable = [root for root, channels in width.items() if channels > round_to]
        if not shrinkable:
            raise ValueError(f"MAC budget {budget / 1e6:.2f}M is unreachable: the smallest reached is "
                             f"{macs / 1e6:.2f}M with every group at {round_to} channels (round_to={round_to}); "
                             f"raise the budget, lower round_to, or pick a smaller student")
        root = max(shrinkable, key=lambda m: (width[m] / original[m], width[m]))
        keep = (width[root] - 1) // round_to * round_to   # the next multiple of round_to below
        _drop_channels(graph, root, width[root], width[root] - keep, scorer)
        width[root] = keep
        macs, step = count_macs(trial, *input_size), step + 1
        if step % LOG_EVERY == 0 or macs <= budget:
            log(f"prune step {step}: {macs / 1e6:.2f}M MACs (budget {budget / 1e6:.2f}M)")
    _adopt(model, trial)
    return round(1 - sum(width.values()) / sum(original.values()), 4)


def weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_student(model: nn.Module, target: PruneTarget, input_size: tuple[int, int], *,
                  round_to: int = 8, importance: str = "magnitude", log: Callable[[str], None] = print) -> dict:
    """Prune `model` in place for images of `input_size` (H, W); return a report.

    Report: params_before/after, macs_before/after (one (1, 3, H, W) forward), ratio (the channel
    ratio used, or for a MAC target the fraction of channels removed), round_to, importance,
    ignored (protected module names), pruned_layers (Conv2d/Linear
    layers whose weight shape changed). Optimizers built before must be rebuilt: parameters are new.
    """
    if importance in NEEDS_GRADIENTS and not any(p.grad is not None for p in model.parameters()):
        raise ValueError(f'pruning importance "{importance}" ranks channels by weight x gradient, and the model '
                         f"has no gradients: compute them first (quant.finetune.loss_gradients)")
    was_training = model.training
    model.eval()   # tracing runs a forward: in train mode it would move BatchNorm running stats
    try:
        shapes, params_before = weight_shapes(model), count_params(model)
        macs_before = count_macs(model, *input_size)
        if target.ratio is not None:
            ratio = target.ratio
            _prune_ratio(model, ratio, input_size, round_to, importance)
        else:
            budget = target.macs if target.macs > 1 else target.macs * macs_before
            ratio = 0.0 if macs_before <= budget else _prune_to_macs(model, budget, input_size, round_to,
                                                                         importance, log)
        after = weight_shapes(model)
        report = {"params_before": params_before, "params_after": count_params(model),
                  "macs_before": macs_before, "macs_after": count_macs(model, *input_size),
                  "ratio": ratio, "round_to": round_to, "importance": importance, "ignored": sorted(protected_modules(model)),
                  "pruned_layers": sum(after[name] != shape for name, shape in shapes.items())}
    finally:
        model.train(was_training)
    log(f"pruned {report['pruned_layers']} layers at channel ratio {ratio:.2f}: "
        f"MACs {macs_before / 1e6:.2f}M -> {report['macs_after'] / 1e6:.2f}M, "
        f"params {params_before / 1e6:.3f}M -> {report['params_after'] / 1e6:.3f}M")
    return report
