"""The op handlers of the MIL reference executor (edge/mil.py): one function per MIL op type,
registered in `HANDLERS` by op type name with `@handler("...")` (base.py). A handler takes the op's
resolved inputs (`Args`) and returns its output(s), computed in float32 (torch or numpy);
edge.mil.run_handler rounds them to the dtypes the program declares. How precision works, and
which programs are in scope, is in edge/mil.py. One module per op family:

    elementwise.py    constants, casts, unary, binary, comparisons, logical ops, activations
    reduction.py      reduce_*, argmax / argmin
    normalization.py  batch, instance, layer, l2 and local response norm
    conv.py           conv, conv_transpose, pooling (and MIL's padding rules)
    linear.py         matmul, linear, einsum, scaled dot-product attention
    resize.py         bilinear and nearest resizing (MIL's sampling modes), crop
    tensor.py         layout: reshape, transpose, slices, concat, pad, gathers, space / depth
    compression.py    constexpr_* weights (iOS16, iOS18), sub-byte unpacking, quantize / dequantize

Adding an op: a handler in the family's module, a case in tests/test_mil.py or a coremltools op
test in tests/test_mil_optests.py's SUBSET (test_every_handler_is_exercised checks).
"""
from edge.mil_ops import compression, conv, elementwise, linear, normalization, reduction, resize, tensor  # noqa: F401
from edge.mil_ops.base import (DTYPES, HANDLERS, SUB_BYTE_BITS, Args, HandlerError, Op, TensorType, UnsupportedOpError,
                               as_f32, handler)
from edge.mil_ops.compression import unpack_bits, unpack_sub_byte
from edge.mil_ops.conv import pad_spatial, spatial_pads, window_geometry
from edge.mil_ops.resize import source_coords

# importing each family module registers its handlers
__all__ = ["DTYPES", "HANDLERS", "SUB_BYTE_BITS", "Args", "HandlerError", "Op", "TensorType", "UnsupportedOpError",
           "as_f32", "handler",
           "pad_spatial", "source_coords", "spatial_pads", "unpack_bits", "unpack_sub_byte", "window_geometry"]
