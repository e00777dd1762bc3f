"""Convolution, transposed convolution and pooling: x (N, C, *spatial), with MIL's pad types."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edge.mil_ops.base import Args, UnsupportedOpError, channel_vector, handler

# --- convolution and pooling: x (N, C, *spatial), pads computed as MIL's pad_type defines them

def spatial_pads(pad_type: str, pad: list[int], sizes: list[int], kernel: list[int], strides: list[int],
                 dilations: list[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim. "same": total = max(0, s*ceil(i/s) - i + k_eff - s),
    the odd pixel after; "same_lower": the odd pixel before; "custom": `pad` (before, after per dim)."""
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(sizes))]
    if pad_type not in ("same", "same_lower"):
        raise UnsupportedOpError(f"pad_type {pad_type!r} is not supported; supported: valid, custom, same, same_lower")
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max(0, s * math.ceil(size / s) - size + (k - 1) * d + 1 - s)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def pad_spatial(x: torch.Tensor, pads: list[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad: last dim first
    return F.pad(x, flat, value=value) if any(flat) else x


def window_geometry(a: Args, kernel: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(strides, dilations, pads) of a conv / pool op with their MIL defaults (also the palettes' bias
    correction, targets/coreml.py, which reads what each tap of a convolution sees)."""
    rank = len(kernel)
    strides = a.ints("strides", [1] * rank)
    dilations = a.ints("dilations", [1] * rank)
    sizes = list(np.shape(a.value("x"))[2:])
    pads = spatial_pads(a.scalar("pad_type", "valid"), a.ints("pad", [0] * 2 * rank), sizes, kernel, strides, dilations)
    return strides, dilations, pads


CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@handler("conv")
def conv(a: Args):
    """x (N, C_in, *D), weight (C_out, C_in / groups, *K), bias (C_out,) -> (N, C_out, *D_out)."""
    weight = a.tensor("weight")
    strides, dilations, pads = window_geometry(a, list(weight.shape[2:]))
    bias = a.tensor("bias") if a.has("bias") else None
    return CONVS[weight.dim() - 2](pad_spatial(a.tensor("x"), pads), weight, bias, stride=strides,
                                   dilation=dilations, groups=a.scalar("groups", 1))


def pooled_size(size: int, kernel: int, stride: int, pads: tuple[int, int], ceil: bool) -> int:
    """MIL's output length: with ceil_mode, a last window is kept only if it starts before the
    input's end (torch, given the padding already added, would keep one that starts in it)."""
    span = size + sum(pads) - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pads[0]:
        if not any(pads):   # MIL keeps such a window when unpadded: it covers no input, its value unspecified
            raise UnsupportedOpError(f"ceil_mode with a last window past the input's end (length {size}, kernel "
                                     f"{kernel}, stride {stride}, no padding): Core ML keeps it and its value is "
                                     "unspecified; use ceil_mode=False")
        return out - 1
    return out


def _pool(a: Args, pools: dict, x: torch.Tensor, pad_value: float, sum_windows: bool = False) -> torch.Tensor:
    """x (N, C, *D) padded with pad_value as the op's pad_type says, then pooled to MIL's output
    size. sum_windows: the sum of each window, not its mean (zeros past the end add nothing)."""
    kernel = a.ints("kernel_sizes")
    strides, _, pads = window_geometry(a, kernel)
    ceil = bool(a.scalar("ceil_mode", False))
    sizes = [pooled_size(n, k, s, p, ceil) for n, k, s, p in zip(x.shape[2:], kernel, strides, pads)]
    if sum_windows:   # every window whole: torch's mean of a clipped window divides by fewer pixels
        pads = [(before, after + k) for (before, after), k in zip(pads, kernel)]
    pooled = pools[len(kernel)](pad_spatial(x, pads, pad_value), kernel, strides, ceil_mode=ceil and not sum_windows)
    if sum_windows:
        pooled = pooled * math.prod(kernel)
    for axis, size in enumerate(sizes):
        pooled = pooled.narrow(2 + axis, 0, size)
    return pooled


@handler("max_pool")
def max_pool(a: Args):
    return _pool(a, MAX_POOLS, a.tensor("x"), -math.inf)


@handler("avg_pool")
def avg_pool(a: Args):
    """Padding counts in the average unless exclude_padding_from_average (then each window is
    divided by its share of real pixels: the same pooling over ones)."""
    mean = _pool(a, AVG_POOLS, a.tensor("x"), 0.0)
    if not a.scalar("exclude_padding_from_average", False):
        return mean
    return mean / _pool(a, AVG_POOLS, torch.ones((1, 1, *np.shape(a.value("x"))[2:])), 0.0)


@handler("l2_pool")
def l2_pool(a: Args):
    """sqrt of the sum of squares in each window (padding adds zeros)."""
    return torch.sqrt(_pool(a, AVG_POOLS, a.tensor("x").square(), 0.0, sum_windows=True))


# --- transposed convolution

CONV_TRANSPOSES = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@handler("conv_transpose")
def conv_transpose(a: Args):
    """x (N, C_in, *D), weight (C_in, C_out / groups, *K). The full transposed convolution,
    (D - 1) * stride + (K - 1) * dilation + 1 per dim, is cropped: by `pad` (custom), by the
    excess over D * stride split as conv's "same" splits it, or not at all (valid); an
    `output_shape` (N, C_out, *D_out) sets the kept length, zero-filled past the full output."""
    x, weight = a.tensor("x"), a.tensor("weight")
    rank = weight.dim() - 2
    strides, dilations = a.ints("strides", [1] * rank), a.ints("dilations", [1] * rank)
    full = CONV_TRANSPOSES[rank](x, weight, None, stride=strides, dilation=dilations, groups=a.scalar("groups", 1))
    pad_type, pad = a.scalar("pad_type", "valid"), a.ints("pad", [0] * 2 * rank)
    out_shape = a.ints("output_shape")[2:] if a.value("output_shape", None) is not None else None
    for i in range(rank):
        size, full_size = x.shape[2 + i], full.shape[2 + i]
        if pad_type == "custom":
            start, length = pad[2 * i], full_size - pad[2 * i] - pad[2 * i + 1]
        elif pad_type == "same":
            start, length = max(0, full_size - size * strides[i]) // 2, size * strides[i]
        elif pad_type == "valid":
            start, length = 0, full_size
        else:
            raise UnsupportedOpError(f"conv_transpose pad_type {pad_type!r} is not supported; "
                                     "supported: valid, same, custom")
        length = out_shape[i] if out_shape is not None else length
        axis = 2 + i
        kept = full.narrow(axis, start, min(length, full_size - start))
        if kept.shape[axis] < length:
            fill = list(kept.shape)
            fill[axis] = length - kept.shape[axis]
            kept = torch.cat([kept, kept.new_zeros(fill)], dim=axis)
        full = kept
    return full + channel_vector(a.value("bias"), full) if a.has("bias") and a.value("bias") is not None else full
