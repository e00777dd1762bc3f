"""NYU Depth V2 layouts and image folders, on tiny files written in the real formats."""
import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from distill.data import build_datasets
from distill.data.classes import IGNORE_INDEX, NYU13_NAMES, class_maps, nyu13_id
from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distill.recipes import DataConfig

H, W = 480, 640


def rgb_of(sample) -> np.ndarray:
    """uint8 (H, W, 3) back from the normalised image."""
    x = sample["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def frames(n: int):
    """n distinct (rgb (H, W, 3) uint8, depth (H, W) m) pairs with marks at known places."""
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        rgb[0, 0] = (10 + i, 20, 30)             # top-left
        rgb[H - 1, W - 1] = (200, 100 + i, 50)   # bottom-right
        depth = np.full((H, W), 2.0 + i, np.float32)
        depth[5, 600] = 7.25                      # row 5, column 600: checks H/W are not swapped
        yield rgb, depth


# ----------------------------------------------------------------------------- official labelled .mat

@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyu_mat")
    n = 3
    imgs, deps = zip(*frames(n))
    labels = np.zeros((n, H, W), np.uint16)
    labels[:, :, :100] = 21     # raw "wall"
    labels[:, :, 100:200] = 11  # raw "floor"
    labels[:, :, 200:300] = 5   # raw "chair"
    raw = np.stack(deps).copy()
    raw[:, 100:110, :] = 0      # holes in raw depth only
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:   # MATLAB v7.3: axes reversed
        f["images"] = np.stack(imgs).transpose(0, 3, 2, 1)           # (N, 3, W, H)
        f["depths"] = np.stack(deps).transpose(0, 2, 1)
        f["rawDepths"] = raw.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    # 1-based MATLAB doubles, column vectors, as the real splits.mat
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1.0], [3.0]]), "testNdxs": np.array([[2.0]])})
    return root / "nyu_depth_v2_labeled.mat"


def test_labeled_mat_orientation_units_splits_and_classes(labeled):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=H, width=W, augment=False))
    assert (len(train), len(val)) == (2, 1)
    expect = list(frames(3))
    for ds, positions in ((train, (0, 2)), (val, (1,))):   # 1-based 1, 3 -> 0, 2; 2 -> 1
        for i, j in enumerate(positions):
            s, (rgb, depth) = ds[i], expect[j]
            assert np.array_equal(rgb_of(s), rgb)            # exact, top-left and bottom-right marks included
            assert s["depth"][0, 5, 600] == 7.25 and s["depth"].shape == (1, H, W)
            assert torch.allclose(s["intrinsics"], torch.tensor([518.8579, 519.4696, 325.5824, 253.7362]))
    s = val[0]                                              # validation: raw depth, holes invalid
    assert not s["valid"][0, 100:110].any() and s["valid"][0, 0:100].all()
    assert train[0]["valid"][0, 100:110].all()              # training: filled depth
    seg = train[0]["seg"]
    assert seg[0, 50] == nyu13_id("wall") and seg[0, 150] == nyu13_id("floor") and seg[0, 250] == nyu13_id("chair")
    assert seg[0, 400] == IGNORE_INDEX
    maps = class_maps()   # the round trip through the shipped maps: raw 21 -> 40 "wall" -> 13 "wall"
    assert maps["names_40"][maps["map_894_to_40"][21 - 1] - 1] == "wall"
    assert NYU13_NAMES[maps["map_40_to_13"][maps["map_894_to_40"][21 - 1] - 1] - 1] == "wall"


def test_labeled_mat_resized_sample_and_hash(labeled):
    train, _ = build_datasets(DataConfig(dataset=f"nyu-labeled:{labeled}", height=96, width=128, augment=True))
    s = train[0]
    assert s["image"].shape == (3, 96, 128) and s["seg"].shape == (96, 128) and s["depth"].shape == (1, 96, 128)
    assert torch.isclose(s["intrinsics"][0], torch.tensor(518.8579 * 128 / 640))
    assert train.content_hash(0) != train.content_hash(1) and len(train.content_hash(0)) == 64


def test_labeled_mat_needs_splits(tmp_path, labeled):
    lonely = tmp_path / "nyu_depth_v2_labeled.mat"
    lonely.write_bytes(labeled.read_bytes())
    with pytest.raises(FileNotFoundError, match="splits.mat"):
        build_datasets(DataConfig(dataset=f"nyu:{lonely}", height=H, width=W))


# ----------------------------------------------------------------------------- BTS sync layout

def write_pair(folder: Path, n: int, rgb: np.ndarray, depth: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / f"rgb_{n:05d}.jpg", quality=100)
    Image.fromarray((depth * 1000).round().astype(np.uint16)).save(folder / f"sync_depth_{n:05d}.png")


@pytest.fixture(scope="module")
def bts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyu_bts")
    (rgb0, d0), (rgb1, d1), (rgb2, d2) = frames(3)
    write_pair(root / "sync" / "kitchen_0028b", 45, rgb0, d0)
    write_pair(root / "sync" / "office_0003", 7, rgb1, d1)
    (root / "nyudepthv2_train_files_with_gt.txt").write_text(
        "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579\n"
        "/office_0003/rgb_00007.jpg None 518.8579\n"
        "/office_0003/rgb_00007.jpg /office_0003/sync_depth_00007.png 500.0\n")
    write_pair(root / "official_splits" / "test" / "bathroom", 45, rgb2, d2)
    (root / "nyudepthv2_test_files_with_gt.txt").write_text("bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n")
    return root


def test_bts_lists_with_leading_slashes_units_crop_and_focal(bts):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{bts}", height=H, width=W, augment=False))
    assert (len(train), len(val), train.skipped) == (2, 1, 1)       # the "None" line skipped and counted
    s = train[1]
    # BTS crop (top 45, left 43, bottom 472, right 608) resized back to 480x640: the 7.25 m mark at
    # (5, 600) is cut away, the flat 3 m (frame 1) stays, in metres from millimetres
    assert torch.allclose(s["depth"], torch.full_like(s["depth"], 3.0))
    assert torch.isclose(s["intrinsics"][0], torch.tensor(500.0 * 640 / 565))     # focal column, cropped + resized
    t = val[0]                                             # test: not cropped, raw 16-bit PNG, exact
    assert t["depth"][0, 5, 600] == 7.25 and t["depth"][0, 0, 0] == 4.0
    with Image.open(bts / "official_splits/test/bathroom/rgb_00045.jpg") as im:   # JPEG is lossy: the decode
        assert np.array_equal(rgb_of(t), np.asarray(im.convert("RGB")))
    assert val.content_hash(0) == hashlib.sha256((bts / "official_splits/test/bathroom/rgb_00045.jpg").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- FastDepth / TFDS h5

def test_fastdepth_h5_layout(tmp_path):
    (rgb0, d0), (rgb1, d1) = frames(2)
    for folder, rgb, depth in ((tmp_path / "train" / "bedroom_0001", rgb0, d0), (tmp_path / "val" / "official", rgb1, d1)):
        folder.mkdir(parents=True)
        with h5py.File(folder / "00001.h5", "w") as f:
            f["rgb"] = rgb.transpose(2, 0, 1)    # (3, 480, 640)
            f["depth"] = depth
    train, val = build_datasets(DataConfig(dataset=f"nyu:{tmp_path}", height=H, width=W, augment=False))
    assert np.array_equal(rgb_of(train[0]), rgb0) and np.array_equal(rgb_of(val[0]), rgb1)
    assert val[0]["depth"][0, 5, 600] == 7.25 and (val[0]["seg"] == IGNORE_INDEX).all()


def test_unknown_layout_lists_the_three(tmp_path):
    with pytest.raises(FileNotFoundError, match="FastDepth"):
        build_datasets(DataConfig(dataset=f"nyu:{tmp_path}", height=H, width=W))


# ----------------------------------------------------------------------------- unlabelled folders

def test_folder_skips_corrupt_files_untouched(tmp_path, labeled):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    good = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(good).save(images / "a.png")
    Image.fromarray(good).save(images / "sub" / "b.jpg")
    full = (images / "sub" / "b.jpg").read_bytes()
    (images / "sub" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    before = {p: p.read_bytes() for p in images.rglob("*")  if p.is_file()}
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        train, val = build_datasets(DataConfig(dataset=f"folder:{images}", val_dataset=f"nyu:{labeled}",
                                               height=64, width=96))
    assert len(train) == 2 and len(train.skipped) == 3 and len(val) == 1
    assert {Path(p).name for p, _ in train.skipped} == {"truncated.jpg", "empty.png", "notes.jpg"}
    assert before == {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    s = train[0]
    assert not s["valid"].any() and (s["seg"] == IGNORE_INDEX).all() and torch.isnan(s["intrinsics"]).all()
    (images / "intrinsics.json").write_text('{"fx": 80, "fy": 80, "cx": 39.5, "cy": 29.5, "width": 80, "height": 60}')
    with pytest.warns(UserWarning):
        train, _ = build_datasets(DataConfig(dataset=f"folder:{images}", val_dataset=f"nyu:{labeled}", height=64, width=96))
    assert torch.allclose(train[0]["intrinsics"], torch.tensor([96.0, 80 * 64 / 60, 47.5, 31.5]))


def test_folder_needs_a_validation_dataset(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="data.val_dataset"):
        build_datasets(DataConfig(dataset=f"folder:{tmp_path}", height=32, width=32))


def test_v3_trains_on_the_labelled_mat(tmp_path, labeled):
    from distill.run import main

    assert main(["v3", f"data.dataset=nyu:{labeled}", "data.height=64", "data.width=96", "train.batch_size=2",
                 "train.epochs=1", "model.student=mobilenetv3_small_050", "model.decoder_channels=16",
                 "eval.preview_images=1", f"out_dir={tmp_path}", "--quiet"]) == 0
