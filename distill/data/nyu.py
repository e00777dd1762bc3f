"""NYU Depth V2 in the three layouts users have (official toolbox, BTS, FastDepth / TFDS), as samples.

- `NyuLabeled`: the official `nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5, axes reversed:
  `images (N, 3, 640, 480)`) with `splits.mat` (795 train / 654 test, 1-based). The only layout
  with labels: raw 894 classes -> 40 -> 13 (`classes.raw894_to_train13`). `seg` uses the **13-class**
  protocol, 0-based, 255 unlabelled; the 40-class ids are in `classes.class_maps()`. Depth is
  "filled" (`depths`, hole-filled: the training default) or "raw" (`rawDepths`, holes = 0: the
  validation default, because the community's official test ground truth is built from raw depth;
  say which when you quote numbers).
- `NyuBTS`: BTS's "sync" layout, ~24K pairs `sync/<scene>/rgb_XXXXX.jpg` + `sync_depth_XXXXX.png`
  (uint16 mm) listed in `nyudepthv2_train_files_with_gt.txt`, and the 654 official test pairs
  (raw depth) listed in `nyudepthv2_test_files_with_gt.txt`. Training images are cut to BTS's
  crop (left 43, top 45, right 608, bottom 472) to drop registration borders.
- `NyuH5`: the FastDepth / sparse-to-dense / TFDS archive, `train/<scene>/<n>.h5` (47,584) and
  `val/official/<n>.h5` (654), keys `rgb (3, 480, 640)` uint8 and `depth (480, 640)` metres.
  No labels (seg all 255).

Every sample is resized to `size` (height, width): image bilinear (PIL, antialiased), depth and
labels nearest (a depth is never interpolated across a hole). Intrinsics follow the crop and the
resize per axis, in the project's convention (pixel u covers [u, u + 1), see synthrooms/scene.py:
a crop subtracts its offset, a resize multiplies, a flip maps cx -> W - cx). At 480x640 without a
crop (every validation split) a sample is a pixel-exact copy of the file: the size at which the
Eigen crop (`eval.eigen_crop=true`, rows 45:471, cols 41:601) is defined.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.io import home_path, sha256 as sha256_file
from distill.data.classes import IGNORE_INDEX, raw894_to_train13
from distill.data.transforms import augment_rng, hflip_intrinsics, normalize, photometric_jitter

NYU_SIZE = (480, 640)                                        # (height, width) of NYU's files
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)   # fx, fy, cx, cy at 640x480
BTS_TRAIN_CROP = (45, 43, 472, 608)                          # top, left, bottom, right
ROOM_DEPTH_MAX_M = 20.0                                      # a median above: not metres (NYU's reach 10 m)
LABELED_MAT = "nyu_depth_v2_labeled.mat"                     # the official download's name
BTS_TRAIN_LIST = "nyudepthv2_train_files_with_gt.txt"
BTS_TEST_LIST = "nyudepthv2_test_files_with_gt.txt"
BTS_TEST_DIRS = ("official_splits/test", "test")             # tried in this order under the root
SPLITS = {"train": "train", "val": "val", "test": "val"}     # NYU's test split is our validation
LAYOUT_HELP = (
    "nyu-labeled: a nyu_depth_v2_labeled.mat file (MATLAB v7.3) with splits.mat beside it; "
    f"nyu-bts: a directory with sync/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png, {BTS_TRAIN_LIST} and "
    f"{BTS_TEST_LIST} (at the root or in train_test_inputs/) and the test pairs in "
    f"{' or '.join(BTS_TEST_DIRS)}/; nyu-h5: a directory with train/<scene>/<n>.h5 and "
    "val/official/<n>.h5 (FastDepth / TFDS, keys rgb and depth)")

Intrinsics = tuple[float, float, float, float]


def resize_array(array: np.ndarray, size: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """(H, W) or (H, W, 3) array at `size` (height, width), same dtype. Bilinear (antialiased when
    shrinking) for uint8 images; nearest for depth (float32) and labels (uint8): no new values."""
    if array.shape[:2] == tuple(size):
        return array
    image = Image.fromarray(array, mode="F") if array.dtype == np.float32 else Image.fromarray(array)
    out = image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(out).astype(array.dtype)


def scale_intrinsics(k: Intrinsics, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Intrinsics:
    """fx, fy, cx, cy of an image of `from_hw` (height, width) resized to `to_hw`, per axis."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return (k[0] * sx, k[1] * sy, k[2] * sx, k[3] * sy)


def make_sample(rgb: np.ndarray, depth: np.ndarray, seg: np.ndarray | None, intrinsics: Intrinsics, *,
                index: int, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None,
                rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The sample dict (schema: distill/data/__init__.py) from arrays at the source resolution.

    rgb uint8 (h, w, 3); depth (h, w) metres, where 0, negative or non-finite values are invalid
    (they become 0); seg uint8 (h, w) 0-based ids or None (all IGNORE_INDEX); intrinsics at (h, w).
    Steps: crop (top, left, bottom, right), resize to `size`, then flip (p = 0.5) + photometric
    jitter drawn from `rng` when one is given (training augmentation).
    """
    if seg is None:
        seg = np.full(depth.shape, IGNORE_INDEX, np.uint8)
    fx, fy, cx, cy = intrinsics
    if crop is not None:
        top, left, bottom, right = crop
        rgb, depth, seg = (a[top:bottom, left:right] for a in (rgb, depth, seg))
        cx, cy = cx - left, cy - top
    intr = np.array(scale_intrinsics((fx, fy, cx, cy), depth.shape, size), np.float32)
    rgb = resize_array(rgb, size, nearest=False)
    depth = resize_array(np.asarray(depth, np.float32), size, nearest=True)
    seg = resize_array(seg, size, nearest=True)
    flipped = False
    if rng is not None:
        if rng.random() < 0.5:
            flipped = True
            rgb, depth, seg = rgb[:, ::-1], depth[:, ::-1], seg[:, ::-1]
            intr = hflip_intrinsics(intr, size[1])
        rgb = photometric_jitter(np.ascontiguousarray(rgb), rng)
    depth_t = torch.from_numpy(np.array(depth, np.float32))[None]   # a copy: never the source array
    depth_t = torch.where(torch.isfinite(depth_t) & (depth_t > 0), depth_t, torch.zeros_like(depth_t))
    return {"image": normalize(np.ascontiguousarray(rgb)), "depth": depth_t, "valid": depth_t > 0,
            "seg": torch.from_numpy(seg.astype(np.int64)), "intrinsics": torch.from_numpy(intr),
            "index": index, "flipped": flipped}   # a cached pseudo-label is flipped to match


def damaged(source: str, exc: Exception) -> ValueError:
    return ValueError(f"{source} cannot be read ({type(exc).__name__}: {exc}): a truncated or damaged file "
                      f"(a download cut short?); download it again")


def pixels(path: Path, mode: str | None = None) -> np.ndarray:
    """An image file's pixels (converted to `mode` if given); a damaged file named by itself."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (OSError, SyntaxError) as exc:
        raise damaged(str(path), exc) from None


def check_size(size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) as positive ints; None -> NYU's 480x640."""
    h, w = size if size is not None else NYU_SIZE
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"output size {h}x{w} must be positive (data.height, data.width; multiples of 32).")
    return int(h), int(w)


def first_n(items: list, limit: int | None, what: str) -> list:
    """The first `limit` items (data.num_train / num_val caps a split), all when limit is None."""
    if limit is None:
        return items
    if limit < 1:
        raise ValueError(f"{what}: a sample cap of {limit} leaves nothing; use a positive number or None (all).")
    return items[:limit]


class NyuDataset(Dataset):
    """What the three layouts share: a split's samples at `size` (height, width), `set_epoch`,
    augmentation (training split only) from `augment_rng(seed, epoch, index)`.
    Subclasses fill `items` (one per sample) and implement `read(index) -> (rgb, depth, seg | None,
    intrinsics)` at the source resolution, `content_hash(index)` and `source(index)` (the file(s)
    of a sample, for error messages); `crop` (top, left, bottom, right) cuts first."""

    crop: tuple[int, int, int, int] | None = None

    def __init__(self, split: str, *, size: tuple[int, int] | None, augment: bool, seed: int):
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: unknown split {split!r}; valid: {', '.join(SPLITS)}.")
        self.split = SPLITS[split]
        self.size = check_size(size)
        self.augment, self.seed, self.epoch = bool(augment) and self.split == "train", int(seed), 0
        self.items: list = []

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch`."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} {type(self).__name__} {self.split} samples.")
        index = int(index) % n
        try:
            rgb, depth, seg, intrinsics = self.read(index)
        except (OSError, SyntaxError) as exc:   # h5py and PIL on a truncated file do not say which file
            raise damaged(self.source(index), exc) from None
        rng = augment_rng(self.seed, self.epoch, index) if self.augment else None
        return make_sample(rgb, depth, seg, intrinsics, index=index, size=self.size, crop=self.crop, rng=rng)


class NyuLabeled(NyuDataset):
    """The official labelled set: `nyu_depth_v2_labeled.mat` + `splits.mat` (looked up beside it
    unless `splits` is given). 1,449 images at 480x640: train = `trainNdxs` (795), val = `testNdxs`
    (654), 1-based in the file. `seg`: 13 classes (0-based, 255 unlabelled). `depth`: "filled"
    (`depths`) or "raw" (`rawDepths`, holes invalid); default "filled" for train, "raw" for val.
    The HDF5 file is opened lazily once per process (DataLoader workers fork). A file of another
    image size (tests) gets NYU's intrinsics scaled to it.
    """

    KEYS = ("images", "depths", "rawDepths", "labels")

    def __init__(self, mat: str | os.PathLike, split: str, *, depth: str | None = None,
                 splits: str | os.PathLike | None = None, size: tuple[int, int] | None = None,
                 augment: bool = False, seed: int = 0, limit: int | None = None):
        super().__init__(split, size=size, augment=augment, seed=seed)
        self.path = home_path(mat)
        if self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is a folder; pass the official nyu_depth_v2_labeled.mat inside it.")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass the official nyu_depth_v2_labeled.mat.")
        kinds = {"filled": "depths", "raw": "rawDepths"}
        depth = depth or ("filled" if self.split == "train" else "raw")
        if depth not in kinds:
            raise ValueError(f"depth={depth!r} is not a NYU depth; valid: filled (hole-filled `depths`) or "
                             f"raw (`rawDepths`, holes invalid).")
        self.depth, self.depth_key = depth, kinds[depth]
        self._file, self._pid = None, -1
        n, self.source_hw = self._check_file()
        splits_path = home_path(splits) if splits else self.path.with_name("splits.mat")
        self.items = first_n(read_split(splits_path, self.split, n), limit, f"{self.path} {self.split}")

    def _check_file(self) -> tuple[int, tuple[int, int]]:
        """(N, (height, width)) after checking the datasets and their reversed-axis shapes."""
        f = self.file
        missing = [k for k in self.KEYS if k not in f]
        if missing:
            raise ValueError(f"{self.path} lacks {', '.join(missing)}: not the official labelled NYU file "
                             f"(it has {', '.join(sorted(f))}).")
        n, c, w, h = f["images"].shape if f["images"].ndim == 4 else (0, 0, 0, 0)
        if c != 3 or any(f[k].shape != (n, w, h) for k in self.KEYS[1:]):
            raise ValueError(f"{self.path}: expected MATLAB v7.3 shapes images (N, 3, 640, 480) and depths, "
                             f"rawDepths, labels (N, 640, 480), got "
                             + ", ".join(f"{k} {f[k].shape}" for k in self.KEYS) + ".")
        return n, (h, w)

    @property
    def file(self):
        """The open h5py.File of this process (a handle does not survive a fork; reopen after one)."""
        import h5py

        if self._file is None or self._pid != os.getpid():
            try:
                self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            except OSError as e:
                if "truncated" in str(e):   # an HDF5 file whose end is missing: a download cut short
                    raise ValueError(f"{self.path} is truncated ({e}); download nyu_depth_v2_labeled.mat "
                                     "again (2.8 GB).") from e
                raise ValueError(f"{self.path} is not a MATLAB v7.3 (HDF5) file ({e}); the official "
                                 "nyu_depth_v2_labeled.mat is one.") from e
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}   # spawned workers reopen the file

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Intrinsics]:
        """rgb uint8 (H, W, 3), depth float32 (H, W) metres, seg uint8 (H, W) 13-class ids."""
        j, f = int(self.items[index]), self.file
        rgb = np.ascontiguousarray(f["images"][j].transpose(2, 1, 0))     # (3, W, H) -> (H, W, 3)
        depth = np.ascontiguousarray(f[self.depth_key][j].T, np.float32)    # (W, H) -> (H, W)
        raw = np.asarray(f["labels"][j].T, np.int64)
        if raw.min() < 0 or raw.max() > 894:
            raise ValueError(f"{self.path}: labels of image {j} span {raw.min()}..{raw.max()}, outside NYU's "
                             "0 (unlabelled) .. 894; is this the official labelled file?")
        return rgb, depth, raw894_to_train13(raw), scale_intrinsics(NYU_INTRINSICS, NYU_SIZE, self.source_hw)

    def source(self, index: int) -> str:
        return f"{self.path} image {int(self.items[index]) + 1} (1-based)"

    def content_hash(self, index: int) -> str:
        """sha256 of the image's uint8 array as stored (3, W, H), C order."""
        stored = np.ascontiguousarray(self.file["images"][int(self.items[index])], np.uint8)
        return hashlib.sha256(stored.tobytes()).hexdigest()


def read_split(path: Path, split: str, n: int) -> np.ndarray:
    """0-based image indices of `split` ("train" -> trainNdxs, "val" -> testNdxs) from splits.mat."""
    import scipy.io

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the labelled .mat needs the official splits.mat "
                                "(trainNdxs / testNdxs, MATLAB v5) beside it: put it there, under that name.")
    try:
        table = scipy.io.loadmat(path)
    except (NotImplementedError, ValueError) as e:
        raise ValueError(f"{path} is not a MATLAB v5 splits.mat ({e}); use the official file.") from e
    except Exception as e:   # scipy's OSError / MatReadError on a cut file name neither the file nor the fix
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): truncated or damaged; download "
                         "the official splits.mat again.") from e
    key = "trainNdxs" if split == "train" else "testNdxs"
    if key not in table:
        raise ValueError(f"{path} has no {key}: keys are {', '.join(k for k in table if not k.startswith('__'))}.")
    raw = np.asarray(table[key], np.float64).ravel()
    if raw.size == 0 or (raw != np.round(raw)).any() or raw.min() < 1 or raw.max() > n:
        raise ValueError(f"{path}: {key} must be 1-based integers in 1..{n} (the .mat has {n} images), got "
                         f"{raw.size} values in {raw.min() if raw.size else None}..{raw.max() if raw.size else None}.")
    return raw.astype(np.int64) - 1   # MATLAB is 1-based


class NyuBTS(NyuDataset):
    """BTS's layout. Training pairs: `<root>/sync/` + the lines of `nyudepthv2_train_files_with_gt.txt`
    (their leading "/" is stripped: os.path.join(root, "/x") would drop root), cut to BTS's crop
    (left 43, top 45, right 608, bottom 472) then resized. Validation pairs: the lines of
    `nyudepthv2_test_files_with_gt.txt`, relative to `test_dir` or else the first existing of
    `<root>/official_splits/test/`, `<root>/test/`; not cropped (480x640: Eigen crop applies).
    The lists are read from `<root>/` or `<root>/train_test_inputs/`. Depth PNGs are uint16 mm.
    A line's focal column gives fx = fy; cx, cy are NYU's. Lines whose depth is "None" are
    skipped and counted in `skipped`; a listed file that is missing is an error at construction.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, test_dir: str | os.PathLike | None = None,
                 size: tuple[int, int] | None = None, augment: bool = False, seed: int = 0,
                 limit: int | None = None):
        super().__init__(split, size=size, augment=augment, seed=seed)
        self.root = home_path(root)
        train = self.split == "train"
        self.crop = BTS_TRAIN_CROP if train else None
        listing = find_first([self.root / BTS_TRAIN_LIST if train else self.root / BTS_TEST_LIST,
                              self.root / "train_test_inputs" / (BTS_TRAIN_LIST if train else BTS_TEST_LIST)],
                             "the BTS file list (from BTS's train_test_inputs/); " + LAYOUT_HELP)
        if train:
            self.base = find_first([self.root / "sync"], "BTS's training pairs sync/<scene>/...")
        else:
            self.base = home_path(test_dir) if test_dir else find_first(
                [self.root / d for d in BTS_TEST_DIRS], "the 654 official test pairs "
                "<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (BTS keeps them in official_splits/test/)")
        items, self.skipped = parse_list(listing)
        self.items = first_n(items, limit, f"{listing}")
        check_exist(self.base, self.items, listing)

    def source(self, index: int) -> str:
        rgb_name, depth_name, _ = self.items[index]
        return f"{self.base / rgb_name} or {self.base / depth_name}"

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, None, Intrinsics]:
        """rgb uint8 (480, 640, 3), depth float32 (480, 640) metres (uint16 mm / 1000, 0 = hole)."""
        rgb_name, depth_name, focal = self.items[index]
        rgb, mm = pixels(self.base / rgb_name, "RGB"), pixels(self.base / depth_name)
        if rgb.shape[:2] != NYU_SIZE:
            # the list's focal lengths, NYU's principal point and the training crop are in 480x640 pixels:
            # on a downscaled copy they would give other metres (da3-metric's scale with the focal)
            raise ValueError(f"{self.base / rgb_name} is {rgb.shape[0]}x{rgb.shape[1]}; BTS's lists, focal lengths "
                             f"and crop are defined at {NYU_SIZE[0]}x{NYU_SIZE[1]}: use the original files "
                             f"(data.height and data.width resize them for training)")
        if mm.ndim != 2 or mm.shape != rgb.shape[:2] or mm.dtype not in (np.uint16, np.int32):
            # an 8-bit map read as millimetres would be depths below 0.26 m, inside the evaluated range
            raise ValueError(f"{self.base / depth_name} should be a 16-bit single-channel PNG of "
                             f"{rgb.shape[0]}x{rgb.shape[1]} (millimetres), got {mm.dtype} of shape {mm.shape}.")
        depth = mm.astype(np.float32) / np.float32(1000.0)
        return rgb, depth, None, (focal, focal, NYU_INTRINSICS[2], NYU_INTRINSICS[3])

    def content_hash(self, index: int) -> str:
        """sha256 of the RGB file's bytes and the list's focal length: da3-metric's metres scale with
        the focal, so a cache labelled before a list was corrected must not pass for this one."""
        rgb_name, _, focal = self.items[index]
        return hashlib.sha256(f"{sha256_file(self.base / rgb_name)} focal {focal!r}".encode()).hexdigest()


def parse_list(listing: Path) -> tuple[list[tuple[str, str, float]], int]:
    """(rgb, depth, focal) per line of a BTS list, paths relative (leading "/" stripped), and the
    number of lines skipped because their depth is "None"."""
    items, skipped = [], 0
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise ValueError(f"{listing}:{number}: expected 'rgb depth focal', got {line!r}.")
        if parts[1] == "None":   # BTS lists some images without depth
            skipped += 1
            continue
        try:
            focal = float(parts[2])
        except ValueError:
            raise ValueError(f"{listing}:{number}: focal {parts[2]!r} is not a number (pixels).") from None
        # The training list's paths start with "/": joined as they are they would replace the root.
        items.append((parts[0].lstrip("/"), parts[1].lstrip("/"), focal))
    return items, skipped


def check_exist(base: Path, items: list[tuple[str, str, float]], listing: Path) -> None:
    """Raise naming the missing files when a listed pair is not under `base`."""
    missing = [str(base / p) for rgb, depth, _ in items for p in (rgb, depth) if not (base / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files listed in {listing} are missing under {base}, e.g. "
                                f"{', '.join(missing[:3])}; the list's paths are relative to that directory.")


class NyuH5(NyuDataset):
    """FastDepth / sparse-to-dense / TFDS archive: train = every `<root>/train/**/*.h5`, val = every
    `<root>/val/**/*.h5` (the archive has val/official/), sorted by path. Each file: `rgb` (3, H, W)
    uint8, `depth` (H, W) float metres (480x640 in the archive). No labels; NYU's intrinsics."""

    def __init__(self, root: str | os.PathLike, split: str, *, size: tuple[int, int] | None = None,
                 augment: bool = False, seed: int = 0, limit: int | None = None):
        super().__init__(split, size=size, augment=augment, seed=seed)
        folder = home_path(root) / self.split
        files = sorted(folder.rglob("*.h5"))
        if not files:
            raise FileNotFoundError(f"no .h5 files under {folder}: the FastDepth layout has train/<scene>/<n>.h5 "
                                    "and val/official/<n>.h5 with keys rgb (3, 480, 640) and depth (480, 640).")
        self.items = first_n(files, limit, str(folder))

    def source(self, index: int) -> str:
        return str(self.items[index])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, None, Intrinsics]:
        """rgb uint8 (H, W, 3), depth float32 (H, W) metres."""
        import h5py

        path = self.items[index]
        with h5py.File(path, "r") as f:
            if "rgb" not in f or "depth" not in f:
                raise ValueError(f"{path} lacks rgb or depth (has {', '.join(f)}); not a FastDepth NYU file.")
            rgb, depth = np.asarray(f["rgb"]), np.asarray(f["depth"])
        if not np.issubdtype(depth.dtype, np.floating):   # integer depth is a millimetre variant, not metres
            raise ValueError(f"{path}: depth is {depth.dtype}, where the FastDepth archive stores float metres; "
                             "integer depth is most likely millimetres from another conversion. Use the "
                             "archive's files, or convert depth to float32 metres (divide by 1000).")
        depth = depth.astype(np.float32)
        measured = depth[np.isfinite(depth) & (depth > 0)]
        median = float(np.median(measured)) if measured.size else 0.0
        if median > ROOM_DEPTH_MAX_M:   # float millimetres from another conversion
            raise ValueError(f"{path}: depth has a median of {median:.0f}, where NYU's rooms are "
                             f"0.5-10 m; most likely float millimetres from another conversion. Use the archive's "
                             f"files, or convert depth to metres (divide by 1000).")
        if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != np.uint8 or depth.shape != rgb.shape[1:]:
            raise ValueError(f"{path}: expected rgb (3, H, W) uint8 and depth (H, W), got rgb {rgb.shape} "
                             f"{rgb.dtype} and depth {depth.shape}.")
        k = scale_intrinsics(NYU_INTRINSICS, NYU_SIZE, depth.shape)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), depth, None, k

    def content_hash(self, index: int) -> str:
        """sha256 of the .h5 file's bytes."""
        return sha256_file(self.items[index])


def find_first(paths: list[Path], what: str) -> Path:
    """The first of `paths` that exists; raise naming all of them and what they should hold."""
    for p in paths:
        if p.exists():
            return p
    raise FileNotFoundError(f"none of {', '.join(map(str, paths))} exists: expected {what}.")


LAYOUTS: dict[str, type[NyuDataset]] = {"nyu-labeled": NyuLabeled, "nyu-bts": NyuBTS, "nyu-h5": NyuH5}


def detect_layout(path: Path) -> str:
    """"nyu-labeled" for a .mat file, "nyu-bts" for a directory with one of BTS's lists (at the root or
    in train_test_inputs/) or sync/, "nyu-h5" for one with .h5 files under train/ or val/,
    "nyu-labeled" for one holding nyu_depth_v2_labeled.mat; else raise."""
    if path.is_file() and path.suffix.lower() == ".mat":
        return "nyu-labeled"
    if path.is_dir():   # either split may be on disk alone (`build`)
        lists = (BTS_TRAIN_LIST, BTS_TEST_LIST)
        bts = (*lists, "sync", *(f"train_test_inputs/{n}" for n in lists))
        if any((path / p).exists() for p in bts):
            return "nyu-bts"
        if any(next((path / split).rglob("*.h5"), None) for split in ("train", "val") if (path / split).is_dir()):
            return "nyu-h5"
        if (path / LABELED_MAT).is_file():
            return "nyu-labeled"
    state = "does not exist" if not path.exists() else "is not a NYU Depth V2 layout this project reads"
    raise FileNotFoundError(f"{path} {state}. The layouts are: {LAYOUT_HELP}. Pass nyu:<path> (or "
                            "nyu-labeled:, nyu-bts:, nyu-h5: to name the layout).")


def build(path: str | os.PathLike, cfg, layout: str = "nyu") -> tuple[NyuDataset, NyuDataset]:
    """(train, val) for a `DataConfig` at `path`; layout "nyu" detects it. Size: `cfg.height x
    cfg.width` (480x640 when None). `cfg.num_train` / `cfg.num_val`, when not None, keep the first
    N samples of each split in file order (smoke runs). Augmentation (cfg.augment) on train only."""
    path = home_path(path)
    layout = detect_layout(path) if layout == "nyu" else layout
    if layout == "nyu-labeled" and path.is_dir() and (path / LABELED_MAT).is_file():
        path = path / LABELED_MAT   # the folder of the official download
    if layout not in LAYOUTS:
        raise ValueError(f"unknown NYU layout {layout!r}; valid: nyu (detect), {', '.join(LAYOUTS)}.")
    cls, size = LAYOUTS[layout], (cfg.height or NYU_SIZE[0], cfg.width or NYU_SIZE[1])
    train = split_or_absent(lambda: cls(path, "train", size=size, augment=cfg.augment, seed=cfg.seed,
                                        limit=cfg.num_train))
    val = split_or_absent(lambda: cls(path, "val", size=size, augment=False, seed=cfg.seed, limit=cfg.num_val))
    if isinstance(train, AbsentSplit) and isinstance(val, AbsentSplit):
        raise train.error
    return train, val


class AbsentSplit(Dataset):
    """A split whose files are not there (a download of the test pairs alone, or of the training set
    alone): nothing until it is used, then the loader's own error, naming what is missing. Evaluating
    on NYU's 654 test images must not need its training set on disk."""

    def __init__(self, error: FileNotFoundError):
        self.error = error

    def __len__(self) -> int:
        raise self.error

    def __getitem__(self, index: int):
        raise self.error


def split_or_absent(make) -> Dataset:
    try:
        return make()
    except FileNotFoundError as error:
        return AbsentSplit(error)
