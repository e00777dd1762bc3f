"""Unlabelled image folders: corrupt files skipped and left untouched, schema, intrinsics, registry."""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nyu_fixtures import rgb_of, write_labeled
from PIL import Image

from distill.data import build_datasets
from distill.data.classes import IGNORE_INDEX
from core.images import upright_rgb
from distill.data.folder import EXTENSIONS, ImageFolder
from distill.data.nyu import NyuLabeled
from distill.data.transforms import denormalize
from distill.recipes import DataConfig

KEYS = {"image", "depth", "valid", "seg", "intrinsics", "index", "flipped"}


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under `folder`: what "left untouched" means."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def images(tmp_path) -> Path:
    """Two good images (60x80), one upper-case .JPG, and three broken files in a subdirectory."""
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    good = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    good[0, 0] = (1, 2, 3)
    Image.fromarray(good).save(root / "a.png")
    Image.fromarray(good).save(root / "sub" / "B.JPG", quality=95)
    Image.fromarray(good[:, ::-1]).save(root / "sub" / "deeper" / "c.webp", lossless=True)
    full = (root / "sub" / "B.JPG").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "sub" / "deeper" / "notes.jpg").write_text("not an image")
    (root / "README.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("nyu_small"), n=2, train=(1,), test=(2,), h=48, w=64)


def test_corrupt_files_skipped_counted_reported_untouched(images):
    before = digest(images)
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image files") as caught:
        ds = ImageFolder(images, size=(64, 96))
    assert "\n" not in str(caught[0].message)                      # one line
    assert [Path(p).relative_to(images).as_posix() for p in ds.files] == ["a.png", "sub/B.JPG", "sub/deeper/c.webp"]
    reasons = {Path(p).name: reason for p, reason in ds.skipped}
    assert set(reasons) == {"empty.png", "truncated.jpg", "notes.jpg"}
    assert "UnidentifiedImageError" in reasons["empty.png"] and "UnidentifiedImageError" in reasons["notes.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert digest(images) == before                                  # nothing modified, moved or deleted


def test_sample_schema_and_unknown_intrinsics(images):
    with pytest.warns(UserWarning):
        ds = ImageFolder(images, size=(64, 96))
    s = ds[0]
    assert set(s) == KEYS and s["index"] == 0 and s["flipped"] is False
    assert s["image"].shape == (3, 64, 96) and s["image"].dtype == torch.float32
    assert s["depth"].shape == (1, 64, 96) and (s["depth"] == 0).all() and not s["valid"].any()
    assert s["seg"].shape == (64, 96) and s["seg"].dtype == torch.int64 and (s["seg"] == IGNORE_INDEX).all()
    assert s["intrinsics"].shape == (4,) and torch.isnan(s["intrinsics"]).all()
    assert ds.content_hash(1) == hashlib.sha256((images / "sub" / "B.JPG").read_bytes()).hexdigest()
    with pytest.warns(UserWarning):
        same = ImageFolder(images, size=(60, 80))
    assert tuple(rgb_of(same[0])[0, 0]) == (1, 2, 3)                 # the PNG, exact at its own size


def test_intrinsics_json_scaled_to_the_output_and_flipped(images):
    (images / "intrinsics.json").write_text(json.dumps({"fx": 100, "fy": 90, "cx": 40, "cy": 30,
                                                        "width": 160, "height": 120}))
    with pytest.warns(UserWarning):   # given at 160x120 for 80x60 files, output 64x96
        ds = ImageFolder(images, size=(64, 96), augment=True, seed=1)
    expect = torch.tensor([100 * 96 / 160, 90 * 64 / 120, 40 * 96 / 160, 30 * 64 / 120])
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[0]
        k = expect.clone()
        k[2] = 96 - k[2] if s["flipped"] else k[2]
        assert torch.allclose(s["intrinsics"], k)
        assert torch.equal(ds[0]["image"], s["image"])             # a function of (seed, epoch, index)
        flips.add(s["flipped"])
    assert flips == {True, False}
    # the camera is part of an image's content for a cache: da3-metric's labels scale with fx
    (images / "intrinsics.json").write_text(json.dumps({"fx": 110, "fy": 90, "cx": 40, "cy": 30,
                                                        "width": 160, "height": 120}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corrected = ImageFolder(images, size=(64, 96))
        (images / "intrinsics.json").unlink()
        plain = ImageFolder(images, size=(64, 96))
    assert len({ds.content_hash(0), corrected.content_hash(0), plain.content_hash(0)}) == 3


def test_intrinsics_json_errors(images, tmp_path):
    (images / "intrinsics.json").write_text('{"fx": 100, "fy": 90, "cx": 40}')
    with pytest.raises(ValueError, match=r"intrinsics.json must be a JSON object with numbers fx, fy, cx, cy, "
                                         r"width, height"):
        ImageFolder(images, size=(64, 96))
    (images / "intrinsics.json").write_text(json.dumps({"fx": 100, "fy": 90, "cx": 40, "cy": 30,
                                                        "width": 120, "height": 160}))   # portrait camera
    with pytest.raises(ValueError, match=r"a.png is 80x60 but .*intrinsics.json describes 120x160"):
        ImageFolder(images, size=(64, 96))


def test_empty_folder_and_limit(images, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="1 unreadable skipped") as err:
        ImageFolder(tmp_path / "broken", size=(32, 32))
    assert str(tmp_path / "broken") in str(err.value) and ".jpg, .jpeg, .png, .bmp, .webp" in str(err.value)
    assert EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", size=(32, 32))
    one = ImageFolder(images, size=(32, 32), limit=1)               # stops before the broken files
    assert len(one) == 1 and one.skipped == []


def test_registry_needs_a_validation_dataset(images, labeled):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="set data.val_dataset"):
        build_datasets(DataConfig(dataset=f"folder:{images}", height=32, width=64))
    with pytest.raises(ValueError, match="data.val_dataset=folder:.*an image folder has no ground truth"):
        build_datasets(DataConfig(dataset=f"nyu:{labeled}", val_dataset=f"folder:{images}", height=32, width=64))
    with pytest.raises(ValueError, match="data.val_dataset='nyu' needs a path"):   # not data.dataset's
        build_datasets(DataConfig(dataset=f"folder:{images}", val_dataset="nyu", height=32, width=64))
    with pytest.warns(UserWarning):
        train, val = build_datasets(DataConfig(dataset=f"folder:{images}", val_dataset=f"nyu:{labeled}",
                                               height=32, width=64, num_train=2))
    assert isinstance(train, ImageFolder) and len(train) == 2 and train.augment is True
    assert isinstance(val, NyuLabeled) and len(val) == 1 and val[0]["depth"].shape == (1, 32, 64)
    assert val[0]["valid"].any() and (val[0]["seg"] != IGNORE_INDEX).any()


def test_sixteen_bit_images_keep_their_range(tmp_path):
    ramp = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)   # 0 .. 61430
    Image.fromarray(ramp).save(tmp_path / "deep.png")   # a 16-bit grey PNG (mode I;16)
    sample = ImageFolder(tmp_path, size=(64, 96))[0]
    rgb = denormalize(sample["image"])
    assert rgb.max() > 200 and (rgb == 255).mean() < 0.01   # PIL's convert("RGB") made 99.7% of it 255
    assert np.abs(rgb[..., 0].astype(int) - np.rint(ramp / 257).astype(int)).max() <= 1


def test_huge_images_are_skipped_with_the_reason_and_jpegs_decode_reduced(tmp_path, monkeypatch):
    import distill.data.folder as folder

    Image.new("RGB", (800, 600), (90, 120, 150)).save(tmp_path / "a_big.jpg", quality=95)
    Image.new("RGB", (800, 600), (90, 120, 150)).save(tmp_path / "a_big.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "b_small.png")
    monkeypatch.setattr(folder, "MAX_MEGAPIXELS", 0.4)   # the big ones are 0.48 MP
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = ImageFolder(tmp_path, size=(32, 32))
    # the JPEG decodes at 1/8 scale (100x75), so only the PNG costs its whole size
    assert [p.name for p in ds.files] == ["a_big.jpg", "b_small.png"]
    assert Path(ds.skipped[0][0]).name == "a_big.png"
    assert "800x600 (as decoded) is 0 MP, above the 0 MP" in ds.skipped[0][1] and "downscale it once" in ds.skipped[0][1]
    assert ds[0]["image"].shape[-2:] == (32, 32)
    monkeypatch.setattr(folder, "MAX_MEGAPIXELS", 200.0)
    with Image.open(tmp_path / "a_big.jpg") as im:
        assert upright_rgb(im, (32, 32)).size == (100, 75)   # 1/8 scale still covers 2 x 32


def test_a_portrait_photo_is_turned_upright_with_its_intrinsics(tmp_path):
    """A phone stores a portrait photo on its side with EXIF orientation 6; intrinsics.json describes
    the stored (sensor) layout, 80x60 here. The sample is upright, 60x80, and its intrinsics too."""
    stored = np.zeros((60, 80, 3), np.uint8)
    stored[:, :40] = 255                      # the stored left half is the upright top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "portrait.png", exif=exif)
    (tmp_path / "intrinsics.json").write_text(json.dumps({"fx": 100, "fy": 90, "cx": 41, "cy": 29,
                                                          "width": 80, "height": 60}))
    s = ImageFolder(tmp_path, size=(80, 60))[0]
    rgb = denormalize(s["image"])
    assert (rgb[:38] > 250).all() and (rgb[42:] < 5).all()
    assert torch.allclose(s["intrinsics"], torch.tensor([90.0, 100.0, 60 - 29.0, 41.0]))


def test_an_image_cut_short_after_the_folder_was_read_is_named_with_the_fix(tmp_path):
    """PIL's "image file is truncated" names no file, and ended a training run with exit 1."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    ds = ImageFolder(tmp_path, size=(32, 32))
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])   # a sync still writing the folder
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a.jpg'} cannot be read \\(OSError: .*fix or remove it"):
        ds[0]
