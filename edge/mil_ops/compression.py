"""Compressed weights and activation quantisation: the constexpr_* ops (iOS16 affine, palette,
sparse and cast; iOS18 blockwise shift-scale, grouped and vector palettes, sparse and joint forms),
which edge.mil.MILProgram decodes once at load, the sub-byte unpacking they need, and iOS17
quantize / dequantize."""
from __future__ import annotations

import numpy as np

from edge.mil_ops.base import DTYPES, SUB_BYTE_BITS, Args, UnsupportedOpError, handler, mil_dtype

# --- compressed weights, decoded once at load

@handler("constexpr_affine_dequantize")
def constexpr_affine_dequantize(a: Args):
    """(quantized_data - zero_point) * scale; zero_point and scale are scalars or vectors along `axis`."""
    return affine_dequantize(a.value("quantized_data"), a.value("zero_point"), a.value("scale"), a.scalar("axis"))


def affine_dequantize(data, zero_point, scale, axis) -> np.ndarray:
    """(data - zero_point) * scale in float32; zero_point and scale are scalars or vectors along `axis`
    (constexpr_affine_dequantize's weights and iOS17 dequantize's activations alike)."""
    data = np.asarray(data)
    return (data.astype(np.float32) - _along_axis(zero_point, data.ndim, axis)) * _along_axis(scale, data.ndim, axis)


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
    return np.asarray(a.value("source_val")).astype(mil_dtype(a.scalar("output_dtype"), a.op))


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
    stored = np.asarray(a.value("input"))   # its dtype: float16 in an fp16 program
    x = stored.astype(np.float32)
    dtype = a.scalar("output_dtype")
    if dtype not in ("int8", "uint8"):
        raise UnsupportedOpError(f"quantize to {dtype!r} is not supported; supported: int8, uint8")
    axis = a.value("axis", None)
    zero_point = _along_axis(a.value("zero_point", 0), x.ndim, axis)
    info = np.iinfo(DTYPES[dtype])
    quotient = x / _along_axis(a.value("scale"), x.ndim, axis)
    if stored.dtype == np.float16:   # MIL divides in the input's dtype: 95.49 rounds to fp16's 95.5, then to 96, not 95
        quotient = quotient.astype(np.float16).astype(np.float32)
    q = np.rint(quotient) + zero_point
    return np.clip(q, info.min, info.max).astype(DTYPES[dtype])


@handler("dequantize")
def dequantize(a: Args):
    """(input - zero_point) * scale."""
    return affine_dequantize(a.value("input"), a.value("zero_point", 0), a.value("scale"), a.value("axis", None))
