"""Depth unit spaces: units are part of the type (DESIGN.md, seed 000).

Every depth tensor that crosses a module boundary travels with its space. Teachers declare the
space and range of what they output; recipes declare the space they train and evaluate in; the
pre-flight check refuses a mismatch before the first optimisation step.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DepthSpace(str, Enum):
    METRIC = "metric"          # metres along the optical axis (z-depth)
    RELATIVE = "relative"      # affine-invariant depth or inverse depth, e.g. normalised to [0, 1]
    DISPARITY = "disparity"    # inverse depth up to scale (1/m times an unknown factor)

    def describe(self) -> str:
        return {"metric": "metres",
                "relative": "affine-invariant, unitless",
                "disparity": "inverse depth up to scale"}[self.value]

    def phrase(self) -> str:
        """What a depth output in this space holds, for an artefact's description."""
        return "metric depth in metres" if self is DepthSpace.METRIC else f"{self.value} depth ({self.describe()})"


@dataclass(frozen=True)
class ValueRange:
    """Closed interval a tensor's finite values must lie in."""
    low: float
    high: float

    def contains(self, lo: float, hi: float) -> bool:
        return self.low <= lo and hi <= self.high

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


def check_depth_tensors(pred, target, valid, target_name: str = "target") -> None:
    """Raise ValueError unless `pred`, `target` and `valid` are (B, 1, H, W) and `valid` is bool."""
    import torch

    if pred.shape != target.shape or pred.shape != valid.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, {target_name} {tuple(target.shape)} and valid "
                         f"{tuple(valid.shape)} must have the same shape (B, 1, H, W).")
    if pred.dim() != 4 or pred.shape[1] != 1:
        raise ValueError(f"depth tensors must be (B, 1, H, W), got {tuple(pred.shape)}; "
                         "add the channel dimension with `.unsqueeze(1)`.")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}; "
                         "pass `valid.bool()` or build it with a comparison such as `depth > 0`.")
