"""Per-dataset scale alignment of a metric teacher (`teacher.align=dataset`).

A metric teacher trained on other data is off by a near-constant factor on a new dataset (DA2's
metric-indoor weights, trained on Hypersim, on NYU). One factor, the median over images of the
per-image median of ground truth / teacher, is fitted on labelled training images and applied to
every label. A relative or disparity teacher cannot be aligned this way: a scale does not make
affine-invariant depth metric.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from core.spaces import DepthSpace, ValueRange
from distill.teachers.base import Teacher


class Replay:
    """Batches drawn once from `batches` and kept: each pass replays the kept ones, then draws on.
    Several teachers are fitted on the same images, each as far as it needs (fit_scale stops at
    `max_images` usable ones, which depends on the teacher's labels)."""

    def __init__(self, batches: Iterable[dict]):
        self.source, self.kept = iter(batches), []

    def __iter__(self) -> Iterator[dict]:
        yield from self.kept
        for batch in self.source:
            self.kept.append(batch)
            yield batch


def fit_scale(teacher: Teacher, batches: Iterable[dict], *, max_images: int = 64) -> float:
    """Median over up to `max_images` images of median(gt / teacher) on pixels valid in both."""
    ratios: list[torch.Tensor] = []
    for batch in batches:
        label = teacher(batch)
        for gt, valid, t in zip(batch["depth"], batch["valid"], label):
            both = valid & (t > 0) & torch.isfinite(t)
            if both.any():
                ratios.append((gt[both] / t[both]).median())
        if len(ratios) >= max_images:
            break
    if not ratios:
        raise ValueError(f"teacher.align=dataset found no image with both ground truth and {teacher.name} depth; "
                         f"it needs labelled training images (an unlabelled folder cannot be aligned): "
                         f"set teacher.align=none")
    return torch.stack(ratios).median().item()


class ScaleAligned(Teacher):
    """`inner` x `scale`, same space; features and identity delegate (the scale is recorded)."""

    def __init__(self, inner: Teacher, scale: float):
        if inner.space != DepthSpace.METRIC:
            raise ValueError(f"teacher.align=dataset scales metric depth, but {inner.name} outputs "
                             f"{inner.space.value} ({inner.space.describe()}); use a metric teacher or align=none")
        if not scale > 0:
            raise ValueError(f"alignment scale must be positive, got {scale}")
        self.inner, self.scale = inner, float(scale)
        self.name, self.space = f"{inner.name}*{scale:.4g}", inner.space
        self.range = ValueRange(inner.range.low * scale, inner.range.high * scale)
        self.needs_ground_truth = inner.needs_ground_truth

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.inner(batch) * self.scale

    def depth_and_features(self, batch: dict):
        depth, features = self.inner.depth_and_features(batch)
        return depth * self.scale, features

    def features(self, batch: dict):
        return self.inner.features(batch)

    def to(self, device: torch.device) -> "ScaleAligned":
        self.inner.to(device)
        return self

    def identity(self) -> dict:
        return {**self.inner.identity(), "scale": self.scale}
