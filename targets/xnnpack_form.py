"""The XNNPACK deploy form of a student, as module transformations on the torch side: what
targets/litert_graph.py does to the ONNX graph for onnx2tf, done before litert-torch converts
(the parent's side of targets/: imports torch; converter processes never import it).

- Hard activations become ops XNNPACK runs in int8 (`xnnpack_form`): it takes neither an int8
  HARD_SWISH nor RELU_0_TO_1, and each such op splits its graph into partitions (measured on v3 at
  128x160, litert-torch + the LiteRT quantizer: 19 partitions, int8 0.66x the speed of fp32).
- Their 1/6 moves into the weights of the convolutions that read them (`defer_sixths`): a constant
  int8 MUL is pure overhead, ~4x the cost of an int8 ADD here (targets/litert_graph.py).
The function stays the same within float rounding; the tests compare.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

SIXTH = 1.0 / 6.0
# aten ops through which a tensor scaled by a positive constant stays scaled by it, when it is
# their first input: f(c x) = c f(x) (linear or nearest resampling, pooling, ReLU, layout changes).
HOMOGENEOUS = {"mean", "avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "relu", "relu_", "upsample_bilinear2d",
               "upsample_nearest2d", "view", "reshape", "permute", "transpose", "clone", "contiguous", "flatten",
               "squeeze", "unsqueeze", "dropout", "_unsafe_view"}


class Relu6HardSwish(nn.Module):
    """hardswish(x) = relu6(x + 3) * (x / 6), in that order (litert-torch fuses x * relu6(x + 3) / 6
    back into HARD_SWISH); `deferred`: relu6(x + 3) * x, six times it, the readers scaled by 1/6."""

    def __init__(self):
        super().__init__()
        self.deferred = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) * (x if self.deferred else x * SIXTH)


class Relu6HardSigmoid(nn.Module):
    """hardsigmoid(x) = relu6(x + 3) / 6: an ADD with a fused RELU6 (and a MUL unless `deferred`)."""

    def __init__(self):
        super().__init__()
        self.deferred = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(x + 3.0)
        return y if self.deferred else y * SIXTH


def xnnpack_form(student: nn.Module, *, int8: bool) -> nn.Module:
    """A copy of `student` with hardsigmoid, and in int8 graphs hardswish, in their relu6 forms
    (XNNPACK runs a float HARD_SWISH natively in one op, so float graphs keep it)."""
    student = copy.deepcopy(student)
    swaps = {nn.Hardsigmoid: Relu6HardSigmoid, **({nn.Hardswish: Relu6HardSwish} if int8 else {})}
    for module in list(student.modules()):
        for name, child in list(module.named_children()):
            if type(child) in swaps:
                setattr(module, name, swaps[type(child)]())
    return student


def aten_name(node: torch.fx.Node) -> str:
    """"mean" for aten.mean.dim: the op without its overload."""
    return str(node.target).split(".")[1] if str(node.target).startswith("aten.") else ""


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def conv_readers(output: torch.fx.Node) -> list[str] | None:
    """The paths of the convolutions whose weights can absorb a constant factor on `output`, or None.

    Follows the factor through homogeneous ops and through products with an unscaled operand until
    every path ends in a convolution's input; any other reader (an addition, a threshold, a graph
    output, a product of two scaled tensors) means it cannot be deferred."""
    scaled: set[torch.fx.Node] = set()
    convs: list[str] = []
    pending = [output]
    while pending:
        node = pending.pop()
        if node in scaled:
            continue
        scaled.add(node)
        for user in node.users:
            name = aten_name(user)
            first = user.args and user.args[0] is node and node not in user.args[1:]
            if name == "conv2d" and first:
                convs.append(module_path(user))
            elif first and (name in HOMOGENEOUS or (name in ("pad", "constant_pad_nd") and zero_padding(user))):
                pending.append(user)
            elif name == "mul" and len(user.args) == 2 and user.args[0] is not user.args[1]:
                pending.append(user)
            else:
                return None
    products = [n for n in scaled if aten_name(n) == "mul" and all(a in scaled for a in n.args[:2])]
    return None if products else sorted(set(convs))


def zero_padding(node: torch.fx.Node) -> bool:
    """Whether a pad node pads with zeros: aten.pad(input, pad, mode, value) or
    aten.constant_pad_nd(input, pad, value), whose third argument is the value, not a mode."""
    if aten_name(node) == "constant_pad_nd":
        return not node.kwargs.get("value", node.args[2] if len(node.args) > 2 else 0)
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return mode == "constant" and not value


@torch.no_grad()
def defer_sixths(model: nn.Module, example: torch.Tensor) -> int:
    """Set `deferred` on every relu6-form activation of `model` whose 1/6 its reading convolutions
    can absorb, and scale their weights; returns how many were deferred."""
    activations = {name: m for name, m in model.named_modules() if isinstance(m, (Relu6HardSwish, Relu6HardSigmoid))}
    if not activations:
        return 0
    graph = torch.export.export(model, (example,)).graph
    outputs: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:   # in execution order: an activation's last op is its output
        if node.op == "call_function" and module_path(node) in activations:
            outputs[module_path(node)] = node
    deferred = 0
    for path, node in outputs.items():
        convs = conv_readers(node)
        if not convs or any(not isinstance(model.get_submodule(c), nn.Conv2d) for c in convs):
            continue
        for conv in convs:
            model.get_submodule(conv).weight.mul_(SIXTH)
        activations[path].deferred = True
        deferred += 1
    return deferred
