"""Activation-range equalisation: the same float function, each live channel of a ReLU tensor lifted
to the tensor's range (depthwise reader) or halfway there in log (dense reader), per-channel integer
weights unchanged, a chain with a hidden reader left alone, and less int8 error where channels differ."""
import copy
import math

import torch
from torch import nn

from distill.students import build_student
from quant import equalize as eq
from quant import qat


class TwoChains(nn.Module):
    """expand -> ReLU -> depthwise -> ReLU -> project. For inputs in [0, 1] reaching 1, the first
    ReLU's channels peak at 8, 2 and 0 (dead), the second's at 4, 2 and 0."""

    def __init__(self, hidden_reader: bool = False):
        super().__init__()
        self.expand, self.act1 = nn.Conv2d(1, 3, 1), nn.ReLU()
        self.dw, self.act2 = nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.ReLU()
        self.project = nn.Conv2d(3, 2, 1)
        self.hidden_reader = hidden_reader
        with torch.no_grad():
            self.expand.weight.copy_(torch.tensor([8.0, 2.0, -1.0]).view(3, 1, 1, 1))
            self.expand.bias.zero_()
            self.dw.weight.zero_()
            self.dw.weight[:, 0, 1, 1] = torch.tensor([0.5, 1.0, 3.0])
            self.dw.bias.zero_()
            self.project.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, 1.0]]).view(2, 3, 1, 1))

    def forward(self, x):
        a = self.act1(self.expand(x))
        y = self.project(self.act2(self.dw(a)))
        return {"out": y + a.mean() if self.hidden_reader else y}


def images(count: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(count, 1, 6, 6)
    x[0, 0, 2, 2] = 1.0
    return [x[:2], x[2:]]


def test_each_chain_gets_the_scales_of_its_reader():
    model, batches = TwoChains(), images()
    equalized, records = eq.equalize(model, batches[0][:1], batches)
    assert [(r["producer"], r["consumer"], r["depthwise"]) for r in records] == [
        ("expand", "dw", True), ("dw", "project", False)]
    assert [r["largest_scale"] for r in records] == [4.0, round(math.sqrt(2), 2)]
    torch.testing.assert_close(eq.channel_peaks(equalized, ["act1"], batches)["act1"], torch.tensor([8.0, 8.0, 0.0]))
    torch.testing.assert_close(eq.channel_peaks(equalized, ["act2"], batches)["act2"],
                               torch.tensor([4.0, 2 * math.sqrt(2), 0.0]))
    x = torch.cat(batches)
    torch.testing.assert_close(equalized(x)["out"], model(x)["out"], rtol=1e-5, atol=1e-6)


def test_per_channel_integer_weights_do_not_change_where_both_sides_are_per_channel():
    model, batches = TwoChains(), images()
    equalized, _ = eq.equalize(model, batches[0][:1], batches)

    def integers(conv):
        return torch.round(conv.weight / qat.weight_scale(conv.weight).view(-1, 1, 1, 1))

    for name in ("expand", "dw"):     # producer rows, depthwise channels: their scales follow s_i
        assert torch.equal(integers(getattr(equalized, name)), integers(getattr(model, name)))


def test_a_chain_whose_tensor_another_op_reads_is_left_alone():
    model, batches = TwoChains(hidden_reader=True), images()
    equalized, records = eq.equalize(model, batches[0][:1], batches)
    assert [r["producer"] for r in records] == ["dw"]      # a.mean() reads the first ReLU's output too
    assert [c.producer for c in eq.relu_chains(model, batches[0][:1])] == ["dw"]   # seen by the tracer itself
    assert torch.equal(equalized.expand.weight, model.expand.weight)
    x = torch.cat(batches)
    torch.testing.assert_close(equalized(x)["out"], model(x)["out"], rtol=1e-5, atol=1e-6)


def test_a_depthwise_reader_with_a_channel_multiplier_is_left_alone():
    """groups == in_channels but two filters per channel (out = 2 x in): not a per-channel reader,
    so the chain into it is not rescaled, and the function is kept."""
    model, batches = TwoChains(), images()
    model.dw = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    model.project = nn.Conv2d(6, 2, 1)
    equalized, records = eq.equalize(model.eval(), batches[0][:1], batches)
    assert ("expand", "dw") not in [(r["producer"], r["consumer"]) for r in records]
    assert torch.equal(equalized.expand.weight, model.expand.weight)
    x = torch.cat(batches)
    torch.testing.assert_close(equalized(x)["out"], model(x)["out"], rtol=1e-5, atol=1e-6)


def int8_error(model: TwoChains, x: torch.Tensor) -> float:
    """Output error when the first ReLU's output is fake-quantised per tensor by min/max."""
    quantizer = qat.ActivationQuantizer(momentum=None).train()
    hook = model.act1.register_forward_hook(lambda _m, _i, out: quantizer(out))
    try:
        with torch.no_grad():
            quantized = model(x)["out"]
    finally:
        hook.remove()
    return (quantized - model(x)["out"]).abs().mean().item()


def test_equalised_channels_lose_less_to_int8():
    model, batches = TwoChains(), images()
    equalized, _ = eq.equalize(model, batches[0][:1], batches)
    x = torch.cat(batches)
    assert int8_error(equalized, x) < 0.5 * int8_error(model, x)


def test_a_student_keeps_its_function_and_is_left_untouched():
    torch.manual_seed(0)
    student = build_student("mobilenetv3_small_050", decoder_channels=16).eval()
    before = copy.deepcopy(student.state_dict())
    x = torch.rand(2, 3, 64, 96)
    equalized, records = eq.equalize(student, x[:1], [x])
    assert any(r["depthwise"] for r in records) and any(not r["depthwise"] for r in records)
    out, ref = equalized(x), student(x)
    for key in ("depth", "seg"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
