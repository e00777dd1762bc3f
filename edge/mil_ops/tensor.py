"""Tensor layout: reshape, transpose, slicing, concatenation, padding, space / depth / batch
rearrangements, gathers and the shape-producing ops."""
from __future__ import annotations

import numpy as np

from edge.mil_ops.base import Args, UnsupportedOpError, handler


@handler("concat")
def concat(a: Args):
    """interleave: the parts (equal shapes) alternate along `axis`, one slice of each in turn."""
    values, axis = [np.asarray(v) for v in a.many("values")], a.scalar("axis")
    if not a.scalar("interleave", False):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return np.stack(values, axis=axis + 1).reshape(shape)


@handler("reshape")
def reshape(a: Args):
    """shape: -1 is inferred; 0 copies a dim of x, matched from the right (iOS17: shape[i] matches
    x.shape[j] when len(shape) - i == rank(x) - j, 1 where there is none; iOS15/16 allow 0 only when
    len(shape) == rank(x), where both rules agree)."""
    x, shape = np.asarray(a.value("x")), a.ints("shape")
    offset = x.ndim - len(shape)
    return x.reshape([(x.shape[i + offset] if 0 <= i + offset < x.ndim else 1) if s == 0 else s
                      for i, s in enumerate(shape)])


@handler("reshape_like")
def reshape_like(a: Args):
    """x reshaped to the concatenation of ref_tensors[k].shape[begins[k]:ends[k]] (end_masks[k]: to the end)."""
    def flat(name):   # a tuple input: one binding per element, or one tensor
        return np.concatenate([np.ravel(v) for v in a.many(name)])
    dims = []
    for ref, begin, end, to_end in zip(a.many("ref_tensors"), flat("begins"), flat("ends"), flat("end_masks")):
        dims += list(np.shape(ref)[int(begin):None if to_end else int(end)])
    return np.asarray(a.value("x")).reshape(dims)


@handler("transpose")
def transpose(a: Args):
    return np.transpose(a.value("x"), a.ints("perm"))


@handler("squeeze")
def squeeze(a: Args):
    x = np.asarray(a.value("x"))
    axes = a.ints("axes") if a.has("axes") else [i for i, s in enumerate(x.shape) if s == 1]
    return np.squeeze(x, axis=tuple(axes))


@handler("expand_dims")
def expand_dims(a: Args):
    return np.expand_dims(a.value("x"), tuple(a.ints("axes")))


@handler("pad")
def pad(a: Args):
    """pad: (before, after) for each of the last len(pad) / 2 dims; mode constant, reflect or replicate."""
    x = np.asarray(a.value("x"))
    flat = a.ints("pad")
    widths = [(0, 0)] * (x.ndim - len(flat) // 2) + [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    mode = a.scalar("mode", "constant")
    if mode == "constant":
        return np.pad(a.tensor("x").numpy(), widths, constant_values=a.scalar("constant_val", 0.0))
    modes = {"reflect": "reflect", "replicate": "edge"}
    if mode not in modes:
        raise UnsupportedOpError(f"pad mode {mode!r} is not supported; supported: constant, reflect, replicate")
    limit = {"reflect": 1, "replicate": 0}[mode]   # Core ML: reflect pads at most D - 1, replicate at most D
    if any(max(w) > n - limit for w, n in zip(widths, x.shape)):
        raise UnsupportedOpError(f"pad {mode} by {flat} on shape {x.shape}: Core ML allows at most "
                                 f"{'D - 1' if limit else 'D'} per side (numpy would pad on)")
    return np.pad(x, widths, mode=modes[mode])


@handler("slice_by_index")
def slice_by_index(a: Args):
    """numpy slicing x[begin:end:stride] per axis; a set begin_mask / end_mask bit means "from the
    start" / "to the end"; squeeze_mask drops that axis (indexing at begin)."""
    x = np.asarray(a.value("x"))
    rank = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask, end_mask, squeeze_mask = (a.ints(m, [0] * rank) for m in ("begin_mask", "end_mask", "squeeze_mask"))
    index = tuple((0 if begin_mask[i] else begin[i]) if squeeze_mask[i] else
                  slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i])
                  for i in range(rank))
    # a copy: a negative stride gives a view torch cannot wrap; np.array keeps a 0-d result 0-d
    # (ascontiguousarray makes it (1,)), which coremltools' reads of one shape entry produce
    return np.array(x[index], copy=True)


@handler("split")
def split(a: Args):
    """x split along `axis` into num_splits equal parts or parts of split_sizes: one output each."""
    x, axis = np.asarray(a.value("x")), a.scalar("axis")
    if a.has("split_sizes"):
        bounds = np.cumsum(a.ints("split_sizes"))[:-1]
        return np.split(x, bounds, axis=axis)
    return np.split(x, a.scalar("num_splits"), axis=axis)


@handler("slice_by_size")
def slice_by_size(a: Args):
    """x[begin : begin + size] per axis; size -1 means to the end; a negative begin counts from the end."""
    x = np.asarray(a.value("x"))
    begin = [b + n if b < 0 else b for b, n in zip(a.ints("begin"), x.shape)]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, a.ints("size")))]


@handler("reverse_sequence")
def reverse_sequence(a: Args):
    """For each index b along batch_axis, the first lengths[b] elements along seq_axis reversed."""
    x = np.array(a.value("x"))
    seq_axis, batch_axis = a.scalar("seq_axis", 0) % x.ndim, a.scalar("batch_axis", 0) % x.ndim
    for b, length in enumerate(a.ints("lengths")):
        index = [slice(None)] * x.ndim
        index[batch_axis], index[seq_axis] = b, slice(0, length)
        # the batch axis is gone from the slice: seq_axis shifts down when it came after it
        x[tuple(index)] = np.flip(x[tuple(index)], axis=seq_axis - (seq_axis > batch_axis))
    return x


@handler("sliding_windows")
def sliding_windows(a: Args):
    """Windows of `size` along `axis`, every `stride`: that dim becomes (windows, size)."""
    x = np.asarray(a.value("x"))
    axis, size, stride = a.scalar("axis") % x.ndim, a.scalar("size"), a.scalar("stride", 1)
    windows = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)    # (..., L - size + 1, ..., size)
    windows = np.moveaxis(windows, -1, axis + 1)
    return np.ascontiguousarray(windows.take(np.arange(0, x.shape[axis] - size + 1, stride), axis=axis))


@handler("space_to_batch")
def space_to_batch(a: Args):
    """x (n, C, H, W) zero-padded by `paddings`, then each (b0, b1) block offset becomes a batch
    group: (b0 * b1 * n, C, H' / b0, W' / b1), block offset major (TensorFlow's order)."""
    (b0, b1), pads = a.ints("block_shape"), a.ints("paddings")
    x = np.pad(np.asarray(a.value("x")), [(0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])])
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // b0, b0, w // b1, b1).transpose(3, 5, 0, 1, 2, 4)
    return blocks.reshape(b0 * b1 * n, c, h // b0, w // b1)


@handler("batch_to_space")
def batch_to_space(a: Args):
    """The inverse of space_to_batch, then `crops` removed from each spatial dim."""
    (b0, b1), crops = a.ints("block_shape"), a.ints("crops")
    x = np.asarray(a.value("x"))
    n, c, h, w = x.shape
    n //= b0 * b1
    space = x.reshape(b0, b1, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * b0, w * b1)
    return space[:, :, crops[0]:h * b0 - crops[1], crops[2]:w * b1 - crops[3]]


@handler("reverse")
def reverse(a: Args):
    x = np.asarray(a.value("x"))
    return np.flip(x, axis=tuple(a.ints("axes")) if a.has("axes") and a.value("axes") is not None else None).copy()


@handler("tile")
def tile(a: Args):
    return np.tile(a.value("x"), a.ints("reps"))


@handler("stack")
def stack(a: Args):
    return np.stack([np.asarray(v) for v in a.many("values")], axis=a.scalar("axis"))


@handler("shape")
def shape(a: Args):
    return np.array(np.shape(a.value("x")), np.int32)


@handler("fill")
def fill(a: Args):
    return np.full(a.ints("shape"), a.scalar("value", 0.0))


@handler("fill_like")
def fill_like(a: Args):
    return np.full(np.shape(a.value("ref_tensor")), a.scalar("value", 0.0))


@handler("range_1d")
def range_1d(a: Args):
    return np.arange(a.scalar("start"), a.scalar("end"), a.scalar("step"))


@handler("flatten2d")
def flatten2d(a: Args):
    """(d0 * ... * d_{axis-1}, d_axis * ... * d_n)."""
    x = np.asarray(a.value("x"))
    axis = a.scalar("axis", 1) % max(1, x.ndim) if a.scalar("axis", 1) < 0 else a.scalar("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _space_to_channels(x: np.ndarray, block: int, channel_major: bool) -> np.ndarray:
    """(N, C, H, W) -> (N, C * b * b, H / b, W / b); channel_major (pixel_unshuffle): channel c's b*b
    pixels are consecutive; else (space_to_depth) the block offset is the major part."""
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // block, block, w // block, block)
    order = (0, 1, 3, 5, 2, 4) if channel_major else (0, 3, 5, 1, 2, 4)
    return blocks.transpose(order).reshape(n, c * block * block, h // block, w // block)


def _channels_to_space(x: np.ndarray, block: int, channel_major: bool) -> np.ndarray:
    """The inverse of _space_to_channels: depth_to_space (block offset major) and pixel_shuffle."""
    n, c, h, w = x.shape
    depth = c // (block * block)
    if channel_major:
        blocks = x.reshape(n, depth, block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        blocks = x.reshape(n, block, block, depth, h, w).transpose(0, 3, 4, 1, 5, 2)
    return blocks.reshape(n, depth, h * block, w * block)


@handler("space_to_depth")
def space_to_depth(a: Args):
    return _space_to_channels(np.asarray(a.value("x")), a.scalar("block_size"), channel_major=False)


@handler("depth_to_space")
def depth_to_space(a: Args):
    return _channels_to_space(np.asarray(a.value("x")), a.scalar("block_size"), channel_major=False)


@handler("pixel_unshuffle")
def pixel_unshuffle(a: Args):
    return _space_to_channels(np.asarray(a.value("x")), a.scalar("downscale_factor"), channel_major=True)


@handler("pixel_shuffle")
def pixel_shuffle(a: Args):
    return _channels_to_space(np.asarray(a.value("x")), a.scalar("upscale_factor"), channel_major=True)


@handler("gather")
def gather(a: Args):
    """x indexed by `indices` along `axis` (negative indices count from the end); the first
    `batch_dims` dims are shared by x and indices, one gather per batch element."""
    x, indices = np.asarray(a.value("x")), np.asarray(a.value("indices")).astype(np.int64)
    axis, batch_dims = a.scalar("axis", 0) % x.ndim, a.scalar("batch_dims", 0)
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    xs, ids = x.reshape(-1, *x.shape[batch_dims:]), indices.reshape(-1, *indices.shape[batch_dims:])
    out = np.stack([np.take(xb, ib, axis=axis - batch_dims) for xb, ib in zip(xs, ids)])
    return out.reshape(*x.shape[:batch_dims], *out.shape[1:])


@handler("gather_along_axis")
def gather_along_axis(a: Args):
    x, indices = np.asarray(a.value("x")), np.asarray(a.value("indices")).astype(np.int64)
    axis = a.scalar("axis", 0) % x.ndim
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)
