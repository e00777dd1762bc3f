"""Activation-range equalisation before int8: the same float function, with every channel of a
ReLU tensor using the int8 levels the tensor's one scale gives.

An int8 file quantises an activation tensor with one scale, a weight tensor with one scale per
output channel. When one channel of an activation reaches 25 and most stay under 2 (v3's
`encoder.blocks.1.0` expansion output), the small channels get a few of the 256 levels. For a
chain convolution -> ReLU -> convolution, multiplying channel i of the first convolution's output
by s_i > 0 and dividing input channel i of the second by s_i computes the same function, as
ReLU(s x) = s ReLU(x): the cross-layer equalisation of Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction" (ICCV 2019), here with per-channel weights:

- the producer's output channel i scales by s_i, and its per-channel weight scale with it: its
  integer weights do not change;
- a depthwise consumer's channel i scales by 1/s_i: the same, so s_i = R / r_i (every channel
  spans the tensor's range R) costs nothing;
- a dense consumer's input column i scales by 1/s_i, which coarsens that column on its output
  channels' grids: s_i = sqrt(R / r_i) shares the gain between the activation and those columns.

r_i is channel i's maximum over the calibration images (the converters' min/max rule). The
chains are found by running the model once (`quant.qat.graph_ops`: the modules and the functions
between them, by tensor identity and version): a tensor that another op also reads (a residual
ADD, a squeeze-excite's mean) would see the scaling. Each chain is still checked on the example
and left alone if the outputs move. docs/EXPORT.md, "Activation-range
equalisation", has the drift it removes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from quant.qat import Key, fold_batchnorm, graph_ops

MAX_SCALE = 1000.0      # a channel that barely fires is lifted at most this much: no float overflow
PRESERVED = 1e-4        # largest output change, relative to the output's peak, of a function-preserving chain


@dataclass(frozen=True)
class Chain:
    producer: str       # Conv2d whose output only the ReLU reads
    activation: str     # nn.ReLU whose output only the consumer reads
    consumer: str       # Conv2d, depthwise or dense


def relu_chains(model: nn.Module, example: torch.Tensor) -> list[Chain]:
    """Every convolution -> ReLU -> convolution chain whose tensors have exactly one reader each:
    one module, and no function between modules (`graph_ops`; identities read through)."""
    modules = dict(model.named_modules())
    ops = graph_ops(model, example)
    readers: dict[Key, list[str]] = {}
    for name, _, inputs, _ in ops:
        if not isinstance(modules.get(name), nn.Identity):
            for tensor in inputs:
                readers.setdefault(tensor, []).append(name)
    only_reader = {name: found[0] for name, _, _, outputs in ops if outputs
                   for found in [readers.get(outputs[0], [])] if len(found) == 1}
    chains = []
    for name, kind, _, _ in ops:
        act = only_reader.get(name)
        if kind != "conv" or act is None or type(modules.get(act)) is not nn.ReLU:
            continue
        second = only_reader.get(act)
        if second is not None and type(modules.get(second)) is nn.Conv2d and equalizable_consumer(modules[second]):
            chains.append(Chain(name, act, second))
    return chains


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per channel; a channel multiplier (out = k x in) is not: its k filters per input
    channel would need the scale repeated, which `rescale` does not do."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def equalizable_consumer(conv: nn.Conv2d) -> bool:
    """Depthwise or dense, zero-padded (a scaled channel pads with zero as before)."""
    return (conv.groups == 1 or is_depthwise(conv)) and conv.padding_mode == "zeros"


@torch.no_grad()
def channel_peaks(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel maximum of each named module's output over `batches`, in one pass."""
    peaks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: peaks[name].append(out.amax(dim=(0, 2, 3)))) for name in names]
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(values).amax(0) for name, values in peaks.items()}


def channel_scales(peaks: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """s_i: R / r_i for a depthwise consumer, its square root for a dense one; 1 for dead channels."""
    ratio = (peaks.max() / peaks.clamp_min(torch.finfo(peaks.dtype).tiny)).clamp(max=MAX_SCALE)
    scale = ratio if depthwise else ratio.sqrt()
    return torch.where(peaks > 0, scale, torch.ones_like(scale))


@torch.no_grad()
def rescale(producer: nn.Conv2d, consumer: nn.Conv2d, scale: torch.Tensor) -> None:
    """Producer output channel i times scale_i, consumer input channel i divided by it."""
    producer.weight.mul_(scale.view(-1, 1, 1, 1))
    if producer.bias is not None:
        producer.bias.mul_(scale)
    consumer.weight.div_(scale.view(-1, 1, 1, 1) if is_depthwise(consumer) else scale.view(1, -1, 1, 1))


def outputs(model: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    out = model(example)
    return list(out.values()) if isinstance(out, dict) else [out]


def largest_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(after, before))


@torch.no_grad()
def equalize(student: nn.Module, example: torch.Tensor, batches: list[torch.Tensor]) -> tuple[nn.Module, list[dict]]:
    """An equalised copy of `student` (BatchNorm folded, ReLUs not in place; `student` untouched)
    and one record per chain rescaled: names, the tensor's range R and the largest s_i."""
    model = copy.deepcopy(student).eval()
    fold_batchnorm(model, example)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    modules = dict(model.named_modules())
    chains = relu_chains(model, example)
    # Each rescaling keeps the function, so every chain's peaks and the outputs can be measured once
    peaks = channel_peaks(model, [chain.activation for chain in chains], batches)
    reference = outputs(model, example)
    records = []
    for chain in chains:
        producer, consumer = modules[chain.producer], modules[chain.consumer]
        scale = channel_scales(peaks[chain.activation], is_depthwise(consumer))
        saved = copy.deepcopy((producer.state_dict(), consumer.state_dict()))
        rescale(producer, consumer, scale)
        if largest_change(reference, outputs(model, example)) > PRESERVED:   # another reader saw the scaled tensor
            producer.load_state_dict(saved[0]), consumer.load_state_dict(saved[1])
            continue
        records.append({"producer": chain.producer, "consumer": chain.consumer,
                        "depthwise": is_depthwise(consumer), "range": round(peaks[chain.activation].max().item(), 4),
                        "largest_scale": round(scale.max().item(), 2)})
    return model, records
