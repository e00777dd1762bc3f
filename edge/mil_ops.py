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
          "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


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
    if a.scalar("interleave", False):
        raise UnsupportedOpError(f"concat {a.op.name!r} with interleave=True is not supported")
    return np.concatenate([np.asarray(v) for v in a.many("values")], axis=a.scalar("axis"))


@handler("reshape")
def reshape(a: Args):
    """shape: -1 is inferred; 0 copies the input's dim at that position (iOS15/16: only when
    len(shape) == rank(x))."""
    x, shape = np.asarray(a.value("x")), a.ints("shape")
    if 0 in shape and len(shape) != x.ndim:
        raise UnsupportedOpError(f"reshape {a.op.name!r} to {shape} with 0 and a rank change (the iOS17 "
                                 "right-aligned form) is not supported")
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])


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
    return x[index]


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


@handler("constexpr_lut_to_dense")
def constexpr_lut_to_dense(a: Args):
    """iOS16 form: lut (2**nbits,), indices (uint8, packed LSB first), shape -> lut[indices].reshape(shape)."""
    if not a.has("shape"):
        raise UnsupportedOpError("constexpr_lut_to_dense without `shape` (the iOS18 grouped-palette form) "
                                 "is not supported; export with minimum_deployment_target iOS16 or iOS17")
    lut, shape = np.asarray(a.value("lut")), a.ints("shape")
    nbits = int(lut.size).bit_length() - 1
    if lut.ndim != 1 or lut.size != 1 << nbits:
        raise ValueError(f"constexpr_lut_to_dense {a.op.name!r}: lut has shape {lut.shape}, expected (2**nbits,)")
    return lut[unpack_bits(a.value("indices"), nbits, int(np.prod(shape)))].reshape(shape)


@handler("constexpr_cast")
def constexpr_cast(a: Args):
    return np.asarray(a.value("source_val")).astype(_dtype(a.scalar("output_dtype"), a.op))


def _dtype(name: str, op: Op):
    if name not in DTYPES:
        raise UnsupportedOpError(f"{op.type} op {op.name!r}: dtype {name!r} is not supported; "
                                 f"supported: {', '.join(DTYPES)}")
    return DTYPES[name]
