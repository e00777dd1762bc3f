"""Writers of tiny NYU Depth V2 files in the real layouts (shared/NYU.md), for tests.

Frames carry marks at known places so orientation errors show: rgb (0, 0) = (10 + i, 20, 30)
(top-left), rgb (H-1, W-1) = (200, 100 + i, 50) (bottom-right), depth (5, W-40) = 7.25 m (near
the top-right: a transposed or flipped read moves it).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io
import torch
from PIL import Image

from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD

H, W = 480, 640
MARK = (5, W - 40)   # (row, col) of the 7.25 m depth mark at 480x640
# Raw NYU label ids (1..894) painted in bands of 40 columns: wall, floor, chair, ceiling,
# counter (40: counter -> 13: furniture), door (-> wall), the last raw id, 0 = unlabelled.
RAW_BANDS = (21, 11, 5, 4, 7, 28, 894, 0)


def rgb_of(sample: dict) -> np.ndarray:
    """uint8 (H, W, 3) back from a sample's normalised image (exact for 8-bit sources)."""
    x = sample["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def frames(n: int, h: int = H, w: int = W) -> list[tuple[np.ndarray, np.ndarray]]:
    """n distinct (rgb uint8 (h, w, 3), depth float32 (h, w) metres) pairs with the marks."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[0, 0], rgb[h - 1, w - 1] = (10 + i, 20, 30), (200, 100 + i, 50)
        depth = np.full((h, w), 2.0 + i, np.float32)
        depth[5, w - 40] = 7.25
        out.append((rgb, depth))
    return out


def raw_labels(h: int = H, w: int = W) -> np.ndarray:
    """uint16 (h, w) raw ids in vertical bands of w // len(RAW_BANDS) columns."""
    labels = np.zeros((h, w), np.uint16)
    band = w // len(RAW_BANDS)
    for k, raw in enumerate(RAW_BANDS):
        labels[:, k * band:(k + 1) * band] = raw
    return labels


def write_labeled(root: Path, n: int = 3, train: tuple[int, ...] = (1, 3), test: tuple[int, ...] = (2,),
                  h: int = H, w: int = W) -> Path:
    """`root/nyu_depth_v2_labeled.mat` (HDF5, MATLAB's reversed axes) + `root/splits.mat` (v5,
    1-based doubles in (k, 1) columns). rawDepths = depths with rows 100:110 zeroed (holes)."""
    root.mkdir(parents=True, exist_ok=True)
    imgs, deps = zip(*frames(n, h, w))
    depths = np.stack(deps)
    raw = depths.copy()
    raw[:, 100:110] = 0
    labels = np.stack([raw_labels(h, w)] * n)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = np.stack(imgs).transpose(0, 3, 2, 1)    # (N, H, W, 3) -> (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)               # (N, W, H)
        f["rawDepths"] = raw.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array(train, np.float64)[:, None],
                                           "testNdxs": np.array(test, np.float64)[:, None]})
    return root / "nyu_depth_v2_labeled.mat"


def write_pair(folder: Path, n: int, rgb: np.ndarray, depth: np.ndarray) -> None:
    """BTS files `rgb_%05d.jpg` (quality 100, 4:4:4) + `sync_depth_%05d.png` (uint16 millimetres)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / f"rgb_{n:05d}.jpg", quality=100, subsampling=0)   # near lossless
    Image.fromarray((depth * 1000).round().astype(np.uint16)).save(folder / f"sync_depth_{n:05d}.png")


def write_bts(root: Path, test_dir: str = "official_splits/test", lists_dir: str = "") -> Path:
    """A BTS root: two training pairs in sync/ listed with leading slashes plus one "None" line,
    one test pair under `test_dir`. Training frame 0 marks BTS's crop corners in depth:
    (45, 43) = 1.234 m, (471, 607) = 4.321 m, (44, 43) and (45, 42) = 9.999 m (just outside)."""
    (rgb0, d0), (rgb1, d1), (rgb2, d2) = frames(3)
    d0 = d0.copy()
    d0[45, 43], d0[471, 607], d0[44, 43], d0[45, 42] = 1.234, 4.321, 9.999, 9.999
    write_pair(root / "sync" / "kitchen_0028b", 45, rgb0, d0)
    write_pair(root / "sync" / "office_0003", 7, rgb1, d1)
    write_pair(root / test_dir / "bathroom", 45, rgb2, d2)
    lists = root / lists_dir
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "nyudepthv2_train_files_with_gt.txt").write_text(
        "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579\n"
        "/office_0003/rgb_00007.jpg None 518.8579\n"
        "/office_0003/rgb_00007.jpg /office_0003/sync_depth_00007.png 500.0\n")
    (lists / "nyudepthv2_test_files_with_gt.txt").write_text(
        "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n")
    return root


def write_h5(root: Path, n_train: int = 2) -> Path:
    """FastDepth layout: train/<scene>/<NNNNN>.h5 (frames 0..n_train-1) and val/official/00001.h5
    (frame n_train), keys rgb (3, 480, 640) uint8 and depth (480, 640) float32 metres."""
    pairs = frames(n_train + 1)
    targets = [root / "train" / f"scene_{i:04d}" / f"{i:05d}.h5" for i in range(n_train)]
    targets.append(root / "val" / "official" / "00001.h5")
    for path, (rgb, depth) in zip(targets, pairs):
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f["rgb"] = rgb.transpose(2, 0, 1)
            f["depth"] = depth
    return root
