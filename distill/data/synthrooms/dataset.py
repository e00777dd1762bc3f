"""`SynthRoomsDataset`: a generated SynthRooms directory as the project's sample dicts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.io import sha256

from ..transforms import augment_rng, hflip_intrinsics, normalize, photometric_jitter
from .store import DEPTH_SCALE_M, GENERATOR, VERSION

_HOW_TO = ("create it with `from distill.data.synthrooms import generate; "
           "generate(root, num_train=1200, num_val=200, height=96, width=128)` and pass the "
           "returned path")


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and check `path/manifest.json`; raise with the fix when missing or stale."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SynthRooms directory {path} does not exist; {_HOW_TO}.")
    mfile = path / "manifest.json"
    if not mfile.is_file():
        raise FileNotFoundError(f"{mfile} is missing, so {path} is not a complete SynthRooms "
                                f"dataset (an interrupted generation?); {_HOW_TO}.")
    try:
        manifest = json.loads(mfile.read_text())
    except ValueError as e:
        raise ValueError(f"{mfile} is not valid JSON ({e}); delete {path} and {_HOW_TO}.") from e
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR or manifest.get("version") != VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise ValueError(
            f"{path} was written by generator {found.get('generator')!r} version "
            f"{found.get('version')!r}, but this code reads {GENERATOR!r} version {VERSION}; "
            f"regenerate it ({_HOW_TO}; the new version gets its own directory name).")
    k = manifest.get("intrinsics", {})
    values = [k.get(name) for name in ("fx", "fy", "cx", "cy")]
    if not all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{mfile}: intrinsics fx, fy, cx, cy must be positive finite pixels, got {values}; "
                         f"the manifest is damaged: delete {path} and {_HOW_TO}.")
    return manifest


class SynthRoomsDataset(Dataset):
    """Samples of one split of a generated SynthRooms directory.

    Each item is a dict: `image` float32 (3, H, W) ImageNet-normalised; `depth` float32
    (1, H, W) z-depth in metres, 0 where invalid; `valid` bool (1, H, W) = depth > 0; `seg` int64
    (H, W) NYU13 ids, IGNORE_INDEX (255) where unlabelled; `intrinsics` float32 (4,) fx, fy, cx,
    cy in pixels at this size (after any flip); `index` int, the position in the split; `flipped`
    bool, whether augmentation mirrored it.

    With `augment=True`: horizontal flip (p = 0.5; depth, labels and cx follow) and photometric
    jitter, drawn from `augment_rng(seed, epoch, index)`, so a sample depends only on
    (seed, epoch, index), never on DataLoader workers or resume points. Call `set_epoch(epoch)`
    before iterating each epoch (with persistent workers, recreate the DataLoader).
    `cache_mb` > 0 keeps the decoded files of the items read first in memory, up to that many MB
    in this process: PNG decoding was 0.75 ms of each item's 2.2 ms on a laptop CPU, paid again
    every epoch. Only the reading process gains: a DataLoader's workers end with their epoch, and
    their caches with them.
    """

    def __init__(self, path: str | os.PathLike, split: str, *, augment: bool = False,
                 seed: int = 0, cache_mb: float = 0):
        self.path = Path(path)
        self.manifest: dict[str, Any] = load_manifest(self.path)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {self.path}; valid splits: "
                             f"{', '.join(splits)}.")
        self.split, self.augment, self.seed = split, augment, seed
        self.files: list[dict[str, Any]] = splits[split]["files"]
        k = self.manifest["intrinsics"]
        self.intrinsics = np.array([k["fx"], k["fy"], k["cx"], k["cy"]], np.float32)
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._cache_left = int(cache_mb * 2 ** 20)   # bytes the cache may still take

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch`."""
        self.epoch = int(epoch)

    def content_hash(self, index: int) -> str:
        """sha256 of item `index`'s RGB file: a pseudo-label cache proves it labelled these images."""
        return sha256(self.path / self.files[index]["rgb"])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded files of item `index`: rgb uint8 (H, W, 3), depth float32 (H, W) metres
        (0 = invalid), seg uint8 (H, W)."""
        if index in self._cache:
            rgb, millimetres, seg = self._cache[index]
        else:
            entry = self.files[index]
            rgb = self.decode(entry["rgb"], np.uint8, 3)
            millimetres = self.decode(entry["depth"], np.uint16, 2)
            seg = self.decode(entry["seg"], np.uint8, 2)
            size = rgb.nbytes + millimetres.nbytes + seg.nbytes
            if size <= self._cache_left:   # kept as stored (16-bit depth): half of float32's memory
                self._cache[index], self._cache_left = (rgb, millimetres, seg), self._cache_left - size
        return rgb, millimetres.astype(np.float32) * np.float32(DEPTH_SCALE_M), seg

    def decode(self, name: str, dtype: type, ndim: int) -> np.ndarray:
        """A PNG of the set as an array of `dtype` at the manifest's size; ValueError naming the file
        when it is unreadable, or of another type or size (an 8-bit depth map would be read as mm)."""
        path = self.path / name
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB") if ndim == 3 else im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"{path} cannot be decoded ({type(exc).__name__}: {exc}): a truncated or damaged "
                             f"file; delete {self.path} and render the set again") from None
        k = self.manifest["intrinsics"]
        expected = (k["height"], k["width"], 3)[:ndim]
        if array.dtype != dtype or array.shape != expected:
            raise ValueError(f"{path} is {array.dtype} {array.shape}; the set stores {np.dtype(dtype)} "
                             f"{expected} here (depth: 16-bit millimetres, labels: 8-bit ids). Delete {self.path} "
                             f"and render the set again")
        return array

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items in split {self.split!r}.")
        index = int(index) % n
        rgb, depth, seg = self.read(index)
        intrinsics, flipped = self.intrinsics, False
        if self.augment:
            rng = augment_rng(self.seed, self.epoch, index)
            if rng.random() < 0.5:
                flipped = True
                rgb, depth, seg = rgb[:, ::-1], depth[:, ::-1], seg[:, ::-1]
                intrinsics = hflip_intrinsics(intrinsics, rgb.shape[1])
            rgb = photometric_jitter(rgb, rng)
        depth_t = torch.from_numpy(np.array(depth, np.float32, copy=True))[None]  # contiguous: a flip is a view
        return {
            "image": normalize(rgb),
            "depth": depth_t,
            "valid": depth_t > 0,
            "seg": torch.from_numpy(seg.astype(np.int64)),
            "intrinsics": torch.from_numpy(np.array(intrinsics, np.float32)),
            "index": index,
            "flipped": flipped,   # a cached pseudo-label is flipped to match
        }
