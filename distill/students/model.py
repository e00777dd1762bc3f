"""Multi-task student: timm encoder (`features_only`) + export-friendly FPN decoder + task heads.

Export-friendly by construction (DESIGN.md): every upsampling is by a fixed factor (TFLite's and
CoreML's resize ops want static scales; onnx2tf fails on Resize sizes computed from Shape ops,
docs/TOOLCHAIN.md), shapes are static, and the input height and width must be multiples of 32 (the
encoder's deepest stride) so that every skip connection lines up without padding or cropping.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.io import IntegrityError, home_path

OUTPUT_STRIDES = (2, 4)   # where the decoder stops; the heads upsample the rest by a fixed factor
INPUT_MULTIPLE = 32
IMAGE_STEM_CHANNELS = 16  # the stride-2 level of an encoder that has none (output_stride=2)
# The stride-2 level's convolutions (`fine_convs`: decoder smoothing and head bodies). "pointwise"
# (the recipes' default, distill/recipes/base.py) drops the depthwise 3x3 layers there, which run
# no faster in int8 than in fp32 on XNNPACK, and trains a better student (docs/TRAINING.md);
# "separable" is the form of runs saved before 2026-12-01.
FINE_FORMS = ("separable", "pointwise")


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1: about 1/8 of a 3x3 conv's MACs at 64 channels, which is
    what pays for a stride-2 level. Both are int8 kernels in XNNPACK, Core ML and ONNX Runtime."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), conv_bn_relu(cin, cout, 1))


def conv_block(cin: int, cout: int, form: str) -> nn.Sequential:
    """"full" 3x3, "separable" (depthwise 3x3 + 1x1) or "pointwise" (1x1), each with BN and ReLU."""
    if form == "full":
        return conv_bn_relu(cin, cout)
    if form == "separable":
        return separable_bn_relu(cin, cout)
    if form == "pointwise":
        return conv_bn_relu(cin, cout, 1)
    raise ValueError(f'a decoder convolution is "full", "separable" or "pointwise", got {form!r}')


def level_form(stride: int, separable: bool, fine_convs: str) -> str:
    """How a decoder level of this stride (and the heads on it) convolves."""
    return fine_convs if stride < 4 else ("separable" if separable else "full")


def upsample(factor: int) -> nn.Module:
    # Fixed scale factor, never a size read from a tensor: static Resize in every target format.
    return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Top-down feature pyramid over the encoder levels given (those of stride >= the output stride).

    Sized from the encoder's `feature_info` (channels and reductions), never from hand-written
    channel lists. Levels of stride >= 4 carry `channels` and are smoothed by a 3x3 convolution
    (depthwise-separable with `separable`); a stride-2 level carries half of them (projected 1x1
    before the upsampling, where it is 4x cheaper) and is smoothed by `fine_convs`: full width and
    full convolutions there would cost more than the rest of the decoder.
    Input: list of (B, C_i, H/r_i, W/r_i), fine to coarse. Output: (B, out_channels, H/r_0, W/r_0).
    """

    def __init__(self, in_channels: list[int], reductions: list[int], channels: int, *, separable: bool = False,
                 fine_convs: str = "separable"):
        super().__init__()
        for fine, coarse in zip(reductions, reductions[1:]):
            if coarse != 2 * fine:
                raise ValueError(f"FPNDecoder needs encoder strides that double per level, got {reductions}")
        widths = [channels if r >= 4 else max(channels // 2, 8) for r in reductions]
        self.out_channels = widths[0]
        self.lateral = nn.ModuleList(conv_bn_relu(c, w, 1) for c, w in zip(in_channels, widths))
        self.project = nn.ModuleList(conv_bn_relu(coarse, fine, 1) if coarse != fine else nn.Identity()
                                     for fine, coarse in zip(widths, widths[1:]))
        self.smooth = nn.ModuleList(conv_block(w, w, level_form(r, separable, fine_convs))
                                    for w, r in zip(widths[:-1], reductions))
        self.up = upsample(2)

    def forward(self, features: list[torch.Tensor], levels: list | None = None) -> torch.Tensor:
        """`levels`: a list that receives each level's output, coarse to fine (deep supervision)."""
        x = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            x = self.smooth[i](self.up(self.project[i](x)) + self.lateral[i](features[i]))
            if levels is not None:
                levels.append(x)
        return x


class DepthHead(nn.Module):
    """Predicts metric (or the training space's) depth, (B, 1, H, W), always > 0.

    `activation="exp"`: depth = exp(log-depth); `"softplus"`: depth = softplus(x). Never ReLU: a
    from-scratch ReLU output dies (seed 001, Exp 12). The last bias starts at the training
    targets' median so the first predictions sit in the middle of the range (seed 001, issue 3).
    """

    def __init__(self, channels: int, scale: int, activation: str = "exp", form: str = "full"):
        super().__init__()
        if activation not in ("exp", "softplus"):
            raise ValueError(f'depth activation must be "exp" or "softplus", got "{activation}"')
        self.activation = activation
        self.body = conv_block(channels, channels // 2, form)
        self.out = nn.Conv2d(channels // 2, 1, 1)
        self.up = upsample(scale)
        self.init_depth(2.5)

    @torch.no_grad()
    def init_depth(self, median: float) -> None:
        """Set the output bias so that a zero feature map predicts `median` (in target units)."""
        if not (median > 0 and math.isfinite(median)):
            raise ValueError(f"depth head init needs a positive finite median, got {median}")
        if self.activation == "exp":
            bias = math.log(median)
        else:  # inverse softplus, stable for large values
            bias = median + math.log(-math.expm1(-median))
        self.out.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self.depth, self.body(x))

    def depth(self, x: torch.Tensor) -> torch.Tensor:
        # Upsample before the activation: interpolating log-depth keeps depth positive and smooth.
        x = self.up(self.out(x))
        return torch.exp(x) if self.activation == "exp" else F.softplus(x)


def in_float32(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x), in float32 when training under bf16 autocast (CUDA's amp=auto): log-depth there, whose
    bf16 step is 0.4% of depth at 2 m and 1.6% at 8 m. Not taken when a graph is exported (exports
    trace without autocast), nor on the CPU's default float32 training."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x.float())
    return fn(x)


class SegHead(nn.Module):
    """Per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, channels: int, num_classes: int, scale: int, form: str = "full"):
        super().__init__()
        self.body = conv_block(channels, channels, form)
        self.out = nn.Conv2d(channels, num_classes, 1)
        self.up = upsample(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.out(self.body(x)))


AUX_PREFIX = ("aux_heads.", "aux_normals.")   # training-only layers: never in best.safetensors, never exported


class MultiTaskStudent(nn.Module):
    """image (B, 3, H, W) normalised -> {"depth": (B, 1, H, W), "seg": (B, C, H, W) logits}.

    H and W must be multiples of 32. `tasks` picks the heads ("depth", "seg"). `aux_heads` > 0
    adds deep supervision for training: a 1x1 convolution per task on each of the decoder's
    `aux_heads` coarsest outputs (stride 16 and 8 with 2), whose predictions at that level's
    resolution training mode returns as "aux" (distill/training/objective.py); `aux_normals` adds
    a 1x1 convolution on the output level whose (B, 3, H/s, W/s) surface normals training mode
    returns as "normals". Evaluation mode never runs them, and `shipped_state` leaves them out of
    the weights that are kept and exported.
    """

    def __init__(self, encoder: str, *, tasks: tuple[str, ...] = ("depth", "seg"), num_classes: int = 13,
                 decoder_channels: int = 64, depth_activation: str = "exp", pretrained: str | bool = False,
                 output_stride: int = 4, separable: bool = False, fine_convs: str = "separable",
                 aux_heads: int = 0, aux_normals: bool = False):
        super().__init__()
        unknown = set(tasks) - {"depth", "seg"}
        if unknown or not tasks:
            raise ValueError(f'tasks must be a non-empty subset of ("depth", "seg"), got {tasks}')
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if fine_convs not in FINE_FORMS:
            raise ValueError(f"fine_convs must be one of {FINE_FORMS}, got {fine_convs!r}")
        self.encoder_name, self.tasks, self.num_classes = encoder, tuple(tasks), num_classes
        self.encoder = create_encoder(encoder, pretrained)
        info = self.encoder.feature_info
        self.levels = [i for i, r in enumerate(info.reduction()) if r >= output_stride]
        channels, reductions = [info.channels()[i] for i in self.levels], [info.reduction()[i] for i in self.levels]
        self.image_stem = None
        if reductions[0] != output_stride:
            # EfficientViT starts at stride 4: its stride-2 level comes from the image itself (a strided
            # 3x3 convolution, image guidance for the finest level as in GuideDepth)
            self.image_stem = nn.Sequential(nn.Conv2d(3, IMAGE_STEM_CHANNELS, 3, stride=2, padding=1, bias=False),
                                            nn.BatchNorm2d(IMAGE_STEM_CHANNELS), nn.ReLU(inplace=True))
            channels, reductions = [IMAGE_STEM_CHANNELS, *channels], [2, *reductions]
        self.decoder = FPNDecoder(channels, reductions, decoder_channels, separable=separable, fine_convs=fine_convs)
        width = self.decoder.out_channels
        self.heads = nn.ModuleDict()
        form = level_form(output_stride, separable, fine_convs)   # the heads convolve as their level does
        if "depth" in tasks:
            self.heads["depth"] = DepthHead(width, output_stride, depth_activation, form)
        if "seg" in tasks:
            self.heads["seg"] = SegHead(width, num_classes, output_stride, form)
        if not 0 <= aux_heads < len(self.decoder.smooth):
            raise ValueError(f"aux_heads must be in [0, {len(self.decoder.smooth) - 1}] for {encoder} "
                             f"(the decoder levels above the output), got {aux_heads}")
        self.aux_heads = nn.ModuleList()
        for level in range(aux_heads):   # the decoder's outputs, coarsest first
            c = self.decoder.lateral[len(self.decoder.lateral) - 2 - level][0].out_channels
            depth = nn.Conv2d(c, 1, 1)
            depth.bias.data.fill_(math.log(2.5))   # log-depth, as DepthHead starts
            self.aux_heads.append(nn.ModuleDict({"depth": depth, "seg": nn.Conv2d(c, num_classes, 1)}))
        self.aux_normals = nn.Conv2d(width, 3, 1) if aux_normals else None

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Everything but the encoder: the decoder, the heads, EfficientViT's image stem and the
        training-only heads (in registration order, the order optimizer checkpoints were saved in)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def forward(self, image: torch.Tensor, *, features: bool = False) -> dict[str, torch.Tensor]:
        """`features=True` adds "features": the encoder maps the decoder reads, fine to coarse
        (for feature-level distillation; exported graphs never ask for them)."""
        h, w = image.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(f"input size {h}x{w} is not a multiple of {INPUT_MULTIPLE}; "
                             f"resize or crop to e.g. {h // 32 * 32 or 32}x{w // 32 * 32 or 32}")
        levels = [f for i, f in enumerate(self.encoder(image)) if i in self.levels]
        supervised = [] if self.training and len(self.aux_heads) else None
        x = self.decoder(levels if self.image_stem is None else [self.image_stem(image), *levels], supervised)
        out = {name: head(x) for name, head in self.heads.items()}
        if supervised is not None:
            # exp runs in float32 under autocast (torch's float32 list) on a float32 input
            out["aux"] = [{"depth": torch.exp(in_float32(head["depth"], f)), "seg": head["seg"](f)}
                          for head, f in zip(self.aux_heads, supervised)]
        if self.training and self.aux_normals is not None:
            out["normals"] = self.aux_normals(x)   # at the output level's resolution, unnormalised
        if features:
            out["features"] = levels
        return out


def shipped_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student's weights without its training-only heads (deep supervision, surface normals)."""
    return {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, fix: str, *,
                      training_only_may_miss: bool = False) -> None:
    """`model.load_state_dict(state)`, with a mismatch said in one line naming `source` and `fix`
    instead of torch's message (several KB: every tensor of another shape). With
    `training_only_may_miss`, the training-only heads may be absent from `state` (shipped weights,
    `shipped_state`) and keep their values."""
    own = model.state_dict()
    missing = sorted(k for k in own.keys() - state.keys() if not (training_only_may_miss and k.startswith(AUX_PREFIX)))
    unexpected = sorted(state.keys() - own.keys())
    reshaped = [f"{k} {tuple(state[k].shape)} here, {tuple(own[k].shape)} in the model"
                for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        found = ([f"{len(reshaped)} tensors of other shapes (e.g. {sorted(reshaped)[0]})"] if reshaped else []) + \
                ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        raise IntegrityError(f"{source} does not hold the weights of the model its config describes: "
                             f"{'; '.join(found)}; {fix}")
    model.load_state_dict(state, strict=not training_only_may_miss)


def create_encoder(name: str, pretrained: str | bool) -> nn.Module:
    """timm `features_only` encoder. `pretrained`: False/"" = from scratch; a local file path =
    weights loaded from it (no network); True/"hub" = timm downloads (only when the user asks)."""
    if pretrained in (False, "", None):
        return timm.create_model(name, features_only=True, pretrained=False)
    if pretrained in (True, "hub"):
        return timm.create_model(name, features_only=True, pretrained=True)
    return encoder_from_file(name, pretrained)


def encoder_from_file(name: str, pretrained: str) -> nn.Module:
    """The encoder with the weights of the local file `pretrained`; ValueError naming model.pretrained
    unless every weight tensor came from it. timm loads a features_only encoder non-strictly, so a
    file of other keys (a densekit run's whole student, "encoder.*"; torchvision's names) loaded
    nothing and trained from scratch, with only timm's "this may be expected" note. A twin built from
    the same random state shows which tensors the file left as initialised."""
    path = pretrained_file(pretrained)
    before = torch.get_rng_state()
    try:
        loaded = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except (RuntimeError, KeyError, ValueError) as e:   # a size mismatch: another encoder's weights
        lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
        detail = next((line for line in lines if "size mismatch" in line or "Missing key" in line), lines[0])
        raise ValueError(f"model.pretrained={pretrained} does not hold weights of the {name} encoder "
                         f"({detail[:300]}); pass timm's {name} weights, or leave model.pretrained empty to train "
                         f"from scratch") from None
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    twin = timm.create_model(name, features_only=True, pretrained=False)
    torch.set_rng_state(after)   # the rest of the student draws as if one encoder had been built
    initial = twin.state_dict()
    weights = {k: v for k, v in loaded.state_dict().items() if v.ndim > 1}   # conv / linear kernels
    untouched = [k for k, v in weights.items() if torch.equal(v, initial[k])]
    if untouched:
        raise ValueError(f"model.pretrained={pretrained} left {len(untouched)} of the {len(weights)} weight tensors of "
                         f"the {name} encoder as initialised (first: {untouched[0]}): its keys are not timm's "
                         f"{name} ones (a densekit run's best.safetensors holds a whole student, keys 'encoder.*'). "
                         f"Pass timm's {name} weights, or leave model.pretrained empty to train from scratch")
    return loaded


def check_pretrained(name: str, pretrained: str) -> None:
    """model.pretrained as a local file: the encoder must load every weight from it (ValueError or
    FileNotFoundError naming the key otherwise); run before training renders its data."""
    if pretrained not in (False, "", None, True, "hub"):
        encoder_from_file(name, pretrained)


def pretrained_file(pretrained: str) -> Path:
    """The local weights file `model.pretrained` names; FileNotFoundError naming the key and the fix
    when there is none (checked before training renders its data, and where the encoder loads it)."""
    path = home_path(str(pretrained))
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained={pretrained}: no such file ({path}); pass a local weights "
                                f"file (.safetensors/.pth), model.pretrained=hub to download, or leave "
                                f"model.pretrained empty to train from scratch")
    return path
