"""Elementwise handlers: constants, casts, unary math, binary arithmetic and comparisons, logical
ops and every MIL activation (iOS15-iOS18)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edge.mil_ops.base import Args, UnsupportedOpError, channel_vector, handler, mil_dtype


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    handler(op_type)(lambda a: fn(a.tensor("x")))


for _type, _fn in {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
                   "sqrt": torch.sqrt, "silu": F.silu,
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
    return np.asarray(a.value("x")).astype(mil_dtype(a.scalar("dtype"), a.op))


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
    return x.clamp(min=0.0) + channel_vector(a.value("alpha"), x) * x.clamp(max=0.0)


@handler("softplus_parametric")
def softplus_parametric(a: Args):
    """alpha_c * log(1 + exp(beta_c * x)), alpha and beta per channel (dim 1)."""
    x = a.tensor("x")
    return channel_vector(a.value("alpha"), x) * F.softplus(channel_vector(a.value("beta"), x) * x)


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
