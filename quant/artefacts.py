"""The export directory, the converter processes, and the manifest.

`exports/<run name>/<target>/` is built in a staging directory next to it and renamed into place
only when every requested artefact converted and ran: a failed conversion never replaces a valid
export, and an existing export is never clobbered without `--overwrite`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from core import io
from core.formats import FORMATS
from core.manifest import MANIFEST
from targets.job import RESULT_FILE, Job


class ExportExistsError(FileExistsError):
    """The export exists and --overwrite was not given (exit status 2)."""
    exit_code = 2


class ConversionError(RuntimeError):
    """A converter process failed; the message carries the last lines of its log."""
    exit_code = 1


class ExportDir:
    """Staging for `final` and scratch space beside it; `commit()` swaps the staging in, `discard()`
    removes it. Made while holding the target's lock (quant.export), so any other staging, scratch
    or swapped-out directory of this target is a killed export's leftover: `leftovers` lists what
    was removed."""

    def __init__(self, final: Path, overwrite: bool):
        self.final = Path(final)
        self.committed = False
        if not self.final.exists():   # a commit killed between its two renames left old-PID beside staging-PID
            for old in sorted(self.final.parent.glob(f".{self.final.name}.old-*"), key=lambda p: p.stat().st_mtime,
                              reverse=True):
                pid = old.name.rsplit("-", 1)[-1]
                if (self.final.parent / f".{self.final.name}.staging-{pid}").is_dir():
                    io.replace(old, self.final)   # put the newest back (an old-PID alone is a deletion cut short);
                    break                         # any other is a leftover, removed below
        if self.final.exists() and not overwrite:
            count = len(list(self.final.iterdir())) if self.final.is_dir() else 1
            raise ExportExistsError(f"{self.final} already exists ({count} entries); pass --overwrite to replace "
                                    f"it (it is replaced once every new artefact converted and ran, also when a "
                                    f"gate fails), or remove it")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.leftovers = sorted(p for kind in ("staging", "work", "old")
                                for p in self.final.parent.glob(f".{self.final.name}.{kind}-*"))
        for leftover in self.leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        self.staging = self.final.parent / f".{self.final.name}.staging-{os.getpid()}"
        # the converters' scratch; absolute, since a converter changes its working directory (onnx2tf)
        self.work = (self.final.parent / f".{self.final.name}.work-{os.getpid()}").resolve()
        self.staging.mkdir()
        self.work.mkdir()

    def commit(self) -> Path:
        # the artefacts and records were fsynced as written; the copied device scripts and converter
        # logs were not: a power cut after the rename must not leave them empty under the final name
        io.fsync_tree(self.staging)
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, old)
        io.replace(self.staging, self.final)
        self.committed = True   # from here the new export is in place, whatever stops the cleanup
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> bool:
        """Remove the staging, and the scratch if nothing was written into it (an export refused
        early). True when scratch files are kept: the user may read them; the next export removes them."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.work.is_dir() and not any(self.work.iterdir()):
            self.work.rmdir()
        return self.work.exists()


def die_with_parent() -> None:
    """Runs in a child before exec: on Linux the kernel kills the child when its parent dies, so a
    killed export leaves no converter or runtime process behind (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


SILENCE_ENV = "DENSEKIT_CONVERTER_SILENCE_S"
SILENCE_S = 1800.0   # the longest a converter may print nothing (its slowest step, a large onnx2tf graph, is minutes)


def silence_limit() -> float:
    """Seconds a converter may print nothing, and an edge.run or edge.bench child may run, before it
    is taken for hung and killed: $DENSEKIT_CONVERTER_SILENCE_S, else 1800."""
    text = os.environ.get(SILENCE_ENV, "")
    try:
        limit = float(text) if text else SILENCE_S
    except ValueError:
        limit = -1.0
    if not limit > 0:
        raise ValueError(f"{SILENCE_ENV}={text!r}: give the seconds a converter may print nothing (e.g. 3600)")
    return limit


def run_module(module: str, *args: str, tail_lines: int = 15) -> None:
    """`python -m module args...` in a child process (runtimes never share a process with torch,
    docs/TOOLCHAIN.md); RuntimeError with the last lines of its output when it fails, or when it
    runs longer than silence_limit()."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    limit = silence_limit()   # these children print only at their end: the limit bounds their whole run
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                              preexec_fn=die_with_parent, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"python -m {module} {' '.join(args)} ran for {limit:.0f} s and was stopped as hung "
                           f"({SILENCE_ENV}={limit:.0f}; raise it for a slow device)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:])
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")


class SilenceWatchdog:
    """Kills `proc` once `limit` seconds pass without `heard()`: a hung toolchain (a deadlocked
    converter) would otherwise hold the export and its lock for ever. `fired`: it did."""

    def __init__(self, proc: subprocess.Popen, limit: float):
        self.proc, self.limit, self.fired = proc, limit, False
        self.last = time.monotonic()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def heard(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            if time.monotonic() - self.last > self.limit:
                self.fired = True
                self.proc.kill()
                return
            time.sleep(min(1.0, self.limit / 4))


def run_converter(job: Job, job_dir: Path, log=print) -> dict:
    """Run the job's converter process (`python -m <module> JOB.json`, core/formats.py) on `job`;
    stream its progress lines; return result.json. A converter silent for longer than
    silence_limit() is killed, and the export fails naming the limit."""
    job_path = job_dir / f"{job.format}.job.json"
    log_path = job_dir / f"{job.format}.log"
    job.save(job_path)
    limit = silence_limit()
    # The toolchains' own temp directories (coremltools' packages, onnxruntime's quantiser) inside the
    # export's work directory: a converter killed by the watchdog or with its parent cannot clean
    # /tmp, and the next export removes a killed one's work directory.
    scratch = Path(job.work_dir) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch)}
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", FORMATS[job.format].converter(job.converter).module, str(job_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, preexec_fn=die_with_parent)
        watchdog = SilenceWatchdog(proc, limit)
        try:
            for line in proc.stdout:
                watchdog.heard()
                log_file.write(line)
                tail.append(line.rstrip())
                if line.startswith(f"{job.format} "):   # the converter's own progress lines
                    log("  " + line.rstrip())
        except BaseException:   # an interrupt, a full disk, a `log` that raised: the parent lives on (a
            proc.kill()         # notebook), so no parent-death signal stops the converter writing on
            proc.wait()
            raise
        code = proc.wait()
        watchdog.thread.join()
    if watchdog.fired:
        raise ConversionError(f"the {job.format} converter printed nothing for {limit:.0f} s and was stopped as hung "
                              f"({SILENCE_ENV}={limit:.0f}; raise it for a model that converts slowly); last lines "
                              f"of {log_path}:\n" + "\n".join(tail))
    if code != 0:
        # A negative code is the signal that ended it: a crash in the toolchain's native code
        how = f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exit {code}"
        raise ConversionError(f"the {job.format} converter failed ({how}); last lines of {log_path}:\n"
                              + "\n".join(line if len(line) <= 300 else line[:300] + " ..." for line in tail))
    result = Path(job.work_dir) / RESULT_FILE
    if not result.is_file():   # our failure, not a path the user gave: exit 1, with the converter's log
        raise ConversionError(f"the {job.format} converter exited 0 without writing {result}; last lines of "
                              f"{log_path}:\n" + "\n".join(tail))
    return json.loads(result.read_text())


def write_manifest(export_dir: Path, artefacts: list[dict], tools: dict, config: dict) -> dict:
    """manifest.json: every artefact with its size and hash, the tool versions, the export config."""
    entries = []
    for a in artefacts:
        path = export_dir / a["path"]
        entries.append({"path": a["path"], "format": a["format"], "precision": a["precision"],
                        "bytes": io.tree_bytes(path), "sha256": io.sha256(path),
                        **{k: v for k, v in a.items() if k not in ("path", "format", "precision")}})
    manifest = {"artefacts": entries, "tools": tools, "config": config}
    io.write_json(export_dir / MANIFEST, manifest)
    return manifest
