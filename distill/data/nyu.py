"""NYU Depth V2 in the three layouts users have (see the README's "Real data" section).

- `NyuLabeled`: the official `nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5, axes reversed:
  `images (N, 3, 640, 480)`) with `splits.mat` (795 train / 654 test, 1-based). The only layout
  with labels: 894 raw classes -> 40 -> 13 (`classes.raw894_to_train13`; 13 classes, 0-based,
  255 unlabelled). Depth: "filled" (`depths`, hole-filled, the training default) or "raw"
  (`rawDepths`, holes = 0, the validation default: the community's official test ground truth
  is built from raw depth; say which when you quote numbers).
- `NyuBTS`: BTS's "sync" layout, ~24K pairs `sync/<scene>/rgb_XXXXX.jpg` + `sync_depth_XXXXX.png`
  (uint16 mm) listed in `nyudepthv2_train_files_with_gt.txt`, whose paths start with "/" (a naive
  os.path.join(root, "/kitchen/...") drops root); the 654 test pairs (raw depth, mm PNG) under
  `official_splits/test/` listed in `nyudepthv2_test_files_with_gt.txt`. Training images are cut
  to BTS's crop (left 43, top 45, right 608, bottom 472) to drop registration borders.
- `NyuH5`: the FastDepth / sparse-to-dense / TFDS archive, `train/<scene>/<n>.h5` (47,584) and
  `val/official/<n>.h5` (654), keys `rgb (3, 480, 640)` uint8 and `depth (480, 640)` metres.
  No labels (seg all 255).

Samples follow the project's schema at `height x width` (image bilinear; depth and labels
nearest, never interpolated across holes; intrinsics scaled). At 480x640 without a crop a sample
is a pixel-exact copy of the file, which is where the Eigen crop (`eval.eigen_crop=true`) is defined.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from distill.data.classes import IGNORE_INDEX, raw894_to_train13
from distill.data.transforms import hflip_intrinsics, normalize, photometric_jitter

NYU_SIZE = (480, 640)
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)   # fx, fy, cx, cy at 640x480
BTS_TRAIN_CROP = (45, 43, 472, 608)                          # top, left, bottom, right
BTS_TRAIN_LIST, BTS_TEST_LIST = "nyudepthv2_train_files_with_gt.txt", "nyudepthv2_test_files_with_gt.txt"


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """(H, W[, 3]) array at `size` (h, w): bilinear (antialiased) for images, nearest for depth/labels."""
    if array.shape[:2] == tuple(size):
        return array
    mode = "F" if array.dtype == np.float32 else None
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    out = image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(out).astype(array.dtype)


def make_sample(rgb: np.ndarray, depth: np.ndarray, seg: np.ndarray | None, intrinsics: tuple, *, index: int,
                size: tuple[int, int], crop: tuple[int, int, int, int] | None = None,
                rng: np.random.Generator | None = None) -> dict:
    """The sample dict from decoded arrays at the source resolution: crop (top, left, bottom,
    right), resize to `size`, then flip + jitter when `rng` is given (augmentation)."""
    fx, fy, cx, cy = intrinsics
    if seg is None:
        seg = np.full(depth.shape, IGNORE_INDEX, np.uint8)
    if crop is not None:
        top, left, bottom, right = crop
        rgb, depth, seg = rgb[top:bottom, left:right], depth[top:bottom, left:right], seg[top:bottom, left:right]
        cx, cy = cx - left, cy - top
    h0, w0 = depth.shape
    sy, sx = size[0] / h0, size[1] / w0
    intr = np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], np.float32)
    rgb, depth, seg = resize(rgb, size, False), resize(depth.astype(np.float32), size, True), resize(seg, size, True)
    flipped = False
    if rng is not None:
        if rng.random() < 0.5:
            flipped = True
            rgb, depth, seg = rgb[:, ::-1], depth[:, ::-1], seg[:, ::-1]
            intr = hflip_intrinsics(intr, size[1])
        rgb = photometric_jitter(np.ascontiguousarray(rgb), rng)
    depth_t = torch.from_numpy(np.ascontiguousarray(depth, np.float32))[None]
    depth_t = torch.where(torch.isfinite(depth_t) & (depth_t > 0), depth_t, torch.zeros_like(depth_t))
    return {"image": normalize(np.ascontiguousarray(rgb)), "depth": depth_t, "valid": depth_t > 0,
            "seg": torch.from_numpy(np.ascontiguousarray(seg).astype(np.int64)),
            "intrinsics": torch.from_numpy(np.asarray(intr, np.float32)), "index": index, "flipped": flipped}


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class NyuDataset(Dataset):
    """Shared behaviour: `read(i) -> (rgb, depth, seg | None, intrinsics)` in subclasses, sizing,
    augmentation as a function of (seed, epoch, index), `set_epoch`, `content_hash`."""

    crop: tuple[int, int, int, int] | None = None

    def __init__(self, split: str, *, size: tuple[int, int] | None, augment: bool, seed: int, limit: int | None):
        self.split, self.size, self.augment, self.seed, self.limit = split, tuple(size or NYU_SIZE), augment, seed, limit
        self.epoch = 0

    def __len__(self) -> int:
        return min(self.count(), self.limit) if self.limit else self.count()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {type(self).__name__} {self.split} samples")
        rgb, depth, seg, intrinsics = self.read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        return make_sample(rgb, depth, seg, intrinsics, index=index, size=self.size, crop=self.crop, rng=rng)


class NyuLabeled(NyuDataset):
    def __init__(self, mat: str | os.PathLike, split: str, *, depth: str | None = None, splits: str | os.PathLike | None = None,
                 size=None, augment=False, seed=0, limit=None):
        super().__init__(split, size=size, augment=augment, seed=seed, limit=limit)
        import scipy.io

        self.path = Path(mat)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass the official nyu_depth_v2_labeled.mat")
        splits_path = Path(splits) if splits else self.path.with_name("splits.mat")
        if not splits_path.is_file():
            raise FileNotFoundError(f"{splits_path} is missing: the labelled .mat needs the official splits.mat "
                                    f"(trainNdxs / testNdxs) next to it")
        key = {"train": "trainNdxs", "val": "testNdxs", "test": "testNdxs"}[split]
        self.indices = scipy.io.loadmat(splits_path)[key].ravel().astype(np.int64) - 1   # MATLAB is 1-based
        self.depth_key = {"filled": "depths", "raw": "rawDepths"}[depth or ("filled" if split == "train" else "raw")]
        self._file, self._pid = None, None

    def count(self) -> int:
        return len(self.indices)

    @property
    def file(self):
        import h5py

        if self._file is None or self._pid != os.getpid():   # h5py handles do not survive a fork
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def read(self, index: int):
        j = int(self.indices[index])
        f = self.file
        rgb = np.ascontiguousarray(f["images"][j].transpose(2, 1, 0))       # (3, W, H) -> (H, W, 3)
        depth = np.ascontiguousarray(f[self.depth_key][j].T, np.float32)      # (W, H) -> (H, W) metres
        seg = raw894_to_train13(np.asarray(f["labels"][j].T, np.int64))
        return rgb, depth, seg, NYU_INTRINSICS

    def content_hash(self, index: int) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.file["images"][int(self.indices[index])]).tobytes()).hexdigest()


class NyuBTS(NyuDataset):
    def __init__(self, root: str | os.PathLike, split: str, *, size=None, augment=False, seed=0, limit=None):
        super().__init__(split, size=size, augment=augment, seed=seed, limit=limit)
        self.root = Path(root)
        train = split == "train"
        self.crop = BTS_TRAIN_CROP if train else None
        listing = find_first([self.root / name for name in (BTS_TRAIN_LIST if train else BTS_TEST_LIST,)]
                             + [self.root / "train_test_inputs" / (BTS_TRAIN_LIST if train else BTS_TEST_LIST)])
        self.base = self.root / "sync" if train else find_first(
            [self.root / "official_splits" / "test", self.root / "test"], what="the 654 test images (BTS keeps "
            "them in official_splits/test/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png)")
        self.items, self.skipped = [], 0
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] == "None":   # BTS lists a few images without depth
                self.skipped += int(bool(parts))
                continue
            # Paths in the training list start with "/": joined naively they would replace the root.
            self.items.append((parts[0].lstrip("/"), parts[1].lstrip("/"), float(parts[2])))

    def count(self) -> int:
        return len(self.items)

    def read(self, index: int):
        rgb_name, depth_name, focal = self.items[index]
        with Image.open(self.base / rgb_name) as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(self.base / depth_name) as im:
            depth = np.asarray(im, np.float32) / 1000.0                        # uint16 millimetres
        return rgb, depth, None, (focal, focal, NYU_INTRINSICS[2], NYU_INTRINSICS[3])

    def content_hash(self, index: int) -> str:
        return file_hash(self.base / self.items[index][0])


class NyuH5(NyuDataset):
    def __init__(self, root: str | os.PathLike, split: str, *, size=None, augment=False, seed=0, limit=None):
        super().__init__(split, size=size, augment=augment, seed=seed, limit=limit)
        folder = Path(root) / ("train" if split == "train" else "val")
        self.files = sorted(folder.rglob("*.h5"))
        if not self.files:
            raise FileNotFoundError(f"no .h5 files under {folder}: the FastDepth layout has train/<scene>/<n>.h5 "
                                    f"and val/official/<n>.h5")

    def count(self) -> int:
        return len(self.files)

    def read(self, index: int):
        import h5py

        with h5py.File(self.files[index], "r") as f:
            rgb = np.ascontiguousarray(np.asarray(f["rgb"]).transpose(1, 2, 0))   # (3, H, W) -> (H, W, 3)
            depth = np.asarray(f["depth"], np.float32)
        return rgb, depth, None, NYU_INTRINSICS

    def content_hash(self, index: int) -> str:
        return file_hash(self.files[index])


def find_first(paths: list[Path], what: str = "") -> Path:
    for p in paths:
        if p.exists():
            return p
    raise FileNotFoundError(f"none of {', '.join(map(str, paths))} exists{': ' + what if what else ''}")


LAYOUTS = {"nyu-labeled": NyuLabeled, "nyu-bts": NyuBTS, "nyu-h5": NyuH5}


def detect_layout(path: Path) -> str:
    """Which of the three layouts `path` holds; the error lists what each needs."""
    if path.suffix == ".mat" and path.is_file():
        return "nyu-labeled"
    if (path / BTS_TRAIN_LIST).is_file() or (path / "train_test_inputs" / BTS_TRAIN_LIST).is_file() or (path / "sync").is_dir():
        return "nyu-bts"
    if (path / "train").is_dir() and (path / "val").is_dir():
        return "nyu-h5"
    raise FileNotFoundError(
        f"{path} is not a NYU Depth V2 layout this project reads: nyu:<.../nyu_depth_v2_labeled.mat> (with "
        f"splits.mat beside it), nyu:<dir> with sync/ and {BTS_TRAIN_LIST} (BTS), or nyu:<dir> with train/ and "
        f"val/ of .h5 files (FastDepth / TFDS)")


def build(layout: str, path: str, cfg) -> tuple[Dataset, Dataset]:
    """(train, val) of a DataConfig for one layout; `num_train` / `num_val` keep the first N."""
    cls = LAYOUTS[layout if layout != "nyu" else detect_layout(Path(path))]
    size = (cfg.height or NYU_SIZE[0], cfg.width or NYU_SIZE[1])
    return (cls(path, "train", size=size, augment=cfg.augment, seed=cfg.seed, limit=cfg.num_train),
            cls(path, "val", size=size, augment=False, seed=cfg.seed, limit=cfg.num_val))
