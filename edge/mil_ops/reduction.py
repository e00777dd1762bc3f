"""Reductions over axes (reduce_*), and argmax / argmin."""
from __future__ import annotations

from typing import Callable

import numpy as np

from edge.mil_ops.base import Args, handler


def _reduce(op_type: str, fn: Callable) -> None:
    """x reduced over `axes` (default: all), keeping reduced dims when keep_dims (default False)."""
    def run(a: Args):
        x = a.tensor("x").numpy()
        axes = a.value("axes", None)
        return fn(x, axis=None if axes is None else tuple(a.ints("axes")), keepdims=bool(a.scalar("keep_dims", False)))
    handler(op_type)(run)


for _type, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
                   "reduce_min": np.min, "reduce_prod": np.prod,
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
