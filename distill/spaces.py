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
        return {"metric": "metric depth in metres",
                "relative": "relative (affine-invariant, unitless) depth",
                "disparity": "disparity (inverse depth up to scale)"}[self.value]


@dataclass(frozen=True)
class ValueRange:
    """Closed interval a tensor's finite values must lie in."""
    low: float
    high: float

    def contains(self, lo: float, hi: float) -> bool:
        return self.low <= lo and hi <= self.high

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"
