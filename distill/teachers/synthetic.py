"""Embedded teachers on SynthRooms: renderer depth passed through a documented error model.

They stand in for Depth Anything offline, so the student learns from an imperfect teacher as in
real distillation, and the relative one reproduces seed 000's unit mismatch exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.spaces import DepthSpace, ValueRange
from distill.teachers.base import Teacher


@dataclass(frozen=True)
class TeacherErrorModel:
    """How `synthetic-metric` departs from the exact renderer depth d (metres), in this order:

    1. edge blur: d is averaged over a Gaussian of `blur_sigma` x image width pixels, with
       invalid pixels excluded, so depth edges are smeared across discontinuities as a network's
       are;
    2. far-range compression: d * (1 - far_compression * (d / far_reference)^2), i.e. -5% at
       10 m and -1.25% at 5 m with the defaults (large teachers under-estimate far depth);
    3. per-image scale error: x exp(N(0, scale_sigma)), a few percent, the same for all pixels;
    4. noise: x (1 + N(0, noise_sigma)) per pixel.
    Errors are drawn from a generator seeded by (seed, sample index): the same image always gets
    the same pseudo-label, as from a teacher cache.
    """

    blur_sigma: float = 0.006
    far_compression: float = 0.05
    far_reference: float = 10.0
    scale_sigma: float = 0.03
    noise_sigma: float = 0.01
    seed: int = 1234


def gaussian_kernel(sigma_px: float) -> torch.Tensor:
    radius = max(1, int(round(2.5 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma_px, 1e-3)) ** 2)
    return k / k.sum()


def masked_blur(depth: torch.Tensor, valid: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) depth that ignores invalid pixels."""
    k = gaussian_kernel(sigma_px).to(depth)
    r = k.numel() // 2
    num, den = depth * valid, valid.to(depth)
    for kernel, pad in ((k.view(1, 1, 1, -1), (r, r, 0, 0)), (k.view(1, 1, -1, 1), (0, 0, r, r))):
        num = F.conv2d(F.pad(num, pad, mode="replicate"), kernel)
        den = F.conv2d(F.pad(den, pad, mode="replicate"), kernel)
    return torch.where(valid, num / den.clamp_min(1e-6), torch.zeros_like(depth))


class SyntheticMetricTeacher(Teacher):
    name = "synthetic-metric"
    space = DepthSpace.METRIC
    range = ValueRange(0.0, 20.0)
    needs_ground_truth = True

    def __init__(self, errors: TeacherErrorModel = TeacherErrorModel()):
        self.errors = errors

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        e = self.errors
        depth, valid = batch["depth"].float(), batch["valid"]
        d = masked_blur(depth, valid, e.blur_sigma * depth.shape[-1])
        d = d * (1 - e.far_compression * (d / e.far_reference) ** 2).clamp_min(0.5)
        # the indices read once (on a GPU, int() of each element would wait for the device each time)
        gen = [torch.Generator().manual_seed(e.seed * 1_000_003 + i) for i in torch.as_tensor(batch["index"]).tolist()]
        scale = torch.stack([torch.randn(1, generator=g) for g in gen]).view(-1, 1, 1, 1)
        # drawn on the CPU (a generator per image: labels independent of the batch and the device),
        # then moved to the batch's device, where `flipped` is
        noise = torch.stack([torch.randn(d.shape[1:], generator=g) for g in gen]).to(d)
        # drawn for the stored image, then mirrored with a flipped sample, as a cache mirrors its label
        flipped = torch.as_tensor(batch.get("flipped", False), device=d.device).expand(len(gen)).view(-1, 1, 1, 1)
        noise = torch.where(flipped, noise.flip(-1), noise)
        d = d * torch.exp(e.scale_sigma * scale.to(d)) * (1 + e.noise_sigma * noise)
        return torch.where(valid, d.clamp_min(1e-3), torch.zeros_like(d))


class SyntheticRelativeTeacher(Teacher):
    """Depth Anything 2's output space: per-image min-max normalised inverse depth in [0, 1]
    (1 = nearest). Affine-invariant and unitless: it cannot supervise metres (seed 000)."""

    name = "synthetic-relative"
    space = DepthSpace.RELATIVE
    range = ValueRange(0.0, 1.0)
    needs_ground_truth = True

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        depth, valid = batch["depth"].float(), batch["valid"]
        inv = torch.where(valid, 1.0 / depth.clamp_min(1e-3), torch.zeros_like(depth))
        big = torch.finfo(inv.dtype).max
        lo = torch.where(valid, inv, torch.full_like(inv, big)).amin(dim=(1, 2, 3), keepdim=True)
        hi = inv.amax(dim=(1, 2, 3), keepdim=True)
        rel = (inv - lo) / (hi - lo).clamp_min(1e-6)
        return torch.where(valid, rel.clamp(0, 1), torch.zeros_like(rel))


class SyntheticAssistantTeacher(SyntheticMetricTeacher):
    """Distill Any Depth's assistant, embedded: where `synthetic-metric` stands in for an
    encoder-decoder teacher (smooth edges, accurate global scale), this one stands in for a
    diffusion teacher (seed 004: fine detail, weaker global consistency): a third of the edge
    blur, twice the per-image scale error, other noise draws."""

    name = "synthetic-assistant"

    def __init__(self, errors: TeacherErrorModel = TeacherErrorModel(blur_sigma=0.002, scale_sigma=0.06,
                                                                     noise_sigma=0.015, seed=4321)):
        super().__init__(errors)
