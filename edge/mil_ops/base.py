"""The registry of the MIL reference executor's op handlers, and what every handler uses: the MIL
dtypes (`DTYPES`), a program's `Op` and `TensorType` (here, not in edge/mil.py, so that the
handlers need nothing of the executor that imports them), `Args` (an op's resolved inputs) and
`as_f32` (torch float32, the compute precision). `@handler("op_type")` registers a function
`fn(a: Args) -> array | [arrays]`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

# MIL dtype names (cast's `dtype`, constexpr_cast's `output_dtype`) -> numpy.
DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bool": np.bool_,
          "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
          "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
          # sub-byte dtypes (iOS18 compressed weights), held unpacked, one value per byte
          "int4": np.int8, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint4": np.uint8,
          "uint6": np.uint8}
SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}


@dataclass
class TensorType:
    """dtype: a MIL dtype name ("fp16", "int32", "str", ...); shape: a tuple, None for unknown dims
    (the whole shape None for a variadic rank)."""
    dtype: str
    shape: tuple


@dataclass
class Op:
    """One MIL operation. inputs: input name -> bindings (a value name, or an inline np.ndarray);
    attributes: decoded attributes (constexpr ops keep their data here); outputs: (name, type)."""
    type: str
    name: str
    inputs: dict[str, list] = field(default_factory=dict)
    attributes: dict[str, object] = field(default_factory=dict)
    outputs: list[tuple[str, TensorType]] = field(default_factory=list)


class UnsupportedOpError(NotImplementedError):
    """The program uses an op type (or a form of one) that the reference executor does not implement."""


class HandlerError(ValueError):
    """A handler failed on the program's values: the executor's reading of the op, not a damaged file."""



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


def mil_dtype(name: str, op: Op):
    if name not in DTYPES:
        raise UnsupportedOpError(f"{op.type} op {op.name!r}: dtype {name!r} is not supported; "
                                 f"supported: {', '.join(DTYPES)}")
    return DTYPES[name]



def channel_vector(value, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) shaped to broadcast along dim 1 of x (N, C, ...); scalars as they are."""
    v = as_f32(value)
    return v.reshape(1, -1, *[1] * (x.dim() - 2)) if v.dim() == 1 else v
