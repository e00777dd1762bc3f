"""Matrix products: matmul, linear, einsum and scaled dot-product attention."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge.mil_ops.base import Args, as_f32, handler


@handler("matmul")
def matmul(a: Args):
    x, y = a.tensor("x"), a.tensor("y")
    if a.scalar("transpose_x", False) and x.dim() > 1:   # the flags have no effect on a 1-D operand
        x = x.transpose(-1, -2)
    if a.scalar("transpose_y", False) and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


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
