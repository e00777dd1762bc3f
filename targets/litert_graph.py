"""ONNX rewrites that shape the exported graph for LiteRT's XNNPACK delegate, the same function in
fewer and cheaper ops. Run by the TFLite converter process before onnx2tf (imports onnx and numpy).

Measured on this repository's v3 student (MobileNetV3-Small, 128x160, 2 threads; op costs from
one-op models cut out of the .tflite file, `python -m edge.op_profile`), these are where an int8
file lost its speed-up:

1. `normalization_over_rows`: the ImageNet (x - mean) / std on a 3-channel NHWC image is a
   broadcast over an innermost axis of 3, which XNNPACK runs slowly (SUB + MUL: 76 us in int8 and
   59 us in fp32, 2 threads; all 52 int8 convolutions took 0.25 ms). The same map
   with its constants repeated along the width streams whole rows instead (10 us).
2. `lower_hard_activations`: XNNPACK takes neither RELU_0_TO_1 (what onnx2tf writes for
   HardSigmoid) nor an int8 HARD_SWISH, so each one split the delegate's graph. They become
   relu6(x + 3) (an ADD with a fused RELU6, or a convolution's own RELU6 after the converter folds
   the +3 into its bias) and a MUL, with their 1/6 moved into the weights of the convolutions that
   read them (`defer_scale`): an int8 MUL costs ~4x an int8 ADD here, and a constant one is pure
   overhead. Float HARD_SWISH stays: XNNPACK runs it natively in one op.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

SIXTH = 1.0 / 6.0
# Ops through which a tensor scaled by a positive constant stays scaled by it, when it is input 0:
# f(c x) = c f(x). Resize here is linear interpolation (or nearest), Pad pads with zeros.
HOMOGENEOUS = {"ReduceMean", "GlobalAveragePool", "AveragePool", "MaxPool", "Relu", "Resize", "Reshape",
               "Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Pad"}


class Graph:
    """An ONNX graph with the lookups a rewrite needs; edits go through it so they stay consistent."""

    def __init__(self, model):
        self.model, self.graph = model, model.graph
        self.counter = 0   # for unique names
        self.refresh()

    def refresh(self) -> None:
        from onnx import numpy_helper

        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants = {init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.outputs = {o.name for o in self.graph.output}

    def unique(self, base: str) -> str:
        self.counter += 1
        return f"{base}__xnn{self.counter}"

    def constant(self, base: str, value: np.ndarray) -> str:
        """A new initializer (never an edit of an existing one: exporters share identical ones)."""
        from onnx import numpy_helper

        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.constants[name] = value
        return name

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attrs):
        from onnx import helper

        output = output or self.unique(f"{inputs[0]}_{op_type}")
        return helper.make_node(op_type, inputs, [output], name=self.unique(op_type), **attrs)

    def replace(self, old, new_nodes: list) -> None:
        """Put `new_nodes` where `old` was (keeps the list topologically sorted)."""
        nodes = list(self.graph.node)
        at = nodes.index(old)
        del self.graph.node[:]
        self.graph.node.extend(nodes[:at] + new_nodes + nodes[at + 1:])
        self.refresh()

    def drop_unused_initializers(self) -> None:
        used = {name for node in self.graph.node for name in node.input}
        kept = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        self.refresh()

    def attribute(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


# ----------------------------------------------------------------------------- input normalisation

def per_channel(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """`value` as a (channels,) vector if it is a scalar or one value per NCHW channel, else None."""
    if value is None:
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.size == channels and value.shape[-3:] == (channels, 1, 1):
        return value.reshape(-1).astype(np.float64)
    return None


def normalization_over_rows(g: Graph) -> bool:
    """input -> Sub(mean) -> Div(std) or Mul(1/std)  becomes  input * a + b, with a = 1/std and
    b = -mean/std each repeated along the image width: (1, C, 1, W).

    The same per-channel affine map, but in TFLite's NHWC layout its constants broadcast over the
    rows only, so XNNPACK streams each row's W*C contiguous values instead of running a broadcast
    whose innermost axis has 3 values. Measured as one-op models at 128x160, 2 threads: int8 MUL
    6.5 us + ADD 3.7 us (fp32 2.9 + 2.6), against 33 us as a 1x1 depthwise conv and 76 us as SUB +
    MUL by (1, 1, 1, 3) constants. The constants are 2 x W x C floats. (Folding the map into the
    first convolution is exact only with a constant border map, since zero padding of the normalised
    image is not zero padding of the raw one, and that map grows with the input: +25% on the int8
    file at 256x320, for a few per cent of speed.)
    Returns False (graph unchanged) unless the graph starts that way with per-channel constants.
    """
    graph_input = g.graph.input[0].name
    dims = [d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim]
    users = g.consumers[graph_input]
    if len(dims) != 4 or 0 in dims or len(users) != 1 or users[0].op_type != "Sub" or users[0].input[0] != graph_input:
        return False
    sub, channels, width = users[0], dims[1], dims[3]
    mean = per_channel(g.constants.get(sub.input[1]), channels)
    scales = g.consumers[sub.output[0]]
    if mean is None or len(scales) != 1 or scales[0].op_type not in ("Div", "Mul") or scales[0].input[0] != sub.output[0]:
        return False
    scale_node = scales[0]
    value = per_channel(g.constants.get(scale_node.input[1]), channels)
    if value is None or np.any(value == 0):
        return False
    inv_std = 1.0 / value if scale_node.op_type == "Div" else value

    def along_rows(name: str, per_channel_value: np.ndarray) -> str:
        row = np.broadcast_to(per_channel_value.reshape(1, channels, 1, 1), (1, channels, 1, width))
        return g.constant(name, row.astype(np.float32))

    mul = g.node("Mul", [graph_input, along_rows("normalize_scale", inv_std)])
    add = g.node("Add", [mul.output[0], along_rows("normalize_shift", -mean * inv_std)], scale_node.output[0])
    g.replace(scale_node, [mul, add])
    g.graph.node.remove(sub)
    g.refresh()
    return True


# ----------------------------------------------------------------------------- hard activations

def defer_scale(g: Graph, tensor: str) -> list | None:
    """The convolutions whose weights can absorb a constant factor on `tensor`, or None.

    Follows the factor through ops that are positively homogeneous in their first input and
    through MULs with an unscaled operand, until every path ends in a Conv's data input. Any other
    reader (an ADD, an activation with a threshold, a graph output) means it cannot be deferred.
    """
    scaled, convs, muls, pending = set(), [], [], [tensor]
    while pending:
        name = pending.pop()
        if name in scaled:
            continue
        scaled.add(name)
        if name in g.outputs:
            return None
        for node in g.consumers[name]:
            first_only = node.input[0] == name and name not in node.input[1:]
            if node.op_type == "Conv" and first_only and node.input[1] in g.constants:
                convs.append(node)
            elif node.op_type in HOMOGENEOUS and first_only and not nonzero_padding(g, node):
                pending.append(node.output[0])
            elif node.op_type == "Mul" and len(node.input) == 2 and node.input[0] != node.input[1]:
                muls.append(node)
                pending.append(node.output[0])
            else:
                return None
    if any(all(i in scaled for i in m.input) for m in muls):
        return None   # a product of two scaled tensors carries the factor squared
    return convs


def nonzero_padding(g: Graph, node) -> bool:
    """A constant-mode Pad with a non-zero value (not homogeneous: it adds that value)."""
    if node.op_type != "Pad" or g.attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        return False
    value = g.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return value is not None and np.any(value != 0)


def scale_weights(g: Graph, convs: list, factor: float) -> None:
    for conv in convs:
        weight = g.constants[conv.input[1]]
        conv.input[1] = g.constant(conv.input[1], (weight * factor).astype(weight.dtype))


def hard_parameters(g: Graph, node) -> bool:
    """True for PyTorch's constants, alpha 1/6 and beta 1/2 (ONNX HardSwish has no others)."""
    if node.op_type == "HardSwish":
        return True
    return abs(g.attribute(node, "alpha", 0.2) - SIXTH) < 1e-6 and abs(g.attribute(node, "beta", 0.5) - 0.5) < 1e-6


def lower_hard_activations(g: Graph, keep_hardswish: bool) -> dict:
    """HardSigmoid(x) = relu6(x + 3) / 6; HardSwish(x) = x * relu6(x + 3) / 6 (unless `keep_hardswish`).

    Where `defer_scale` allows, the output tensor keeps its name but holds 6x the activation, and
    the convolutions reading it get weights / 6; else the 1/6 stays a MUL, for HardSwish in the
    order relu6(x + 3) * (x / 6), which TFLite's converter does not fuse back into HARD_SWISH.
    Returns counts of what was rewritten and how.
    """
    counts = {"hardsigmoid": 0, "hardswish": 0, "sixth_deferred": 0}
    for node in [n for n in g.graph.node if n.op_type in ("HardSigmoid", "HardSwish")]:
        if (node.op_type == "HardSwish" and keep_hardswish) or not hard_parameters(g, node):
            continue
        x, y = node.input[0], node.output[0]
        convs = None if y in g.outputs else defer_scale(g, y)
        add = g.node("Add", [x, g.constant("three", np.array(3.0, np.float32))])
        relu6 = g.node("Clip", [add.output[0], g.constant("zero", np.array(0.0, np.float32)),
                                g.constant("six", np.array(6.0, np.float32))])
        if convs is not None:      # y now holds 6 * the activation
            scale_weights(g, convs, SIXTH)
            counts["sixth_deferred"] += 1
            if node.op_type == "HardSigmoid":
                relu6.output[0], tail = y, []
            else:
                tail = [g.node("Mul", [x, relu6.output[0]], y)]
        else:
            sixth = g.constant("sixth", np.array(SIXTH, np.float32))
            if node.op_type == "HardSigmoid":
                tail = [g.node("Mul", [relu6.output[0], sixth], y)]
            else:
                x6 = g.node("Mul", [x, sixth])
                tail = [x6, g.node("Mul", [relu6.output[0], x6.output[0]], y)]
        g.replace(node, [add, relu6, *tail])
        counts[node.op_type.lower()] += 1
    return counts


def shape_for_xnnpack(source, dest, *, int8: bool) -> dict:
    """Read ONNX `source`, apply the rewrites, check the graph, write `dest`. Returns a report."""
    import onnx

    g = Graph(onnx.load(str(source)))
    report = {"normalization_over_rows": normalization_over_rows(g),
              **lower_hard_activations(g, keep_hardswish=not int8)}
    g.drop_unused_initializers()
    onnx.checker.check_model(g.model)
    onnx.save(g.model, str(dest))
    return report
