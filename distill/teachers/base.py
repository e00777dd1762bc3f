"""The teacher contract: what every teacher (embedded, Depth Anything, cached) declares and does."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from core.spaces import DepthSpace, ValueRange


def needs_a_real_teacher(teacher_name: str, dataset: str) -> str:
    """Why a teacher that labels only where ground truth exists cannot label `dataset`, and the fix."""
    return (f"teacher {teacher_name} labels only where the dataset has ground-truth depth (embedded teachers do) "
            f"and {dataset} has none: use a real teacher (teacher.name=da2-metric teacher.source=...)")


class Teacher(ABC):
    """Produces pseudo-label depth for a batch of the project's sample schema.

    Every teacher declares `space` (the units of what it outputs) and `range` (the interval its
    finite outputs lie in); pre-flight checks both before training. `__call__(batch)` returns
    (B, 1, H, W) float32 at the batch's image size, 0 where it has no opinion. `needs_ground_truth`
    says whether it reads `batch["depth"]` (the embedded teachers do; real ones read images only).
    """

    name: str = "teacher"
    space: DepthSpace = DepthSpace.METRIC
    range: ValueRange = ValueRange(0.0, float("inf"))
    needs_ground_truth: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Teacher":
        """Build from a recipe's `TeacherConfig`; real teachers read `source` and `input_size`."""
        return cls()

    @abstractmethod
    def __call__(self, batch: dict) -> torch.Tensor: ...

    def identity(self) -> dict:
        """What a pseudo-label cache records and checks: a cache made by another teacher, another
        checkpoint or in other units is refused. Real teachers add their source and weights hash."""
        return {"name": self.name, "space": self.space.value, "range": [self.range.low, self.range.high]}

    def features(self, batch: dict) -> list[torch.Tensor] | None:
        """Intermediate feature maps (B, C, h, w) for feature-level KD; None when it has none."""
        return None

    def depth_and_features(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Both from one forward where the teacher can (the Depth Anything teachers do)."""
        return self(batch), self.features(batch)

    def describe(self) -> str:
        return f"{self.name}: {self.space.value} ({self.space.describe()}), range {self.range}"

    def to(self, device: torch.device) -> "Teacher":
        return self
