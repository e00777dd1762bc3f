"""Student registry: each variant is a small named function over one builder (timm style).

Contract: `build_student(name, **options) -> MultiTaskStudent` taking a normalised image
(B, 3, H, W), H and W multiples of 32, and returning {"depth": (B, 1, H, W) > 0, "seg": logits}.
The `*_050` / `efficientvit_b0` variants are the tiny ones tests use.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from core.registry import Registry
from distill.students.model import INPUT_MULTIPLE, MultiTaskStudent, check_pretrained, load_weights_into, shipped_state

STUDENTS: Registry = Registry("student")

for _encoder in ("mobilenetv3_small_050", "mobilenetv3_small_100", "mobilenetv3_large_100",
                 "efficientvit_b0", "efficientvit_b1"):
    STUDENTS.register(_encoder, partial(MultiTaskStudent, _encoder))


def build_student(name: str, **options) -> MultiTaskStudent:
    return STUDENTS.get(name)(**options)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass at (1, 3, height, width), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, height, width, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


__all__ = ["STUDENTS", "MultiTaskStudent", "build_student", "count_params", "count_macs", "shipped_state",
           "load_weights_into", "INPUT_MULTIPLE", "check_pretrained"]
