"""Normalizations: batch, instance, layer, l2 and local response norm (population variance)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edge.mil_ops.base import Args, channel_vector, handler


@handler("batch_norm")
def batch_norm(a: Args):
    x = a.tensor("x")
    scale = torch.rsqrt(channel_vector(a.value("variance"), x) + a.scalar("epsilon", 1e-5))
    y = (x - channel_vector(a.value("mean"), x)) * scale
    if a.has("gamma"):
        y = y * channel_vector(a.value("gamma"), x)
    return y + channel_vector(a.value("beta"), x) if a.has("beta") else y


def _normalize(x: torch.Tensor, dims: list[int], epsilon: float) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    variance = (x - mean).square().mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(variance + epsilon)


@handler("instance_norm")
def instance_norm(a: Args):
    """Per sample and channel over the spatial dims; gamma, beta per channel."""
    x = a.tensor("x")
    y = _normalize(x, list(range(2, x.dim())), a.scalar("epsilon", 1e-5))
    if a.has("gamma"):
        y = y * channel_vector(a.value("gamma"), x)
    return y + channel_vector(a.value("beta"), x) if a.has("beta") else y


@handler("layer_norm")
def layer_norm(a: Args):
    """Over `axes` (default all); gamma and beta have the shape of x's dims at `axes`."""
    x = a.tensor("x")
    axes = sorted(i % x.dim() for i in a.ints("axes")) if a.value("axes", None) is not None else list(range(x.dim()))
    y = _normalize(x, axes, a.scalar("epsilon", 1e-5))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.dim())]
    if a.has("gamma") and a.value("gamma") is not None:
        y = y * a.tensor("gamma").reshape(shape)
    if a.has("beta") and a.value("beta") is not None:
        y = y + a.tensor("beta").reshape(shape)
    return y


@handler("l2_norm")
def l2_norm(a: Args):
    """x / sqrt(sum(x^2) + epsilon) over the last three dims (all dims of a rank-3 x)."""
    x = a.tensor("x")
    dims = list(range(max(0, x.dim() - 3), x.dim()))
    return x * torch.rsqrt(x.square().sum(dim=dims, keepdim=True) + a.scalar("epsilon", 1e-6))


@handler("local_response_norm")
def local_response_norm(a: Args):
    """x_c / (k + alpha / size * sum of x^2 over `size` channels around c) ** beta."""
    return F.local_response_norm(a.tensor("x"), a.scalar("size"), alpha=a.scalar("alpha", 1e-4),
                                 beta=a.scalar("beta", 0.75), k=a.scalar("k", 1.0))
