"""The teacher pseudo-label cache: written once, resumed after a kill, refused when it does not match."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from distill import io
from distill.cache_teacher import main
from distill.data import build_datasets
from distill.recipes import DataConfig, TeacherConfig
from distill.teachers import build_teacher, teacher_for
from distill.teachers.cache import CachedTeacher, CacheMismatchError, shard_name

DATA = ["data.num_train=24", "data.num_val=4", "data.height=32", "data.width=32"]


@pytest.fixture(autouse=True)
def cache_root(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "data"
    monkeypatch.setenv("DENSEKIT_CACHE", str(root))
    return root


def cli(tmp_path: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cache_teacher", "synthetic-metric", *DATA, "shard_size=3",
                           f"out={tmp_path / out}", *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: io.sha256(p) for p in sorted(folder.glob("shard-*.safetensors"))}


def dataset(**kw):
    train, _ = build_datasets(DataConfig(num_train=24, num_val=4, height=32, width=32, augment=False, **kw))
    return train


def test_cache_holds_the_teachers_labels_and_training_reads_them(tmp_path):
    assert main(["synthetic-metric", *DATA, "shard_size=5", f"out={tmp_path / 'c'}"]) == 0
    cached = CachedTeacher.open(tmp_path / "c", TeacherConfig(name="synthetic-metric"))
    ds = dataset()
    cached.verify(ds, height=32, width=32)
    assert cached.scan_finite() == [] and cached.space.value == "metric" and cached.needs_ground_truth is False
    batch = default_collate([ds[i] for i in (0, 7, 23)])
    expect = build_teacher("synthetic-metric")(batch)
    assert torch.allclose(cached(batch), expect.half().float())
    batch["flipped"] = torch.tensor([True, False, True])
    assert torch.equal(cached(batch)[0], expect.half().float()[0].flip(-1))
    assert isinstance(teacher_for(TeacherConfig(name="synthetic-metric", cache=str(tmp_path / "c"))), CachedTeacher)


@pytest.mark.slow
def test_resume_after_a_real_kill_gives_the_same_shards(tmp_path):
    assert cli(tmp_path, "straight").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "distill.cache_teacher", "synthetic-metric", *DATA, "shard_size=3",
                             f"out={tmp_path / 'killed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / shard_name(0)).exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = cli(tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert shard_hashes(tmp_path / "killed") == shard_hashes(tmp_path / "straight") and len(shard_hashes(tmp_path / "straight")) == 8
    assert not list((tmp_path / "killed").glob("*.tmp*"))


def test_max_shards_leaves_a_partial_cache_that_completes_identically(tmp_path, capsys):
    assert main(["synthetic-metric", *DATA, "shard_size=3", "max_shards=1", f"out={tmp_path / 'p'}"]) == 75
    assert "run the same command again" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CachedTeacher.open(tmp_path / "p")
    assert main(["synthetic-metric", *DATA, "shard_size=3", f"out={tmp_path / 'p'}"]) == 0
    assert main(["synthetic-metric", *DATA, "shard_size=3", f"out={tmp_path / 'q'}"]) == 0
    assert shard_hashes(tmp_path / "p") == shard_hashes(tmp_path / "q")


def test_mismatches_are_refused_with_what_differs(tmp_path, capsys):
    assert main(["synthetic-metric", *DATA, "shard_size=8", f"out={tmp_path / 'c'}"]) == 0
    # resuming into it with another teacher or size
    assert main(["synthetic-relative", *DATA[:2], "data.height=64", "data.width=64", f"out={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert "another job" in err and "height: 32 in DIR, now 64" in err and "'synthetic-relative'" in err
    cached = CachedTeacher.open(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match=r"images: 24 of 24 differ"):
        cached.verify(dataset(seed=1), height=32, width=32)     # other scenes
    with pytest.raises(CacheMismatchError, match=r"split: cache 'train', training 'val'\n  - resolution: cache 32x32"):
        cached.verify(dataset(), height=64, width=64, split="val")
    with pytest.raises(CacheMismatchError, match="another teacher"):
        CachedTeacher.open(tmp_path / "c", TeacherConfig(name="da2-metric", source="/models/x"))
    with pytest.raises(FileNotFoundError, match="not a pseudo-label cache"):
        CachedTeacher.open(tmp_path)


def test_non_finite_labels_stop_caching_and_are_found_in_a_cache(tmp_path, capsys):
    from distill.teachers import TEACHERS
    from distill.teachers.synthetic import SyntheticMetricTeacher

    class Broken(SyntheticMetricTeacher):
        name = "broken-for-test"

        def __call__(self, batch):
            out = super().__call__(batch)
            out[batch["index"] == 4] = float("nan")
            return out

    TEACHERS.register("broken-for-test", Broken)
    try:
        assert main(["broken-for-test", *DATA, "shard_size=3", f"out={tmp_path / 'b'}"]) == 1
    finally:
        TEACHERS._items.pop("broken-for-test")
    assert "non-finite values for sample 4" in capsys.readouterr().err
    assert (tmp_path / "b" / shard_name(0)).exists() and not (tmp_path / "b" / shard_name(1)).exists()
    assert main(["synthetic-metric", *DATA, "shard_size=3", f"out={tmp_path / 'c'}"]) == 0
    path = tmp_path / "c" / shard_name(2)
    depth = io.load_weights(path)["depth"]
    depth[1, 0, 3, 3] = float("nan")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    io.save_weights(path, {"depth": depth}, meta)
    assert CachedTeacher.open(tmp_path / "c").scan_finite() == [7]


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_shards(tmp_path):
    assert cli(tmp_path, "one").returncode == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "distill.cache_teacher", "synthetic-metric", *DATA, "shard_size=3",
                           f"out={tmp_path / 'two'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["shards"] == \
        json.loads((tmp_path / "one" / "manifest.json").read_text())["shards"]
