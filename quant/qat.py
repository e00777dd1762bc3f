"""Quantisation-aware training that simulates exactly the int8 scheme the converters produce.

TFLite int8 (onnx2tf) and onnxruntime's QDQ both run convolutions with per-channel symmetric int8
weights (scale = max|w| / 127 per output channel, range [-127, 127]; onnxruntime's files [-64, 64],
core/formats.py `Converter.int8_weight_max` says why) after batch norm has been
folded into them, and per-tensor asymmetric int8 activations (range [-128, 127], the real range
always containing 0) calibrated by min/max. QAT here simulates that:

1. `fold_batchnorm` folds every BatchNorm into the convolution that feeds it, as the converters
   do, so the weights QAT quantises are the weights the int8 file stores.
2. `prepare` swaps each Conv2d for `QuantConv2d`: fake-quantised input activation (exponential
   moving average of min/max, as TensorFlow's QAT does, so the ranges follow the weights while
   they train), fake-quantised per-channel weights, with straight-through gradients, and a
   fake-quantised output where no activation follows; each ReLU, ReLU6 and hardsigmoid for
   `QuantActivation` (the output of the fused convolution + activation); and each Hardswish for
   `QuantHardswish` (input, gate and product quantised, as the int8 file's ADD + RELU6 and MUL
   compute it); and each residual block for `QuantResidual` (its int8 sum). The heads' last
   convolutions write the int8 outputs; what follows them (upsampling, EXP) runs in float in the
   TFLite files, while onnxruntime's QDQ Resize rounds the upsampled outputs again, on its input's
   scale: `requantize_outputs=True` simulates that with a quantiser per output (depth and logits
   never share one scale; bilinear upsampling keeps a range within its input's). `float_stem=N`
   leaves the layers within N weighted layers of the input float, as the int8 files keep their
   input stem (targets/stem.py), and EfficientViT's attention kernels stay float, as in the files'
   float islands (`attention_kernels`). Inside the decoder, int8 resizes are simulated as float
   (their re-rounding on the input's scale is not).
3. `finalize` returns a plain float student whose weights sit exactly on their int8 grid. The
   converter's weight quantisation then reproduces QAT's integer weights bit for bit (max|w| is on
   the grid, so the scale is unchanged). The activation ranges are not carried over: during QAT they
   follow the weights by EMA, and the converter measures its own by min/max on the calibration set
   (on the float model);
   `calibrate(..., fresh=True)` measures them that way on the simulation after QAT, which is what
   the export records. The export's converter checks
   the int8 file against the QAT model it came from (manifest `check`, `reference: int8`); the
   gain of QAT over PTQ alone was measured over seeds (README, "QAT or PTQ").
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from targets.stem import stem_ops

QMIN, QMAX = -128, 127       # int8 activations
WMAX = 127                   # symmetric int8 weights use [-WMAX, WMAX] unless a converter stores fewer levels


# ----------------------------------------------------------------------------- batch-norm folding

def producer_consumer_pairs(model: nn.Module, example: torch.Tensor, producer: tuple[type, ...],
                            consumer: tuple[type, ...]) -> list[tuple[str, str]]:
    """(producer name, consumer name) where the consumer's input is exactly the producer's output.

    Found by running the model once with hooks (tensor identity), not by module order: module
    registration order is not data flow. Hooks on every module of the consumer types, not `graph_ops`'
    leaf modules: timm's BatchNormAct2d is a BatchNorm2d with children. Producers match by exact
    type (a QuantConv2d is no Conv2d).
    """
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def after_producer(module, _inputs, output):
        produced[id(output)] = (module, output)

    def before_consumer(module, inputs):
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((names[hit[0]], names[module]))

    hooks = [m.register_forward_hook(after_producer) for m in model.modules() if type(m) in producer]
    hooks += [m.register_forward_pre_hook(before_consumer) for m in model.modules() if isinstance(m, consumer)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pairs


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) where the BatchNorm's input is exactly that convolution's output."""
    return producer_consumer_pairs(model, example, (nn.Conv2d,), (nn.BatchNorm2d,))


def bn_replacement(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a BatchNorm once folded: nothing, or timm's fused activation (BatchNormAct2d)."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every conv -> BatchNorm pair in place (eval-mode statistics). Returns the pairs folded."""
    pairs = conv_bn_pairs(model, example)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter(bias * scale + shift)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, bn_replacement(bn))
    return len(pairs)


# ----------------------------------------------------------------------------- fake quantisation

def weight_scale(weight: torch.Tensor, weight_max: int = WMAX) -> torch.Tensor:
    """Per-output-channel symmetric scale, as TFLite and onnxruntime compute it."""
    return weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-8) / weight_max


def fake_quant_weight(weight: torch.Tensor, weight_max: int = WMAX) -> torch.Tensor:
    """`weight` on its per-channel grid of integers in [-weight_max, weight_max]."""
    scale = weight_scale(weight, weight_max)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -weight_max, weight_max)


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric int8 fake quantisation with EMA min/max ranges (0 always inside)."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum     # None: running min/max (calibration), else EMA (training)
        self.quantize = True         # False: observe only (`calibrate` measures the float activations)
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if not self.seen:
            self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
        elif self.momentum is None:
            self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(1e-8)
        zero = (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX).to(torch.int32)
        return scale.reshape(1), zero.reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if not self.seen or not self.quantize:   # no range observed yet, or calibrating
            return x
        scale, zero = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)


class QuantConv2d(nn.Module):
    """A Conv2d computing on int8-simulated input and weights; its output is int8 too, unless an
    activation fused into it by the converters quantises it after the activation instead
    (`QuantActivation`, `QuantHardswish`). Its weights take integers in [-weight_max, weight_max]."""

    def __init__(self, conv: nn.Conv2d, quantize_output: bool = True, weight_max: int = WMAX):
        super().__init__()
        self.conv = conv
        self.weight_max = weight_max
        self.input_quant = ActivationQuantizer()
        self.output_quant = ActivationQuantizer() if quantize_output else nn.Identity()
        self.quantize = True   # False: float weights (`calibrate`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        weight = fake_quant_weight(c.weight, self.weight_max) if self.quantize else c.weight
        x = F.conv2d(self.input_quant(x), weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return self.output_quant(x)


class QuantOutput(nn.Module):
    """`module` with its output on an int8 scale; `finalize` puts `module` back."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.output_quant = ActivationQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.module(x))


class QuantActivation(QuantOutput):
    """ReLU, ReLU6 or hardsigmoid with an int8 output: the converters fuse it into the convolution
    before it (hardsigmoid as that convolution's RELU6, its +3 and 1/6 folded into weights), and the
    fused op writes int8. Its output may feed an ADD or a MUL rather than a convolution, so the
    next convolution's input quantiser does not cover it."""


class QuantHardswish(nn.Module):
    """hardswish as the int8 file computes it: x * relu6(x + 3) / 6 with x, the gate relu6(x + 3)
    and the product each on their own int8 scale. XNNPACK has no int8 HARD_SWISH, so both converters
    write it as ADD + RELU6 and MUL (targets/litert_graph.py, targets/xnnpack_form.py), and its input
    is a convolution's int8 output. Simulating only the convolutions' inputs missed these points:
    the stem's hardswish alone held most of the v3 students' int8 drift (README)."""

    def __init__(self):
        super().__init__()
        self.input_quant, self.gate_quant, self.output_quant = (ActivationQuantizer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        return self.output_quant(x * self.gate_quant(F.relu6(x + 3.0)) / 6.0)


class QuantResidual(QuantOutput):
    """A residual block whose sum is int8: the file's ADD writes int8, and the next block reads it
    twice, through its first convolution (whose input quantiser covers it) and through its own
    shortcut (which nothing else would quantise)."""


def is_residual(module: nn.Module) -> bool:
    """timm's residual blocks: MobileNetV3's (`has_skip`) and EfficientViT's (`ResidualBlock`)."""
    from timm.models.efficientvit_mit import ResidualBlock
    if isinstance(module, ResidualBlock):
        return module.shortcut is not None
    return bool(getattr(module, "has_skip", False))


class QuantStudent(nn.Module):
    """The student with every conv quantised; with `requantize_outputs`, each output on its own
    activation quantiser too.

    `requantize_outputs`: the outputs are rounded to int8 once more, as onnxruntime's int8 Resize
    rounds the upsampled outputs (TFLite's output tails run in float: targets/tflite_file.py
    `output_tails`), depth as log-depth with `log_depth=True`, exponentiated in float after (both
    files run the final EXP in float).
    """

    def __init__(self, student: nn.Module, log_depth: bool = False, requantize_outputs: bool = True):
        super().__init__()
        self.student = student
        self.log_depth = log_depth
        self.output_quant = nn.ModuleDict({t: ActivationQuantizer() for t in student.tasks} if requantize_outputs else {})

    @property
    def tasks(self):
        return self.student.tasks

    @property
    def num_classes(self):
        return self.student.num_classes

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.student(image)
        if not self.output_quant:
            return out
        if self.log_depth and "depth" in out:
            out["depth"] = self.output_quant["depth"](out["depth"].clamp_min(1e-6).log()).exp()
        return {t: v if t == "depth" and self.log_depth else self.output_quant[t](v) for t, v in out.items()}


FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardsigmoid)   # written into the convolution before them


Key = tuple[int, int]   # a tensor's identity and version (`key`)


class _FunctionsOutsideModules(TorchFunctionMode):
    """Records the torch functions called outside every leaf module (a squeeze-excite's mean and
    product, a residual ADD, the decoder's resizes and concatenations): ops of the files' graphs too.
    `inside[0]` counts the leaf modules running; what they call is their own op."""

    def __init__(self, ops: list, alive: list, inside: list[int]):
        super().__init__()
        self.ops, self.alive, self.inside = ops, alive, inside

    def __torch_function__(self, func, types, args=(), kwargs=None):
        read = [] if self.inside[0] else [key(t) for t in tensors_in((args, kwargs))]   # before an in-place write
        out = func(*args, **(kwargs or {}))
        if read:
            outputs = tensors_in(out)
            if outputs:
                self.alive.extend([*tensors_in((args, kwargs)), *outputs])
                self.ops.append((f"{getattr(func, '__name__', 'function')}#{len(self.ops)}", "other", read,
                                 [key(t) for t in outputs]))
        return out


def key(t: torch.Tensor) -> Key:
    """A tensor's value as the graph sees it: its identity and version (an in-place op, `a += b`, makes
    another value of the same tensor)."""
    return id(t), t._version


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a function's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    return []


def graph_ops(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, list[Key], list[Key]]]:
    """`model`'s ops on `example` in execution order, in targets/stem.py's form (name, kind, input keys,
    output keys): its leaf modules (kind "conv" for a convolution, else "other") and the torch functions
    called between them, by tensor identity and version (`key`). Every tensor is held until the run ends
    (no id reused)."""
    names = {m: n for n, m in model.named_modules()}
    ops: list = []
    alive: list[torch.Tensor] = [example]
    inside = [0]
    reads: list[list[Key]] = []   # each running leaf module's inputs, keyed before it runs

    def enter(module, inputs):
        inside[0] += 1
        reads.append([key(t) for t in tensors_in(inputs)])

    def leave(module, inputs, output):
        inside[0] -= 1
        outputs = tensors_in(output)
        alive.extend([*tensors_in(inputs), *outputs])
        ops.append((names[module], "conv" if type(module) is nn.Conv2d else "other", reads.pop(),
                    [key(t) for t in outputs]))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), _FunctionsOutsideModules(ops, alive, inside):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return ops


def input_stem(model: nn.Module, example: torch.Tensor, layers: int) -> set[str]:
    """Names of the convolutions within the first `layers` weighted layers from the input and of the
    activations between them: what the int8 files keep in float, by the files' own rule
    (targets/stem.py `stem_ops`) over the same graph: the leaf modules and the functions between them
    (`graph_ops`). The activation after a convolution `layers` deep is not among them: the file
    quantises its output. (Over the leaf modules alone, block 0's squeeze-excite ended the stem, so
    `--float-stem` above 2 kept 2 convolutions float in QAT where the files kept 3 and more.)"""
    return set(stem_ops(graph_ops(model, example), [key(example)], layers, weighted={"conv"}))


def attention_kernels(model: nn.Module) -> set[str]:
    """EfficientViT's LiteMLA kernel ReLUs (v4): they act on q and k inside the attention's float
    island (targets/stem.py `island_ops`: everything between the qkv and aggregation convolutions
    and the output projection), so no int8 file quantises their outputs. One module serves q and k,
    so a quantiser there would also have mixed the two ranges."""
    from timm.models.efficientvit_mit import LiteMLA

    return {f"{name}.kernel_func" for name, module in model.named_modules() if isinstance(module, LiteMLA)}


def prepare(student: nn.Module, example: torch.Tensor, log_depth: bool = False, float_stem: int = 0,
            weight_max: int = WMAX, requantize_outputs: bool = True) -> QuantStudent:
    """A fake-quantised copy of `student` (BN folded); `student` itself is left untouched.

    Every tensor the int8 file stores gets a quantiser: each convolution's input, its output
    after the activation fused into it (or the raw output where none follows: the residual
    branches that feed ADDs, the heads' last convolutions), and each residual block's sum.
    `float_stem`: the layers within N weighted layers of the input stay float, as the int8 files
    keep their input stem (`input_stem`); the output of the last layer is where the files quantise.
    `weight_max`: the converter's largest integer weight (core/formats.py `Converter.int8_weight_max`);
    `requantize_outputs`: whether its file rounds the upsampled outputs again (`QuantStudent`)."""
    model = copy.deepcopy(student).eval()
    fold_batchnorm(model, example)
    pairs = producer_consumer_pairs(model, example, (nn.Conv2d,), (*FUSED_ACTIVATIONS, nn.Hardswish))
    in_float = input_stem(model, example, float_stem) if float_stem > 0 else set()
    in_float |= attention_kernels(model)
    activated = {conv for conv, _ in pairs}
    names = {m: n for n, m in model.named_modules()}
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if names.get(child) in in_float:
                continue
            if type(child) is nn.Conv2d:
                setattr(module, attr, QuantConv2d(child, names[child] not in activated, weight_max))
            elif type(child) is nn.Hardswish:
                setattr(module, attr, QuantHardswish())
            elif type(child) in FUSED_ACTIVATIONS:
                setattr(module, attr, QuantActivation(child))
            elif is_residual(child):   # its own children are swapped too: they are in the list above
                setattr(module, attr, QuantResidual(child))
    return QuantStudent(model, log_depth, requantize_outputs)


@torch.no_grad()
def calibrate(model: QuantStudent, images, fresh: bool = False) -> None:
    """Initialise the activation ranges with the min/max over `images` batches before QAT moves
    them by EMA; `fresh`: forget the ranges first (after QAT, to measure what the converter will).
    Measured as the converters measure them, on the model they are given, so that no range depends
    on the activation rounding upstream of it (with rounding on, 69% of a v3 student's ranges moved
    by more than one int8 step): activation quantisers off; weight grids off for the first
    calibration (the converter of a PTQ file calibrates the float weights) and on after QAT (it is
    given `finalize`'s weights, snapped onto the grid). Observers on, no weight update."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    if fresh:
        for q in quantizers:
            q.seen.fill_(False)
    saved = [q.momentum for q in quantizers]
    model.train()
    for q in quantizers:
        q.momentum = None
    set_quantization(model, False, weights=not fresh)
    try:
        for batch in images:
            model(batch)
    finally:
        set_quantization(model, True)
        for q, m in zip(quantizers, saved):
            q.momentum = m
        model.eval()


def set_quantization(model: nn.Module, enabled: bool, weights: bool = True) -> None:
    """Turn the fake quantisation of every activation quantiser (and, with `weights`, every weight
    grid) on or off."""
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) or (weights and isinstance(module, QuantConv2d)):
            module.quantize = enabled


@torch.no_grad()
def finalize(model: QuantStudent) -> nn.Module:
    """The float student for export: convs restored, weights snapped onto their integer grid."""
    student = copy.deepcopy(model.student)
    for module in list(student.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, QuantConv2d):
                conv = child.conv
                conv.weight.copy_(fake_quant_weight(conv.weight, child.weight_max))
                setattr(module, attr, conv)
            elif isinstance(child, QuantHardswish):
                setattr(module, attr, nn.Hardswish())
            elif isinstance(child, QuantOutput):
                setattr(module, attr, child.module)
    return student.eval()


def activation_ranges(model: QuantStudent) -> dict[str, list[float]]:
    """(lo, hi) per quantiser as last observed, for reports."""
    return {n: [round(m.lo.item(), 5), round(m.hi.item(), 5)] for n, m in model.named_modules()
            if isinstance(m, ActivationQuantizer)}
