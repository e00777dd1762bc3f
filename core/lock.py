"""Exclusive writers: one process at a time writes a run, an export target or a cache directory.

The lock is an advisory `flock` on a small file that records the holder's PID. The kernel drops
it when the holder exits, however it dies, so a lock left by a killed process is simply free: the
next writer takes it without guessing whether a PID is still alive. The file itself stays, with
the last holder's PID (harmless once the lock is free), and tells who holds it while it is held. A
forked child (a DataLoader worker) does not hold its parent's lock.
"""
from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


_held: set[int] = set()   # this process's lock descriptors
_held_guard = threading.Lock()   # no fork between a descriptor's opening (or closing) and its record


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the descriptors of the parent's locks: a child
    sharing them kept the lock held after the parent was killed (0.3 s measured, up to torch's
    5 s watchdog), and the next writer was refused in the name of a dead process. Closing a shared
    descriptor in the child leaves the parent's lock as it is."""
    for fd in _held:
        os.close(fd)
    _held.clear()
    _held_guard.release()   # taken before the fork


os.register_at_fork(before=_held_guard.acquire, after_in_parent=_held_guard.release,
                    after_in_child=_drop_inherited_locks)


class LockHeld(RuntimeError):
    """Another live process writes the same place; the message names it and the fix."""
    exit_code = 2


@contextmanager
def exclusive(lock_file: str | Path, what: str, *, wait: bool = False) -> Iterator[Path]:
    """Hold `lock_file` for the block; LockHeld at once when another process holds it, or with
    `wait` block until it is free (for work the other process does for us too, e.g. a render).

    what: the thing guarded, in words for the message (e.g. "export exports/v3-.../tflite").
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # 0o666 under the umask, as every file core.io writes: a group sharing a cache can take its lock.
    # A lock file we may not write is refused (PermissionError): the place it guards is not ours to write.
    with _held_guard:
        fd, owner = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666), os.getpid()
        _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"{what} is being written by process {holder} (lock {lock_file}); wait for it to "
                           f"finish or stop it, then run this again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_file
    finally:
        if os.getpid() == owner:   # a forked child closed its copy at the fork (its number may be reused)
            with _held_guard:
                _held.discard(fd)
                os.close(fd)   # closing the last descriptor of it releases the flock
