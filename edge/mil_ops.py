"""The op handlers of the MIL reference executor (edge/mil.py): one function per MIL op type,
registered in `HANDLERS` by op type name with `@handler("...")`. A handler takes the op's
resolved inputs (`Args`) and returns its output(s), computed in float32 (torch or numpy);
edge.mil.run_handler rounds them to the dtypes the program declares. How precision works, and
which programs are in scope, is in edge/mil.py. Also here: the convolution / pooling padding,
resizing coordinates and bit unpacking the handlers share, and the compressed-weight
(constexpr_*) handlers, which edge.mil.MILProgram runs once at load.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:   # only for annotations: edge.mil imports this module
    from edge.mil import Op

# MIL dtype names (cast's `dtype`, constexpr_cast's `output_dtype`) -> numpy.
DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bool": np.bool_,
          "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
          "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
          # sub-byte dtypes (iOS18 compressed weights), held unpacked, one value per byte
          "int4": np.int8, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint4": np.uint8, "uint6": np.uint8}
SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}


class UnsupportedOpError(NotImplementedError):
    """The program uses an op type (or a form of one) that the reference executor does not implement."""


# ----------------------------------------------------------------------------- handlers

HANDLERS: dict[str, Callable] = {}
_REQUIRED = object()


def handler(*op_types: str):
    """Register a function `fn(a: Args) -> array | [arrays]` as the handler of `op_types`."""
    def register(fn):
        for op_type in op_types:
            if op_type in HANDLERS:
                raise ValueError(f"op type {op_type!r} already has a handler ({HANDLERS[op_type].__name__})")
            HANDLERS[op_type] = fn
        return fn
    return register


def as_f32(value) -> torch.Tensor:
    """A numpy value as a float32 torch tensor (torch converts float16 with vector instructions)."""
    array = np.asarray(value, order="C")   # (ascontiguousarray would make a scalar 1-D)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"cannot compute on a value of dtype {array.dtype}")
    return torch.from_numpy(array).float()


class Args:
    """The resolved inputs of one op: numpy values by input name (attributes for constexpr ops).
    cache: float32 tensors of the program's constants by name (converted once), or None."""

    def __init__(self, op: Op, env: dict, cache: dict | None = None):
        self.op, self.env, self.cache = op, env, cache

    def _bindings(self, name: str):
        if name in self.op.inputs:
            return [self.env[b] if isinstance(b, str) else b for b in self.op.inputs[name]]
        if name in self.op.attributes:
            return [self.op.attributes[name]]
        return None

    def has(self, name: str) -> bool:
        return self._bindings(name) is not None

    def value(self, name: str, default=_REQUIRED):
        found = self._bindings(name)
        if found is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.op.type} op {self.op.name!r} has no input {name!r}; "
                                 f"it has {sorted([*self.op.inputs, *self.op.attributes])}")
            return default
        return found[0]

    def many(self, name: str) -> list:
        return self._bindings(name) or []

    def tensor(self, name: str) -> torch.Tensor:
        """Input `name` as a float32 torch tensor (the compute precision of every handler)."""
        bindings = self.op.inputs.get(name)
        if self.cache is not None and bindings and isinstance(bindings[0], str) and bindings[0] in self.cache:
            return self.cache[bindings[0]]
        return as_f32(self.value(name))


    def ints(self, name: str, default=_REQUIRED) -> list[int]:
        return [int(v) for v in np.asarray(self.value(name, default)).reshape(-1)]

    def scalar(self, name: str, default=_REQUIRED):
        value = self.value(name, default)
        return value.item() if isinstance(value, np.ndarray) else value


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    handler(op_type)(lambda a: fn(a.tensor("x")))


for _type, _fn in {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
                   "sqrt": torch.sqrt, "abs": torch.abs, "silu": F.silu,
                   "relu6": lambda x: x.clamp(0.0, 6.0)}.items():
    _unary(_type, _fn)


def _binary(op_type: str, float_fn: Callable, int_fn: Callable) -> None:
    """Elementwise with broadcasting; float inputs compute in float32 (torch), integer ones in numpy."""
    def run(a: Args):
        x, y = np.asarray(a.value("x")), np.asarray(a.value("y"))
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            return float_fn(a.tensor("x"), a.tensor("y"))
        return int_fn(x, y)
    handler(op_type)(run)


for _type, _fns in {"add": (torch.add, np.add), "sub": (torch.sub, np.subtract), "mul": (torch.mul, np.multiply),
                    "maximum": (torch.maximum, np.maximum), "minimum": (torch.minimum, np.minimum),
                    "real_div": (torch.div, np.true_divide)}.items():
    _binary(_type, *_fns)


@handler("const")
def const(a: Args):
    return a.value("val")


@handler("identity")
def identity(a: Args):
    return a.value("x")


@handler("cast")
def cast(a: Args):
    """x -> dtype ("fp16", "fp32", "int32", ...); float -> int truncates toward zero."""
    return np.asarray(a.value("x")).astype(_dtype(a.scalar("dtype"), a.op))


@handler("clip")
def clip(a: Args):
    return a.tensor("x").clamp(a.scalar("alpha"), a.scalar("beta"))


@handler("sigmoid_hard")
def sigmoid_hard(a: Args):
    """min(max(alpha * x + beta, 0), 1); torch's hardsigmoid is alpha = 1/6, beta = 0.5."""
    return (a.scalar("alpha", 0.2) * a.tensor("x") + a.scalar("beta", 0.5)).clamp(0.0, 1.0)


@handler("thresholded_relu")
def thresholded_relu(a: Args):
    """x where x >= alpha, else 0 (coremltools writes hardswish as this, sigmoid_hard and mul)."""
    x = a.tensor("x")
    return torch.where(x >= a.scalar("alpha", 1.0), x, torch.zeros_like(x))


@handler("softmax")
def softmax(a: Args):
    return torch.softmax(a.tensor("x"), dim=a.scalar("axis", -1))


def _reduce(op_type: str, fn: Callable) -> None:
    """x reduced over `axes` (default: all), keeping reduced dims when keep_dims (default False)."""
    def run(a: Args):
        x = a.tensor("x").numpy()
        axes = a.value("axes", None)
        return fn(x, axis=None if axes is None else tuple(a.ints("axes")), keepdims=bool(a.scalar("keep_dims", False)))
    handler(op_type)(run)


for _type, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max}.items():
    _reduce(_type, _fn)


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


def _pad_spatial(x: torch.Tensor, pads: list[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad: last dim first
    return F.pad(x, flat, value=value) if any(flat) else x


def _spatial(a: Args, kernel: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(strides, dilations, pads) of a conv / pool op with their MIL defaults."""
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
    strides, dilations, pads = _spatial(a, list(weight.shape[2:]))
    bias = a.tensor("bias") if a.has("bias") else None
    return CONVS[weight.dim() - 2](_pad_spatial(a.tensor("x"), pads), weight, bias, stride=strides,
                                   dilation=dilations, groups=a.scalar("groups", 1))


def _pool(a: Args, pools: dict, x: torch.Tensor, pad_value: float) -> torch.Tensor:
    """x (N, C, *D) padded with pad_value as the op's pad_type says, then pooled."""
    kernel = a.ints("kernel_sizes")
    strides, _, pads = _spatial(a, kernel)
    return pools[len(kernel)](_pad_spatial(x, pads, pad_value), kernel, strides,
                              ceil_mode=bool(a.scalar("ceil_mode", False)))


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
    kernel = a.ints("kernel_sizes")
    return torch.sqrt(_pool(a, AVG_POOLS, a.tensor("x").square(), 0.0) * math.prod(kernel))


@handler("matmul")
def matmul(a: Args):
    x, y = a.tensor("x"), a.tensor("y")
    if a.scalar("transpose_x", False):
        x = x.transpose(-1, -2)
    if a.scalar("transpose_y", False):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


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
    height = math.floor(x.shape[-2] * a.scalar("scale_factor_height", 1))
    width = math.floor(x.shape[-1] * a.scalar("scale_factor_width", 1))
    return bilinear(x, height, width, mode)


@handler("resize_bilinear")
def resize_bilinear(a: Args):
    return bilinear(a.tensor("x"), a.scalar("target_size_height", 1), a.scalar("target_size_width", 1),
                    a.scalar("sampling_mode", "DEFAULT"))


# --- tensor layout

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
    index = tuple(begin[i] if squeeze_mask[i] else
                  slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i])
                  for i in range(rank))
    return np.ascontiguousarray(x[index])   # a negative stride gives a view torch cannot wrap


@handler("split")
def split(a: Args):
    """x split along `axis` into num_splits equal parts or parts of split_sizes: one output each."""
    x, axis = np.asarray(a.value("x")), a.scalar("axis")
    if a.has("split_sizes"):
        bounds = np.cumsum(a.ints("split_sizes"))[:-1]
        return np.split(x, bounds, axis=axis)
    return np.split(x, a.scalar("num_splits"), axis=axis)


# --- compressed weights (iOS16), decoded once at load

@handler("constexpr_affine_dequantize")
def constexpr_affine_dequantize(a: Args):
    """(quantized_data - zero_point) * scale; zero_point and scale are scalars or vectors along `axis`."""
    data = np.asarray(a.value("quantized_data"))
    shape = [1] * data.ndim
    shape[a.scalar("axis") % data.ndim] = -1
    zero_point = np.asarray(a.value("zero_point"), np.float32).reshape(shape if np.ndim(a.value("zero_point")) else ())
    scale = np.asarray(a.value("scale"), np.float32).reshape(shape if np.ndim(a.value("scale")) else ())
    return (data.astype(np.float32) - zero_point) * scale


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """`count` unsigned nbits-wide fields from uint8 bytes, packed from each byte's least significant
    bit upward (a field may straddle two bytes: its low bits in the first): iOS16's constexpr_lut_to_dense."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    if bits.size < nbits * count:
        raise ValueError(f"{packed.size} packed bytes hold {bits.size // nbits} {nbits}-bit indices, {count} needed")
    fields = bits[:nbits * count].reshape(count, nbits).astype(np.int64)
    return fields @ (1 << np.arange(nbits, dtype=np.int64))


def unpack_sub_byte(packed: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """`count` values of a sub-byte MIL dtype (int4, uint1..uint6) from packed bytes; int4 is two's
    complement."""
    nbits = SUB_BYTE_BITS[dtype]
    fields = unpack_bits(packed, nbits, count)
    if dtype.startswith("int"):
        fields = np.where(fields >= 1 << (nbits - 1), fields - (1 << nbits), fields)
    return fields.astype(DTYPES[dtype])


@handler("constexpr_lut_to_dense")
def constexpr_lut_to_dense(a: Args):
    """iOS16 form: lut (2**nbits,), indices (uint8, packed LSB first), shape -> lut[indices].reshape(shape).
    iOS18 form (no `shape`): indices (unpacked uintN, shape D), lut (*G, 2**nbits, V), vector_axis: see
    lut_lookup."""
    if not a.has("shape"):
        return lut_lookup(np.asarray(a.value("indices")), np.asarray(a.value("lut")), a.value("vector_axis", None))
    lut, shape = np.asarray(a.value("lut")), a.ints("shape")
    nbits = int(lut.size).bit_length() - 1
    if lut.ndim != 1 or lut.size != 1 << nbits:
        raise ValueError(f"constexpr_lut_to_dense {a.op.name!r}: lut has shape {lut.shape}, expected (2**nbits,)")
    return lut[unpack_bits(a.value("indices"), nbits, int(np.prod(shape)))].reshape(shape)


def lut_lookup(indices: np.ndarray, lut: np.ndarray, vector_axis=None) -> np.ndarray:
    """iOS18 palettes. lut (*G, 2**nbits, V) holds one palette per block: along dim i, G[i] palettes
    each cover indices.shape[i] / G[i] consecutive positions (per-grouped-channel palettes have G =
    (groups, 1, ...)). Each index selects a V-vector; for V > 1 the vectors are laid out along
    `vector_axis` (that output dim is V times the indices'), consecutive elements of one vector
    next to each other."""
    rank = indices.ndim
    if lut.ndim != rank + 2 or any(d % g for d, g in zip(indices.shape, lut.shape[:rank])):
        raise ValueError(f"lut of shape {lut.shape} does not tile indices of shape {indices.shape}")
    # flat palette number of every index position: sum over dims of (position // block) * stride
    strides = np.cumprod((1, *lut.shape[1:rank][::-1]))[::-1]
    palette = np.zeros(indices.shape, np.int64)
    for axis, (size, groups, stride) in enumerate(zip(indices.shape, lut.shape[:rank], strides)):
        group = np.arange(size) // (size // groups) * stride
        palette = palette + group.reshape([-1 if i == axis else 1 for i in range(rank)])
    vectors = lut.reshape(-1, *lut.shape[rank:])[palette, indices.astype(np.int64)]   # (*D, V)
    if lut.shape[-1] == 1:
        return vectors[..., 0]
    axis = int(vector_axis) % rank
    shape = list(indices.shape)
    shape[axis] *= lut.shape[-1]
    return np.moveaxis(vectors, -1, axis + 1).reshape(shape)


def block_scale(data: np.ndarray, scale: np.ndarray, offset) -> np.ndarray:
    """scale * (data - offset), float32, scale and offset repeated over blocks: along dim i one
    scale covers data.shape[i] / scale.shape[i] consecutive positions (iOS18 blockwise quantisation)."""
    data = data.astype(np.float32)
    if scale.ndim != data.ndim or any(d % s for d, s in zip(data.shape, scale.shape)):
        raise ValueError(f"scale of shape {scale.shape} does not tile data of shape {data.shape}")

    def spread(x):
        for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
            x = np.repeat(x, d // s, axis) if d != s else x
        return x.astype(np.float32)
    if offset is not None:
        data = data - spread(np.asarray(offset))
    return spread(scale) * data


def scatter_mask(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A dense tensor of mask's shape: zeros, and `nonzero` (in C order) where the mask is set."""
    mask = np.asarray(mask) != 0
    if int(mask.sum()) != nonzero.size:
        raise ValueError(f"the sparsity mask sets {int(mask.sum())} elements, the data holds {nonzero.size}")
    dense = np.zeros(mask.shape, nonzero.dtype)
    dense[mask] = nonzero.reshape(-1)
    return dense


@handler("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(a: Args):
    """iOS18: scale * (data - offset), per block (see block_scale); data int4/uint4/int8/uint8/float."""
    return block_scale(np.asarray(a.value("data")), np.asarray(a.value("scale")), a.value("offset", None))


@handler("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(a: Args):
    """iOS16: mask is a flat bit mask (uint8, LSB first) and `shape` the output's; iOS18: mask is a
    uint1 tensor of the output's shape. nonzero_data fills the set positions in C order."""
    nonzero = np.asarray(a.value("nonzero_data"))
    if a.has("shape"):
        shape = a.ints("shape")
        bits = np.unpackbits(np.asarray(a.value("mask"), np.uint8), bitorder="little")[:int(np.prod(shape))]
        return scatter_mask(nonzero, bits.reshape(shape))
    return scatter_mask(nonzero, a.value("mask"))


@handler("constexpr_lut_to_sparse")
def constexpr_lut_to_sparse(a: Args):
    """iOS18 palette on sparse data: -> (mask, palettized nonzero values); with vector palettes the
    mask is repeated V times along vector_axis."""
    mask, lut = np.asarray(a.value("indices_mask")), np.asarray(a.value("lut"))
    indices = scatter_mask(np.asarray(a.value("indices_nonzero_data")), mask)
    vector_axis = a.value("vector_axis", None)
    dense = lut_lookup(indices, lut, vector_axis)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis) % mask.ndim)
    return mask, dense[mask != 0]


@handler("constexpr_sparse_blockwise_shift_scale")
def constexpr_sparse_blockwise_shift_scale(a: Args):
    """iOS18 blockwise dequantisation of sparse data: -> (mask, dequantized nonzero values)."""
    mask = np.asarray(a.value("data_mask"))
    data = scatter_mask(np.asarray(a.value("nonzero_data")), mask)
    dense = block_scale(data, np.asarray(a.value("scale")), a.value("offset", None))
    return mask, dense[mask != 0]


@handler("constexpr_cast")
def constexpr_cast(a: Args):
    return np.asarray(a.value("source_val")).astype(_dtype(a.scalar("output_dtype"), a.op))


def _dtype(name: str, op: Op):
    if name not in DTYPES:
        raise UnsupportedOpError(f"{op.type} op {op.name!r}: dtype {name!r} is not supported; "
                                 f"supported: {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- coverage for vision models
# (iOS15-iOS18 opsets: the activations, unary and comparison ops, reductions, normalizations,
# transposed convolution, linear layers, nearest resizing, tensor layout and iOS17 quantisation)

def _channel_vector(value, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) shaped to broadcast along dim 1 of x (N, C, ...); scalars as they are."""
    v = as_f32(value)
    return v.reshape(1, -1, *[1] * (x.dim() - 2)) if v.dim() == 1 else v


def _int_or_float_unary(op_type: str, float_fn: Callable, int_fn: Callable) -> None:
    """Elementwise; integer inputs stay integers (numpy), float ones compute in float32 (torch)."""
    def run(a: Args):
        x = np.asarray(a.value("x"))
        return int_fn(x) if x.dtype.kind in "iub" else float_fn(a.tensor("x"))
    handler(op_type)(run)


for _type, _fn in {"acos": torch.acos, "asin": torch.asin, "atan": torch.atan, "atanh": torch.atanh,
                   "ceil": torch.ceil, "cos": torch.cos, "cosh": torch.cosh, "erf": torch.erf,
                   "floor": torch.floor, "round": torch.round,   # half to even: 0.5 -> 0, as MIL defines it
                   "sin": torch.sin, "sinh": torch.sinh, "tan": torch.tan,
                   "softplus": F.softplus, "softsign": F.softsign}.items():
    _unary(_type, _fn)

for _type, _fns in {"abs": (torch.abs, np.abs), "sign": (torch.sign, np.sign), "square": (torch.square, np.square),
                    "exp2": (torch.exp2, lambda x: np.exp2(x).astype(x.dtype))}.items():
    HANDLERS.pop(_type, None)   # abs was float-only above
    _int_or_float_unary(_type, *_fns)


@handler("inverse")
def inverse(a: Args):
    return 1.0 / (a.tensor("x") + a.scalar("epsilon", 1e-4))


@handler("log")
def log(a: Args):
    return torch.log(a.tensor("x") + a.scalar("epsilon", 1e-45))


@handler("rsqrt")
def rsqrt(a: Args):
    return torch.rsqrt(a.tensor("x") + a.scalar("epsilon", 1e-12))


@handler("threshold")
def threshold(a: Args):
    """max(x, alpha) (MIL's threshold is a lower clamp, not torch's threshold)."""
    return torch.clamp(a.tensor("x"), min=a.scalar("alpha"))


@handler("logical_not")
def logical_not(a: Args):
    return np.logical_not(a.value("x"))


@handler("clamped_relu")
def clamped_relu(a: Args):
    """min(max(x, 0), beta) + min(min(x, 0) * alpha, beta)."""
    x, alpha, beta = a.tensor("x"), a.scalar("alpha"), a.scalar("beta")
    return x.clamp(min=0.0).clamp(max=beta) + (x.clamp(max=0.0) * alpha).clamp(max=beta)


@handler("elu")
def elu(a: Args):
    return F.elu(a.tensor("x"), alpha=a.scalar("alpha", 1.0))


@handler("leaky_relu")
def leaky_relu(a: Args):
    return F.leaky_relu(a.tensor("x"), negative_slope=a.scalar("alpha", 0.01))


@handler("linear_activation")
def linear_activation(a: Args):
    return a.scalar("alpha") * a.tensor("x") + a.scalar("beta", 0.0)


@handler("scaled_tanh")
def scaled_tanh(a: Args):
    return a.scalar("alpha", 1.0) * torch.tanh(a.scalar("beta", 1.0) * a.tensor("x"))


@handler("prelu")
def prelu(a: Args):
    """max(x, 0) + alpha_c * min(x, 0), alpha per channel (dim 1)."""
    x = a.tensor("x")
    return x.clamp(min=0.0) + _channel_vector(a.value("alpha"), x) * x.clamp(max=0.0)


@handler("softplus_parametric")
def softplus_parametric(a: Args):
    """alpha_c * log(1 + exp(beta_c * x)), alpha and beta per channel (dim 1)."""
    x = a.tensor("x")
    return _channel_vector(a.value("alpha"), x) * F.softplus(_channel_vector(a.value("beta"), x) * x)


@handler("gelu")
def gelu(a: Args):
    """mode EXACT (erf), TANH_APPROXIMATION, or SIGMOID_APPROXIMATION (x * sigmoid(1.702 x))."""
    x, mode = a.tensor("x"), a.scalar("mode", "EXACT")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    if mode not in ("EXACT", "TANH_APPROXIMATION"):
        raise UnsupportedOpError(f"gelu mode {mode!r} is not supported; supported: EXACT, TANH_APPROXIMATION, "
                                 "SIGMOID_APPROXIMATION")
    return F.gelu(x, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none")


for _type, _fns in {"pow": (torch.pow, np.power), "floor_div": (lambda x, y: torch.floor(x / y), np.floor_divide),
                    "mod": (torch.remainder, np.mod),   # the divisor's sign, as numpy and Core ML
                    "equal": (torch.eq, np.equal), "not_equal": (torch.ne, np.not_equal),
                    "greater": (torch.gt, np.greater), "greater_equal": (torch.ge, np.greater_equal),
                    "less": (torch.lt, np.less), "less_equal": (torch.le, np.less_equal)}.items():
    _binary(_type, *_fns)

for _type, _fn in {"logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor}.items():
    handler(_type)(lambda a, fn=_fn: fn(np.asarray(a.value("x")), np.asarray(a.value("y"))))


# --- reductions (axes default: all; keep_dims default False)

for _type, _fn in {"reduce_min": np.min, "reduce_prod": np.prod,
                   "reduce_l1_norm": lambda x, **k: np.sum(np.abs(x), **k),
                   "reduce_l2_norm": lambda x, **k: np.sqrt(np.sum(np.square(x), **k)),
                   "reduce_sum_square": lambda x, **k: np.sum(np.square(x), **k),
                   "reduce_log_sum": lambda x, **k: np.log(np.sum(x, **k)),
                   "reduce_log_sum_exp": lambda x, **k: np.log(np.sum(np.exp(x - np.max(x, **{**k, "keepdims": True})),
                                                                      **k)) + np.max(x, **k)}.items():
    _reduce(_type, _fn)


def _arg_reduce(op_type: str, fn: Callable) -> None:
    """Index of the max / min along `axis` (default -1; the first one on ties), as int32."""
    def run(a: Args):
        x, axis = np.asarray(a.value("x")), a.scalar("axis", -1)
        index = fn(x, axis=axis)
        return np.expand_dims(index, axis) if a.scalar("keep_dims", False) else index
    handler(op_type)(run)


_arg_reduce("reduce_argmax", np.argmax)
_arg_reduce("reduce_argmin", np.argmin)


# --- normalization (x (N, C, *D) unless said otherwise; population variance)

@handler("batch_norm")
def batch_norm(a: Args):
    x = a.tensor("x")
    scale = torch.rsqrt(_channel_vector(a.value("variance"), x) + a.scalar("epsilon", 1e-5))
    y = (x - _channel_vector(a.value("mean"), x)) * scale
    if a.has("gamma"):
        y = y * _channel_vector(a.value("gamma"), x)
    return y + _channel_vector(a.value("beta"), x) if a.has("beta") else y


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
        y = y * _channel_vector(a.value("gamma"), x)
    return y + _channel_vector(a.value("beta"), x) if a.has("beta") else y


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


# --- transposed convolution, linear layers, attention

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
    return full + _channel_vector(a.value("bias"), full) if a.has("bias") and a.value("bias") is not None else full


@handler("linear")
def linear(a: Args):
    """x (..., D_in) @ weight (D_out, D_in).T + bias (D_out,)."""
    bias = a.tensor("bias") if a.has("bias") and a.value("bias") is not None else None
    return F.linear(a.tensor("x"), a.tensor("weight"), bias)


@handler("einsum")
def einsum(a: Args):
    return torch.einsum(a.scalar("equation"), *[as_f32(v) for v in a.many("values")])


@handler("scaled_dot_product_attention")
def scaled_dot_product_attention(a: Args):
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask keeps where True, a float mask is added."""
    mask = a.value("attn_mask", None)
    if mask is not None:
        mask = torch.from_numpy(np.asarray(mask)) if np.asarray(mask).dtype == np.bool_ else as_f32(mask)
    return F.scaled_dot_product_attention(a.tensor("query"), a.tensor("key"), a.tensor("value"), attn_mask=mask)


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
    height = math.floor(x.shape[-2] * a.scalar("scale_factor_height", 1))
    width = math.floor(x.shape[-1] * a.scalar("scale_factor_width", 1))
    return nearest(x, np.arange(height) * x.shape[-2] / height, np.arange(width) * x.shape[-1] / width)


@handler("resize_nearest_neighbor")
def resize_nearest_neighbor(a: Args):
    x = a.tensor("x")
    height, width = a.scalar("target_size_height"), a.scalar("target_size_width")
    return nearest(x, np.arange(height) * x.shape[-2] / height, np.arange(width) * x.shape[-1] / width)


@handler("resize")
def resize(a: Args):
    """iOS17: the last `resized_dims` dims (1 or 2) take their sizes from the end of `shape` (0:
    keep), LINEAR (bilinear with the sampling mode) or NEAREST_NEIGHBOR (DEFAULT sampling only)."""
    x = a.tensor("x")
    dims, shape = a.scalar("resized_dims"), a.ints("shape")
    if dims not in (1, 2):
        raise UnsupportedOpError(f"resize over {dims} dims is not supported (1 or 2)")
    sizes = [s or x.shape[x.dim() - dims + i] for i, s in enumerate(shape[-dims:])]
    height, width = (x.shape[-2], sizes[0]) if dims == 1 else sizes
    mode, sampling = a.scalar("interpolation_mode", "LINEAR"), a.scalar("sampling_mode", "DEFAULT")
    if mode == "LINEAR":
        return bilinear(x, height, width, sampling)
    if mode == "NEAREST_NEIGHBOR" and sampling == "DEFAULT":
        return nearest(x, (np.arange(height) + 0.5) * x.shape[-2] / height, (np.arange(width) + 0.5) * x.shape[-1] / width)
    raise UnsupportedOpError(f"resize with interpolation_mode {mode!r} and sampling_mode {sampling!r} is not "
                             "supported; supported: LINEAR with any sampling mode, NEAREST_NEIGHBOR with DEFAULT")


# --- tensor layout

@handler("slice_by_size")
def slice_by_size(a: Args):
    """x[begin : begin + size] per axis; size -1 means to the end."""
    x = np.asarray(a.value("x"))
    begin, size = a.ints("begin"), a.ints("size")
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


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


@handler("crop")
def crop(a: Args):
    """x (..., H, W) without crop_height = (top, bottom) rows and crop_width = (left, right) columns."""
    x = np.asarray(a.value("x"))
    (top, bottom), (left, right) = a.ints("crop_height"), a.ints("crop_width")
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


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


# --- iOS17 activation quantisation: int8 / uint8 tensors with a scale (and zero point) per tensor or along `axis`

def _along_axis(value, rank: int, axis) -> np.ndarray:
    v = np.asarray(value, np.float32)
    if v.ndim == 0:
        return v
    shape = [1] * rank
    shape[int(axis) % rank] = -1
    return v.reshape(shape)


@handler("quantize")
def quantize(a: Args):
    """clip(round(input / scale) + zero_point) to the range of output_dtype (int8 / uint8); round half to even."""
    x = a.tensor("input").numpy()
    dtype = a.scalar("output_dtype")
    if dtype not in ("int8", "uint8"):
        raise UnsupportedOpError(f"quantize to {dtype!r} is not supported; supported: int8, uint8")
    axis = a.value("axis", None)
    zero_point = _along_axis(a.value("zero_point", 0), x.ndim, axis)
    info = np.iinfo(DTYPES[dtype])
    q = np.rint(x / _along_axis(a.value("scale"), x.ndim, axis)) + zero_point
    return np.clip(q, info.min, info.max).astype(DTYPES[dtype])


@handler("dequantize")
def dequantize(a: Args):
    """(input - zero_point) * scale."""
    x = np.asarray(a.value("input"))
    axis = a.value("axis", None)
    zero_point = _along_axis(a.value("zero_point", 0), x.ndim, axis)
    return (x.astype(np.float32) - zero_point) * _along_axis(a.value("scale"), x.ndim, axis)
