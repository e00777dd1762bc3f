"""Resizing and cropping: bilinear with MIL's sampling modes, nearest neighbour, iOS17 resize, crop."""
from __future__ import annotations

import math

import numpy as np
import torch

from edge.mil_ops.base import Args, UnsupportedOpError, handler

# --- resizing: source coordinates per output pixel, as MIL defines them, then separable linear interpolation

def source_coords(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source coordinate of each of `n_out` output pixels along one axis (float64), in
    resize_bilinear's sampling modes; upsample_bilinear maps align_corners to STRICT_ALIGN_CORNERS,
    half_pixel_centers to UNALIGN_CORNERS (torch's align_corners=False) and neither to DEFAULT."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            coords = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            coords = i * (n_in - 1) / (n_out - 1)
    elif mode == "UNALIGN_CORNERS":
        coords = (i + 0.5) * n_in / n_out - 0.5
    elif mode == "DEFAULT":   # spacing (n_in - n_in / n_out) / (n_out - 1), which is n_in / n_out
        coords = i * n_in / n_out
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        coords = 0.5 * delta + i * delta
    else:
        raise UnsupportedOpError(f"sampling mode {mode!r} is not supported; supported: STRICT_ALIGN_CORNERS, "
                                 "ALIGN_CORNERS, UNALIGN_CORNERS, DEFAULT, OFFSET_CORNERS")
    return np.clip(coords, 0, n_in - 1)


def _lerp_axis(x: torch.Tensor, coords: np.ndarray, axis: int) -> torch.Tensor:
    """x sampled at fractional positions `coords` along `axis` by linear interpolation."""
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    shape = [1] * x.dim()
    shape[axis] = len(coords)
    weight = torch.from_numpy((coords - low).astype(np.float32)).view(shape)
    below = x.index_select(axis, torch.from_numpy(low))
    above = x.index_select(axis, torch.from_numpy(high))
    return below + (above - below) * weight


def bilinear(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """x (..., H, W) resized to (..., height, width) with source coordinates of `mode`."""
    x = _lerp_axis(x, source_coords(x.shape[-2], height, mode), x.dim() - 2)
    return _lerp_axis(x, source_coords(x.shape[-1], width, mode), x.dim() - 1)


def scaled_sizes(a: Args, x: torch.Tensor) -> tuple[int, int]:
    """floor(H * scale), floor(W * scale) in float32, as coremltools infers them (in float64,
    0.7 x 10 gives 6, not 7)."""
    return tuple(math.floor(np.float32(a.scalar(f"scale_factor_{axis}", 1)) * np.float32(n))
                 for axis, n in (("height", x.shape[-2]), ("width", x.shape[-1])))


@handler("upsample_bilinear")
def upsample_bilinear(a: Args):
    """Output size floor(H * scale), floor(W * scale) (the scale is recomputed from the sizes);
    align_corners defaults to True, half_pixel_centers (iOS16) to not align_corners."""
    x = a.tensor("x")
    align = bool(a.scalar("align_corners", True))
    half_pixel = bool(a.scalar("half_pixel_centers", not align))
    if align and half_pixel:
        raise UnsupportedOpError("upsample_bilinear with both align_corners and half_pixel_centers is not supported")
    mode = "STRICT_ALIGN_CORNERS" if align else "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    height, width = scaled_sizes(a, x)
    return bilinear(x, height, width, mode)


@handler("resize_bilinear")
def resize_bilinear(a: Args):
    return bilinear(a.tensor("x"), a.scalar("target_size_height", 1), a.scalar("target_size_width", 1),
                    a.scalar("sampling_mode", "DEFAULT"))


# --- nearest-neighbour resizing: each output pixel copies the input pixel at floor(source coordinate).
# upsample_nearest_neighbor and resize_nearest_neighbor take i * in / out (the scale recomputed from
# the sizes: 3 -> 3 columns at scale 1.12 takes columns 0, 1, 2), iOS17's resize the pixel centre,
# (i + 0.5) * in / out (2 -> 3 rows takes rows 0, 1, 1), as coremltools' op tests pin down.

def nearest(x: torch.Tensor, rows: np.ndarray, columns: np.ndarray) -> torch.Tensor:
    """x (..., H, W) sampled at floor(rows) x floor(columns) (source coordinates, clipped to the input)."""
    def index(coords, n_in):
        return torch.from_numpy(np.clip(np.floor(coords), 0, n_in - 1).astype(np.int64))
    x = x.index_select(x.dim() - 2, index(rows, x.shape[-2]))
    return x.index_select(x.dim() - 1, index(columns, x.shape[-1]))


@handler("upsample_nearest_neighbor")
def upsample_nearest_neighbor(a: Args):
    """Output floor(H * scale), floor(W * scale); scales may be fractional."""
    x = a.tensor("x")
    height, width = scaled_sizes(a, x)
    return nearest(x, np.arange(height) * x.shape[-2] / height, np.arange(width) * x.shape[-1] / width)


@handler("resize_nearest_neighbor")
def resize_nearest_neighbor(a: Args):
    x = a.tensor("x")
    height, width = a.scalar("target_size_height"), a.scalar("target_size_width")
    return nearest(x, np.arange(height) * x.shape[-2] / height, np.arange(width) * x.shape[-1] / width)


def resize_last_axis(a: Args, x: torch.Tensor, width: int) -> torch.Tensor:
    """iOS17 resize with resized_dims=1: x (..., W) resampled along W only, computed as (..., 1, W)."""
    rows = x.reshape(-1, 1, 1, x.shape[-1])
    mode, sampling = a.scalar("interpolation_mode", "LINEAR"), a.scalar("sampling_mode", "DEFAULT")
    if mode == "LINEAR":
        out = bilinear(rows, 1, width, sampling)
    elif mode == "NEAREST_NEIGHBOR" and sampling == "DEFAULT":
        out = nearest(rows, np.zeros(1), (np.arange(width) + 0.5) * x.shape[-1] / width)
    else:
        raise UnsupportedOpError(f"resize with interpolation_mode {mode!r} and sampling_mode {sampling!r} is not "
                                 f"supported")
    return out.reshape(*x.shape[:-1], width)


@handler("resize")
def resize(a: Args):
    """iOS17: the last `resized_dims` dims (1 or 2) take their sizes from the end of `shape` (0:
    keep), LINEAR (bilinear with the sampling mode) or NEAREST_NEIGHBOR (DEFAULT sampling only)."""
    x = a.tensor("x")
    dims, shape = a.scalar("resized_dims"), a.ints("shape")
    if dims not in (1, 2):
        raise UnsupportedOpError(f"resize over {dims} dims is not supported (1 or 2)")
    sizes = [s or x.shape[x.dim() - dims + i] for i, s in enumerate(shape[-dims:])]
    if dims == 1:   # only the last axis: as a 1-row image, so no sampling mode can touch another axis
        return resize_last_axis(a, x, sizes[0])
    height, width = sizes
    mode, sampling = a.scalar("interpolation_mode", "LINEAR"), a.scalar("sampling_mode", "DEFAULT")
    if mode == "LINEAR":
        return bilinear(x, height, width, sampling)
    if mode == "NEAREST_NEIGHBOR" and sampling == "DEFAULT":
        return nearest(x, (np.arange(height) + 0.5) * x.shape[-2] / height,
                       (np.arange(width) + 0.5) * x.shape[-1] / width)
    raise UnsupportedOpError(f"resize with interpolation_mode {mode!r} and sampling_mode {sampling!r} is not "
                             "supported; supported: LINEAR with any sampling mode, NEAREST_NEIGHBOR with DEFAULT")


@handler("crop")
def crop(a: Args):
    """x (..., H, W) without crop_height = (top, bottom) rows and crop_width = (left, right) columns."""
    x = np.asarray(a.value("x"))
    (top, bottom), (left, right) = a.ints("crop_height"), a.ints("crop_width")
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
