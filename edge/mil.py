"""A reference executor for Core ML ML programs (.mlpackage): runs the saved MIL program on Linux.

    program = MILProgram("exports/v3-.../coreml/v3-..._fp16.mlpackage")
    outs = program({"image": images})          # {"depth": (1, 1, H, W), "seg": (1, C, H, W)} float32
    program.ops_used, program.precision         # Counter({"const": 537, "conv": 63, ...}), "fp16"
    program(feeds, observe=lambda op, name, value: ...)   # also see every intermediate value (calibration)

Core ML itself predicts only on macOS. This module reads what the package holds -- the program
(`Data/com.apple.CoreML/model.mlmodel`, a protobuf read with coremltools, which needs no runtime)
and the weight blobs (`weights/weight.bin`, parsed here) -- and executes every op of the main
function in order, one small handler per op type (`HANDLERS`, in edge/mil_ops/, one module per op family). The
compressed-weight ops (every `constexpr_*`: iOS16's affine / palette / sparse / cast, iOS18's
blockwise shift-scale, grouped and vector palettes, sparse and joint forms, with sub-byte weight
dtypes) are decoded once at load, as Core ML does when it compiles the model. An op type without
a handler fails at load with a message naming it and the supported ones.

Precision: every op computes in float32 (numpy or torch on the CPU) and its output is rounded to
the dtype the program declares for it (`fp16` -> numpy float16, round to nearest even). So an fp16
program runs with fp16 *storage* between ops: the error every Core ML compute unit has. Not
modelled: fp16 *accumulation* inside a convolution, matmul or reduction (the GPU and the Neural
Engine may sum partial products in fp16, adding up to ~K ulps for a K-term sum where this sums in
float32), the Neural Engine's approximations of exp / sigmoid and its flushing of subnormals, and
fusions that skip an intermediate rounding (conv + activation). So the reference's drift is the part
due to fp16 storage alone: a package that drifts here is expected to drift at least as much on the
GPU or Neural Engine, while one that passes here can still drift more there (Core ML's CPU unit may instead run
an fp16 program in float32 and drift less). Tolerances tighter than the reference's own drift are
trustworthy only after `CoreMLRunner.compare_executors` on a Mac. fp32 programs match PyTorch to
float32 round-off. Results of fp16 programs are not bit-identical across torch thread counts: the
float32 summation order inside a convolution changes, and with it a few fp16 roundings downstream
(within the same bounds; tests/test_mil.py states them).

Scope: ML programs as coremltools writes them for iOS15 to iOS18 with the ops of vision models
(convolutions, transposed convolutions, pooling, normalizations, activations, linear layers and
attention, resizing, tensor layout, reductions, iOS17 quantize / dequantize and the compressed-weight
ops; `HANDLERS` lists them), fixed or flexible (range or enumerated) input shapes, one main function
without control flow. Refused with UnsupportedOpError: control flow, recurrent layers (lstm, gru,
rnn), random ops, iOS18 states, and the few ops listed in README ("The Core ML reference
executor"). coremltools' own op tests are this module's test suite (tests/coreml_optests.py,
tests/test_mil_optests.py). This module imports torch and coremltools (with TensorFlow hidden,
docs/TOOLCHAIN.md), never TensorFlow.
"""
from __future__ import annotations

import logging
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edge.mil_ops import (  # noqa: F401 (re-exported)
    DTYPES,
    HANDLERS,
    Op,
    SUB_BYTE_BITS,
    Args,
    HandlerError,
    TensorType,
    UnsupportedOpError,
    as_f32,
    pad_spatial,
    source_coords,
    spatial_pads,
    unpack_bits,
    unpack_sub_byte,
    window_geometry,
)

# protobuf DataType names -> MIL dtype names (DTYPES, edge/mil_ops/base.py: MIL dtype names -> numpy).
PROTO_DTYPES = {"FLOAT16": "fp16", "FLOAT32": "fp32", "FLOAT64": "fp64", "BOOL": "bool",
                "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
                "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "STRING": "str",
                "INT4": "int4",
                "UINT1": "uint1", "UINT2": "uint2", "UINT3": "uint3", "UINT4": "uint4", "UINT6": "uint6"}

# weight.bin (MIL blob storage, version 2): a 64-byte file header (count, version), then per blob a
# 64-byte record (sentinel, dtype code, size in bytes, absolute data offset) before its data.
BLOB_VERSION, BLOB_SENTINEL = 2, 0xDEADBEEF
# the codes coremltools' BlobWriter writes for these dtypes (read back from its files; 5 is bfloat16,
# which no MIL op takes as a weight). Sub-byte dtypes are packed from each byte's least significant bit up.
BLOB_CODES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 6: "int16", 7: "uint16", 8: "int4", 9: "uint1",
              10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32"}
_BLOB_RECORD = struct.Struct("<IIQQ")

_IMPORT_NOTES = ("Failed to load _ML", "Disabling scikit-learn conversion API", "has not been tested with coremltools")


class _MuteImportNotes(logging.Filter):
    """coremltools' import-time notes that do not concern reading a program: its native runtime is
    absent off macOS, its scikit-learn and torch *conversion* support checks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in _IMPORT_NOTES)


def import_coremltools():
    """coremltools, imported with TensorFlow hidden: coremltools imports TensorFlow when it can, and
    TensorFlow + torch in one process segfault (docs/TOOLCHAIN.md). The block is lifted after the import
    (when this function set it), so a later, separate use of TensorFlow is not poisoned."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    blocked = "tensorflow" not in sys.modules
    if blocked:
        sys.modules["tensorflow"] = None
    logger, mute = logging.getLogger("coremltools"), _MuteImportNotes()
    logger.addFilter(mute)
    try:
        import coremltools
    finally:
        logger.removeFilter(mute)
        if blocked and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return coremltools


# ----------------------------------------------------------------------------- the saved program

class BlobFile:
    """One weights file of a package, read whole; `read(offset, dtype, count)` returns one blob."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        if len(self.data) < 64:
            raise ValueError(f"{path} is {len(self.data)} bytes, shorter than a weight file header (64); "
                             "the package is truncated: re-export it")
        version = struct.unpack_from("<I", self.data, 4)[0]
        if version != BLOB_VERSION:
            raise ValueError(f"{path} has blob storage version {version}; this reader knows version {BLOB_VERSION}")

    def read(self, offset: int, dtype: str, count: int) -> np.ndarray:
        """`count` values of MIL dtype `dtype` from the blob whose record starts at byte `offset`."""
        where = f"{self.path} at offset {offset}"
        if offset + _BLOB_RECORD.size > len(self.data):
            raise ValueError(f"{where}: the blob record lies past the end of the file ({len(self.data)} bytes)")
        sentinel, code, size, start = _BLOB_RECORD.unpack_from(self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise ValueError(f"{where}: blob sentinel is {sentinel:#x}, expected {BLOB_SENTINEL:#x}; "
                             "the weight file is corrupt or not the one the program was saved with")
        if BLOB_CODES.get(code) != dtype:
            raise ValueError(f"{where}: the blob holds dtype code {code} ({BLOB_CODES.get(code, 'unknown')}), "
                             f"the program declares {dtype}")
        expected = packed_size(dtype, count)
        if size != expected or start + size > len(self.data):
            raise ValueError(f"{where}: the blob has {size} bytes at {start}, the program declares {count} x "
                             f"{dtype} ({expected} bytes) in a {len(self.data)}-byte file")
        if dtype in SUB_BYTE_BITS:
            return unpack_sub_byte(np.frombuffer(self.data, np.uint8, size, start), dtype, count)
        return np.frombuffer(self.data, DTYPES[dtype], count, start).copy()


def packed_size(dtype: str, count: int) -> int:
    """Bytes that `count` values of MIL dtype `dtype` take in a blob or an immediate value."""
    if dtype in SUB_BYTE_BITS:
        return -(-count * SUB_BYTE_BITS[dtype] // 8)
    return count * np.dtype(DTYPES[dtype]).itemsize


def tensor_type(value_type) -> TensorType:
    """A protobuf ValueType (a tensor type) as a TensorType."""
    if value_type.WhichOneof("type") != "tensorType":
        raise UnsupportedOpError(f"value type {value_type.WhichOneof('type')} is not supported (only tensors)")
    proto = value_type.tensorType
    name = _proto_dtype_name(proto.dataType)
    if name not in PROTO_DTYPES:
        raise UnsupportedOpError(f"dtype {name} is not supported; supported: {', '.join(PROTO_DTYPES)}")
    if proto.rank < 0 or any(d.WhichOneof("dimension") == "unknown" and d.unknown.variadic for d in proto.dimensions):
        return TensorType(PROTO_DTYPES[name], None)   # a variadic rank: shape unknown, unchecked
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in proto.dimensions)
    return TensorType(PROTO_DTYPES[name], dims)


def _proto_dtype_name(code: int) -> str:
    from coremltools.proto import MIL_pb2
    return MIL_pb2.DataType.Name(code)


def decode_value(value, blobs: Callable[[str], BlobFile]):
    """A protobuf MIL Value as numpy (a str for a scalar string). blobs(file name) -> BlobFile."""
    kind = tensor_type(value.type)
    count = int(np.prod(kind.shape, dtype=np.int64))
    if value.WhichOneof("value") == "blobFileValue":
        array = blobs(value.blobFileValue.fileName).read(value.blobFileValue.offset, kind.dtype, count)
        return array.reshape(kind.shape)
    immediate = value.immediateValue
    if immediate.WhichOneof("value") != "tensor":
        raise UnsupportedOpError(f"immediate {immediate.WhichOneof('value')} values are not supported (only tensors)")
    tensor = immediate.tensor
    which = tensor.WhichOneof("value")
    if which == "strings":
        strings = list(tensor.strings.values)
        return strings[0] if kind.shape == () else np.array(strings, dtype=object).reshape(kind.shape)
    if which == "bytes":
        if kind.dtype in SUB_BYTE_BITS:
            return unpack_sub_byte(np.frombuffer(tensor.bytes.values, np.uint8), kind.dtype, count).reshape(kind.shape)
        return np.frombuffer(tensor.bytes.values, DTYPES[kind.dtype], count).reshape(kind.shape).copy()
    return np.array(list(getattr(tensor, which).values), DTYPES[kind.dtype]).reshape(kind.shape)


def parse_op(proto, blobs) -> Op:
    try:
        inputs = {key: [b.name if b.name else decode_value(b.value, blobs) for b in argument.arguments]
                  for key, argument in proto.inputs.items()}
        attributes = {key: decode_value(value, blobs) for key, value in proto.attributes.items()}
        outputs = [(o.name, tensor_type(o.type)) for o in proto.outputs]
    except UnsupportedOpError as exc:   # a value or type the executor does not read: name the op
        first = proto.outputs[0].name if proto.outputs else "?"
        raise UnsupportedOpError(f"{proto.type} op (output {first!r}): {exc}") from None
    except ValueError as exc:   # a weight blob that does not match its declaration: name the op reading it
        first = proto.outputs[0].name if proto.outputs else "?"
        raise ValueError(f"{proto.type} op (output {first!r}): {exc}") from None
    if proto.blocks:
        raise UnsupportedOpError(f"op {proto.type} has nested blocks (control flow), which is not supported")
    name = attributes.pop("name", outputs[0][0] if outputs else proto.type)
    return Op(proto.type, str(name), inputs, attributes, outputs)


# ----------------------------------------------------------------------------- execution

def store(result, kind: TensorType, op: Op) -> np.ndarray:
    """One handler result as numpy in the op's declared dtype (fp16: round to nearest even), its
    static dims checked against the declared shape."""
    if kind.dtype == "str":
        return result
    if kind.dtype in ("fp16", "fp32") and (isinstance(result, torch.Tensor) or np.asarray(result).dtype.kind == "f"):
        # torch rounds float32 -> float16 to nearest even like numpy, with vector instructions
        result = result if isinstance(result, torch.Tensor) else torch.from_numpy(np.asarray(result, order="C"))
        array = result.to(torch.float16 if kind.dtype == "fp16" else torch.float32).numpy()
    else:
        array = np.asarray(result.numpy() if isinstance(result, torch.Tensor) else result).astype(DTYPES[kind.dtype])
    declared = kind.shape
    if declared is None:   # run_op: no declared shape
        return array
    if len(declared) != array.ndim or any(d is not None and d != s for d, s in zip(declared, array.shape)):
        raise ValueError(f"{op.type} op {op.name!r} produced shape {array.shape}, the program declares "
                         f"{declared}: the handler's semantics differ from Core ML's for this op")
    return array


def run_handler(op: Op, env: dict, cache: dict | None = None) -> list[np.ndarray]:
    """Execute one op on the values in `env` (cache: see Args); returns its outputs in declared dtypes."""
    found = HANDLERS.get(op.type)
    if found is None:
        raise UnsupportedOpError(f"no handler for MIL op type {op.type!r}; supported: {', '.join(sorted(HANDLERS))}")
    try:
        result = found(Args(op, env, cache))
    except UnsupportedOpError as exc:   # a form of the op the handler refuses: name which op
        raise UnsupportedOpError(f"{op.type} op {op.name!r}: {exc}") from None
    except Exception as exc:   # a handler's numpy / torch error, named with the op it ran
        raise HandlerError(f"{op.type} op {op.name!r} failed in the reference executor ({type(exc).__name__}: "
                         f"{exc}); the program's values do not fit this handler's reading of the op") from exc
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(results) != len(op.outputs):
        raise ValueError(f"{op.type} op {op.name!r}: the handler gave {len(results)} outputs, the program "
                         f"declares {len(op.outputs)}")
    return [store(r, kind, op) for r, (_, kind) in zip(results, op.outputs)]


def run_op(op_type: str, inputs: dict, dtype: str = "fp32", outputs: int = 1):
    """Run one handler outside a program (tests, debugging). inputs: MIL input name -> value
    (np.ndarray, number, str, or a list of np.ndarrays for a variadic input such as concat's
    `values`); outputs are rounded to `dtype`, shapes unchecked. Returns one array, or a list of
    `outputs` arrays."""
    op = Op(op_type, f"run_op:{op_type}", outputs=[(f"out{i}", TensorType(dtype, None)) for i in range(outputs)])
    env = {}
    for key, value in inputs.items():
        variadic = isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value)
        values = value if variadic else [value if isinstance(value, str) else np.asarray(value)]
        op.inputs[key] = [f"{key}:{i}" for i in range(len(values))]
        env.update(zip(op.inputs[key], values))
    results = run_handler(op, env)
    return results if outputs > 1 else results[0]


class MILProgram:
    """The main function of a saved .mlpackage, executable: `program(feeds) -> outputs`.

    feeds: {input name: np.ndarray} in the declared shapes (the students: "image" (1, 3, H, W)
    float32 RGB in [0, 1]); returns {output name: float32 np.ndarray} (students: "depth"
    (1, 1, H, W) metres, "seg" (1, C, H, W) logits). See the module docstring for precision.
    """

    def __init__(self, package: str | Path):
        self.path = Path(package)
        if not (self.path / "Manifest.json").is_file():
            raise FileNotFoundError(f"{self.path} is not an .mlpackage (no Manifest.json); pass the package "
                                    "directory that python -m quant.export --target coreml wrote")
        ct = import_coremltools()
        model = ct.models.MLModel(str(self.path), skip_model_load=True)
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise ValueError(f"{self.path} holds a {spec.WhichOneof('Type')} model, not an ML program")
        self._model_dir = Path(model.weights_dir).parent
        self._blobs: dict[str, BlobFile] = {}
        if "main" not in spec.mlProgram.functions:   # a valid multifunction package: not a damaged file
            raise UnsupportedOpError(f"{self.path} has functions {sorted(spec.mlProgram.functions)} and no 'main': "
                                     "the reference executor runs a package's main function; export one function "
                                     "per package to measure it here")
        function = spec.mlProgram.functions["main"]
        self.opset = function.opset
        block = function.block_specializations[function.opset]
        self.inputs = {v.name: tensor_type(v.type) for v in function.inputs}
        self.input_shapes = {name: _allowed_shapes(spec, name, kind) for name, kind in self.inputs.items()}
        self.output_names = list(block.outputs)
        self.ops = [parse_op(op, self._blob) for op in block.operations]
        self._check_handlers()
        self.constants = self._materialise_constants()
        self._f32 = {name: as_f32(v) for name, v in self.constants.items()
                     if isinstance(v, np.ndarray) and v.dtype.kind == "f"}   # converted once, not per call
        self._steps = [op for op in self.ops if not _is_constant(op)]
        self._dead_after = self._dead_values()

    def _blob(self, file_name: str) -> BlobFile:
        if file_name not in self._blobs:
            relative = file_name.removeprefix("@model_path/")
            self._blobs[file_name] = BlobFile(self._model_dir / relative)
        return self._blobs[file_name]

    def _check_handlers(self) -> None:
        missing = sorted({op.type for op in self.ops} - set(HANDLERS))
        if missing:
            raise UnsupportedOpError(f"{self.path}: MIL op type(s) {', '.join(missing)} have no handler in the "
                                     f"reference executor (edge/mil.py); supported: {', '.join(sorted(HANDLERS))}")

    def _materialise_constants(self) -> dict[str, np.ndarray]:
        """const and constexpr_* outputs, decoded once (the compressed weights become dense here)."""
        constants: dict[str, np.ndarray] = {}
        for op in self.ops:
            if _is_constant(op):
                for (name, _), value in zip(op.outputs, run_handler(op, constants)):
                    constants[name] = value
        return constants

    def _dead_values(self) -> list[list[str]]:
        """Per step, the intermediate values it reads for the last time (freed after it runs)."""
        last = {}
        for index, op in enumerate(self._steps):
            for bindings in op.inputs.values():
                last.update({b: index for b in bindings if isinstance(b, str)})
        dead = [[] for _ in self._steps]
        for name, index in last.items():
            if name not in self.constants and name not in self.output_names:
                dead[index].append(name)
        return dead

    @property
    def ops_used(self) -> Counter:
        """Op types of the main function and how often each occurs (const included)."""
        return Counter(op.type for op in self.ops)

    @property
    def precision(self) -> str:
        """"fp16" when any computing op declares a float16 output, else "fp32"."""
        return "fp16" if any(kind.dtype == "fp16" for op in self._steps for _, kind in op.outputs) else "fp32"

    def constant(self, name: str) -> np.ndarray:
        """A decoded constant (a const or a constexpr_* output) by value name."""
        if name not in self.constants:
            raise KeyError(f"{self.path} has no constant named {name!r}")
        return self.constants[name]

    def _accepts(self, name: str, shape: tuple) -> bool:
        allowed = self.input_shapes[name]
        if allowed is None:
            return True
        if isinstance(allowed, list):     # enumerated shapes
            return tuple(shape) in allowed
        return len(shape) == len(allowed) and all(lo <= s and (hi is None or s <= hi)
                                                  for s, (lo, hi) in zip(shape, allowed))

    def _feeds(self, feeds: dict) -> dict[str, np.ndarray]:
        if set(feeds) != set(self.inputs):
            raise ValueError(f"{self.path.name} takes inputs {sorted(self.inputs)}, got {sorted(feeds)}")
        checked = {}
        for name, kind in self.inputs.items():
            value = np.asarray(feeds[name])
            if not self._accepts(name, value.shape):
                raise ValueError(f"input {name!r} has shape {value.shape}; {self.path.name} takes "
                                 f"{self.input_shapes[name]}")
            checked[name] = value.astype(DTYPES[kind.dtype])
        return checked

    def __call__(self, feeds: dict[str, np.ndarray], keep_dtypes: bool = False,
                 observe: Callable[[Op, str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
        """Outputs as float32, or in the dtypes the program declares (keep_dtypes: int32, bool, fp16).

        observe: called as `observe(op, name, value)` for every output of every computing op (const
        and constexpr_* outputs are decoded at load and not observed; the feeds are not either), in
        execution order, with the value as the program stores it (numpy, its declared dtype) before
        it is freed. An observer must not modify `value`. It reads the intermediate values that a
        Core ML model yields only when they are made outputs (e.g. activation ranges for
        calibration: targets/coreml.py)."""
        env = {**self.constants, **self._feeds(feeds)}
        with torch.no_grad():
            for op, dead in zip(self._steps, self._dead_after):
                for (name, _), value in zip(op.outputs, run_handler(op, env, self._f32)):
                    env[name] = value
                    if observe is not None:
                        observe(op, name, value)
                for name in dead:
                    del env[name]
        if keep_dtypes:
            return {name: np.asarray(env[name]) for name in self.output_names}
        return {name: np.asarray(env[name], np.float32) for name in self.output_names}


def _allowed_shapes(spec, name: str, kind: TensorType):
    """An input's shapes: a list of enumerated shapes, or a tuple of per-dim ranges (lowest, highest
    or None) from the model description (a fixed dim is its own range)."""
    described = next((d.type.multiArrayType for d in spec.description.input if d.name == name), None)
    if described is not None and described.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
        return [tuple(s.shape) for s in described.enumeratedShapes.shapes]
    if described is not None and described.WhichOneof("ShapeFlexibility") == "shapeRange":
        ranges = described.shapeRange.sizeRanges
        return tuple((r.lowerBound, None if r.upperBound < 0 else r.upperBound) for r in ranges)
    if kind.shape is None:
        return None   # a variadic rank: any shape
    return tuple((1, None) if d is None else (d, d) for d in kind.shape)


def _is_constant(op: Op) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")
