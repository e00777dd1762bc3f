"""Depth Anything teachers, loaded from a local directory or a hub id the user names.

- `da2-relative`: Depth Anything V2 (transformers' `DepthAnythingForDepthEstimation`, a checkpoint
  with `depth_estimation_type="relative"`, e.g. depth-anything/Depth-Anything-V2-Large-hf).
  Its output is affine-invariant inverse depth (ReLU head), NOT metres: space DISPARITY.
  Pre-flight refuses it for a metric recipe (seed 000).
- `da2-metric`: a metric checkpoint (sigmoid head x `max_depth`), e.g.
  depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf: metres in [0, max_depth]. The released
  metric-indoor weights are trained on Hypersim; users measured 0.69-0.75 m RMSE zero-shot on
  NYU, so `teacher.align=dataset` fits one scale to the training set's ground truth.
- `da3-metric`: Depth Anything 3 Metric (the `depth_anything_3` package), metres = focal_px x
  output / 300 with the sample's focal length at the resolution the network saw. Its package
  does not install beside this project (it pins numpy<2 and needs xformers, open3d, pycolmap):
  install it in its own environment and write a pseudo-label cache there
  (`python -m distill.cache_teacher da3-metric ...`), which training here reads.

ViT teachers see the batch resized so the shorter side is `teacher.input_size` (sides multiples
of 14, aspect kept), from the same ImageNet-normalised tensor the student sees (the
normalisation Depth Anything expects); outputs are resized back to the batch size.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.data.transforms import denormalize
from distill.spaces import DepthSpace, ValueRange
from distill.teachers.base import Teacher

PATCH = 14
REAL_CHECKPOINTS = {"relative": "depth-anything/Depth-Anything-V2-Large-hf",
                    "metric": "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf"}


def network_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(h', w'): shorter side ~`shorter`, aspect kept, both multiples of the ViT patch (14)."""
    scale = shorter / min(h, w)
    return max(PATCH, round(h * scale / PATCH) * PATCH), max(PATCH, round(w * scale / PATCH) * PATCH)


def weights_digest(folder: Path) -> str:
    """sha256 over the checkpoint's weight files (streamed): a cache made with other weights is refused."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_pretrained(cls, source: str, what: str):
    """`cls.from_pretrained` from a local directory (no network) or a hub id (downloads)."""
    if not source:
        raise ValueError(f"{what} needs teacher.source=<a local directory or a hub id>, e.g. "
                         f"{', '.join(REAL_CHECKPOINTS.values())}")
    local = Path(source).expanduser()
    if local.is_dir():
        return cls.from_pretrained(str(local), local_files_only=True), local
    print(f"{what}: loading {source} from the Hugging Face hub (downloads on first use)")
    try:
        model = cls.from_pretrained(source)
    except OSError as e:
        raise OSError(f"could not load {source} ({e}). Offline? Download it once (huggingface-cli download "
                      f"{source} --local-dir DIR) and pass teacher.source=DIR") from e
    return model, None


class DepthAnythingV2Teacher(Teacher):
    kind = "metric"

    def __init__(self, source: str, input_size: int = 518):
        from transformers import DepthAnythingForDepthEstimation

        self.source, self.input_size = source, input_size
        self.model, self.folder = load_pretrained(DepthAnythingForDepthEstimation, source, self.name)
        self.model.eval().requires_grad_(False)
        found = self.model.config.depth_estimation_type
        if found != self.kind:
            raise ValueError(f"{source} is a {found} Depth Anything V2 checkpoint but teacher.name={self.name} expects "
                             f"a {self.kind} one; use teacher.name=da2-{found} or a {self.kind} checkpoint such as "
                             f"{REAL_CHECKPOINTS[self.kind]}")
        self.range = ValueRange(0.0, float(self.model.config.max_depth) if self.kind == "metric" else float("inf"))
        self._digest = None

    @classmethod
    def from_config(cls, cfg) -> "DepthAnythingV2Teacher":
        return cls(cfg.source, cfg.input_size)

    def to(self, device: torch.device) -> "DepthAnythingV2Teacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def depth_and_features(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 1, H, W) depth at the batch size, and the DPT neck's 4 maps (shallow -> deep)."""
        image = batch["image"]
        h, w = image.shape[-2:]
        nh, nw = network_size(h, w, self.input_size)
        x = F.interpolate(image.float(), size=(nh, nw), mode="bicubic", align_corners=False)
        x = x.to(next(self.model.parameters()).device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            maps = self.model.backbone.forward_with_filtered_kwargs(x).feature_maps
            fused = self.model.neck(maps, nh // PATCH, nw // PATCH)
            depth = self.model.head(fused, nh // PATCH, nw // PATCH)
        depth = F.interpolate(depth.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)
        return depth.clamp_min(0).to(image.device), [f.float() for f in fused]

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.depth_and_features(batch)[0]

    def features(self, batch: dict) -> list[torch.Tensor]:
        return self.depth_and_features(batch)[1]

    def identity(self) -> dict:
        if self._digest is None:
            self._digest = weights_digest(self.folder) if self.folder else f"hub:{self.source}"
        return {**super().identity(), "source": self.source, "input_size": self.input_size, "weights": self._digest}


class DA2Relative(DepthAnythingV2Teacher):
    name, kind, space = "da2-relative", "relative", DepthSpace.DISPARITY


class DA2Metric(DepthAnythingV2Teacher):
    name, kind, space = "da2-metric", "metric", DepthSpace.METRIC


def da3_metric_to_metres(output: torch.Tensor, focal_px: torch.Tensor) -> torch.Tensor:
    """Depth Anything 3 Metric's output in metres: focal_px x output / 300 (its README's rule).

    output: (B, 1, h, w) at the resolution the network saw; focal_px: (B,) the mean of fx and fy
    in pixels AT THAT RESOLUTION (scale the sample's intrinsics by h / H first)."""
    if not torch.isfinite(focal_px).all():
        raise ValueError("Depth Anything 3 Metric needs each image's focal length; these samples have none "
                         "(an image folder without intrinsics.json?). Add intrinsics.json (fx, fy, cx, cy, width, "
                         "height) to the folder, or use teacher.name=da2-metric")
    return output * focal_px.view(-1, 1, 1, 1) / 300.0


class DA3Metric(Teacher):
    name, space, range = "da3-metric", DepthSpace.METRIC, ValueRange(0.0, 200.0)

    def __init__(self, source: str, input_size: int = 504):
        try:
            from depth_anything_3.api import DepthAnything3
        except ImportError as e:
            raise ImportError(
                "teacher da3-metric needs the depth_anything_3 package, which does not install beside densekit "
                "(it pins numpy<2 and needs xformers, open3d, pycolmap). Install it in its own environment, run "
                "python -m distill.cache_teacher da3-metric teacher.source=<dir or depth-anything/DA3METRIC-LARGE> "
                "data=... out=CACHE there, and train here with teacher.cache=CACHE; or use teacher.name=da2-metric"
            ) from e
        self.source, self.input_size = source, input_size
        self.model, self.folder = load_pretrained(DepthAnything3, source, self.name)

    @classmethod
    def from_config(cls, cfg) -> "DA3Metric":
        return cls(cfg.source, cfg.input_size)

    def to(self, device: torch.device) -> "DA3Metric":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        image = batch["image"]
        h, w = image.shape[-2:]
        rgb = [denormalize(im.cpu()) for im in image]
        out = torch.as_tensor(self.model.inference(rgb, process_res=self.input_size).depth).float()[:, None]
        seen = out.shape[-2] / h                                   # the network's resolution / the batch's
        focal = batch["intrinsics"][:, :2].float().mean(dim=1).cpu() * seen
        metres = da3_metric_to_metres(out, focal)
        return F.interpolate(metres, size=(h, w), mode="bilinear", align_corners=False).to(image.device)

    def identity(self) -> dict:
        digest = weights_digest(self.folder) if self.folder else f"hub:{self.source}"
        return {**super().identity(), "source": self.source, "input_size": self.input_size, "weights": digest}
