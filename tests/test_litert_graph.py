"""targets/litert_graph.py: the XNNPACK rewrites compute the same function (onnxruntime runs the
graph before and after) and move the 1/6 of hard activations only where it is exact to do so."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from targets.litert_graph import Graph, defer_scale, lower_hard_activations, shape_for_xnnpack


class HardNet(nn.Module):
    """Each way a hard activation's output can be read in a MobileNetV3-like graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project, self.mix, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, image):
        a = nn.functional.hardswish(self.stem((image - self.mean) / self.std))   # read by a mean and a MUL: deferred
        gate = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(a.mean((2, 3), keepdim=True)))))
        b = nn.functional.hardswish(self.project(a * gate))    # read by a residual ADD: stays explicit
        c = self.mix(b) + b
        return c, nn.functional.hardswish(self.head(c))        # a graph output: stays explicit


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("litert_graph") / "hard.onnx"
    torch.onnx.export(HardNet().eval(), (torch.rand(1, 3, 32, 48),), str(path), input_names=["image"],
                      output_names=["c", "out"], opset_version=18, dynamo=True)   # as targets/deploy.py
    return path


def run(path, image):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})


def op_types(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("int8", [False, True])
def test_rewrites_keep_the_function(onnx_path, tmp_path, int8):
    dest = tmp_path / "xnn.onnx"
    report = shape_for_xnnpack(onnx_path, dest, int8=int8)
    ops = op_types(dest)
    assert report["normalization_over_rows"] and "Sub" not in ops and "Div" not in ops
    assert report["hardsigmoid"] == 1 and "HardSigmoid" not in ops
    if int8:   # the stem's hardswish and the gate: 1/6 in the reading convs; the other two keep a MUL
        assert report["hardswish"] == 3 and "HardSwish" not in ops and report["sixth_deferred"] == 2
    else:      # float HARD_SWISH is native in XNNPACK
        assert report["hardswish"] == 0 and ops["HardSwish"] == 3 and report["sixth_deferred"] == 1
    image = np.random.default_rng(0).random((1, 3, 32, 48), dtype=np.float32)
    for before, after in zip(run(onnx_path, image), run(dest, image)):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_a_factor_reaching_an_add_or_an_output_is_not_deferred(onnx_path):
    g = Graph(onnx.load(str(onnx_path)))
    swishes = [n for n in g.graph.node if n.op_type == "HardSwish"]
    assert defer_scale(g, swishes[0].output[0]) is not None      # mean -> conv, mul -> conv
    assert defer_scale(g, swishes[1].output[0]) is None          # the residual ADD
    assert defer_scale(g, swishes[2].output[0]) is None          # a graph output
    counts = lower_hard_activations(g, keep_hardswish=False)
    assert counts == {"hardsigmoid": 1, "hardswish": 3, "sixth_deferred": 2}
    # the explicit form is relu6(x + 3) * (x / 6): a MUL by 1/6 on x, which TFLite does not fuse back
    sixths = [n for n in g.graph.node if n.op_type == "Mul" and any(
        i in g.constants and np.isclose(g.constants[i], 1 / 6).all() for i in n.input)]
    assert len(sixths) == 2


def test_a_graph_without_the_patterns_is_left_alone(tmp_path):
    class Plain(nn.Module):
        def forward(self, image):
            return torch.relu(image * 2.0)

    source, dest = tmp_path / "plain.onnx", tmp_path / "plain.xnn.onnx"
    torch.onnx.export(Plain().eval(), (torch.rand(1, 3, 8, 8),), str(source), input_names=["image"], opset_version=18,
                      dynamo=True)
    report = shape_for_xnnpack(source, dest, int8=True)
    assert report == {"normalization_over_rows": False, "hardsigmoid": 0, "hardswish": 0, "sixth_deferred": 0}
    assert op_types(dest) == op_types(source)
