"""Unlabelled image folders as distillation data: teacher labels only, no ground truth.

Every image under the folder (recursive, sorted; jpg, jpeg, png, bmp, webp) is checked once by
decoding it; unreadable files (truncated, empty, not an image) are skipped, counted and listed in
`skipped`, never modified. Samples have `depth` 0 and `valid` False everywhere, `seg` 255, and
intrinsics from an optional `intrinsics.json` at the folder's root ({"fx", "fy", "cx", "cy",
"width", "height"} at the original resolution), else NaN (unknown: a teacher that needs the focal
length, Depth Anything 3 Metric, refuses them).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from distill.data.nyu import file_hash, make_sample

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def readable(path: Path) -> str | None:
    """None when `path` decodes as an image, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:   # verify() leaves the file unusable; a real decode catches truncation
            im.convert("RGB").load()
    except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolder(Dataset):
    def __init__(self, root: str | os.PathLike, *, size: tuple[int, int], augment: bool = False, seed: int = 0,
                 limit: int | None = None):
        self.root, self.size, self.augment, self.seed, self.epoch = Path(root), tuple(size), augment, seed, 0
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        self.files, self.skipped = [], []
        for path in candidates:
            reason = readable(path)
            (self.skipped.append((str(path), reason)) if reason else self.files.append(path))
        if limit:
            self.files = self.files[:limit]
        if not self.files:
            raise ValueError(f"no readable image in {self.root} (accepted: {', '.join(EXTENSIONS)}; "
                             f"{len(self.skipped)} unreadable files skipped)")
        if self.skipped:
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable image files (left untouched), "
                          f"e.g. {self.skipped[0][0]} ({self.skipped[0][1]})", stacklevel=2)
        self.intrinsics = self.read_intrinsics()

    def read_intrinsics(self) -> tuple[float, float, float, float, float, float] | None:
        path = self.root / "intrinsics.json"
        if not path.is_file():
            return None
        k = json.loads(path.read_text())
        try:
            return tuple(float(k[key]) for key in ("fx", "fy", "cx", "cy", "width", "height"))
        except KeyError as e:
            raise ValueError(f"{path} lacks {e}; it needs fx, fy, cx, cy, width, height (pixels)") from None

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.files[index]) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        nan = float("nan")
        intr = (nan,) * 4
        if self.intrinsics:   # given at (width, height): rescale to this file's size first
            fx, fy, cx, cy, kw, kh = self.intrinsics
            intr = (fx * w / kw, fy * h / kh, (cx + 0.5) * w / kw - 0.5, (cy + 0.5) * h / kh - 0.5)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        return make_sample(rgb, np.zeros((h, w), np.float32), None, intr, index=index, size=self.size, rng=rng)

    def content_hash(self, index: int) -> str:
        return file_hash(self.files[index])
