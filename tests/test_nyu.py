"""NYU Depth V2 in its three layouts, on tiny files written in the real formats (nyu_fixtures.py)."""
import hashlib
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from nyu_fixtures import MARK, RAW_BANDS, H, W, frames, rgb_of, write_bts, write_h5, write_labeled
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import build_datasets
from distill.data.classes import IGNORE_INDEX, NYU13_NAMES, class_maps
from distill.data.nyu import NYU_INTRINSICS, NyuBTS, NyuH5, NyuLabeled
from distill.metrics import DepthMetrics
from distill.recipes import DataConfig

KEYS = {"image", "depth", "valid", "seg", "intrinsics", "index", "flipped"}


def check_schema(s: dict, h: int, w: int) -> None:
    assert set(s) == KEYS
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
    assert s["depth"].shape == (1, h, w) and s["depth"].dtype == torch.float32
    assert s["valid"].dtype == torch.bool and torch.equal(s["valid"], s["depth"] > 0)
    assert s["seg"].shape == (h, w) and s["seg"].dtype == torch.int64
    assert s["intrinsics"].shape == (4,) and s["intrinsics"].dtype == torch.float32
    assert torch.isfinite(s["depth"]).all()


def nyu13_via_json(raw: int) -> int:
    """The 13-class id of a raw id by walking the shipped json maps by hand (0-based, 255 = none)."""
    if raw == 0:
        return IGNORE_INDEX
    maps = class_maps()
    return maps["map_40_to_13"][maps["map_894_to_40"][raw - 1] - 1] - 1


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("nyu_mat"))


@pytest.fixture(scope="module")
def bts(tmp_path_factory) -> Path:
    return write_bts(tmp_path_factory.mktemp("nyu_bts"))


# ----------------------------------------------------------------------------- official labelled .mat

def test_labeled_orientation_split_mapping_and_units(labeled):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=H, width=W, augment=False))
    assert isinstance(train, NyuLabeled) and (len(train), len(val)) == (2, 1)
    expect = frames(3)
    for ds, images in ((train, (0, 2)), (val, (1,))):   # 1-based trainNdxs 1, 3 and testNdxs 2
        for i, j in enumerate(images):
            s, (rgb, depth) = ds[i], expect[j]
            check_schema(s, H, W)
            assert s["index"] == i and s["flipped"] is False
            out = rgb_of(s)
            assert tuple(out[0, 0]) == (10 + j, 20, 30) and tuple(out[H - 1, W - 1]) == (200, 100 + j, 50)
            assert np.array_equal(out, rgb)                       # a pixel-exact copy at 480x640
            assert s["depth"][0, MARK[0], MARK[1]] == 7.25 and s["depth"][0, 0, 0] == 2.0 + j   # metres
            assert torch.equal(s["intrinsics"], torch.tensor(NYU_INTRINSICS, dtype=torch.float32))
    hole = val[0]                                                 # validation: raw depth, holes invalid
    assert not hole["valid"][0, 100:110].any() and hole["valid"][0, :100].all()
    assert train[0]["valid"][0, 100:110].all()                    # training: filled depth
    assert val.depth == "raw" and train.depth == "filled"
    metrics = DepthMetrics(eigen_crop=True)   # a prediction equal to the ground truth: no error inside the crop
    metrics.update(hole["depth"][None], hole["depth"][None], hole["valid"][None])
    assert metrics.compute()["abs_rel"] == 0.0


def test_labeled_classes_894_to_40_to_13(labeled):
    train, _ = build_datasets(DataConfig(dataset=f"nyu-labeled:{labeled}", height=H, width=W, augment=False))
    seg = train[0]["seg"]
    band = W // len(RAW_BANDS)
    got = {raw: int(seg[7, k * band + band // 2]) for k, raw in enumerate(RAW_BANDS)}
    assert got == {raw: nyu13_via_json(raw) for raw in RAW_BANDS}
    assert [NYU13_NAMES[got[r]] for r in (21, 11, 5, 4, 7, 28, 894)] == [
        "wall", "floor", "chair", "ceiling", "furniture", "wall", "objects"]
    assert got[0] == IGNORE_INDEX and len(NYU13_NAMES) == 13
    assert (seg == seg[0]).all()   # bands are vertical: labels were not transposed


def test_labeled_content_hash_is_the_stored_array(labeled):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=64, width=96))
    with h5py.File(labeled, "r") as f:
        stored = [np.asarray(f["images"][j]) for j in range(3)]
    assert train.content_hash(1) == hashlib.sha256(stored[2].tobytes()).hexdigest()
    assert val.content_hash(0) == hashlib.sha256(stored[1].tobytes()).hexdigest()
    assert train.content_hash(0) != train.content_hash(1)


def test_labeled_resized_augmented_deterministic(labeled):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=96, width=128, seed=3))
    check_schema(train[0], 96, 128)
    assert set(torch.unique(val[0]["depth"]).tolist()) <= {0.0, 3.0, 7.25}   # nearest: no mixed holes
    assert val.augment is False and train.augment is True
    k = torch.tensor([518.8579 * 0.2, 519.4696 * 0.2, 325.5824 * 0.2, 253.7362 * 0.2])
    seen = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        a, b = train[0], train[0]
        assert torch.equal(a["image"], b["image"]) and a["flipped"] == b["flipped"]   # f(seed, epoch, index)
        kk = k.clone()
        if a["flipped"]:
            kk[2] = 128 - kk[2]
            assert torch.equal(a["seg"], torch.flip(unaugmented(train)[0]["seg"], [1]))
        assert torch.allclose(a["intrinsics"], kk)
        seen.add(a["flipped"])
    assert seen == {True, False}


def unaugmented(ds: NyuLabeled) -> NyuLabeled:
    clone = pickle.loads(pickle.dumps(ds))   # also checks that a dataset pickles (spawned workers)
    clone.augment = False
    return clone


def test_labeled_options_and_errors(labeled, tmp_path, monkeypatch):
    raw_train = NyuLabeled(labeled, "train", depth="raw", size=(H, W))
    assert not raw_train[0]["valid"][0, 100:110].any()
    with pytest.raises(ValueError, match="depth='holes'.*filled.*raw"):
        NyuLabeled(labeled, "train", depth="holes")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        NyuLabeled(labeled, "dev")
    lonely = tmp_path / "nyu_depth_v2_labeled.mat"
    lonely.write_bytes(labeled.read_bytes())
    with pytest.raises(FileNotFoundError, match="splits.mat is missing"):
        build_datasets(DataConfig(dataset=f"nyu:{lonely}", height=H, width=W))
    assert len(NyuLabeled(lonely, "val", splits=labeled.with_name("splits.mat"))) == 1   # given explicitly
    capped_train, capped_val = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=32, width=32,
                                                         num_train=1, num_val=1))
    assert (len(capped_train), len(capped_val)) == (1, 1)
    assert capped_train.content_hash(0) == NyuLabeled(labeled, "train").content_hash(0)   # the first N
    # SynthRooms trains, NYU validates: every NYU test image, and SynthRooms renders one unused one
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    _, nyu_val = build_datasets(DataConfig(dataset="synthrooms", val_dataset=f"nyu:{labeled}", height=32, width=32,
                                           num_train=2, num_val=None), progress=False)
    assert len(nyu_val) == len(NyuLabeled(labeled, "val"))


def test_labeled_rejects_unreversed_axes_and_bad_splits(tmp_path):
    small = write_labeled(tmp_path / "ok", n=2, train=(1,), test=(2,), h=24, w=32)
    s = NyuLabeled(small, "val", size=(24, 32))[0]            # a small file: intrinsics scaled to it
    assert torch.allclose(s["intrinsics"], torch.tensor(NYU_INTRINSICS) / 20)
    with h5py.File(tmp_path / "wrong.mat", "w") as f:        # (N, H, W, 3) as numpy would write it
        f["images"] = np.zeros((2, 24, 32, 3), np.uint8)
        for key in ("depths", "rawDepths", "labels"):
            f[key] = np.zeros((2, 24, 32), np.float32)
    with pytest.raises(ValueError, match=r"images \(N, 3, 640, 480\)"):
        NyuLabeled(tmp_path / "wrong.mat", "train")
    bad = write_labeled(tmp_path / "bad", n=2, train=(0, 1), test=(2,), h=24, w=32)   # 0 is not 1-based
    with pytest.raises(ValueError, match="1-based integers in 1..2"):
        NyuLabeled(bad, "train")
    with pytest.raises(FileNotFoundError, match="is a folder; pass the official nyu_depth_v2_labeled.mat inside it"):
        NyuLabeled(small.parent, "train")
    splits = small.with_name("splits.mat")   # downloads cut short: scipy's and h5py's errors name neither file
    splits.write_bytes(splits.read_bytes()[: splits.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"splits.mat cannot be read .*truncated or damaged; download the official"):
        NyuLabeled(small, "train")
    small.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"nyu_depth_v2_labeled.mat is truncated .*download"):
        NyuLabeled(small, "train")


def test_labeled_dataloader_workers_reopen_the_file(labeled):
    train, _ = build_datasets(DataConfig(dataset=f"nyu:{labeled}", height=32, width=32, augment=False))
    train.content_hash(0)                                     # the parent opened the HDF5 file
    batches = list(DataLoader(train, batch_size=2, num_workers=2))
    assert batches[0]["image"].shape == (2, 3, 32, 32) and batches[0]["index"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- BTS sync layout

def test_bts_train_leading_slashes_crop_focal_and_none_lines(bts):
    train, val = build_datasets(DataConfig(dataset=f"nyu:{bts}", height=427, width=565, augment=False))
    assert isinstance(train, NyuBTS) and (len(train), len(val), train.skipped) == (2, 1, 1)
    assert not any(Path(p).is_absolute() for item in train.items for p in item[:2])
    s = train[0]                                              # crop size = output size: no resize
    check_schema(s, 427, 565)
    assert s["depth"][0, 0, 0] == pytest.approx(1.234) and s["depth"][0, -1, -1] == pytest.approx(4.321)
    assert not torch.isclose(s["depth"], torch.tensor(9.999)).any()   # the row/column just outside: cut
    with Image.open(bts / "sync/kitchen_0028b/rgb_00045.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb_of(s), decoded[45:472, 43:608])
    assert np.abs(decoded.astype(int) - frames(1)[0][0]).mean() < 2   # JPEG is lossy: loosely
    expect = torch.tensor([518.8579, 518.8579, 325.5824 - 43, 253.7362 - 45])   # focal column: fx = fy
    assert torch.allclose(s["intrinsics"], expect)
    assert torch.allclose(train[1]["intrinsics"][:2], torch.tensor([500.0, 500.0]))
    assert train[1]["depth"][0, 200, 200] == 3.0             # uint16 mm -> metres
    full, _ = build_datasets(DataConfig(dataset=f"nyu-bts:{bts}", height=H, width=W, augment=False))
    assert torch.allclose(full[0]["intrinsics"], expect * torch.tensor([640 / 565, 480 / 427, 640 / 565, 480 / 427]))


def test_bts_test_split_is_exact_at_480x640(bts):
    _, val = build_datasets(DataConfig(dataset=f"nyu:{bts}", height=H, width=W))
    t = val[0]
    check_schema(t, H, W)
    assert t["depth"][0, MARK[0], MARK[1]] == 7.25 and t["depth"][0, 0, 0] == 4.0
    assert (t["seg"] == IGNORE_INDEX).all() and val.base == bts / "official_splits" / "test"
    jpg = bts / "official_splits/test/bathroom/rgb_00045.jpg"
    with Image.open(jpg) as im:
        assert np.array_equal(rgb_of(t), np.asarray(im.convert("RGB")))
    image_hash = hashlib.sha256(jpg.read_bytes()).hexdigest()
    assert val.content_hash(0) == hashlib.sha256(f"{image_hash} focal 518.8579".encode()).hexdigest()
    val.items[0] = (*val.items[0][:2], 600.0)   # a corrected list: the same image, other metres for da3-metric
    assert val.content_hash(0) != hashlib.sha256(f"{image_hash} focal 518.8579".encode()).hexdigest()


def test_bts_other_folders_and_missing_files(tmp_path):
    root = write_bts(tmp_path / "bts", test_dir="test", lists_dir="train_test_inputs")
    train, val = build_datasets(DataConfig(dataset=f"nyu:{root}", height=64, width=96))
    assert val.base == root / "test" and len(train) == 2
    (root / "test/bathroom/sync_depth_00045.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files listed in .*nyudepthv2_test_files_with_gt.txt are "
                                                r"missing .*sync_depth_00045.png"):
        NyuBTS(root, "val")
    depth_8bit = root / "sync/kitchen_0028b/sync_depth_00045.png"   # a re-saved preview, not millimetres
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(depth_8bit)
    with pytest.raises(ValueError, match=r"sync_depth_00045.png should be a 16-bit single-channel PNG of "
                                         r"480x640 \(millimetres\), got uint8"):
        train[0]
    (root / "train_test_inputs/nyudepthv2_train_files_with_gt.txt").write_text("/a/rgb_1.jpg\n")
    with pytest.raises(ValueError, match=r"nyudepthv2_train_files_with_gt.txt:1: expected 'rgb depth focal'"):
        NyuBTS(root, "train")


# ----------------------------------------------------------------------------- FastDepth / TFDS h5

def test_fastdepth_h5_exact_and_unlabelled(tmp_path):
    root = write_h5(tmp_path / "nyudepthv2")
    train, val = build_datasets(DataConfig(dataset=f"nyu:{root}", height=H, width=W, augment=False))
    assert isinstance(train, NyuH5) and (len(train), len(val)) == (2, 1)
    (rgb0, _), (rgb1, _), (rgb2, _) = frames(3)
    for s, rgb, j in ((train[0], rgb0, 0), (train[1], rgb1, 1), (val[0], rgb2, 2)):
        check_schema(s, H, W)
        assert np.array_equal(rgb_of(s), rgb) and s["depth"][0, MARK[0], MARK[1]] == 7.25
        assert s["depth"][0, 0, 0] == 2.0 + j and (s["seg"] == IGNORE_INDEX).all()
    assert val.content_hash(0) == hashlib.sha256((root / "val/official/00001.h5").read_bytes()).hexdigest()
    with h5py.File(root / "train/scene_0000/00000.h5", "a") as f:   # another conversion's millimetres
        millimetres = (np.asarray(f["depth"]) * 1000).astype(np.uint16)
        del f["depth"]
        f["depth"] = millimetres
    with pytest.raises(ValueError, match="depth is uint16, where the FastDepth archive stores float metres"):
        train[0]
    with h5py.File(root / "train/scene_0000/00000.h5", "a") as f:   # millimetres stored as floats
        del f["depth"]
        f["depth"] = millimetres.astype(np.float32)
    with pytest.raises(ValueError, match="depth has a median of 2000, where NYU's rooms are 0.5-10 m; most likely float millimetres"):
        train[0]
    with h5py.File(root / "train/scene_0000/00000.h5", "a") as f:
        del f["depth"]
    with pytest.raises(ValueError, match="lacks rgb or depth"):
        train[0]
    cut = train.items[1]   # a download cut short: h5py's error does not name the file
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"^{cut} cannot be read \\(OSError: .*truncated or damaged file"):
        train[1]


def test_a_truncated_bts_image_and_the_labelled_samples_are_named(bts, labeled, tmp_path):
    """PIL's error on a cut file names no file; hours into training or labelling a cache, the user must
    know which of ~24,000 pairs to fetch again. cache_teacher's messages name a sample the same way."""
    import shutil

    from distill.cache_teacher import sample_source
    root = Path(shutil.copytree(bts, tmp_path / "bts"))
    train = NyuBTS(root, "train")
    rgb = train.base / train.items[1][0]
    rgb.write_bytes(rgb.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{rgb} cannot be read \\(OSError: "):   # the file itself, not the pair
        train[1]
    assert sample_source(train, 1).startswith(f"{rgb} or ")
    depth = train.base / train.items[0][1]
    depth.write_bytes(depth.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{depth} cannot be read \\(OSError: "):
        train[0]
    # the labelled set's items are a numpy array: sample_source once asked it for a truth value
    val = NyuLabeled(labeled, "val")
    assert sample_source(val, 0) == f"{labeled} image {int(val.items[0]) + 1} (1-based)"


def test_a_downscaled_bts_copy_is_refused_not_read_with_480x640_intrinsics(bts, tmp_path):
    """BTS's focal lengths and crop are in 480x640 pixels: read from a 240x320 copy they gave a test
    sample fx 518.9 instead of about 259 (da3-metric's metres scale with it), silently."""
    import shutil
    root = Path(shutil.copytree(bts, tmp_path / "small"))
    for path in (root / "official_splits" / "test" / "bathroom").iterdir():
        with Image.open(path) as im:
            im.resize((320, 240), Image.NEAREST).save(path)
    val = NyuBTS(root, "val", size=(240, 320))
    with pytest.raises(ValueError, match=r"rgb_00045.jpg is 240x320; BTS's lists, focal lengths and crop are defined "
                                         r"at 480x640: use the original files"):
        val[0]


def test_either_split_may_be_on_disk_alone(bts, tmp_path):
    """Evaluating on NYU's 654 test images (data.val_dataset=nyu:..., distill.evaluate) needed the
    ~24,000 training pairs (or 47,000 .h5 files) on disk too, and a training-only download could not
    train beside data.val_dataset=synthrooms. The missing split is named when, and only when, it is used."""
    import shutil

    from distill.data.nyu import build, detect_layout
    from distill.recipes.base import DataConfig

    cfg = DataConfig(height=H, width=W)
    test_only = Path(shutil.copytree(bts, tmp_path / "bts-test"))
    shutil.rmtree(test_only / "sync")
    (test_only / "nyudepthv2_train_files_with_gt.txt").unlink()
    train, val = build(test_only, cfg)
    assert detect_layout(test_only) == "nyu-bts" and len(val) == 1 and val[0]["depth"].shape[-2:] == (H, W)
    with pytest.raises(FileNotFoundError, match="expected the BTS file list"):
        len(train)
    h5 = write_h5(tmp_path / "h5")
    shutil.rmtree(h5 / "val")
    train, val = build(h5, cfg)   # the training set alone: its validation comes from data.val_dataset
    assert detect_layout(h5) == "nyu-h5" and len(train) == 2
    with pytest.raises(FileNotFoundError, match="no .h5 files under .*val"):
        val[0]
    with pytest.raises(FileNotFoundError, match="no .h5 files under .*val"):   # at once when it would validate
        build_datasets(DataConfig(dataset=f"nyu:{h5}", height=H, width=W))
    shutil.rmtree(h5 / "train")
    with pytest.raises(FileNotFoundError, match="is not a NYU Depth V2 layout"):
        build(h5, cfg)


def test_the_official_downloads_folder_is_read_as_the_labelled_set(labeled):
    """nyu:/data/nyu, the folder holding nyu_depth_v2_labeled.mat and splits.mat, as the docs' examples
    write it, was "not a NYU Depth V2 layout"."""
    from distill.data.nyu import build
    from distill.recipes.base import DataConfig

    assert labeled.name == "nyu_depth_v2_labeled.mat"
    train, val = build(labeled.parent, DataConfig(height=H, width=W))
    assert isinstance(val, NyuLabeled) and val.path == labeled and len(train) + len(val) == 3


# ----------------------------------------------------------------------------- layout detection

def test_unknown_layout_lists_the_three(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError, match="nyu-labeled: .*splits.mat.*nyu-bts: .*sync/.*nyu-h5: .*val/official"):
        build_datasets(DataConfig(dataset=f"nyu:{tmp_path / 'stuff'}", height=H, width=W))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(DataConfig(dataset=f"nyu:{tmp_path / 'nowhere'}", height=H, width=W))
    with pytest.raises(FileNotFoundError, match=r"no \.h5 files under"):
        build_datasets(DataConfig(dataset=f"nyu-h5:{tmp_path / 'stuff'}", height=H, width=W))
    with pytest.raises(ValueError, match="needs a path"):
        build_datasets(DataConfig(dataset="nyu", height=H, width=W))



def test_training_on_a_split_without_labels_weighs_depth_alone(tmp_path, monkeypatch, capsys):
    """BTS has no segmentation labels: Kendall's seg log-variance, fed a loss that is always 0,
    would fall every step until exp(-s) overflowed; the weighting balances depth alone instead."""
    from core import io
    from distill.run import main as run_main

    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    root = write_bts(tmp_path / "bts")
    assert run_main(["v3", f"data.dataset=nyu-bts:{root}", "model.student=mobilenetv3_small_050",
                     "model.decoder_channels=16", "data.height=64", "data.width=96", "train.batch_size=2",
                     "train.epochs=1", "eval.preview_images=0", f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 0
    assert "carry no segmentation labels; the seg head is not trained" in capsys.readouterr().out
    (run,) = (tmp_path / "runs").glob("v3-*")
    (record,) = io.read_jsonl(run / "metrics.jsonl")
    assert "weight_depth" in record["train"] and "weight_seg" not in record["train"]


def test_validating_on_nyu_reuses_the_rendered_synthrooms_training_set(labeled, tmp_path):
    """With data.val_dataset set, SynthRooms' own validation split goes unused; its size is part of
    the set's directory name, so asking for one image rendered every training scene again."""
    sized = {"height": 32, "width": 32, "num_train": 4}
    own, _ = build_datasets(DataConfig(dataset="synthrooms", num_val=3, root=str(tmp_path / "a"), **sized))
    train, val = build_datasets(DataConfig(dataset="synthrooms", val_dataset=f"nyu:{labeled}",
                                           root=str(tmp_path / "a"), **sized))
    assert train.path == own.path and isinstance(val, NyuLabeled)
    assert [p.name for p in (tmp_path / "a" / "synthrooms").iterdir() if p.is_dir()] == [own.path.name]
    fresh, _ = build_datasets(DataConfig(dataset="synthrooms", val_dataset=f"nyu:{labeled}",
                                         root=str(tmp_path / "b"), **sized))
    assert fresh.path.name.endswith("-4-1-v2")   # nothing rendered before: one validation scene
    # cache_teacher's training split is the same set (it called the loader with num_val=None: TypeError)
    from distill.cache_teacher import build_split
    labelled = build_split(DataConfig(dataset="synthrooms", val_dataset=f"nyu:{labeled}", root=str(tmp_path / "a"),
                                      **sized), "train", progress=False)
    assert len(labelled) == 4 and labelled.parts["train"].path == own.path
