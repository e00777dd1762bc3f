"""Exclusive writers (core/lock.py): a second writer is refused at once naming the holder; a lock
left by a killed process is free again; the commands turn a held lock into exit 2."""
from __future__ import annotations

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
