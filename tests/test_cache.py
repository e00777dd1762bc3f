"""The teacher pseudo-label cache: written once, resumed after a kill, refused when it does not match."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import default_collate

from core import io
from core.weights import load_weights, save_weights
from distill.cache_teacher import main
from distill.data import build_datasets
from distill.recipes import DataConfig, TeacherConfig
from distill.teachers import TEACHERS, build_teacher, teacher_for
from distill.teachers.cache import CachedTeacher, CacheMismatchError, shard_name
from distill.teachers.synthetic import SyntheticMetricTeacher

REPO = Path(__file__).resolve().parents[1]
DATA = ["data.num_train=24", "data.num_val=4", "data.height=32", "data.width=32"]
# float16 storage: half an ulp (2^-11 relative), plus float32 noise of the teacher's batch composition
FP16 = {"rtol": 2 ** -11, "atol": 1e-5}


@pytest.fixture(autouse=True)
def data_root(tmp_path_factory, monkeypatch):
    """SynthRooms rendered once per session; subprocesses inherit the variable."""
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "data"))


def command(out: Path, *extra: str, teacher: str = "synthetic-metric") -> list[str]:
    return [teacher, *DATA, "shard_size=3", f"out={out}", *extra]


def cli(*args: str, module: tuple[str, ...] = ("-m", "distill.cache_teacher"),
        tmp: Path | None = None) -> subprocess.CompletedProcess:
    """`tmp`: the temp folder of the command (torchrun's log folders go there, not to /tmp)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TMPDIR": str(tmp)} if tmp else {})}
    return subprocess.run([sys.executable, *module, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: io.sha256(p) for p in sorted(folder.glob("shard-*.safetensors"))}


def datasets(seed: int = 0, size: int = 32):
    return build_datasets(DataConfig(num_train=24, num_val=4, height=size, width=size, seed=seed, augment=False),
                          progress=False)


@contextmanager
def registered(name: str, cls):
    """A test-only teacher in the real registry, removed afterwards."""
    TEACHERS.register(name, cls)
    try:
        yield
    finally:
        TEACHERS._items.pop(name)


class SegTeacher(SyntheticMetricTeacher):
    """A teacher that also gives segmentation logits (the format's optional tensor)."""
    name = "seg-for-test"
    provides_seg_logits = True

    def seg_logits(self, batch: dict) -> torch.Tensor:
        """(B, 2, H, W): the depth and a horizontal ramp, so a mirror is visible."""
        ramp = torch.linspace(0, 1, batch["depth"].shape[-1]).expand_as(batch["depth"])
        return torch.cat([self(batch), ramp], 1)


def test_cache_holds_the_teachers_labels_and_training_reads_them(tmp_path, capsys):
    assert main(command(tmp_path / "c", "shard_size=5")) == 0
    out = capsys.readouterr().out
    assert "labelled 24 images" in out and "images/s" in out and f"teacher.cache={tmp_path / 'c'}" in out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == list(shard_hashes(tmp_path / "c").values())
    assert manifest["count"] == 24 and len(manifest["shards"]) == 5 and manifest["dtype"] == "float16"
    with safe_open(str(tmp_path / "c" / shard_name(4)), "pt") as f:
        assert f.get_tensor("depth").dtype == torch.float16 and f.get_tensor("depth").shape == (4, 1, 32, 32)
        assert json.loads(f.metadata()["shard"])["start"] == 20

    cached = teacher_for(TeacherConfig(name="synthetic-metric", cache=str(tmp_path / "c")))
    assert isinstance(cached, CachedTeacher) and cached.needs_ground_truth is False
    assert cached.identity() == build_teacher("synthetic-metric").identity() and cached.space.value == "metric"
    train, _ = datasets()
    cached.verify(train, height=32, width=32, split="train")
    assert cached.scan_finite() == []
    batch = default_collate([train[i] for i in (0, 7, 23)])
    expect = build_teacher("synthetic-metric")(batch)
    got = cached(batch)
    assert got.dtype == torch.float32 and not torch.equal(got[0], got[0].flip(-1))
    torch.testing.assert_close(got, expect, **FP16)
    batch["flipped"] = torch.tensor([True, False, True])
    assert torch.equal(cached(batch), torch.stack([got[0].flip(-1), got[1], got[2].flip(-1)]))

    assert main(command(tmp_path / "c", "shard_size=5")) == 0   # finished: no work
    assert "complete" in capsys.readouterr().out and shard_hashes(tmp_path / "c") == \
        {s["file"]: s["sha256"] for s in manifest["shards"]}


@pytest.mark.slow
def test_resume_after_a_real_kill_gives_the_same_shards(tmp_path):
    many = ("batch_size=1", "data.num_train=96")   # 32 shards: the kill lands long before the last
    assert cli(*command(tmp_path / "straight", *many)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distill.cache_teacher", *command(killed, *many)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / shard_name(0)).exists():
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the kill came after the last shard: nothing to resume"
    (killed / ".shard-00031.safetensors.x1y2.tmp").write_bytes(b"half a shard")   # what a kill mid-write leaves
    resumed = cli(*command(killed, *many))
    assert resumed.returncode == 0, resumed.stderr
    labelled = int(re.search(r"labelled (\d+) images", resumed.stdout)[1])
    assert 0 < labelled < 96, resumed.stdout   # the resume labelled only what the kill left
    assert shard_hashes(killed) == shard_hashes(tmp_path / "straight") and len(shard_hashes(killed)) == 32
    assert (killed / "manifest.json").read_bytes() == (tmp_path / "straight" / "manifest.json").read_bytes()
    assert not list(killed.glob(".*.tmp"))


def test_max_shards_leaves_a_partial_cache_that_completes_identically(tmp_path, capsys):
    assert main(command(tmp_path / "p", "max_shards=1")) == 75
    assert "partial: 7 shards left; run the same command again to continue" in capsys.readouterr().out
    assert list(shard_hashes(tmp_path / "p")) == [shard_name(0)] and not (tmp_path / "p" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match=r"incomplete .* run python -m distill.cache_teacher with out="):
        CachedTeacher.open(tmp_path / "p")
    assert main(command(tmp_path / "p", "max_shards=5")) == 75
    assert main(command(tmp_path / "p")) == 0
    assert main(command(tmp_path / "q")) == 0
    assert shard_hashes(tmp_path / "p") == shard_hashes(tmp_path / "q")

    # killed after its last shard, before its manifest: the same command writes the manifest alone
    manifest = (tmp_path / "q" / "manifest.json").read_bytes()
    (tmp_path / "q" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(command(tmp_path / "q")) == 0
    assert "labelled" not in capsys.readouterr().out and (tmp_path / "q" / "manifest.json").read_bytes() == manifest
    CachedTeacher.open(tmp_path / "q")

    # a shard whose metadata does not match (here: other content hashes) is labelled again
    shard = tmp_path / "p" / shard_name(2)
    save_weights(shard, load_weights(shard), {"shard": json.dumps({"start": 6, "stop": 9,
                                                                           "content_hashes": ["x"] * 3})})
    capsys.readouterr()
    assert main(command(tmp_path / "p")) == 0
    assert "labelled 3 images" in capsys.readouterr().out
    assert shard_hashes(tmp_path / "p") == shard_hashes(tmp_path / "q")


def test_mismatches_are_refused_with_what_differs(tmp_path, capsys):
    assert main(command(tmp_path / "c", "shard_size=8")) == 0
    assert main([*command(tmp_path / "c", "shard_size=8", teacher="synthetic-relative"), "data.height=64",
                 "data.width=64"]) == 2
    err = capsys.readouterr().err
    assert "holds a cache of another job" in err and f"height: 32 in {tmp_path / 'c'}, now 64" in err
    assert "'synthetic-relative'" in err and "delete" in err and "another out=" in err
    # refused before the images are rendered (80 s at the CPU defaults): no new SynthRooms set in the cache
    import os
    renders = lambda: sorted(p.name for p in Path(os.environ["DENSEKIT_CACHE"]).glob("**/synthrooms-*"))   # noqa: E731
    before = renders()
    assert main([*command(tmp_path / "c", "shard_size=8"), "data.height=96", "data.width=96"]) == 2
    assert f"height: 32 in {tmp_path / 'c'}, now 96" in capsys.readouterr().err and renders() == before

    cached = CachedTeacher.open(tmp_path / "c")
    other, _ = datasets(seed=1)          # other scenes, same size and count
    with pytest.raises(CacheMismatchError, match=r"images: 24 of 24 differ .*0: cache [0-9a-f]{12}, dataset "):
        cached.verify(other, height=32, width=32, split="train")
    _, val = datasets()
    with pytest.raises(CacheMismatchError) as e:
        cached.verify(val, height=64, width=64, split="val")
    assert "split: cache 'train', training 'val'" in str(e.value) and "resolution: cache 32x32, training 64x64" \
        in str(e.value) and "samples: cache 24, dataset 4" in str(e.value)
    with pytest.raises(CacheMismatchError, match=r"another teacher \(teacher.name: cache 'synthetic-metric', "
                                                 r"recipe 'da2-metric'.*set teacher.name=synthetic-metric"):
        CachedTeacher.open(tmp_path / "c", TeacherConfig(name="da2-metric", source="/models/x"))
    with pytest.raises(FileNotFoundError, match="not a pseudo-label cache"):
        CachedTeacher.open(tmp_path)
    assert main(["synthetic-metric", *DATA, f"out={tmp_path / 'x'}", "split=test"]) == 2
    assert main(["synthetic-metric", *DATA, f"out={tmp_path / 'x'}", "train.epochs=3"]) == 2
    assert "split='test': must be one of train, val, all" in capsys.readouterr().err


def test_non_finite_labels_stop_caching_and_are_found_in_a_cache(tmp_path, capsys):
    class Broken(SyntheticMetricTeacher):
        name = "broken-for-test"

        def __call__(self, batch):
            out = super().__call__(batch)
            out[batch["index"] == 4] = float("nan")
            return out

    with registered("broken-for-test", Broken):
        assert main(command(tmp_path / "b", teacher="broken-for-test")) == 1
        err = capsys.readouterr().err
        assert "non-finite values in depth for sample 4 (train index 4, " in err and "rgb" in err
        assert list(shard_hashes(tmp_path / "b")) == [shard_name(0)]   # shard 1 (samples 3..5) not written
        assert main(command(tmp_path / "b", teacher="broken-for-test")) == 1
    assert main(command(tmp_path / "c")) == 0
    path = tmp_path / "c" / shard_name(2)
    with safe_open(str(path), "pt") as f:
        depth, meta = f.get_tensor("depth"), f.metadata()
    depth[1, 0, 3, 3] = float("nan")
    save_weights(path, {"depth": depth}, meta)
    assert CachedTeacher.open(tmp_path / "c").scan_finite() == [7]


def test_a_shard_changed_after_caching_is_refused_before_training_uses_it(tmp_path):
    """Halving every label of a shard (a valid file with the same metadata) used to train quietly."""
    assert main(command(tmp_path / "c")) == 0
    path = tmp_path / "c" / shard_name(2)
    with safe_open(str(path), "pt") as f:
        depth, meta = f.get_tensor("depth"), f.metadata()
    save_weights(path, {"depth": depth / 2}, meta)
    train, _ = datasets()
    with pytest.raises(CacheMismatchError, match=rf"1 shard\(s\) differ from the sha256 in manifest.json.*{shard_name(2)}"):
        CachedTeacher.open(tmp_path / "c").verify(train, height=32, width=32, split="train")
    # a rerun stopped before it relabels that shard (here: after one other) must not lose what it found:
    # the manifest goes, and with it the sha256 that told the changed shard from a good one
    (tmp_path / "c" / shard_name(0)).write_bytes(b"damaged too")
    assert main(command(tmp_path / "c", "max_shards=1")) == 75
    assert not path.exists()   # removed with the manifest: the next run relabels it, as training refuses the cache
    # the fix the message names: the rerun finds the changed shard by its sha256 and labels it again
    assert main(command(tmp_path / "c")) == 0
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("depth"), depth)
    CachedTeacher.open(tmp_path / "c").verify(train, height=32, width=32, split="train")


def test_a_cache_is_refused_when_the_teachers_weights_at_its_source_changed(tmp_path):
    from distill.teachers.depth_anything import weights_digest

    assert main(command(tmp_path / "c")) == 0
    weights = tmp_path / "teacher"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"the weights the cache was made with")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())   # as a real teacher records it
    manifest["teacher"]["weights"] = weights_digest(weights)
    manifest["recipe_teacher"]["source"] = str(weights)
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    config = TeacherConfig(name="synthetic-metric", source=str(weights))
    CachedTeacher.open(tmp_path / "c", config)   # the same weights: accepted
    (weights / "model.safetensors").write_bytes(b"other weights at the same path")
    with pytest.raises(CacheMismatchError, match=r"made with other weights than those now at teacher.source=.*"
                                                 r"rebuild the cache"):
        CachedTeacher.open(tmp_path / "c", config)


def test_a_cache_made_at_another_teacher_input_size_is_refused(tmp_path):
    assert main(command(tmp_path / "c")) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())   # as a real ViT teacher records it
    manifest["teacher"]["input_size"] = 518
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    CachedTeacher.open(tmp_path / "c", TeacherConfig(name="synthetic-metric", input_size=518))   # the same size
    with pytest.raises(CacheMismatchError, match=r"teacher.input_size: cache 518, recipe 266\); set "
                                                 r"teacher.name=synthetic-metric teacher.input_size=518, or build"):
        CachedTeacher.open(tmp_path / "c", TeacherConfig(name="synthetic-metric", input_size=266))


def test_overflowing_labels_are_refused(tmp_path, capsys):
    class Loud(SyntheticMetricTeacher):
        name = "loud-for-test"

        def __call__(self, batch):
            return super().__call__(batch) * torch.where(batch["index"] == 10, 1e6, 1.0).view(-1, 1, 1, 1)

    with registered("loud-for-test", Loud):
        assert main(command(tmp_path / "b", teacher="loud-for-test")) == 1
    assert "values beyond fp16's 65504 in depth for sample 10" in capsys.readouterr().err


def test_split_all_segmentation_logits_and_a_cache_of_a_cache(tmp_path):
    with registered("seg-for-test", SegTeacher):
        assert main(command(tmp_path / "all", "split=all", teacher="seg-for-test")) == 0
        teacher = build_teacher("seg-for-test")
    job = json.loads((tmp_path / "all" / "job.json").read_text())
    assert job["splits"] == {"train": [0, 24], "val": [24, 28]} and job["tensors"] == ["depth", "seg_logits"]
    cached = CachedTeacher.open(tmp_path / "all", TeacherConfig(name="seg-for-test"))
    train, val = datasets()
    cached.verify(train, height=32, width=32, split="train")
    cached.verify(val, height=32, width=32, split="val")       # now serves val
    batch = default_collate([val[i] for i in range(4)])
    torch.testing.assert_close(cached(batch), teacher(batch), **FP16)
    seg = cached.seg_logits(batch)
    torch.testing.assert_close(seg, teacher.seg_logits(batch), **FP16)
    batch["flipped"] = torch.tensor([True, False, False, False])
    assert torch.equal(cached.seg_logits(batch)[0], seg[0].flip(-1)) and torch.equal(cached.seg_logits(batch)[1], seg[1])

    assert main(command(tmp_path / "direct")) == 0
    assert main([*command(tmp_path / "again"), f"teacher.cache={tmp_path / 'direct'}"]) == 0
    assert shard_hashes(tmp_path / "again") == shard_hashes(tmp_path / "direct")
    assert (tmp_path / "again" / "job.json").read_bytes() == (tmp_path / "direct" / "job.json").read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_shards(tmp_path):
    assert main(command(tmp_path / "one")) == 0
    done = cli("--standalone", "--nproc_per_node=2", "-m", "distill.cache_teacher", *command(tmp_path / "two"),
               module=("-m", "torch.distributed.run"), tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")
    assert (tmp_path / "two" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert done.stdout.count("labelled 24 images") == 1     # rank 0 alone reports
    assert "2 processes, rank 0 labelled 12)" in done.stdout   # shards 0, 2, 4, 6: the work was split


def test_the_printed_training_command_reads_the_cache_it_follows():
    """Every teacher key travels (a cache refuses a recipe of another teacher.input_size); the
    cache key names the new cache; training keys stay the user's choice."""
    from distill.cache_teacher import how_to_train

    overrides = ["teacher.name=da2-metric", "teacher.source=/w", "teacher.input_size=392", "teacher.cache=/old",
                 "data.seed=2", "train.epochs=3"]
    assert how_to_train({"recipe": "v3"}, overrides, {"data.height": 128, "train.batch_size": 8}, Path("/c")) == (
        "python -m distill.run v3 teacher.name=da2-metric teacher.source=/w teacher.input_size=392 data.seed=2 "
        "data.height=128 teacher.cache=/c")


def test_a_run_that_learnt_from_a_cache_is_not_fine_tuned_at_another_size(tmp_path, capsys):
    """QAT and the pruning fine-tune read the cache's labels, which exist at the run's size only: an
    export at another size (a device profile's) is refused before any data is built, saying the fix."""
    from distill.run import main as train_main
    from quant.export import main as export_main

    assert main(command(tmp_path / "c")) == 0
    assert train_main(["v3", *DATA, "model.student=mobilenetv3_small_050", "model.decoder_channels=16",
                       "train.batch_size=8", "train.epochs=1", "eval.teacher=false", "eval.preview_images=0",
                       f"teacher.cache={tmp_path / 'c'}", f"out_dir={tmp_path / 'runs'}"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    base = ["--run", str(run), "--out", str(tmp_path / "exports"), "--target", "onnx", "--input-size", "64x64"]
    assert export_main([*base, "--precision", "int8", "--qat-steps", "5"]) == 2
    assert (f"error: run {run.name} learnt from teacher.cache={tmp_path / 'c'}, labels at 32x32; QAT would train "
            f"at 64x64 on them. Export at the run's size (--input-size 32x32), or without fine-tuning (--qat-steps 0)"
            in capsys.readouterr().err)
    assert export_main([*base, "--precision", "fp32", "--prune", "0.5"]) == 2
    assert "; the pruning fine-tune would train at 64x64 on them." in capsys.readouterr().err
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").rglob("manifest.json"))


def test_an_embedded_teacher_is_refused_on_an_unlabelled_folder(tmp_path, capsys):
    """Embedded teachers label only where ground truth exists: a folder's cache would be zeros, written
    as complete. Refused before any image is read, and nothing is left behind."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(2):
        Image.new("RGB", (48, 32), (40 * i, 90, 160)).save(tmp_path / "photos" / f"{i}.png")
    out = tmp_path / "c"
    assert main(["synthetic-metric", f"data.dataset=folder:{tmp_path / 'photos'}", "data.height=32",
                 "data.width=32", f"out={out}"]) == 2
    assert "labels only where the dataset has ground-truth depth" in capsys.readouterr().err and not out.exists()
