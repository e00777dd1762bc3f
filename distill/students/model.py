"""Multi-task student: timm encoder (`features_only`) + export-friendly FPN decoder + task heads.

Export-friendly by construction (DESIGN.md): every upsampling is by a fixed factor (TFLite's and
CoreML's resize ops want static scales; onnx2tf fails on Resize sizes computed from Shape ops,
docs/TOOLCHAIN.md), shapes are static, and the input height and width must be multiples of 32 (the
encoder's deepest stride) so that every skip connection lines up without padding or cropping.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_STRIDE = 4   # the decoder stops at stride 4: the stride-2 level costs more MACs than it adds
INPUT_MULTIPLE = 32


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample(factor: int) -> nn.Module:
    # Fixed scale factor, never a size read from a tensor: static Resize in every target format.
    return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Top-down feature pyramid over the encoder levels of stride >= OUTPUT_STRIDE.

    Sized from the encoder's `feature_info` (channels and reductions), never from hand-written
    channel lists. Input: list of (B, C_i, H/r_i, W/r_i). Output: (B, channels, H/4, W/4).
    """

    def __init__(self, in_channels: list[int], reductions: list[int], channels: int):
        super().__init__()
        for fine, coarse in zip(reductions, reductions[1:]):
            if coarse != 2 * fine:
                raise ValueError(f"FPNDecoder needs encoder strides that double per level, got {reductions}")
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.up = upsample(2)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            x = self.smooth[i](self.up(x) + self.lateral[i](features[i]))
        return x


class DepthHead(nn.Module):
    """Predicts metric (or the training space's) depth, (B, 1, H, W), always > 0.

    `activation="exp"`: depth = exp(log-depth); `"softplus"`: depth = softplus(x). Never ReLU: a
    from-scratch ReLU output dies (seed 001, Exp 12). The last bias starts at the training
    targets' median so the first predictions sit in the middle of the range (seed 001, issue 3).
    """

    def __init__(self, channels: int, scale: int, activation: str = "exp"):
        super().__init__()
        if activation not in ("exp", "softplus"):
            raise ValueError(f'depth activation must be "exp" or "softplus", got "{activation}"')
        self.activation = activation
        self.body = conv_bn_relu(channels, channels // 2)
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
        # Upsample before the activation: interpolating log-depth keeps depth positive and smooth.
        x = self.up(self.out(self.body(x)))
        return torch.exp(x) if self.activation == "exp" else F.softplus(x)


class SegHead(nn.Module):
    """Per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, channels: int, num_classes: int, scale: int):
        super().__init__()
        self.body = conv_bn_relu(channels, channels)
        self.out = nn.Conv2d(channels, num_classes, 1)
        self.up = upsample(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.out(self.body(x)))


class MultiTaskStudent(nn.Module):
    """image (B, 3, H, W) normalised -> {"depth": (B, 1, H, W), "seg": (B, C, H, W) logits}.

    H and W must be multiples of 32. `tasks` picks the heads ("depth", "seg").
    """

    def __init__(self, encoder: str, *, tasks: tuple[str, ...] = ("depth", "seg"), num_classes: int = 13,
                 decoder_channels: int = 64, depth_activation: str = "exp", pretrained: str | bool = False):
        super().__init__()
        unknown = set(tasks) - {"depth", "seg"}
        if unknown or not tasks:
            raise ValueError(f'tasks must be a non-empty subset of ("depth", "seg"), got {tasks}')
        self.encoder_name, self.tasks, self.num_classes = encoder, tuple(tasks), num_classes
        self.encoder = create_encoder(encoder, pretrained)
        info = self.encoder.feature_info
        self.levels = [i for i, r in enumerate(info.reduction()) if r >= OUTPUT_STRIDE]
        self.decoder = FPNDecoder([info.channels()[i] for i in self.levels],
                                  [info.reduction()[i] for i in self.levels], decoder_channels)
        scale = info.reduction()[self.levels[0]]
        self.heads = nn.ModuleDict()
        if "depth" in tasks:
            self.heads["depth"] = DepthHead(decoder_channels, scale, depth_activation)
        if "seg" in tasks:
            self.heads["seg"] = SegHead(decoder_channels, num_classes, scale)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters()) + list(self.heads.parameters())

    def forward(self, image: torch.Tensor, *, features: bool = False) -> dict[str, torch.Tensor]:
        """`features=True` adds "features": the encoder maps the decoder reads, fine to coarse
        (for feature-level distillation; exported graphs never ask for them)."""
        h, w = image.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(f"input size {h}x{w} is not a multiple of {INPUT_MULTIPLE}; "
                             f"resize or crop to e.g. {h // 32 * 32 or 32}x{w // 32 * 32 or 32}")
        levels = [f for i, f in enumerate(self.encoder(image)) if i in self.levels]
        x = self.decoder(levels)
        out = {name: head(x) for name, head in self.heads.items()}
        if features:
            out["features"] = levels
        return out


def create_encoder(name: str, pretrained: str | bool) -> nn.Module:
    """timm `features_only` encoder. `pretrained`: False/"" = from scratch; a local file path =
    weights loaded from it (no network); True/"hub" = timm downloads (only when the user asks)."""
    if pretrained in (False, "", None):
        return timm.create_model(name, features_only=True, pretrained=False)
    if pretrained in (True, "hub"):
        return timm.create_model(name, features_only=True, pretrained=True)
    from pathlib import Path
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights for {name} not found at {path}; pass a local "
                                f"weights file (.safetensors/.pth), model.pretrained=hub to download, "
                                f"or leave model.pretrained empty to train from scratch")
    return timm.create_model(name, features_only=True, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path)})
