"""Image normalisation and augmentation shared by every dataset.

The student sees ImageNet-normalised float images: `normalize` turns an 8-bit HxWx3 RGB array
into a (3, H, W) float32 tensor, `denormalize` undoes it for previews. Augmentations work on
numpy arrays before normalisation and take an explicit numpy Generator, so a dataset can make
them a pure function of (seed, epoch, index).
"""
from __future__ import annotations

import numpy as np
import torch

from core.contract import IMAGENET_MEAN, IMAGENET_STD  # the artefacts normalise inside with the same constants


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float32 tensor (3, H, W), (x / 255 - mean) / std per channel."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"normalize expects a uint8 (H, W, 3) RGB array, got dtype {rgb.dtype} "
                         f"and shape {rgb.shape}; convert with "
                         "np.asarray(PIL_image.convert('RGB')).")
    x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def unit_rgb(image: torch.Tensor) -> torch.Tensor:
    """Normalised float tensor (..., 3, H, W) -> float RGB in [0, 1] (clipped): what exported
    models take (their normalisation is inside the graph)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image.detach() * std + mean).clamp(0, 1)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised float tensor (3, H, W) -> uint8 RGB (H, W, 3) (rounded, clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize expects a (3, H, W) tensor, got shape {tuple(image.shape)};"
                         " index a batch first (image[i]).")
    x = unit_rgb(image).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


# Random streams drawn beside the SynthRooms scenes' own ([seed, split, index]). numpy's seed words
# ignore trailing zeros, and three words of the same values replay a scene (at epoch 0, [seed, epoch,
# index] was the training scene's stream, so the flip and the jitter were functions of the wall's
# draws). Each use draws from its own spawn key instead: SeedSequence's documented way to keep
# streams independent.
AUGMENT_STREAM = 0xA06


def keyed_rng(stream: int, *words: int) -> np.random.Generator:
    """A Generator that is a pure function of `words`, in the use's own `stream` (a constant)."""
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words], spawn_key=(stream,)))


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of sample `index` in `epoch`: a pure function of the three."""
    return keyed_rng(AUGMENT_STREAM, seed, epoch, index)


def hflip_intrinsics(intrinsics: np.ndarray, width: int) -> np.ndarray:
    """fx, fy, cx, cy (4,) of the horizontally flipped image of `width` pixels (cx -> W - cx;
    pixel centres at u + 0.5)."""
    out = np.array(intrinsics, dtype=np.float32, copy=True)
    out[2] = width - out[2]
    return out


def photometric_jitter(rgb: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.2,
                       contrast: float = 0.2, saturation: float = 0.2,
                       gamma: tuple[float, float] = (0.8, 1.25)) -> np.ndarray:
    """Random brightness, contrast, saturation and gamma on uint8 RGB (H, W, 3) -> uint8.

    Factors are drawn uniformly from [1 - x, 1 + x] (gamma from `gamma`) with `rng`, in a fixed
    order, so the result is a pure function of the input and the generator state.
    """
    b, c, s = (rng.uniform(1 - x, 1 + x) for x in (brightness, contrast, saturation))
    g = rng.uniform(*gamma)
    x = rgb.astype(np.float32) / 255.0
    x = x * b
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey.mean()) * c + grey.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (x - grey) * s + grey
    x = np.clip(x, 0, 1) ** np.float32(g)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
