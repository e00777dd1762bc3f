"""QAT: batch-norm folding is exact, fake quantisation matches the int8 scheme, training changes
weights and ranges, and the finalised weights sit on their int8 grid."""
import copy

import pytest
import torch

from distill.students import build_student
from quant import qat


def randomized(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_student(name, decoder_channels=16)
    for m in model.modules():  # non-trivial statistics so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientvit_b0"])
def test_fold_batchnorm_is_exact(name):
    model = randomized(name, torch.float64)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    ref = model(x)
    folded = copy.deepcopy(model)
    count = qat.fold_batchnorm(folded, x[:1])
    assert count > 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    out = folded(x)
    torch.testing.assert_close(out["depth"], ref["depth"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["seg"], ref["seg"], rtol=1e-12, atol=1e-12)


def test_weight_fake_quant_is_per_channel_symmetric_int8():
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8).view(8, 1, 1, 1)
    q = qat.fake_quant_weight(w)
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    codes = q / scale.view(8, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.abs().max() <= 127 + 1e-4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6


def test_activation_quantizer_keeps_zero_exact_and_uses_256_levels():
    aq = qat.ActivationQuantizer().train()
    x = torch.linspace(0.5, 3.0, 1000)   # an all-positive tensor: the range is widened to contain 0
    y = aq(x)
    scale, zero = aq.qparams()
    assert aq.lo.item() == pytest.approx(0.5) and aq.hi.item() == pytest.approx(3.0)
    assert scale.item() == pytest.approx(3.0 / 255, rel=1e-5)
    assert len(torch.unique(y)) <= 256
    assert aq(torch.zeros(3)).abs().max().item() == 0.0
    assert (y - x).abs().max().item() <= scale.item() / 2 + 1e-6


def test_qat_trains_weights_and_ranges_and_finalizes_on_grid():
    model = randomized("mobilenetv3_small_050")
    x = torch.randn(4, 3, 64, 96)
    fake = qat.prepare(model, x[:1])
    qat.calibrate(fake, [x[:2], x[2:]])
    ranges_before = qat.activation_ranges(fake)
    weights_before = [p.detach().clone() for p in fake.parameters()]
    fake.train()
    optimizer = torch.optim.SGD(fake.parameters(), lr=0.05)
    for _ in range(3):
        out = fake(x)
        loss = out["depth"].log().square().mean() + out["seg"].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(weights_before, fake.parameters()))
    assert changed == len(weights_before)         # straight-through gradients reach every weight
    assert qat.activation_ranges(fake) != ranges_before

    final = qat.finalize(fake)
    assert not any(isinstance(m, qat.QuantConv2d) for m in final.modules())
    for m in final.modules():
        if isinstance(m, torch.nn.Conv2d):
            scale = qat.weight_scale(m.weight).view(-1, *[1] * (m.weight.dim() - 1))
            codes = m.weight / scale
            torch.testing.assert_close(codes, codes.round(), atol=2e-3, rtol=0)
    # the untouched original is still the float model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_hardswish_is_simulated_as_the_int8_file_computes_it():
    """Input, gate relu6(x + 3) and product each on an int8 grid (the file's ADD + RELU6 and MUL),
    swapped in by `prepare` and swapped back by `finalize`."""
    hswish = qat.QuantHardswish().train()
    t = torch.linspace(-5, 8, 1001)
    hswish(t)                                   # the first batch sets every range to its min / max
    hswish.eval()
    gate_lo, gate_hi = hswish.gate_quant.lo.item(), hswish.gate_quant.hi.item()
    assert (gate_lo, gate_hi) == (0.0, 6.0)     # the gate has its own range, not the input's
    out = hswish(t)
    err = (out - torch.nn.functional.hardswish(t)).abs().max().item()
    assert 0 < err < 0.1 and out.unique().numel() <= 256
    # the gate's grid shows: a float gate would leave the product on the input's grid times a smooth factor
    exact_gate = hswish.input_quant(t) * torch.nn.functional.relu6(hswish.input_quant(t) + 3) / 6
    assert not torch.allclose(hswish.output_quant(exact_gate), out)

    model = randomized("mobilenetv3_small_050")
    count = sum(type(m) is torch.nn.Hardswish for m in model.modules())
    fake = qat.prepare(model, torch.randn(1, 3, 64, 96))
    assert count > 0 and sum(isinstance(m, qat.QuantHardswish) for m in fake.modules()) == count
    assert not any(type(m) is torch.nn.Hardswish for m in fake.modules())
    final = qat.finalize(fake)
    assert sum(type(m) is torch.nn.Hardswish for m in final.modules()) == count
    assert not any(isinstance(m, qat.QuantHardswish) for m in final.modules())
