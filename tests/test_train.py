"""End-to-end training on tiny SynthRooms: loss falls, pre-flight refuses v1, resume is exact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import io
from core.config import ConfigError
from core.weights import latest_checkpoint, load_weights
from distill.run import main

TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
        "data.num_train=48", "data.num_val=8", "train.batch_size=8", "eval.preview_images=2"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_v3_trains_and_writes_the_run_directory(tmp_path, capsys):
    assert main(["v3", *TINY, "train.epochs=4", f"out_dir={tmp_path}", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "per-class IoU (lowest first):" in table and "gap_closed" in table and "dbe_comp" in table
    assert "depth by GT range" in table and "2-5 m: abs_rel" in table
    (run,) = run_dirs(tmp_path)
    for name in ("config.json", "preflight.json", "metrics.jsonl", "summary.json", "best.safetensors",
                 "report.md", "preview.png"):
        assert (run / name).is_file(), name
    records = io.read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    first, last = records[0]["train"], records[-1]["train"]
    assert last["loss_depth"] < 0.85 * first["loss_depth"]   # 0.82 on SynthRooms version 2
    # class-balanced cross-entropy falls slowly on 24 steps of a tiny model, but every epoch
    seg = [r["train"]["loss_seg"] for r in records]
    assert all(b < a for a, b in zip(seg, seg[1:])) and seg[-1] < 0.97 * seg[0]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("abs_rel", "rmse", "d1", "s_star", "abs_rel_aligned", "miou", "pixel_acc", "baseline_abs_rel",
                "train_images_per_s", "wall_s", "iou_per_class", "dbe_acc", "dbe_comp", "seg_boundary_f1",
                "teacher_abs_rel", "teacher_d1", "teacher_dbe_acc", "ratio_0_2", "ratio_2_5",
                "train_abs_rel", "train_abs_rel_aligned", "train_d1", "train_miou"):
        assert key in summary, key
    assert "train_abs_rel" in table and "train_miou" in (run / "report.md").read_text()
    # the metric teacher measured on the same validation images, and the share of its gap closed
    assert summary["teacher_abs_rel"] < summary["baseline_abs_rel"]
    # where the training time went: shares of it, per epoch and over the run, and on the terminal
    for shares in (summary, *(r["train"] for r in records)):
        assert 0 < shares["data_wait_share"] < 1 and 0 < shares["teacher_share"] < 1
        assert shares["data_wait_share"] + shares["teacher_share"] < 1
    assert "waiting for data" in table and "teacher labelling" in table
    assert summary["gap_closed"] == pytest.approx((summary["baseline_abs_rel"] - summary["abs_rel"])
                                                  / (summary["baseline_abs_rel"] - summary["teacher_abs_rel"]))
    report = (run / "report.md").read_text()
    assert "gap_closed" in report and "iBims-1" in report
    # the images as loaded, not the recipe's sizes (None for a file dataset: its own)
    assert (summary["train_set"], summary["val_set"]) == (48, 8) and "64x96, 48 training images (8 validating)" in report
    assert json.loads((run / "preflight.json").read_text())["passed"] is True
    assert list(tb for tb in (run / "tensorboard").iterdir() if tb.name.startswith("events"))
    assert sys.modules.get("tensorflow") is None  # TensorBoard never pulled TensorFlow into torch's process


def test_fit_metrics_are_the_student_on_its_training_images_without_augmentation(tmp_path):
    from torch.utils.data import DataLoader

    from distill.data.synthrooms import SynthRoomsDataset, generate
    from distill.recipes import get_recipe
    from distill.students import build_student
    from distill.training.evaluation import FIT_KEYS, evaluate, evaluate_fit, seen_images

    path = generate(tmp_path, num_train=10, num_val=2, height=32, width=64, seed=3, progress=False)
    train = SynthRoomsDataset(path, "train", augment=True, seed=3)
    train.set_epoch(5)
    seen = seen_images(train, 4)
    assert seen.indices == [0, 3, 6, 9] and train.augment   # evenly spaced; the training set keeps its flag
    plain = SynthRoomsDataset(path, "train")
    for i, item in zip(seen.indices, seen):
        assert torch.equal(item["image"], plain[i]["image"]) and torch.equal(item["depth"], plain[i]["depth"])
    assert len(seen_images(train, 50)) == 10
    torch.manual_seed(0)
    model = build_student("mobilenetv3_small_050", decoder_channels=16).eval()
    device, recipe = torch.device("cpu"), get_recipe("v3")
    fit = evaluate_fit(model, train, 4, 2, device, None, recipe)
    expected = evaluate(model, DataLoader(torch.utils.data.Subset(plain, [0, 3, 6, 9]), batch_size=4),
                        device, None, recipe)   # another batch size: equal up to the kernels' rounding
    assert fit == pytest.approx({f"train_{k}": expected[k] for k in FIT_KEYS}, rel=1e-5)

    class NoDepth(torch.utils.data.Dataset):   # an image folder: teacher labels only, no ground truth
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {**plain[i], "valid": torch.zeros_like(plain[i]["valid"])}
    assert evaluate_fit(model, NoDepth(), 4, 2, device, None, recipe) == {}


def test_surface_normals_are_off_for_images_without_intrinsics(tmp_path, monkeypatch, capsys):
    """An image folder without intrinsics.json has no camera (NaN intrinsics, the sample format's
    "unknown"): the normal term is off for that run, said once, and config.json records it."""
    import distill.training.loop as loop

    real = loop.build_datasets

    class NoCamera(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return {**self.ds[i], "intrinsics": torch.full((4,), float("nan"))}

        def __getattr__(self, name):   # set_epoch and the rest: the dataset's own
            if name == "ds":   # not set yet (a copy being made)
                raise AttributeError(name)
            return getattr(self.ds, name)

    monkeypatch.setattr(loop, "build_datasets", lambda *a, **k: tuple(NoCamera(d) for d in real(*a, **k)))
    assert main(["v3", *TINY, "train.epochs=1", "loss.normal_weight=1", f"out_dir={tmp_path}"]) == 0
    assert "carry no camera intrinsics" in capsys.readouterr().out
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "config.json").read_text())["loss"]["normal_weight"] == 0.0
    assert not any(k.startswith("aux_normals.") for k in load_weights(latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    assert not loop.known_camera({}) and loop.known_camera({"intrinsics": torch.tensor([100.0, 100.0, 80.0, 64.0])})


def test_each_epoch_line_says_how_long_the_rest_takes():
    from distill.training.loop import NullWriter, log_epoch
    lines = []
    record = {"epoch": 3, "step": 30, "train": {"loss": 0.5}, "val": {"abs_rel": 0.2, "miou": 0.4}}
    for left_s in (150.0, 42.0, 0.0):
        log_epoch(NullWriter(), record, lines.append, left_s=left_s)
    assert lines[0].endswith("~2.5 min left") and lines[1].endswith("~42 s left")
    assert lines[2].endswith("miou 0.4000")   # the last epoch: nothing left to announce


def test_v1_is_refused_before_any_step(tmp_path, capsys):
    assert main(["v1", *TINY, "train.epochs=1", f"out_dir={tmp_path}", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "training target space is relative" in err and "evaluation space is metric" in err
    assert "teacher.name=synthetic-metric" in err                       # the fix is named
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "preflight.json").read_text())["passed"] is False
    assert not (run / "checkpoints").exists()


def test_v1_with_preflight_warn_shows_errors_of_metres(tmp_path, capsys):
    """With surface normals asked for: a relative teacher's normals are not the scene's, so the
    term is off for the run, said once, and config.json records it."""
    assert main(["v1", *TINY, "train.epochs=2", "preflight=warn", "loss.normal_weight=1", f"out_dir={tmp_path}"]) == 0
    assert "outputs relative depth, whose surface normals are not the scene's" in capsys.readouterr().out
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "config.json").read_text())["loss"]["normal_weight"] == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rmse"] > 1.0 and summary["pred_max"] <= 1.5    # [0, 1] predictions against metres
    assert "teacher_abs_rel" not in summary and "gap_closed" not in summary   # a relative teacher has no metric error


def test_override_errors_exit_2(capsys):
    assert main(["v3", "train.epoch=3"]) == 2
    assert 'Did you mean "train.epochs"?' in capsys.readouterr().err


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill.run", *args, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run / "checkpoints") / "model.safetensors")


@pytest.mark.slow
def test_resume_after_kill_continues_exactly(tmp_path):
    args = [*TINY, "data.num_train=96", "train.epochs=3", "loss.weighting=dwa"]
    straight = launch(["v3", *args, f"out_dir={tmp_path / 'a'}"])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    killed = launch(["v3", *args, f"out_dir={tmp_path / 'b'}"])
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "b").glob("*/checkpoints/epoch-0001")):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (run,) = run_dirs(tmp_path / "b")
    assert latest_checkpoint(run / "checkpoints").name < "epoch-0003", "killed too late to test resume"
    assert not (run / "summary.json").exists()

    resumed = launch(["v3", f"resume={run}"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    (reference,) = run_dirs(tmp_path / "a")
    a, b = final_weights(reference), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: [rec["train"]["loss"] for rec in io.read_jsonl(r / "metrics.jsonl")]  # noqa: E731
    assert losses(reference) == losses(run)
    # its files record what it trains, not how this process started: the config rebuilds, not resumes
    from core.weights import load_metadata

    assert json.loads((run / "config.json").read_text())["resume"] == ""
    assert json.loads(load_metadata(run / "best.safetensors")["config"])["resume"] == ""
    assert json.loads(load_metadata(latest_checkpoint(run / "checkpoints") / "model.safetensors")["config"])["resume"] == ""


def test_resume_after_the_last_checkpoint_writes_the_summary(tmp_path, capsys):
    """Killed after its last checkpoint (no summary yet): the run evaluates its final weights and
    writes summary.json, report.md and preview.png. Resumed once finished, it says so and leaves
    every file as it is (it rendered its data, measured and rewrote them all)."""
    assert main(["v3", *TINY, "train.epochs=1", f"out_dir={tmp_path}", "--quiet"]) == 0
    (run,) = run_dirs(tmp_path)
    finished = json.loads((run / "summary.json").read_text())
    for name in ("summary.json", "report.md", "preview.png"):
        (run / name).unlink()
    (run / ".summary.json.k1ll3d.tmp").write_text("{")   # io.atomic_path's temp file, left by a kill
    trained = torch.load(latest_checkpoint(run / "checkpoints") / "state.pt", weights_only=False)["progress"]["wall_s"]
    started = time.time()
    assert main(["v3", f"resume={run}", "--quiet"]) == 0
    assert "nothing left to train (1 of 1 epochs done): the kept weights are measured again" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["abs_rel"] == finished["abs_rel"] and summary["miou"] == finished["miou"]
    assert (run / "report.md").is_file() and (run / "preview.png").is_file()
    assert not list(run.glob(".*.tmp")), "a killed write's temp file outlived the resume"
    # the whole run's wall time: the first process's up to its checkpoint, and this one's
    assert trained < summary["wall_s"] and summary["wall_s"] - trained <= time.time() - started
    assert len(io.read_jsonl(run / "metrics.jsonl")) == 1
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["v3", f"resume={run}", "--quiet"]) == 0   # finished now
    assert f"{run} is finished (1 of 1 epochs, summary.json written): nothing to train or write" in \
        capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files
    import shutil
    shutil.rmtree(run / "checkpoints")   # a finished run whose checkpoints were removed to save space
    assert main(["v3", f"resume={run}", "--quiet"]) == 2
    assert "the run finished (summary.json), and no complete checkpoint is left" in capsys.readouterr().err


def test_training_only_heads_train_and_stay_out_of_the_shipped_weights(tmp_path):
    """With the normal term beside the task weighting (`loss.normal_weighting=fixed`), under DWA,
    whose epoch update reads only the tasks: the term is logged on its own, weighted by no task."""
    from distill.training import load_run

    assert main(["v3", *TINY, "train.epochs=2", "loss.aux_weight=0.5", "loss.normal_weight=1", "loss.normal_weighting=fixed",
                 "loss.weighting=dwa", f"out_dir={tmp_path}", "--quiet"]) == 0
    (run,) = run_dirs(tmp_path)
    assert 0 < json.loads((run / "summary.json").read_text())["abs_rel"] < 1
    for record in io.read_jsonl(run / "metrics.jsonl"):
        assert record["train"]["loss_normals"] > 0 and "weight_normals" not in record["train"]
    assert not any(k.startswith(("aux_heads.", "aux_normals.")) for k in load_weights(run / "best.safetensors"))
    checkpoint = load_weights(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    assert any(k.startswith("aux_heads.") for k in checkpoint) and any(k.startswith("aux_normals.") for k in checkpoint)
    (run / "best.safetensors").unlink()   # the export falls back to the checkpoint: its heads are left out
    (run / "summary.json").unlink()
    assert len(load_run(run).model.aux_heads) == 0 and load_run(run).model.aux_normals is None


def test_bf16_autocast_path_trains(tmp_path):
    # The GPU path (bf16 autocast, float32 losses) exercised on the CPU's autocast.
    from torch import nn
    from torch.nn.modules.module import register_module_forward_hook

    trained_in = set()   # the dtypes training convolutions computed in: bf16 only if autocast is on
    spy = register_module_forward_hook(lambda m, args, out: trained_in.add(out.dtype) if isinstance(
        m, nn.Conv2d) and m.training else None)
    try:
        assert main(["v3", *TINY, "train.epochs=1", "train.amp=bf16", f"out_dir={tmp_path}", "--quiet"]) == 0
    finally:
        spy.remove()
    assert torch.bfloat16 in trained_in
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["abs_rel"] < 1 and json.loads((run / "config.json").read_text())["train"]["amp"] == "bf16"
    # validated in float32, as distill.evaluate measures (bf16 would differ in the third digit; the
    # channels-last layout of training moves the last ones, as in tests/test_evaluate.py)
    from distill.training.evaluation import evaluate_run

    again = evaluate_run(run, progress=False, log=lambda _: None)
    assert again["abs_rel"] == pytest.approx(summary["abs_rel"], rel=1e-6) and again["miou"] == summary["miou"]


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size=0 must be at least 1"),
    ("train.epochs=0", "train.epochs=0 must be at least 1"),
    ("train.epochs=-1", "train.epochs=-1 must be at least 1"),
    ("data.height=80", "data.height=80 must be a positive multiple of 32"),
    ("data.num_train=4", "data.num_train=4 is smaller than train.batch_size=8"),
    ("eval.best_metric=bogus", "eval.best_metric='bogus' is not a depth metric"),
    ("data.cache_mb=-1", "data.cache_mb=-1 must be >= 0"),
    ("loss.gradient_scales=0", "loss.gradient_scales=0 must be at least 1"),
    ("loss.seg_hard_fraction=0", "loss.seg_hard_fraction=0.0 must be in (0, 1]"),
    ("loss.seg_lovasz_weight=-1", "loss.seg_lovasz_weight=-1.0 must be >= 0"),
    ("loss.aux_weight=-0.5", "loss.aux_weight=-0.5 must be >= 0"),
    ("loss.normal_weight=-1", "loss.normal_weight=-1.0 must be >= 0"),
])
def test_bad_values_are_refused_before_any_data_is_rendered(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["v3", override, f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_best_metrics_are_metrics_that_evaluation_reports():
    from distill.metrics import DepthMetrics
    from distill.recipes.base import BEST_METRICS

    metrics = DepthMetrics()
    metrics.update(torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 4, 4), 2.5), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert set(BEST_METRICS) <= set(metrics.compute())


def test_a_resume_elsewhere_may_change_where_it_runs_but_not_what_it_trains(tmp_path, capsys):
    """A run saved with train.device=cuda:1, resumed on a machine without that GPU, was told to use
    train.device=cpu and then refused for the override; a run started from model.pretrained=FILE
    needed FILE again, though the checkpoint replaces those weights (and =hub would download)."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "encoder.safetensors"
    save_file(timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict(), str(weights))
    assert main(["v3", *TINY, "train.epochs=1", f"model.pretrained={weights}", f"out_dir={tmp_path / 'runs'}",
                 "--quiet"]) == 0
    (run,) = run_dirs(tmp_path / "runs")
    finished = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    weights.unlink()
    capsys.readouterr()
    assert main(["v3", f"resume={run}", "train.epochs=3", "--quiet"]) == 2
    assert ("these overrides differ from it: train.epochs=3. Drop them, or start a new run (on resume only "
            "train.device, data.workers, data.root, data.cache_mb may change" in capsys.readouterr().err)
    # through the Python API a Recipe object carries the change: it was dropped without a word
    from dataclasses import replace

    from distill.recipes import get_recipe
    from distill.run import resolve

    v3 = get_recipe("v3")
    with pytest.raises(ConfigError, match=r"these overrides differ from it: train.epochs=50\. Drop them"):
        resolve(replace(v3, train=replace(v3.train, epochs=50)), [f"resume={run}"])
    assert resolve(replace(v3, data=replace(v3.data, workers=1)), [f"resume={run}"]).data.workers == 1
    assert resolve(v3, [f"resume={run}"]).train.epochs == 1   # the saved config, defaults changed or not
    assert main(["v3", f"resume={run}", "train.device=cpu", "data.workers=0", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["abs_rel"] == finished["abs_rel"]


def test_resume_refuses_a_corrupt_or_missing_checkpoint_with_one_line(tmp_path, capsys):
    assert main(["v3", *TINY, "train.epochs=1", f"out_dir={tmp_path}", "--quiet"]) == 0
    (run,) = run_dirs(tmp_path)
    weights = latest_checkpoint(run / "checkpoints") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["v3", f"resume={run}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights} differs from the sha256 its checkpoint recorded" in err[0], err
    shutil.rmtree(weights.parent)
    assert main(["v3", f"resume={run}", "--quiet"]) == 2
    assert "the run finished (summary.json), and no complete checkpoint is left under" in capsys.readouterr().err
    (run / "summary.json").rename(run / "summary.kept")   # the same run killed before its summary
    assert main(["v3", f"resume={run}", "--quiet"]) == 2
    assert "no complete checkpoint under" in capsys.readouterr().err
    (run / "summary.kept").rename(run / "summary.json")
    # refused before the run's files change (config.json, preflight.json were rewritten first until 2026-12-07)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


def test_resume_settles_a_best_staged_when_the_run_was_killed(tmp_path, capsys):
    """A new best is staged as best.safetensors.next until the checkpoint that records it is written.
    Killed after that checkpoint, the resume moves the staged file in; killed before it, the staged
    file names no checkpoint and is removed; a best.safetensors changed since is written again from
    the checkpoint that holds the kept epoch."""
    assert main(["v3", *TINY, "train.epochs=1", f"out_dir={tmp_path}", "--quiet"]) == 0
    (run,) = run_dirs(tmp_path)
    best, staged = run / "best.safetensors", run / "best.safetensors.next"
    recorded = io.sha256(best)
    assert not staged.exists()

    best.rename(staged)   # killed between the checkpoint and the move
    assert main(["v3", f"resume={run}", "--quiet"]) == 0
    assert io.sha256(best) == recorded and not staged.exists()

    staged.write_bytes(b"a best no checkpoint recorded")   # killed before its checkpoint
    assert main(["v3", f"resume={run}", "--quiet"]) == 0
    assert io.sha256(best) == recorded and not staged.exists()

    data = bytearray(best.read_bytes())   # changed since: the checkpoint holds the kept epoch's weights
    data[-5] ^= 0x40
    best.write_bytes(bytes(data))
    assert main(["v3", f"resume={run}"]) == 0
    assert "best.safetensors differed from its record; written again from epoch-0001" in capsys.readouterr().out
    assert io.sha256(best) == recorded


def test_a_resume_whose_kept_weights_are_lost_keeps_its_checkpoints_epoch_and_says_so(tmp_path):
    """Epoch 1 kept, the checkpoint is epoch 2's (only the newest is kept) and best.safetensors is gone:
    the run trained every remaining epoch and then refused to finish, and so did every later resume.
    Now the checkpoint's epoch is the kept one, with a warning naming what was lost."""
    from core.weights import load_metadata, save_checkpoint
    from distill.training.loop import BEST, settle_best

    weights = {"w": torch.arange(6.0)}
    ckpt = save_checkpoint(tmp_path / "checkpoints", 2, weights, {}, {"val": json.dumps({"abs_rel": 0.25})})
    best = {"epoch": 1, "metric": "abs_rel", "value": 0.2, "sha256": "0" * 64}
    lines: list[str] = []
    settle_best(tmp_path, best, ckpt, 2, lines.append)
    assert best == {"epoch": 2, "metric": "abs_rel", "value": 0.25, "sha256": io.sha256(tmp_path / BEST)}
    assert torch.equal(load_weights(tmp_path / BEST)["w"], weights["w"])
    assert json.loads(load_metadata(tmp_path / BEST)["val"]) == {"abs_rel": 0.25}
    assert lines == [f"warning: {tmp_path / BEST} was missing: epoch 1's kept weights (abs_rel 0.2000) are lost. "
                     "The kept weights are now epoch-0002's (epoch 2, abs_rel 0.2500), and the epochs trained now "
                     "replace them if one scores better"]


def test_a_new_best_waits_for_the_checkpoint_that_records_it(tmp_path, monkeypatch):
    """A run that fails while writing epoch 2's checkpoint leaves best.safetensors as epoch 1's checkpoint
    recorded it (a new best is only staged), and its resume finishes the run with a consistent record."""
    from distill.training import loop

    original = loop.save

    def failing_save(run_dir, model, weighting, optimizer, scheduler, state, *args, **kwargs):
        if state["epoch"] == 2:
            raise OSError(28, "No space left on device", str(run_dir / "checkpoints"))
        return original(run_dir, model, weighting, optimizer, scheduler, state, *args, **kwargs)

    monkeypatch.setattr(loop, "save", failing_save)
    assert main(["v3", *TINY, "train.epochs=2", f"out_dir={tmp_path}", "--quiet"]) == 2
    monkeypatch.setattr(loop, "save", original)
    (run,) = run_dirs(tmp_path)
    best, staged = run / "best.safetensors", run / "best.safetensors.next"
    progress = torch.load(latest_checkpoint(run / "checkpoints") / "state.pt", weights_only=False)["progress"]
    first = progress["best"]
    assert first["epoch"] == 1 and io.sha256(best) == first["sha256"]
    assert progress["train_set"] == 48   # what a resume compares its training split with
    assert staged.is_file()   # epoch 2 scored better: staged, never moved in without its checkpoint
    assert main(["v3", f"resume={run}", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["epoch"] == 2 and io.sha256(best) == summary["best"]["sha256"] and not staged.exists()

    # epoch 2 was logged before its checkpoint failed, then trained again: TensorBoard shows it once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/abs_rel")]
    assert steps == [6, 12], steps   # 48 images in batches of 8: 6 steps an epoch


def test_resume_refuses_a_training_split_of_another_size(tmp_path):
    """An image folder that gained files since the run started would move the epochs' ends and the
    schedule; a checkpoint from before the count was recorded resumes as before."""
    from distill.training.loop import check_same_training_set

    state = {"epoch": 2, "train_set": 96}
    check_same_training_set(tmp_path, state, 96, "folder:/imgs")
    with pytest.raises(ConfigError, match=r"its training split had 96 images and folder:/imgs has 120 now.*"
                                          r"Restore the data it trained on, or start a new run"):
        check_same_training_set(tmp_path, state, 120, "folder:/imgs")
    older = {"epoch": 2}
    check_same_training_set(tmp_path, older, 120, "folder:/imgs")
    assert older["train_set"] == 120


def test_seg_balance_weights_the_classes_by_their_training_frequency_in_the_steps_loss():
    """loss.seg_balance=0.5 (v3's default): weights ~ frequency^-0.5 from the training labels,
    normalised so that the average labelled pixel weighs 1, and the step's cross-entropy uses them.
    By hand: 75% class 0 and 25% class 11 give raw 0.75^-0.5 = 1.1547 and 2 (absent classes: the
    largest, 2), divided by 0.75 * 1.1547 + 0.25 * 2 = 1.3660."""
    import torch.nn.functional as F

    from distill.recipes import get_recipe
    from distill.training.objective import Objective, seg_weights_for

    recipe = get_recipe("v3")
    seg = torch.zeros(4, 4, dtype=torch.long)
    seg[0] = 11
    lines: list[str] = []
    weights = seg_weights_for(recipe, [{"seg": seg}, {"seg": seg}], log=lines.append)
    expected = torch.full((13,), 2 / 1.3660)
    expected[0] = 1.1547 / 1.3660
    assert torch.allclose(weights, expected, atol=1e-4) and lines[0].startswith("loss.seg_balance=0.5: class weights bed")

    logits = torch.randn(2, 13, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.stack([seg, seg.flip(0)])
    weighted = Objective(recipe, seg_weights=weights)({"seg": logits}, {"seg": labels})["seg"]
    assert torch.allclose(weighted, F.cross_entropy(logits, labels, weight=weights))
    assert not torch.allclose(weighted, Objective(recipe)({"seg": logits}, {"seg": labels})["seg"])


def test_the_summary_measures_the_kept_weights_when_an_earlier_epoch_was_kept(tmp_path):
    """best.safetensors ships; when an earlier epoch than the last was kept, the end of training loads it
    (its sha256 checked) so summary.json, the fit and the preview describe it, not the last epoch."""
    from core.weights import save_weights
    from distill.students import build_student, shipped_state
    from distill.training.loop import use_kept_weights

    model = build_student("mobilenetv3_small_050", decoder_channels=16, aux_heads=2)
    best = tmp_path / "best.safetensors"
    save_weights(best, shipped_state(model.state_dict()), {})
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    lines = []
    state = {"epoch": 2, "best": {"epoch": 1, "metric": "abs_rel", "value": 0.2, "sha256": io.sha256(best)}}
    assert use_kept_weights(model, tmp_path, state, lines.append)
    now = model.state_dict()
    assert all(torch.equal(now[k], kept[k]) != k.startswith("aux_heads.") for k in kept if now[k].is_floating_point())
    assert "epoch 1's weights (abs_rel 0.2000)" in lines[0]
    assert not use_kept_weights(model, tmp_path, {**state, "epoch": 1}, lines.append)   # the last epoch was kept
    best.write_bytes(best.read_bytes()[:-1] + b" ")
    with pytest.raises(io.IntegrityError, match="differs from the sha256 recorded when epoch 1 kept it"):
        use_kept_weights(model, tmp_path, state, lines.append)


def test_a_finite_loss_with_a_non_finite_gradient_stops_before_the_step(tmp_path, monkeypatch, capsys):
    """0 * sqrt(x - x) is 0, and its gradient NaN: the clipped norm says so, and the run stops
    naming it rather than writing NaN into every weight for the next step's loss to find."""
    import distill.training.loop as loop

    real = loop.weighted_total

    def poisoned(weighting, losses):
        total, weights = real(weighting, losses)
        depth = losses["depth"]
        return total + 0 * torch.sqrt(depth - depth), weights

    monkeypatch.setattr(loop, "weighted_total", poisoned)
    for clip in ("train.grad_clip=1", "train.grad_clip=0"):   # clipping off: the norm is still measured
        assert main(["v3", *TINY, "train.epochs=1", clip, f"out_dir={tmp_path / clip}", "--quiet"]) == 1
        assert "non-finite gradient norm at epoch 1, step 0 (loss " in capsys.readouterr().err
    # the failed runs closed their TensorBoard writers (an ablation runs many in one process)
    import threading
    assert not [t for t in threading.enumerate() if "AsyncWriter" in type(t).__name__]
