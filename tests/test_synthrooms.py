"""SynthRooms: exact geometry, labels, determinism, files on disk and the dataset schema."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.classes import IGNORE_INDEX, NYU13_NAMES, nyu13_id
from distill.data.synthrooms import (
    VERSION,
    Box,
    Camera,
    Room,
    Scene,
    SynthRoomsDataset,
    generate,
    render,
    render_scene,
    scene_rng,
    store,
)
from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_rng, denormalize, normalize

H, W = 48, 64
NYU = (518.8579, 519.4696, 325.5824, 253.7362)


def _rays(camera: Camera, h: int, w: int) -> np.ndarray:
    """Unit world directions (h, w, 3) of pixel-centre rays, from NYU intrinsics scaled here."""
    fx, fy, cx, cy = NYU[0] * w / 640, NYU[1] * h / 480, NYU[2] * w / 640, NYU[3] * h / 480
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    d = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1) @ camera.rotation().T
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _points(camera: Camera, depth: np.ndarray) -> np.ndarray:
    """World points (h, w, 3) from a z-depth map, computed independently of the renderer."""
    d = _rays(camera, *depth.shape)
    fwd = camera.rotation()[:, 2]
    return np.asarray(camera.position) + d * (depth / (d @ fwd))[..., None]


def test_camera_rotation_matches_its_angles():
    cam = Camera(position=(1, 1, 1), yaw=0.7, pitch=-0.3, roll=0.0)
    r = cam.rotation()
    assert np.allclose(r.T @ r, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    fwd = [math.sin(0.7) * math.cos(-0.3), math.sin(-0.3), math.cos(0.7) * math.cos(-0.3)]
    assert np.allclose(r[:, 2], fwd)
    assert abs(r[1, 0]) < 1e-12 and r[1, 1] < 0  # no roll: right is level, image y points down


def test_empty_room_depth_is_analytic_distance_to_planes():
    room = Room(width=4.0, height=2.7, depth=5.5)
    cam = Camera(position=(1.3, 1.4, 1.1), yaw=0.7, pitch=0.05, roll=0.04)
    out = render(Scene(room=room, objects=[]), cam, H, W)
    assert set(np.unique(out["seg"])) == {nyu13_id(n) for n in ("floor", "ceiling", "wall")}
    d = _rays(cam, H, W)
    o = np.asarray(cam.position)
    # t to each plane: floor y=0, ceiling y=H, walls z=0, x=W, z=D, x=0.
    planes = [(1, 0.0), (1, room.height), (2, 0.0), (0, room.width), (2, room.depth), (0, 0.0)]
    with np.errstate(divide="ignore"):
        t = np.stack([(c - o[a]) / d[..., a] for a, c in planes], -1)
    t = np.where(t > 0, t, np.inf)
    order = np.sort(t, -1)
    hit = np.argmin(t, -1)
    z_expected = order[..., 0] * (d @ cam.rotation()[:, 2])
    np.testing.assert_allclose(out["depth"], z_expected, atol=1e-4, rtol=0)
    names = np.array([nyu13_id("floor"), nyu13_id("ceiling")] + [nyu13_id("wall")] * 4)
    clear = order[..., 1] - order[..., 0] > 1e-5  # not exactly on an edge between two planes
    assert np.array_equal(out["seg"][clear], names[hit][clear])
    pts = _points(cam, out["depth"])
    assert np.abs(pts[..., 1][out["seg"] == nyu13_id("floor")]).max() < 1e-4
    assert np.abs(pts[..., 1][out["seg"] == nyu13_id("ceiling")] - room.height).max() < 1e-4


def test_box_in_front_of_camera_has_exact_depth_and_label():
    room = Room(width=4.0, height=2.7, depth=6.0)
    box = Box(center=(2.0, 1.2, 3.0), size=(1.0, 1.0, 0.5), label=nyu13_id("tv"))
    cam = Camera(position=(2.0, 1.2, 0.5))
    out = render(Scene(room=room, objects=[box]), cam, H, W)
    assert out["seg"][H // 2, W // 2] == nyu13_id("tv")
    assert abs(out["depth"][H // 2, W // 2] - 2.25) < 1e-5  # front face at z = 2.75


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_labels_consistent_with_geometry_in_furnished_rooms(index):
    out = render_scene(3, H, W, index=index)
    scene, cam, seg = out["scene"], out["camera"], out["seg"]
    pts = _points(cam, out["depth"].astype(np.float64))
    room = scene.room
    floor = pts[seg == nyu13_id("floor")]
    assert np.all((floor[:, 1] > -1e-3) & (floor[:, 1] < 0.006 + 1e-3))  # rugs 5 mm
    assert np.allclose(pts[seg == nyu13_id("ceiling")][:, 1], room.height, atol=1e-3)
    on_wall_plane = lambda p: ((np.abs(p[:, 0]) < 1e-3) | (np.abs(p[:, 0] - room.width) < 1e-3)
                               | (np.abs(p[:, 2]) < 1e-3) | (np.abs(p[:, 2] - room.depth) < 1e-3))
    for label in np.unique(seg):
        p = pts[seg == label]
        inside = np.zeros(len(p), bool)
        for box in scene.objects:
            if box.label == label:
                inside |= box.contains(p, tol=2e-3)
        if NYU13_NAMES[label] == "wall":
            inside |= on_wall_plane(p)  # doors are wall-labelled boxes
        if NYU13_NAMES[label] in ("floor", "ceiling"):
            continue
        assert inside.all(), f"{(~inside).sum()} {NYU13_NAMES[label]} pixels off their boxes"


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_scene(5, H, W, index=2), render_scene(5, H, W, index=2)
    for key in ("rgb", "depth", "seg", "intrinsics"):
        assert a[key].tobytes() == b[key].tobytes()
    assert render_scene(6, H, W, index=2)["rgb"].tobytes() != a["rgb"].tobytes()
    assert render_scene(5, H, W, index=3)["rgb"].tobytes() != a["rgb"].tobytes()
    assert render_scene(5, H, W, split="val", index=2)["rgb"].tobytes() != a["rgb"].tobytes()


def test_tile_size_changes_speed_not_the_image(monkeypatch):
    from distill.data.synthrooms import raycast
    a = render_scene(3, H, W, index=1)
    monkeypatch.setattr(raycast, "_TILE", 16)  # 48x64 pads to 4 rows of 16-pixel tiles
    b = render_scene(3, H, W, index=1)
    for key in ("rgb", "depth", "seg"):
        assert a[key].tobytes() == b[key].tobytes()


def test_class_mix_is_not_dominated_by_walls():
    """Version 2 furnishes rooms more densely and looks down more: walls fell from 48% to 40% of
    the CPU-default training pixels, chairs and objects rose by 60-70% (README, SynthRooms)."""
    counts = sum(np.bincount(render_scene(0, H, W, index=i)["seg"].ravel(), minlength=13)
                 for i in range(48))
    share = dict(zip(NYU13_NAMES, counts / counts.sum()))
    assert share["wall"] < 0.44, share
    assert share["chair"] > 0.025 and share["objects"] > 0.05 and share["furniture"] > 0.09, share
    assert min(share.values()) > 0.005, share  # every class appears


def test_output_ranges_and_intrinsics():
    classes = set()
    for i in range(6):
        out = render_scene(0, H, W, index=i)
        assert out["rgb"].dtype == np.uint8 and out["rgb"].shape == (H, W, 3)
        assert out["depth"].dtype == np.float32 and out["seg"].dtype == np.uint8
        assert out["depth"].min() > 0 and out["depth"].max() <= 12.0
        assert out["rgb"].std() > 5
        assert out["seg"].max() <= 12
        classes |= set(np.unique(out["seg"]).tolist())
        expected = [NYU[0] * W / 640, NYU[1] * H / 480, NYU[2] * W / 640, NYU[3] * H / 480]
        np.testing.assert_allclose(out["intrinsics"], expected, rtol=1e-6)
    assert len(classes) >= 7, classes


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="outside the room"):
        render(Scene(room=Room(3, 2.5, 3)), Camera(position=(5, 1, 1)), H, W)
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        render_scene(0, H, W, split="training")


# ---------------------------------------------------------------- files on disk


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate(root, num_train=6, num_val=2, height=H, width=W, seed=1, workers=1,
                    progress=False)


def test_generated_files_and_manifest(dataset_dir):
    assert dataset_dir.name == f"synthrooms-{H}x{W}-s1-6-2-v{VERSION}"
    m = json.loads((dataset_dir / "manifest.json").read_text())
    assert m["generator"] == "synthrooms" and m["version"] == VERSION
    assert m["classes"] == list(NYU13_NAMES) and m["depth"]["units"] == "mm in uint16 PNG"
    assert m["params"] == {"height": H, "width": W, "seed": 1, "num_train": 6, "num_val": 2}
    assert np.isclose(m["intrinsics"]["cx"], NYU[2] * W / 640)
    assert [len(m["splits"][s]["files"]) for s in ("train", "val")] == [6, 2]
    assert 0.3 < m["stats"]["train"]["depth_median_m"] < 10
    for split, n in (("train", 6), ("val", 2)):
        for i in range(n):
            entry = m["splits"][split]["files"][i]
            with Image.open(dataset_dir / entry["rgb"]) as im:
                assert im.mode == "RGB" and im.size == (W, H)
            with Image.open(dataset_dir / entry["depth"]) as im:
                assert im.mode == "I;16"
                mm = np.asarray(im)
            with Image.open(dataset_dir / entry["seg"]) as im:
                assert im.mode == "L"
                seg = np.asarray(im)
            ref = render_scene(1, H, W, split=split, index=i)
            assert np.abs(mm.astype(np.float64) / 1000 - ref["depth"]).max() <= 0.0005 + 1e-6
            assert np.array_equal(seg, ref["seg"])
            assert sorted(entry["classes"]) == sorted(np.unique(seg).tolist())
            assert np.isclose(entry["depth_median_m"], np.median(mm) / 1000, atol=1e-3)


def test_generate_is_reused_and_byte_identical_with_workers(dataset_dir, tmp_path, monkeypatch):
    other = generate(tmp_path, num_train=6, num_val=2, height=H, width=W, seed=1, workers=2,
                     progress=False)
    for f in sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*") if p.is_file()):
        assert (dataset_dir / f).read_bytes() == (other / f).read_bytes(), f
    different = generate(tmp_path, num_train=6, num_val=2, height=H, width=W, seed=2, workers=1,
                         progress=False)
    assert different != other
    assert (different / "train/rgb/00000.png").read_bytes() != (other / "train/rgb/00000.png"
                                                                 ).read_bytes()
    small = generate(tmp_path, num_train=3, num_val=1, height=H, width=W, seed=1, workers=1,
                     progress=False)  # image i does not depend on how many are generated
    for f in ("train/rgb/00002.png", "train/depth/00002.png", "val/seg/00000.png"):
        assert (small / f).read_bytes() == (other / f).read_bytes()
    monkeypatch.setattr(store, "_render_job", lambda job: pytest.fail("should reuse"))
    assert generate(tmp_path, num_train=6, num_val=2, height=H, width=W, seed=1,
                    progress=False) == other


def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch):
    real, calls = store._render_job, []

    def failing(job):
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("killed mid-way")
        return real(job)

    monkeypatch.setattr(store, "_render_job", failing)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        generate(tmp_path, num_train=4, num_val=1, height=H, width=W, workers=1, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []   # the lock file stays


def test_a_killed_renders_leftovers_are_removed_and_a_damaged_set_is_kept(tmp_path):
    name = store.dataset_name(**store._params(H, W, 0, 4, 1))
    leftover = tmp_path / f".{name}.tmp-12345"   # what SIGKILL mid-render leaves
    (leftover / "train" / "rgb").mkdir(parents=True)
    target = generate(tmp_path, num_train=4, num_val=1, height=H, width=W, workers=1, progress=False)
    assert not leftover.exists() and target.is_dir()
    for damage in ("{damaged", "[]"):   # not JSON; JSON but not an object
        (target / "manifest.json").write_text(damage)
        with pytest.raises(ValueError, match=r"manifest.json cannot be read .* delete .* to render it again"):
            generate(tmp_path, num_train=4, num_val=1, height=H, width=W, workers=1, progress=False)
    assert (target / "train" / "rgb").is_dir()   # nobody's data is deleted without a word


# ---------------------------------------------------------------- dataset


def test_dataset_sample_schema(dataset_dir):
    ds = SynthRoomsDataset(dataset_dir, "train")
    assert len(ds) == 6 and ds.manifest["version"] == VERSION
    s = ds[1]
    assert set(s) == {"image", "depth", "valid", "seg", "intrinsics", "index", "flipped"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, H, W)
    assert s["valid"].dtype == torch.bool and torch.equal(s["valid"], s["depth"] > 0)
    assert s["seg"].dtype == torch.int64 and s["seg"].shape == (H, W)
    assert s["intrinsics"].dtype == torch.float32 and s["intrinsics"].shape == (4,)
    assert s["index"] == 1 and int(s["seg"].max()) <= 12
    rgb = np.asarray(Image.open(dataset_dir / ds.files[1]["rgb"]))
    assert np.array_equal(denormalize(s["image"]), rgb)


def test_dataset_flip_and_determinism(dataset_dir):
    plain = SynthRoomsDataset(dataset_dir, "train")[2]
    aug = SynthRoomsDataset(dataset_dir, "train", augment=True, seed=7)
    flipped = unflipped = 0
    for epoch in range(12):
        aug.set_epoch(epoch)
        s = aug[2]
        if torch.equal(s["depth"], plain["depth"].flip(-1)):
            flipped += 1
            assert torch.equal(s["seg"], plain["seg"].flip(-1))
            assert torch.isclose(s["intrinsics"][2], W - plain["intrinsics"][2])
        else:
            unflipped += 1
            assert torch.equal(s["depth"], plain["depth"]) and torch.equal(s["seg"], plain["seg"])
            assert torch.equal(s["intrinsics"], plain["intrinsics"])
        again = SynthRoomsDataset(dataset_dir, "train", augment=True, seed=7)
        again.set_epoch(epoch)
        assert all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(again[2][k])) for k in s)
    assert flipped and unflipped
    aug.set_epoch(0)
    a = aug[2]["image"]
    aug.set_epoch(1)
    assert not torch.equal(a, aug[2]["image"])


def test_augmentation_never_replays_a_scenes_stream():
    # [seed, epoch, index] at epoch 0 is [seed, split "train", index]: the flip followed the wall
    for seed, index in ((0, 0), (0, 5), (7, 3)):
        scene = scene_rng(seed, "train", index).random(4)
        assert not np.allclose(augment_rng(seed, 0, index).random(4), scene)
        assert not np.allclose(augment_rng(seed, 1, index).random(4), scene_rng(seed, "val", index).random(4))
        assert np.array_equal(augment_rng(seed, 2, index).random(4), augment_rng(seed, 2, index).random(4))


def test_decoded_cache_gives_the_same_items_within_its_budget(dataset_dir):
    plain = SynthRoomsDataset(dataset_dir, "train", augment=True, seed=3)
    item_mb = H * W * (3 + 2 + 1) / 2 ** 20            # rgb, 16-bit depth, labels
    cached = SynthRoomsDataset(dataset_dir, "train", augment=True, seed=3, cache_mb=2.5 * item_mb)
    for epoch in range(3):                              # augmentation must not write into the cache
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(plain)):
            a, b = plain[index], cached[index]
            assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert sorted(cached._cache) == [0, 1]               # the first items read, as many as fit
    assert len(SynthRoomsDataset(dataset_dir, "train")._cache) == 0   # cache_mb=0: off


def test_the_decoded_cache_is_kept_only_where_it_outlives_an_epoch(tmp_path):
    """Loader workers end with their epoch: a cache in them was filled again every epoch, memory spent
    for nothing (at 1024 / workers MB each). The reading process keeps the whole budget."""
    from distill.data import build_datasets
    from distill.recipes import DataConfig

    for workers, budget in ((0, 64 * 2 ** 20), (2, 0)):
        train, val = build_datasets(DataConfig(root=str(tmp_path), num_train=2, num_val=1, height=H, width=W,
                                               workers=workers, cache_mb=64), progress=False)
        assert train._cache_left == val._cache_left == budget


def test_dataset_keeps_ignore_index(dataset_dir, tmp_path):
    copy = tmp_path / dataset_dir.name
    shutil.copytree(dataset_dir, copy)
    path = copy / "train/seg/00000.png"
    seg = np.asarray(Image.open(path)).copy()
    seg[:4] = IGNORE_INDEX
    Image.fromarray(seg).save(path)
    s = SynthRoomsDataset(copy, "train")[0]
    assert (s["seg"][:4] == IGNORE_INDEX).all() and s["seg"].dtype == torch.int64


def test_dataset_errors_name_path_and_fix(dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="generate"):
        SynthRoomsDataset(tmp_path / "nope", "train")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        SynthRoomsDataset(tmp_path / "half", "train")
    old = tmp_path / "old"
    shutil.copytree(dataset_dir, old)
    m = json.loads((old / "manifest.json").read_text())
    m["version"] = VERSION - 1
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"version {VERSION - 1}.*regenerate"):
        SynthRoomsDataset(old, "train")
    with pytest.raises(ValueError, match="valid splits: train, val"):
        SynthRoomsDataset(dataset_dir, "test")


@pytest.mark.parametrize("damage, message", [
    ("depth8", r"depth/00000.png is uint8 \(48, 64\); the set stores uint16"),
    ("truncated", r"rgb/00000.png cannot be decoded .* truncated or damaged"),
    ("tiny", r"rgb/00000.png is uint8 \(1, 1, 3\); the set stores uint8 \(48, 64, 3\)"),
    ("nan_intrinsics", r"manifest.json: intrinsics fx, fy, cx, cy must be positive finite"),
    ("seg16", r"seg/00000.png is uint16 \(48, 64\); the set stores uint8"),
])
def test_bad_files_in_a_set_are_refused_by_name(damage, message, dataset_dir, tmp_path):
    copy = tmp_path / dataset_dir.name
    shutil.copytree(dataset_dir, copy)
    if damage == "depth8":   # an 8-bit depth map used to be read as millimetres (abs_rel 2.73)
        depth = np.asarray(Image.open(copy / "train/depth/00000.png"))
        Image.fromarray((depth // 256).astype(np.uint8)).save(copy / "train/depth/00000.png")
    elif damage == "truncated":
        data = (copy / "train/rgb/00000.png").read_bytes()
        (copy / "train/rgb/00000.png").write_bytes(data[: len(data) // 3])
    elif damage == "tiny":
        Image.new("RGB", (1, 1)).save(copy / "train/rgb/00000.png")
    elif damage == "seg16":
        seg = np.asarray(Image.open(copy / "train/seg/00000.png")).astype(np.uint16)
        Image.fromarray(seg).save(copy / "train/seg/00000.png")
    else:
        m = json.loads((copy / "manifest.json").read_text())
        m["intrinsics"]["fx"] = float("nan")
        (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=message):
        SynthRoomsDataset(copy, "train")[0]


def test_normalize_roundtrip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(rgb)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert np.isclose(float(normalize(np.zeros((1, 1, 3), np.uint8))[0, 0, 0]),
                      -IMAGENET_MEAN[0] / 0.229)
    assert np.array_equal(denormalize(x), rgb)
    # every level of every channel, from a mirrored (strided) view as augmentation gives
    levels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None, ::-1]
    expected = (levels[0].astype(np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(normalize(levels)[:, 0].numpy().T, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        normalize(rgb.astype(np.float32))
