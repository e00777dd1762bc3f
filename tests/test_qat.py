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


def test_weights_for_onnxruntime_take_the_reduced_range():
    """onnxruntime's files store weights in [-64, 64] (core/formats.py says why): QAT simulates that
    grid, scale max|w| / 64, and every channel's largest weight lands on +-64."""
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8).view(8, 1, 1, 1)
    q = qat.fake_quant_weight(w, 64)
    codes = q / (w.abs().amax(dim=(1, 2, 3)) / 64).view(8, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.abs().amax(dim=(1, 2, 3)).tolist() == pytest.approx([64.0] * 8)


def test_the_onnx_int8_file_stores_the_weights_qat_trained(tmp_path):
    """QAT's finalised weights sit on onnxruntime's grid, so its quantiser reproduces their integers
    bit for bit: what QAT trained is what the file computes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from core.formats import FORMATS
    from targets import onnx as onnx_target
    from targets.deploy import export_onnx

    weight_max = FORMATS["onnx"].converter().int8_weight_max
    model = randomized("mobilenetv3_small_050")
    x = torch.rand(4, 3, 64, 96)
    fake = qat.prepare(model, x[:1], log_depth=True, weight_max=weight_max)
    qat.calibrate(fake, [x])
    final = qat.finalize(fake)
    convs = [m.weight for m in final.modules() if isinstance(m, torch.nn.Conv2d)]
    codes = [w / qat.weight_scale(w, weight_max).view(-1, 1, 1, 1) for w in convs]
    assert all(torch.allclose(c, c.round(), atol=1e-3, rtol=0) for c in codes)   # already on the file's grid
    trained = sorted((tuple(c.shape), c.round().to(torch.int8).numpy().tobytes()) for c in codes)

    source, _ = export_onnx(final, tmp_path / "float.onnx", 64, 96)
    np.save(tmp_path / "calibration.npy", x.numpy())
    onnx_target.quantize_int8(source, tmp_path / "int8.onnx", str(tmp_path / "calibration.npy"), 0, weight_max)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    initializers = {i.name: i for i in graph.initializer}
    stored = sorted((tuple(w.shape), w.tobytes()) for w in (
        numpy_helper.to_array(initializers[n.input[0]]) for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers) if w.dtype == np.int8 and w.ndim == 4)
    assert weight_max == 64 and len(stored) == len(trained) > 20
    assert stored == trained


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


class ResidualPair(torch.nn.Module):
    """relu(conv_a(x)) + conv_b(x): an ADD fed by a fused conv + ReLU and by a raw convolution."""
    tasks = ("depth",)

    def __init__(self):
        super().__init__()
        self.conv_a, self.relu, self.conv_b = torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"depth": self.relu(self.conv_a(x)) + self.conv_b(x)}


def test_every_tensor_an_add_reads_is_int8():
    """The int8 file stores each convolution's output after its fused activation, so both inputs
    of an ADD are int8 even when no convolution reads them: QAT quantises them where they are made."""
    torch.manual_seed(0)
    model, x = ResidualPair().eval(), torch.randn(2, 3, 8, 8)
    fake = qat.prepare(model, x[:1])
    qat.calibrate(fake, [x])
    inner = fake.student
    assert isinstance(inner.relu, qat.QuantActivation)
    assert isinstance(inner.conv_a.output_quant, torch.nn.Identity)       # quantised after its ReLU
    assert isinstance(inner.conv_b.output_quant, qat.ActivationQuantizer)

    def fq(t, q):
        scale, zero = q.qparams()
        return torch.fake_quantize_per_tensor_affine(t, scale, zero, qat.QMIN, qat.QMAX)

    def conv(c, t):
        return torch.nn.functional.conv2d(fq(t, c.input_quant), qat.fake_quant_weight(c.conv.weight), c.conv.bias)

    a = fq(torch.relu(conv(inner.conv_a, x)), inner.relu.output_quant)
    b = fq(conv(inner.conv_b, x), inner.conv_b.output_quant)
    expected = fq(a + b, fake.output_quant["depth"])
    torch.testing.assert_close(fake(x)["depth"], expected)

    # MobileNetV3: the raw outputs quantised are those of the residual projections and the heads'
    # last convolutions; every ReLU, hardsigmoid and residual sum is wrapped, and finalize
    # restores them all
    student = randomized("mobilenetv3_small_050")
    fake = qat.prepare(student, torch.randn(1, 3, 64, 96))
    raw = {n.removeprefix("student.") for n, m in fake.named_modules()
           if isinstance(m, qat.QuantConv2d) and isinstance(m.output_quant, qat.ActivationQuantizer)}
    assert {"heads.depth.out", "heads.seg.out"} <= raw
    assert sum(n.endswith("conv_pwl") for n in raw) == sum(n.endswith("conv_pwl") for n, _ in student.named_modules())
    assert not any(n.startswith("decoder.") for n in raw)
    wrapped = sum(type(m) in qat.FUSED_ACTIVATIONS for m in student.modules())
    assert wrapped > 0 and sum(isinstance(m, qat.QuantActivation) for m in fake.modules()) == wrapped
    residuals = sum(qat.is_residual(m) for m in student.modules())
    assert residuals > 0 and sum(isinstance(m, qat.QuantResidual) for m in fake.modules()) == residuals
    final = qat.finalize(fake)
    assert sum(type(m) in qat.FUSED_ACTIVATIONS for m in final.modules()) == wrapped
    assert sum(qat.is_residual(m) for m in final.modules()) == residuals
    assert not any(isinstance(m, (qat.QuantActivation, qat.QuantConv2d, qat.QuantResidual)) for m in final.modules())


def test_float_stem_leaves_the_first_convolutions_as_the_file_keeps_them():
    """`float_stem=2`: the stem convolution, its hardswish and the first depthwise layer compute in
    float, as the int8 files' input stem does; the depthwise layer's activated output is where
    int8 begins, and finalize leaves the float convolutions' weights off the int8 grid."""
    student = randomized("mobilenetv3_small_050")
    example = torch.randn(1, 3, 64, 96)
    fake = qat.prepare(student, example, float_stem=2)
    enc = fake.student.encoder
    assert type(enc.conv_stem) is torch.nn.Conv2d and type(enc.act1) is torch.nn.Hardswish
    block = enc.blocks[0][0]
    assert type(block.conv_dw) is torch.nn.Conv2d
    assert isinstance(block.bn1[0], qat.QuantActivation)            # the island's output: int8 from here
    assert isinstance(block.se.conv_reduce, qat.QuantConv2d)
    everything = qat.prepare(student, example)
    assert sum(isinstance(m, qat.ActivationQuantizer) for m in everything.modules()) - \
        sum(isinstance(m, qat.ActivationQuantizer) for m in fake.modules()) == 5   # stem input, 3 of hardswish, dw input
    final = qat.finalize(fake)
    folded = copy.deepcopy(student)
    qat.fold_batchnorm(folded, example)
    stem = qat.input_stem(folded, example, 2)
    assert {n for n in stem if "conv" in n} == {"encoder.conv_stem", "encoder.blocks.0.0.conv_dw"}
    assert "encoder.act1" in stem and "encoder.blocks.0.0.bn1.0" not in stem   # int8 after the second layer
    fine = build_student("mobilenetv3_small_050", decoder_channels=16, output_stride=2).eval()
    assert "decoder.lateral.0.0" in qat.input_stem(fine, example, 2)   # the stride-2 level reads the stem too
    assert qat.input_stem(fine, example, 0) == set()
    assert torch.equal(final.encoder.conv_stem.weight, folded.encoder.conv_stem.weight)   # float, not snapped
    assert not torch.equal(final.encoder.blocks[1][0].conv_pw.weight, folded.encoder.blocks[1][0].conv_pw.weight)


def test_float_stem_keeps_in_qat_the_convolutions_the_onnx_file_keeps_at_every_depth(tmp_path):
    """One rule for both sides (targets/stem.py), over the same graph. Traced over the leaf modules
    alone, block 0's squeeze-excite (a mean and a product between modules) ended the torch stem:
    `--float-stem` 3 to 6 kept 2 convolutions float in QAT, where the ONNX file kept 3, 4, 5 and 7."""
    import onnx

    from targets import deploy
    from targets.onnx import input_stem as onnx_stem

    student = randomized("mobilenetv3_small_050").eval()
    example = torch.rand(1, 3, 64, 96)
    folded = copy.deepcopy(student)
    qat.fold_batchnorm(folded, example)
    convs = {n for n, m in folded.named_modules() if type(m) is torch.nn.Conv2d}
    path, _ = deploy.export_onnx(student, tmp_path / "student.onnx", 64, 96)
    graph = onnx.load(path)
    kinds = {n.name: n.op_type for n in graph.graph.node}
    for layers, expected in ((3, 3), (4, 4), (5, 5), (6, 7)):
        in_file = [n for n in onnx_stem(graph, layers) if kinds[n] == "Conv"]
        assert len(convs & qat.input_stem(folded, example, layers)) == len(in_file) == expected, layers
    fake = qat.prepare(student, example, float_stem=3)
    se = fake.student.encoder.blocks[0][0].se
    assert type(se.conv_reduce) is torch.nn.Conv2d and isinstance(se.conv_expand, qat.QuantConv2d)


class InPlaceSum(torch.nn.Module):
    """c1's output gets c4's (three layers deep) added in place, then c5 reads it."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.c1, self.c2, self.c3, self.c4, self.c5 = (torch.nn.Conv2d(3, 3, 1) for _ in range(5))

    def forward(self, x):
        a, e = self.c1(x), self.c4(self.c3(self.c2(x)))
        if self.in_place:
            a += e
        else:
            a = a + e
        return self.c5(a)


@pytest.mark.parametrize("in_place", [False, True])
def test_an_in_place_sum_with_a_tensor_from_outside_the_stem_ends_it(in_place):
    """By identity alone `a += e` left `a` a stem tensor one layer deep, so c5 stayed float in QAT where
    a file (whose ADD makes a new tensor) quantises it."""
    stem = qat.input_stem(InPlaceSum(in_place).eval(), torch.rand(1, 3, 4, 4), 2)
    assert {n for n in stem if n.startswith("c")} == {"c1", "c2", "c3"}


def test_efficientvit_attention_kernels_stay_float_as_in_the_files():
    """LiteMLA's kernel ReLU acts on q and k inside the attention's float island (the TFLite and
    ONNX files keep it float): no quantiser there, and the convolutions around it keep theirs."""
    student = randomized("efficientvit_b0")
    fake = qat.prepare(student, torch.randn(1, 3, 64, 96))
    kernels = {n: m for n, m in fake.named_modules() if n.endswith("kernel_func")}
    assert kernels and all(type(m) is torch.nn.ReLU for m in kernels.values()), kernels
    assert all(isinstance(m, qat.QuantConv2d) for n, m in fake.named_modules() if n.endswith("qkv.conv"))


def test_sensitivity_groups_the_quantisers_of_one_tensor():
    """quant.sensitivity: both convolutions read the image (one tensor, two quantisers); the ReLU's
    output, the raw branch and the sum are tensors of their own; with every quantiser left float
    the simulation is the float model."""
    from quant.sensitivity import drift, tensor_groups, without
    torch.manual_seed(0)
    model, x = ResidualPair().eval(), torch.randn(2, 3, 8, 8)
    fake = qat.prepare(model, x[:1])
    qat.calibrate(fake, [x])
    groups = tensor_groups(fake, x)
    names = sorted(sorted(n.removeprefix("student.") for n in g) for g in groups)
    assert names == [["conv_a.input_quant", "conv_b.input_quant"], ["conv_b.output_quant"], ["output_quant.depth"],
                     ["relu.output_quant"]]
    reference = model(x)
    assert drift(fake, x, reference)["depth_rel"] > 0
    everything = [[n for g in groups for n in g]]
    assert without(everything, fake, x, reference)[0]["depth_rel"] < 1e-6
    assert all(m.seen for m in fake.modules() if isinstance(m, qat.ActivationQuantizer))   # restored


def test_the_outputs_are_rounded_again_only_where_the_converters_file_rounds_them():
    """The heads' last convolutions write the int8 outputs. TFLite runs the upsampling and EXP after
    them in float; onnxruntime's int8 Resize rounds the upsampled outputs again. The simulation
    rounded them again for both, so quant.sensitivity ranked a tensor no TFLite file has."""
    from core.formats import FORMATS
    from quant import ptq
    from quant.sensitivity import tensor_groups

    assert FORMATS["onnx"].converter().int8_requantized_outputs
    assert not any(c.int8_requantized_outputs for c in FORMATS["tflite"].converters)
    model, x = randomized("mobilenetv3_small_050"), torch.rand(4, 3, 64, 96)
    calib = ptq.CalibrationSet(None, {}, x)
    tflite = ptq.simulate(model, calib, FORMATS["tflite"].converter(), log_depth=True)
    onnx = ptq.simulate(model, calib, FORMATS["onnx"].converter(), log_depth=True)
    with torch.no_grad():
        inner, tflite_out, onnx_out = tflite.student(x), tflite(x), onnx(x)
    assert all(torch.equal(tflite_out[t], inner[t]) for t in inner)   # nothing after the heads' int8 outputs
    assert not torch.equal(onnx_out["seg"], inner["seg"])
    names = {n for g in tensor_groups(tflite, x) for n in g}
    assert names and not any(n.startswith("output_quant") for n in names)


def test_the_ranges_recorded_after_qat_are_the_converters_min_max_not_the_ema():
    """QAT moves the ranges by EMA; the converter measures min/max on the calibration images, and the
    export records what it measures: a fresh calibration forgets the EMA's ranges."""
    model, x = randomized("mobilenetv3_small_050"), torch.rand(4, 3, 64, 96)
    fake = qat.prepare(model, x[:1])
    qat.calibrate(fake, [x])
    qat.calibrate(fake, [x], fresh=True)
    measured = qat.activation_ranges(fake)
    for q in fake.modules():
        if isinstance(q, qat.ActivationQuantizer):
            q.lo.fill_(-100.0), q.hi.fill_(100.0)   # where 300 EMA steps might have left them
    qat.calibrate(fake, [x])
    assert qat.activation_ranges(fake) != measured   # min/max on top of a range only widens it
    qat.calibrate(fake, [x], fresh=True)
    assert qat.activation_ranges(fake) == measured
    # what the converter measures on the model it is given: finalize's weights, snapped onto the grid
    given = qat.prepare(qat.finalize(fake), x[:1])
    qat.calibrate(given, [x])
    converter = qat.activation_ranges(given)
    assert converter.keys() == measured.keys()
    assert all(converter[k] == pytest.approx(measured[k], abs=1e-4) for k in measured)


def test_calibration_measures_the_float_models_ranges_as_the_converters_do():
    """The converters calibrate the float model: each range is the min/max of the float activation,
    not of one computed through the int8 rounding upstream of it (with rounding on, the outputs'
    ranges moved by about an int8 step)."""
    model, x = randomized("mobilenetv3_small_050"), torch.rand(4, 3, 64, 96)
    fake = qat.prepare(model, x[:1])
    qat.calibrate(fake, [x[:2], x[2:]])
    with torch.no_grad():
        seg = model(x)["seg"]
    quantizer = fake.output_quant["seg"]
    assert quantizer.lo.item() == pytest.approx(seg.min().item(), rel=1e-4, abs=1e-5)
    assert quantizer.hi.item() == pytest.approx(seg.max().item(), rel=1e-4, abs=1e-5)
    with torch.no_grad():   # and the simulation quantises again once calibrated
        assert not torch.equal(fake(x)["seg"], seg)
