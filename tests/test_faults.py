"""Fault injection: an export killed mid-conversion or mid-validation leaves no export that looks
complete and no process running; the rerun removes its leftovers and writes exactly the files an
uninterrupted export writes. (Training killed mid-epoch: tests/test_train.py; after its last
checkpoint: test_resume_after_the_last_checkpoint_writes_the_summary; caching: tests/test_cache.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_lock import running

from core.io import sha256
from distill.run import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.student=mobilenetv3_small_050", "model.decoder_channels=16", "data.height=64", "data.width=96",
        "data.num_train=32", "data.num_val=8", "train.batch_size=8", "eval.preview_images=1", "train.epochs=1"]
# int8 alone: its conversion and validation are the stages killed; an fp32 file would add a second
# onnx2tf conversion to each of the four exports and test nothing more
EXPORT = ["--target", "tflite", "--precision", "int8", "--qat-steps", "0", "--calib", "8", "--check", "4",
          "--bench-runs", "0", "--quiet", "--tolerance", "int8.abs_rel_change=0.5", "--tolerance",
          "int8.miou_drop_pt=50"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSEKIT_CACHE", str(root / "cache"))   # inherited by the export processes
        assert train_main(["v3", *TINY, f"out_dir={root / 'runs'}", "--quiet"]) == 0
        yield next((root / "runs").glob("v3-*"))


def export(run_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quant.export", "--run", str(run_dir), "--out", str(out), *EXPORT],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> str:
    """The command line of `pid`; "" once it has exited (it can between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def files_of(export_dir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(export_dir.glob("*.tflite"))}


def test_killed_exports_leave_nothing_that_looks_complete_and_the_rerun_is_identical(run_dir, tmp_path):
    """Killed during validation, then its rerun killed during conversion (on top of the first one's
    leftovers), then a third run: byte for byte the files the first export converted uninterrupted
    in a clean directory (a converter places each file in staging whole: targets/job.py)."""
    target = tmp_path / run_dir.name / "tflite"
    clean = {}
    for moment in ("validation", "conversion"):
        stale = set(tmp_path.glob(f"{run_dir.name}/.tflite.staging-*"))   # the killed export's, not this one's
        proc = export(run_dir, tmp_path)
        if moment == "conversion":   # the converter process is running
            wait_for(lambda: any("targets.tflite" in cmdline(c) for c in children(proc.pid)), "the converter")
        else:                        # artefacts are in staging: edge.run executes them
            wait_for(lambda: [f for f in tmp_path.glob(f"{run_dir.name}/.tflite.staging-*/*_int8.tflite")
                              if f.parent not in stale], "the artefacts")
            staged = [d for d in tmp_path.glob(f"{run_dir.name}/.tflite.staging-*") if d not in stale]
            clean = files_of(staged[0])
        spawned = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not any(running(c) for c in spawned), f"the children to die with their parent ({moment})",
                 timeout=10)
        assert not target.exists(), f"an export killed during {moment} must not look complete"
        leftovers = sorted(p.name.split("-")[0] for p in target.parent.glob(".tflite.*"))
        assert leftovers and set(leftovers) <= {".tflite.staging", ".tflite.work", ".tflite.lock"}, (moment, leftovers)

    rerun = export(run_dir, tmp_path)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert clean and files_of(target) == clean   # byte for byte what an uninterrupted conversion wrote
    assert [p.name for p in target.parent.iterdir() if p.name != ".tflite.lock"] == ["tflite"]
