"""Exclusive writers (core/lock.py): a second writer is refused at once naming the holder; a lock
left by a killed process is free again; the commands turn a held lock into exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.lock import LockHeld, exclusive

ROOT = Path(__file__).resolve().parents[1]


def hold(lock: Path) -> subprocess.Popen:
    """Another process that takes `lock` and keeps it until killed."""
    code = ("import sys, time\nfrom core.lock import exclusive\n"
            f"with exclusive({str(lock)!r}, 'test'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = hold(lock)
    try:
        with pytest.raises(LockHeld, match=rf"the run is being written by process {holder.pid} \(lock .*\.lock\)"):
            with exclusive(lock, "the run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(lock, "the run"):   # the kernel dropped the killed holder's lock
        assert lock.read_text().strip() == str(__import__("os").getpid())


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked inside the run's lock. When the run was killed they still held
    it, and a resume was refused in the name of the dead process until they noticed."""
    lock = tmp_path / ".lock"
    code = ("import os, time\nfrom core.lock import exclusive\n"
            f"with exclusive({str(lock)!r}, 'test'):\n    child = os.fork()\n"
            "    if child == 0:\n        time.sleep(600)\n        os._exit(0)\n"
            "    print(child, flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = int(holder.stdout.readline())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        os.kill(child, 0)                  # the worker still runs
        with exclusive(lock, "the run"):   # and the lock is free
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock, "x"):
        pass
    with exclusive(lock, "x"):
        pass


def test_resuming_a_run_that_another_process_writes_is_refused(tmp_path, capsys):
    from distill.run import main

    run = tmp_path / "v3-20260101T000000Z"
    run.mkdir()
    (run / "config.json").write_text('{"name": "v3"}')
    holder = hold(run / ".lock")
    try:
        start = time.time()
        assert main(["v3", f"resume={run}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"being written by process {holder.pid}" in err and time.time() - start < 60
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_new_export_directory_removes_a_killed_exports_leftovers(tmp_path):
    from quant.artefacts import ExportDir

    parent = tmp_path / "exports" / "v3-run"
    kept = parent / ".coreml.staging-123"
    leftovers = [parent / ".tflite.staging-123", parent / ".tflite.work-123", parent / ".tflite.old-123"]
    for d in (*leftovers, kept, parent / "tflite"):   # .old beside the export: killed before its removal
        (d / "sub").mkdir(parents=True)
    staging = ExportDir(parent / "tflite", overwrite=True)
    assert staging.leftovers == sorted(leftovers) and not any(d.exists() for d in leftovers)
    assert kept.exists() and staging.staging.is_dir() and staging.work.is_dir()   # another target's: not ours


def test_an_export_swapped_out_by_a_killed_commit_comes_back(tmp_path):
    """Killed between commit's two renames: the previous export sits in .old-PID and no export is
    in place. The next export directory puts it back before anything else happens."""
    from quant.artefacts import ExportDir, ExportExistsError

    parent = tmp_path / "exports" / "v3-run"
    (parent / ".tflite.old-123").mkdir(parents=True)
    (parent / ".tflite.old-123" / "manifest.json").write_text("{}")
    (parent / ".tflite.staging-123").mkdir()   # the new export, complete or not: nobody can tell
    with pytest.raises(ExportExistsError, match="pass --overwrite"):
        ExportDir(parent / "tflite", overwrite=False)
    assert (parent / "tflite" / "manifest.json").read_text() == "{}" and not (parent / ".tflite.old-123").exists()


def test_of_two_swapped_out_exports_the_newest_comes_back(tmp_path):
    """Two commits killed between their renames (the second export's own restore cut short too):
    the newest swapped-out export is put back, the other is a leftover; not an error."""
    import os

    from quant.artefacts import ExportDir

    parent = tmp_path / "exports" / "v3-run"
    for pid, stamp in (("123", 1_000_000), ("456", 2_000_000)):
        old = parent / f".tflite.old-{pid}"
        old.mkdir(parents=True)
        (old / "manifest.json").write_text(pid)
        (parent / f".tflite.staging-{pid}").mkdir()
        os.utime(old, (stamp, stamp))
    staging = ExportDir(parent / "tflite", overwrite=True)
    assert (parent / "tflite" / "manifest.json").read_text() == "456"
    assert parent / ".tflite.old-123" in staging.leftovers and not (parent / ".tflite.old-123").exists()


def test_an_old_export_whose_removal_was_cut_short_does_not_come_back(tmp_path):
    """.old-PID without .staging-PID: the new export was in place and the old one half deleted; the
    user then removed the export. Putting the half-deleted one back would make it look complete."""
    from quant.artefacts import ExportDir

    parent = tmp_path / "exports" / "v3-run"
    (parent / ".tflite.old-123").mkdir(parents=True)
    (parent / ".tflite.old-123" / "manifest.json").write_text("{}")
    staging = ExportDir(parent / "tflite", overwrite=False)
    assert not (parent / "tflite").exists() and not (parent / ".tflite.old-123").exists()
    assert staging.leftovers == [parent / ".tflite.old-123"]


def test_child_processes_die_with_their_parent(tmp_path):
    """A converter or runtime child (quant.artefacts.run_module) does not outlive a killed export."""
    pid_file = tmp_path / "child.pid"
    code = ("import sys\nfrom quant.artefacts import run_module\n"
            "run_module('timeit', '-n', '1', '-s', "
            f"\"import os, pathlib; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\", "
            "'import time; time.sleep(120)')\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while running(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not running(child), f"child {child} outlived its killed parent"


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_lock_file_takes_the_mode_the_umask_allows(tmp_path):
    """A group sharing a cache (umask 002) must be able to take its lock (it was 0644 whatever the umask)."""
    import os
    import stat

    previous = os.umask(0o002)
    try:
        with exclusive(tmp_path / ".lock", "x"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / ".lock").stat().st_mode) == 0o664
