"""Unlabelled image folders as distillation data: teacher labels only, no ground truth.

Every image under the folder (recursive, sorted by path; .jpg .jpeg .png .bmp .webp in any
case) is checked once at construction by `verify()` and a full decode; unreadable files
(truncated, empty, not an image) are skipped, listed in `skipped` as (path, reason) and reported
in one warning. Files are only read, never modified, moved or deleted. (A truncated file is only
caught while PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is False, its default.)

Samples follow the project's schema at `size`: `depth` 0 and `valid` False everywhere, `seg`
IGNORE_INDEX (255), and `intrinsics` from an optional `intrinsics.json` at the folder's root
({"fx", "fy", "cx", "cy", "width", "height"}: pixels at the original `width x height`, scaled per
axis to the output size) else NaN (unknown: a teacher that needs a focal length refuses them).
Images are turned upright by their EXIF orientation, as `python -m edge.run` turns the photos
it is given (core/images.py: a phone's portrait photo is stored sideways); intrinsics.json
describes the stored layout (the sensor's), and each image's intrinsics are turned with it. Each
image is resized to `size` (bilinear), whatever its aspect ratio. 16-bit images keep their range
(scaled to 8 bits, not clipped at 255). A JPEG is decoded at the
smallest of its 1/1, 1/2, 1/4, 1/8 scales that still covers twice the output size, so a phone's
48 MP photo costs a fraction of its full decode every epoch; images that would decode to more than
MAX_MEGAPIXELS (a JPEG at that reduced scale, other formats whole) are skipped like unreadable
ones, with the reason (downscale them once, outside training).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from core.images import decoded_content_hash, open_image, orientation, upright_intrinsics, upright_rgb
from core.io import home_path, sha256 as sha256_file
from distill.data.nyu import check_size, make_sample
from distill.data.transforms import augment_rng

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_MEGAPIXELS = 200.0   # above: skipped (a 144 MP PNG took 2.6 GB to decode, every epoch)
INTRINSICS_KEYS = ("fx", "fy", "cx", "cy", "width", "height")


def probe(path: Path, size: tuple[int, int]) -> tuple[tuple[int, int] | None, str]:
    """((height, width), "") when `path` decodes as an image, else (None, the reason it does not)."""
    try:
        with open_image(path, size) as im:
            megapixels = im.width * im.height / 1e6   # the header's (a JPEG's at its reduced scale): nothing decoded
            if megapixels > MAX_MEGAPIXELS:
                return None, (f"{im.width}x{im.height} (as decoded) is {megapixels:.0f} MP, above the "
                              f"{MAX_MEGAPIXELS:.0f} MP decoded per sample; downscale it once (e.g. to 4096 px) "
                              f"outside training")
            im.verify()   # structure checks; leaves the object unusable, so open again to decode
        with open_image(path) as im:
            hw = (im.height, im.width)   # as stored, before upright_rgb shrinks a JPEG
            upright_rgb(im, size)   # a real decode: catches truncated data verify() misses
            return hw, ""
    except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def read_intrinsics(path: Path) -> tuple[float, ...] | None:
    """(fx, fy, cx, cy, width, height) from `intrinsics.json`, None when the file is absent."""
    if not path.is_file():
        return None
    try:
        k = json.loads(path.read_text())
        values = tuple(float(k[key]) for key in INTRINSICS_KEYS)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} must be a JSON object with numbers {', '.join(INTRINSICS_KEYS)} (pixels at "
                         f"the original width x height), e.g. {{\"fx\": 1500, \"fy\": 1500, \"cx\": 960, "
                         f"\"cy\": 540, \"width\": 1920, \"height\": 1080}}; got error {e!r}.") from None
    if not all(np.isfinite(values)) or min(values[0], values[1], values[4], values[5]) <= 0:
        raise ValueError(f"{path}: fx, fy, width, height must be positive and all values finite, got "
                         f"{dict(zip(INTRINSICS_KEYS, values))}.")
    return values


class ImageFolder(Dataset):
    """Images under `root` as unlabelled training samples (see the module docstring).

    `size` (height, width) of the output; `augment`: flip (p = 0.5, cx mirrored) + photometric
    jitter from `augment_rng(seed, epoch, index)` (call `set_epoch`); `limit` keeps
    the first N readable images in path order and stops probing there (files after them are not
    opened). `skipped`: [(path, reason)] of unreadable files; `files`: the readable ones.
    """

    split = "train"

    def __init__(self, root: str | os.PathLike, *, size: tuple[int, int] | None = None, augment: bool = False,
                 seed: int = 0, limit: int | None = None):
        self.root = home_path(root)
        self.size, self.augment, self.seed, self.epoch = check_size(size), bool(augment), int(seed), 0
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (folder:<directory of images>).")
        if limit is not None and limit < 1:
            raise ValueError(f"{self.root}: a sample cap of {limit} leaves nothing; use a positive number or None.")
        self.intrinsics = read_intrinsics(self.root / "intrinsics.json")
        self.files: list[Path] = []
        self.skipped: list[tuple[str, str]] = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
            if limit is not None and len(self.files) >= limit:
                break
            hw, reason = probe(path, self.size)
            if hw is None:
                self.skipped.append((str(path), reason))
            else:
                self.check_aspect(path, hw)
                self.files.append(path)
        if not self.files:
            raise ValueError(f"no readable image in {self.root} (searched recursively for "
                             f"{', '.join(EXTENSIONS)}, any case; {len(self.skipped)} unreadable skipped).")
        if self.skipped:
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable image files (left untouched; "
                          f"see .skipped), e.g. {self.skipped[0][0]}: {self.skipped[0][1]}", stacklevel=2)

    def check_aspect(self, path: Path, hw: tuple[int, int]) -> None:
        """intrinsics.json describes one camera: refuse an image whose aspect ratio is not its own
        (rotated or cropped), since scaling its intrinsics per axis would be wrong."""
        if self.intrinsics is None:
            return
        kw, kh = self.intrinsics[4], self.intrinsics[5]
        if abs(hw[1] / hw[0] - kw / kh) > 0.01 * kw / kh:
            raise ValueError(f"{path} is {hw[1]}x{hw[0]} but {self.root / 'intrinsics.json'} describes "
                             f"{kw:g}x{kh:g} images; move images of other cameras or orientations to "
                             "another folder, or remove intrinsics.json (intrinsics then NaN).")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch`."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}.")
        index = int(index) % n
        try:
            with open_image(self.files[index], self.size) as im:
                turn = orientation(im)
                rgb = np.asarray(upright_rgb(im, self.size))
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:   # PIL's messages name no file
            raise ValueError(f"{self.files[index]} cannot be read ({type(exc).__name__}: {exc}): it changed after the "
                             f"folder was read (a copy still being written?) or is damaged; fix or remove it") from None
        h, w = rgb.shape[:2]   # upright; a JPEG may be decoded at 1/2, 1/4 or 1/8 scale
        intr = (float("nan"),) * 4
        if self.intrinsics is not None:   # given for the stored layout: turned upright, then to this size
            fx, fy, cx, cy, kw, kh = upright_intrinsics(*self.intrinsics, turn)
            intr = (fx * w / kw, fy * h / kh, cx * w / kw, cy * h / kh)
        rng = augment_rng(self.seed, self.epoch, index) if self.augment else None
        return make_sample(rgb, np.zeros((h, w), np.float32), None, intr, index=index, size=self.size, rng=rng)

    def content_hash(self, index: int) -> str:
        """sha256 of the image file's bytes (with its EXIF orientation where it has one: core/images.py),
        and of intrinsics.json's camera where there is one: da3-metric's metres scale with the focal
        length, so a cache labelled before the file was corrected must not pass for this one."""
        with open_image(self.files[index]) as im:   # the header only
            digest = decoded_content_hash(sha256_file(self.files[index]), im)
        if self.intrinsics is None:
            return digest
        return hashlib.sha256(f"{digest} intrinsics {json.dumps(self.intrinsics)}".encode()).hexdigest()
