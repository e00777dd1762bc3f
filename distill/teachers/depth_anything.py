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
  output / 300 with the sample's mean focal length (fx + fy) / 2 at the resolution the network
  saw (the package's `apply_metric_scaling`, depth_anything_3/utils/alignment.py). Its package
  does not install beside this project (it pins numpy<2 and needs xformers, open3d, pycolmap):
  install it in its own environment and write a pseudo-label cache there
  (`python -m distill.cache_teacher da3-metric ...`), which training here reads.

ViT teachers see the batch resized so the shorter side is `teacher.input_size` (sides multiples
of 14, aspect kept), from the same ImageNet-normalised tensor the student sees (the
normalisation Depth Anything expects); outputs are resized back to the batch size.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from core.io import home_path
from core.spaces import DepthSpace, ValueRange
from distill.data.transforms import denormalize
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
    for path in weight_files(folder):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weight files, as transformers saves them (safetensors, or older .bin)."""
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def check_source(source: str, what: str, key: str = "teacher.source") -> Path | None:
    """The local checkpoint folder `source` names (None: a hub id), or an error naming the fix; no
    network, no weights read. transformers does not refuse a folder without config.json: it builds
    its default config (DA2-Small, relative) and fails 70 lines later, or loads metric weights as a
    relative model. Run before any data is built (supervision.check_options) and again at load;
    `key` names the setting in the messages (teacher.assistant_source for an assistant)."""
    if not source:
        raise ValueError(f"{what} needs {key}=<a local directory or a hub id>, e.g. "
                         f"{', '.join(REAL_CHECKPOINTS.values())}")
    local = home_path(source)
    if local.is_dir():
        missing = [name for name, found in (("config.json", (local / "config.json").is_file()),
                                            ("weights (*.safetensors or *.bin)", bool(weight_files(local))))
                   if not found]
        if missing:
            raise FileNotFoundError(f"{key}={source} is a directory without {' and '.join(missing)}, so not "
                                    f"a {what} checkpoint; it needs the files of `huggingface-cli download <hub id> "
                                    f"--local-dir {source}`")
        return local
    why_not = not_a_hub_id(source)   # a mistyped path must not become a download
    if why_not:
        raise FileNotFoundError(f"{key}={source} is not a directory, and not a hub id either ({why_not}); "
                                f"check the path, or pass a hub id such as {REAL_CHECKPOINTS['metric']}")
    return None


def load_pretrained(cls, source: str, what: str):
    """`cls.from_pretrained` from a local directory (no network) or a hub id (downloads)."""
    local = check_source(source, what)
    if local is not None:
        try:
            return cls.from_pretrained(str(local), local_files_only=True), local
        except OSError as e:   # transformers' word for a folder without a config or weights
            raise FileNotFoundError(f"teacher.source={source} is a directory but not a {what} checkpoint ({e}); "
                                    f"it needs the files of `huggingface-cli download <hub id> --local-dir "
                                    f"{source}` (config.json and the weights)") from e
    print(f"{what}: loading {source} from the Hugging Face hub (downloads on first use)")
    try:
        model = cls.from_pretrained(source)
    except OSError as e:
        # a misspelt id or no network: the user's to fix (exit 2), with the way to fix it
        raise FileNotFoundError(f"could not load {source} ({e}). Offline, or a misspelt hub id? Download it once "
                                f"(huggingface-cli download {source} --local-dir DIR) and pass teacher.source=DIR") from e
    return model, None


def depth_anything_v2_class() -> type:
    """transformers' `DepthAnythingForDepthEstimation`, imported without torch's warning to library
    authors: transformers imports torchao (installed with litert-torch), which registers an Enum with
    torch's pytree, and torch 2.14 logs a deprecation line about it that a user can do nothing about."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from transformers import DepthAnythingForDepthEstimation
    finally:
        pytree_log.setLevel(level)
    return DepthAnythingForDepthEstimation


def not_a_hub_id(source: str) -> str:
    """Why `source` reads as a path rather than a hub id (owner/name), or "" when it does not."""
    parts = source.split("/")
    if len(parts) != 2 or not all(parts) or source.startswith((".", "~")) or "\\" in source:
        return "a hub id is owner/name"
    if Path(parts[0]).is_dir():   # a path with a typo in its last part
        return f"./{parts[0]} is a directory here, so it reads as a path; run elsewhere to use it as a hub id"
    return ""


class PretrainedTeacher(Teacher):
    """A teacher whose network loads from a checkpoint (`load_pretrained`): it keeps `source`,
    `input_size`, `model` and the local `folder`, builds from a recipe's teacher section, and its
    identity adds the source, the input size and a digest of the weights."""

    def load(self, model_cls, source: str, input_size: int) -> None:
        self.source, self.input_size = source, input_size
        self.model, self.folder = load_pretrained(model_cls, source, self.name)
        self._digest = None

    @classmethod
    def from_config(cls, cfg) -> "PretrainedTeacher":
        return cls(cfg.source, cfg.input_size)

    @classmethod
    def check_ready(cls, source: str, key: str = "teacher.source") -> None:
        """What can be known before loading (the source's form, a package); raises naming the fix and
        `key`, the setting that gave `source`."""
        check_source(source, cls.name, key)

    def to(self, device: torch.device) -> "PretrainedTeacher":
        self.model.to(device)
        return self

    def hub_revision(self) -> str:
        """hub:<id>@<commit> of the snapshot loaded: a cache resumed after the hub's weights changed
        is refused as one made with other local weights is (without a commit: the id alone). The
        commit is the name of the snapshot folder in the local hub cache (read without the network):
        transformers 5 no longer records it on the config, older versions did."""
        commit = getattr(getattr(self.model, "config", None), "_commit_hash", None)
        try:
            from huggingface_hub import snapshot_download

            commit = Path(snapshot_download(self.source, local_files_only=True)).name
        except Exception:   # noqa: BLE001 - not a hub id, not in the cache: the config's record, if any
            pass
        return f"hub:{self.source}@{commit}" if isinstance(commit, str) and commit else f"hub:{self.source}"

    def identity(self) -> dict:
        if self._digest is None:
            self._digest = weights_digest(self.folder) if self.folder else self.hub_revision()
        return {**super().identity(), "source": self.source, "input_size": self.input_size, "weights": self._digest}


class DepthAnythingV2Teacher(PretrainedTeacher):
    """Depth Anything V2 through transformers' `DepthAnythingForDepthEstimation`.

    `kind` is the checkpoint's `config.depth_estimation_type`: "relative" (ReLU head: affine-
    invariant inverse depth, space DISPARITY, range [0, inf)) or "metric" (sigmoid x
    `config.max_depth`: metres in [0, max_depth]); a checkpoint of the other kind is refused.
    The released metric-indoor weights are Hypersim-trained; users measured 0.69-0.75 m RMSE
    zero-shot on NYU, hence `teacher.align=dataset` (`distill.teachers.align`).
    """

    kind = "metric"

    def __init__(self, source: str, input_size: int = 518):
        self.load(depth_anything_v2_class(), source, input_size)
        self.model.eval().requires_grad_(False)
        found = self.model.config.depth_estimation_type
        if found != self.kind:
            raise ValueError(f"{source} is a {found} Depth Anything V2 checkpoint but teacher.name={self.name} expects "
                             f"a {self.kind} one; use teacher.name=da2-{found} or a {self.kind} checkpoint such as "
                             f"{REAL_CHECKPOINTS[self.kind]}")
        self.range = ValueRange(0.0, float(self.model.config.max_depth) if self.kind == "metric" else float("inf"))

    @torch.no_grad()
    def depth_and_features(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 1, H, W) depth at the batch size, and the DPT neck's 4 fused maps (B, fusion_hidden_size,
        h_i, w_i) at the network's size, shallow/high-res first (transformers' fusion stage returns them
        deep first; the head reads its last, highest-resolution map)."""
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
        return depth.clamp_min(0).to(image.device), [f.float() for f in fused[::-1]]

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.depth_and_features(batch)[0]

    def features(self, batch: dict) -> list[torch.Tensor]:
        return self.depth_and_features(batch)[1]


class DA2Relative(DepthAnythingV2Teacher):
    name, kind, space = "da2-relative", "relative", DepthSpace.DISPARITY


class DA2Metric(DepthAnythingV2Teacher):
    name, kind, space = "da2-metric", "metric", DepthSpace.METRIC


def da3_metric_to_metres(output: torch.Tensor, focal_px: torch.Tensor) -> torch.Tensor:
    """Depth Anything 3 Metric's output in metres: focal_px x output / 300.

    The package's rule: `apply_metric_scaling` in depth_anything_3/utils/alignment.py (v0.1.1),
    focal = (fx + fy) / 2 of the intrinsics at the network's input resolution, scale_factor 300.
    output: (B, 1, h, w) at the resolution the network saw; focal_px: (B,) in pixels at that
    resolution (`network_focal`)."""
    require_focal(focal_px)
    return output * focal_px.view(-1, 1, 1, 1) / 300.0


def require_focal(focal_px: torch.Tensor) -> None:
    """Refuse NaN focal lengths (samples without intrinsics) with the fix."""
    if not torch.isfinite(focal_px).all():
        raise ValueError("Depth Anything 3 Metric needs each image's focal length; these samples have none "
                         "(an image folder without intrinsics.json?). Add intrinsics.json (fx, fy, cx, cy, width, "
                         "height) to the folder, or use teacher.name=da2-metric")


def network_focal(intrinsics: torch.Tensor, batch_hw: tuple[int, int], net_hw: tuple[int, int]) -> torch.Tensor:
    """(B,) mean focal length in pixels at the network's input size `net_hw`.

    intrinsics: (B, 4) fx, fy, cx, cy in pixels at `batch_hw`. fx scales with the width and fy with
    the height separately (the package's `InputProcessor._resize_ixt`), then they are averaged."""
    fx = intrinsics[:, 0].float() * net_hw[1] / batch_hw[1]
    fy = intrinsics[:, 1].float() * net_hw[0] / batch_hw[0]
    return (fx + fy) / 2


DA3_MISSING = ("teacher da3-metric needs the depth_anything_3 package, which does not install beside densekit "
               "(depth-anything-3 0.1.1 pins numpy<2 and needs xformers, open3d, pycolmap). Install it in its own "
               "environment, run python -m distill.cache_teacher da3-metric teacher.source=<dir or "
               "depth-anything/DA3METRIC-LARGE> data=... out=CACHE there, and train here with teacher.cache=CACHE; "
               "or use teacher.name=da2-metric (teacher.align=dataset)")


class DA3Metric(PretrainedTeacher):
    """Depth Anything 3 Metric (e.g. depth-anything/DA3METRIC-LARGE) via its package's
    `DepthAnything3.inference`, which returns `Prediction.depth` (N, h, w) at the processed size.

    Its exp-activated head has no upper bound (no max_depth as in DA2), so the declared range is
    [0, inf). The shorter side the network sees is `input_size` (the package's
    `process_res_method="lower_bound_resize"`, sides rounded to multiples of 14), as for DA2."""

    name, space, range = "da3-metric", DepthSpace.METRIC, ValueRange(0.0, float("inf"))

    @classmethod
    def check_ready(cls, source: str, key: str = "teacher.source") -> None:
        import importlib.util

        if importlib.util.find_spec("depth_anything_3") is None:
            raise ImportError(DA3_MISSING)
        super().check_ready(source, key)

    def __init__(self, source: str, input_size: int = 504):
        try:
            from depth_anything_3.api import DepthAnything3
        except ImportError as e:
            raise ImportError(DA3_MISSING) from e
        self.load(DepthAnything3, source, input_size)
        found = getattr(self.model, "model_name", "")
        if not found.startswith("da3metric"):   # focal x output / 300 holds for DA3METRIC only
            raise ValueError(f"{source} is the Depth Anything 3 model {found!r}, not DA3 Metric; teacher.name=da3-metric "
                             f"needs a da3metric checkpoint such as depth-anything/DA3METRIC-LARGE (DA3NESTED outputs "
                             f"metres already and the other DA3 models are relative)")

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        """(B, 1, H, W) metres at the batch size; needs batch["intrinsics"] (B, 4) at that size."""
        image = batch["image"]
        h, w = image.shape[-2:]
        require_focal(batch["intrinsics"][:, :2])            # before the (slow) network, not after
        rgb = [denormalize(im.cpu()) for im in image]        # the package takes uint8 RGB (H, W, 3)
        pred = self.model.inference(rgb, process_res=self.input_size, process_res_method="lower_bound_resize")
        out = torch.as_tensor(pred.depth).float()[:, None]   # (B, 1, h', w') at the network's size
        focal = network_focal(batch["intrinsics"].cpu(), (h, w), tuple(out.shape[-2:]))
        metres = da3_metric_to_metres(out, focal)
        return F.interpolate(metres, size=(h, w), mode="bilinear", align_corners=False).to(image.device)
