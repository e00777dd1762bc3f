"""Calibration selection (depth strata, rare classes, determinism) and the files written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from calibration import ONNX2TF_SAMPLE, select_calibration, write_calibration
from distill.data.classes import IGNORE_INDEX
from distill.data.synthrooms import SynthRoomsDataset, generate
from distill.data.transforms import normalize

H, W = 16, 24
RARE = 9


class Tiny(Dataset):
    """16 images: constant depth 1..8 m (two images each); seg halves of classes 0 and 1 with an
    ignored stripe, one image also has the rare class RARE on 10% of its pixels."""

    def __init__(self, n: int = 16, rare_at: int = 5):
        self.n, self.rare_at = n, rare_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        depth = torch.full((1, H, W), float(1 + i // 2))
        depth[:, 0] = 0.0  # an invalid row
        seg = torch.zeros(H, W, dtype=torch.int64)
        seg[:, W // 2:] = 1 + i % 3  # classes 1..3
        seg[0] = IGNORE_INDEX
        if i == self.rare_at:
            seg[1:3, :W // 2] = RARE
        return {"image": normalize(rgb), "depth": depth, "valid": depth > 0, "seg": seg, "index": i}


def test_depth_bins_get_their_quota_and_rare_class_is_chosen():
    ds = Tiny()
    sel = select_calibration(ds, 8, depth_bins=4, progress=False)
    assert len(sel.indices) == len(set(sel.indices)) == 8
    assert sel.per_bin == [2, 2, 2, 2]
    assert sel.depth_bin_edges[0] == 1.0 and sel.depth_bin_edges[-1] == 8.0
    depths = sorted(1 + i // 2 for i in sel.indices)
    assert max(depths[:2]) <= 2 and min(depths[-2:]) >= 7  # nearest and farthest strata present
    for b in range(4):  # two candidates of each bin: depths 2b+1 .. 2b+2 m
        assert sum(2 * b + 1 <= 1 + i // 2 <= 2 * b + 2 for i in sel.indices) == 2
    assert 5 in sel.indices and sel.class_images[RARE] == 1
    assert 5 not in select_calibration(Tiny(rare_at=-1), 8, progress=False).indices  # rarity did it
    assert all(sel.class_images[c] > 0 for c in range(4))
    summary = sel.describe()
    assert summary["class_images"]["wall"] == sel.class_images[11] and summary["images"] == 8
    # uneven quotas still sum to size
    assert sum(select_calibration(ds, 7, depth_bins=3, progress=False).per_bin) == 7


def test_deterministic():
    ds = Tiny()
    a = select_calibration(ds, 6, candidates=12, progress=False)
    b = select_calibration(ds, 6, candidates=12, progress=False)
    assert a == b and a.candidates == 12


def test_bad_sizes_raise():
    ds = Tiny()
    with pytest.raises(ValueError, match="positive"):
        select_calibration(ds, 0, progress=False)
    with pytest.raises(ValueError, match="depth_bins"):
        select_calibration(ds, 4, depth_bins=0, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        select_calibration(ds, 4, num_classes=4, progress=False)  # RARE = 9 is out of range
    with pytest.raises(ValueError, match=r"17 exceeds the 16 candidate.*candidates"):
        select_calibration(ds, 17, progress=False)
    with pytest.raises(ValueError, match=r"9 exceeds the 8 candidate"):
        select_calibration(ds, 9, candidates=8, progress=False)


def test_write_calibration_files(tmp_path):
    ds = Tiny()
    sel = select_calibration(ds, 5, depth_bins=2, progress=False)
    paths = write_calibration(ds, sel, tmp_path / "calib")
    assert set(paths) == {"nhwc", "nchw", "onnx2tf_sample"}
    nhwc, nchw = np.load(paths["nhwc"]), np.load(paths["nchw"])
    assert nhwc.shape == (5, H, W, 3) and nchw.shape == (5, 3, H, W)
    assert nhwc.dtype == nchw.dtype == np.float32
    assert nchw.min() >= 0 and nchw.max() <= 1
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)
    for k, i in enumerate(sel.indices):  # de-normalisation round-trips the dataset's image
        back = normalize((nhwc[k] * 255).round().astype(np.uint8))
        torch.testing.assert_close(back, ds[i]["image"], atol=1e-5, rtol=0)
        renorm = (torch.from_numpy(nchw[k]) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        torch.testing.assert_close(renorm, ds[i]["image"], atol=1e-5, rtol=0)
    sample = np.load(paths["onnx2tf_sample"])
    assert paths["onnx2tf_sample"].endswith(ONNX2TF_SAMPLE)
    assert sample.shape == (20, 128, 128, 3) and sample.dtype == np.float32
    assert 0 <= sample.min() and sample.max() <= 1
    np.testing.assert_array_equal(sample[0], sample[5])  # 5 images repeated cyclically
    assert not [p for p in (tmp_path / "calib").iterdir() if p.name.endswith(".tmp")]


def test_synthrooms(tmp_path):
    path = generate(tmp_path, num_train=40, num_val=4, height=64, width=96, seed=0, progress=False)
    ds = SynthRoomsDataset(path, "train", augment=False)
    sel = select_calibration(ds, 12, candidates=32, depth_bins=3, progress=False)
    assert sel.per_bin == [4, 4, 4] and sel.candidates == 32 and sel.stratified_by == ["depth", "classes"]
    edges = sel.depth_bin_edges
    assert all(a <= b for a, b in zip(edges, edges[1:])) and 0 < edges[0] < edges[-1] < 20
    assert sel == select_calibration(ds, 12, candidates=32, depth_bins=3, progress=False)
    files = write_calibration(ds, sel, tmp_path / "calib")
    assert np.load(files["nchw"]).shape == (12, 3, 64, 96)
    assert np.load(files["onnx2tf_sample"]).shape == (20, 128, 128, 3)


def test_an_unlabelled_set_says_it_was_not_stratified():
    """An image folder has no depth and no labels: the draw cannot be stratified, and says so."""
    class Unlabelled(Tiny):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            return {**sample, "depth": torch.zeros(1, H, W), "seg": torch.full((H, W), IGNORE_INDEX)}

    sel = select_calibration(Unlabelled(), 6, progress=False)
    assert len(sel.indices) == 6 and sel.stratified_by == [] and sel.basis().startswith("not stratified")
    assert select_calibration(Tiny(), 8, progress=False).basis() == "stratified by depth and classes, per depth bin [2, 2, 2, 2]"
