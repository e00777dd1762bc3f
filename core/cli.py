"""One error convention for every command (`python -m distill.run`, `quant.export`, `edge.bench`, ...).

A problem the user can fix (a bad value, a bad or corrupt file, a missing path, no space, no
permission, a busy directory) ends the command with exit status 2 and one line on stderr:
`error: <what, where, and the fix>`. Anything else is a failure of ours or of a runtime: one line,
exit status 1 (or the exception's own `exit_code`). A traceback is printed only with `--debug`
(or DENSEKIT_DEBUG=1), which every command accepts.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import select
import sys
from contextvars import ContextVar
from typing import Callable, NoReturn

from core.registry import UnknownNameError

EXIT_USER = 2
EXIT_FAILED = 1
EXIT_SIGPIPE = 141   # 128 + SIGPIPE: what a shell reports for a writer whose reader went away
# OSErrors that the user causes and fixes: the fix, by errno
DISK_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space, or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: write elsewhere, or change the permissions",
    errno.EPERM: "operation not permitted: write elsewhere, or change the permissions",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EEXIST: "it already exists: remove it or choose another path",
    errno.EISDIR: "it is a directory, not a file: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
}


# raised with a message that names the problem and the fix (FileNotFoundError("... pass nyu:<path>"))
USER_ERRORS = (ValueError, UnknownNameError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)


def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DENSEKIT_DEBUG", "") not in ("", "0")


_DEBUG_ASKED = ContextVar("densekit_debug", default=False)


def debug_asked() -> bool:
    """Whether the running command was given --debug (or DENSEKIT_DEBUG): for a command that reports
    some errors itself, after @command stripped the flag from its argv."""
    return _DEBUG_ASKED.get() or debugging([])


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# how torch's DataLoader re-raises a worker's exception: the worker's whole traceback as the message
WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback")


def message(exc: BaseException) -> str:
    """The exception's message; for a DataLoader worker's, the original one (what follows the
    traceback's last frame, without the exception's name)."""
    text = str(exc)
    if not WORKER_TRACEBACK.match(text):
        return text
    lines = text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]   # a frame's location and code
    first, *rest = lines[frames[-1] + 1:] if frames and frames[-1] + 1 < len(lines) else lines[-1:]
    return "\n".join([first.partition(": ")[2] or first, *rest])


def exit_code(exc: BaseException) -> int:
    """The exception's own `exit_code`, else 2 for a problem the user fixes, else 1."""
    if hasattr(exc, "exit_code"):
        return int(exc.exit_code)
    if isinstance(exc, OSError) and exc.errno in DISK_FIXES:
        return EXIT_USER
    return EXIT_USER if isinstance(exc, USER_ERRORS) else EXIT_FAILED


def describe(exc: BaseException, prog: str) -> str:
    if isinstance(exc, OSError) and exc.errno in DISK_FIXES and not hasattr(exc, "exit_code"):
        where = exc.filename or ""
        return one_line(f"{where}: {DISK_FIXES[exc.errno]}" if where else f"{exc}: {DISK_FIXES[exc.errno]}")
    if exit_code(exc) == EXIT_FAILED:
        return (one_line(f"{prog} failed: {type(exc).__name__}: {message(exc)}")
                + " (rerun with --debug for the traceback)")
    return one_line(message(exc))


def command(prog: str) -> Callable[[Callable[[list[str]], int]], Callable[..., int]]:
    """Decorate a command's `main(argv) -> int`: strips `--debug`, turns exceptions into the convention."""
    def decorate(main: Callable[[list[str]], int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debugging(argv)
            asked = _DEBUG_ASKED.set(debug)
            try:
                return main([a for a in argv if a != "--debug"])
            except KeyboardInterrupt:
                if debug:
                    raise
                print("error: interrupted", file=sys.stderr)
                return 130
            except Exception as exc:   # noqa: BLE001 - the one place that turns exceptions into exit codes
                if isinstance(exc, BrokenPipeError) and stdout_gone():
                    return EXIT_SIGPIPE   # the reader went away (`| head`): stop quietly, as Unix tools do
                if debug:
                    raise
                print(f"error: {describe(exc, prog)}", file=sys.stderr)
                return exit_code(exc)
            finally:
                _DEBUG_ASKED.reset(asked)
        return run
    return decorate


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone away (another pipe may have broken instead); if
    so stdout now points at /dev/null, so that the interpreter's last flush does not fail again
    (Python's own advice for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):   # captured or replaced stdout; no poll (Windows)
        return False
    poller.register(fd, select.POLLOUT)
    if not dict(poller.poll(0)).get(fd, 0) & (select.POLLERR | select.POLLHUP):   # a reader-less pipe
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def at_least(flag: str, value: int | float | None, low: int | float) -> None:
    """ValueError unless `value` (None: left to a default) is at least `low`."""
    if value is not None and not value >= low:   # `not >=`: NaN is refused too
        raise ValueError(f"{flag} {value}: must be at least {low}")


# More threads than this is a typing slip (a runtime asked for 100,000 threads aborts allocating them);
# never faster, even on a device profile's host.
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def threads_option(flag: str, value: int | None, low: int = 1) -> None:
    """ValueError unless `value` (None: the runtime's default) is in [low, MAX_THREADS]."""
    at_least(flag, value, low)
    if value is not None and value > MAX_THREADS:
        raise ValueError(f"{flag} {value}: at most {MAX_THREADS} (64, or 4x this host's {os.cpu_count()} cores)")


def user_path(text: str) -> str:
    """A path flag's value with "~" as the home folder: a shell expands it only at a word's start
    (`--out ~/x`), not in `--out=~/x`, which made a folder named "~" here. The rule of
    `core.io.home_path`, as text: argparse's type, and "" stays "" (a flag's empty default)."""
    return os.path.expanduser(text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the convention: a bad flag is one `error:` line and exit 2 (not usage + message)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER)


def add_run_arguments(parser: argparse.ArgumentParser, default_recipe: str, *, run_flag: bool = True) -> None:
    """The flags that choose a training run, as every command that reads one spells them: `--run`
    (unless the command takes the run as a positional), `--runs-dir`, `--recipe` (resolved by
    distill.training.find_run)."""
    if run_flag:
        parser.add_argument("--run", type=user_path, help="training run directory (default: the newest finished "
                                                           "run of --recipe under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", type=user_path,
                        help="where to look for the newest run (default: runs)")
    parser.add_argument("--recipe", metavar="NAME",
                        help=f"whose newest run, when no run is named (default: {default_recipe}); "
                             "beside a run, that run's recipe")
