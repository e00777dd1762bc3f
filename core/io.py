"""Atomic file writes and content hashes. A killed process never leaves a half file that looks whole.

Everything goes to a temporary name in the destination's directory, is fsynced, then renamed
over the destination (rename is atomic within one filesystem), and the directory is fsynced so the
rename itself survives a power cut (`replace`).

Torch-free on purpose: the runtime processes (edge/run.py, edge/bench.py) must never import torch
(TensorFlow and torch crash in one process, docs/TOOLCHAIN.md). Weights and checkpoints, which do
need torch, live in core/weights.py.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: setting the umask to read it changes it for every thread of the process for
# that moment (a file another thread creates then would be world-writable).
UMASK = _read_umask()


def as_umask_allows(path: Path) -> None:
    """Give a temp file (mkstemp: 0600) or directory (mkdtemp: 0700) the mode a plain open() or
    mkdir() would have, before it is renamed into place: a cache, run or checkpoint others can read."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


class IntegrityError(ValueError):
    """A file that is corrupt, truncated or differs from the hash recorded for it; the message
    names the file and the fix."""


TEMP_SUFFIX = ".tmp"   # atomic_path's temp files: ".<name>.<random>.tmp" beside their target

# What a write to a full file system raises besides ENOSPC (None: an OSError without an errno).
WRITE_ERRNOS = (None, errno.EIO, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success fsync it and rename it to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the name cut to 100 bytes: the temp name is 14 longer, and NAME_MAX (255 bytes) is for `dest`
    short = os.fsencode(dest.name)[:100].decode(errors="ignore")   # bytes: a CJK name's characters are three
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{short}.", suffix=TEMP_SUFFIX, dir=dest.parent)
    except OSError as exc:   # named by the path the caller gave, not by a temp name it never saw
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        as_umask_allows(tmp)
        replace(tmp, dest)
    except Exception as exc:
        # Writers report a full disk in their own words (torch.save: "unexpected pos ..."); say it plainly.
        # Only their I/O errors: a refusal (ValueError) or a missing source (ENOENT) on a nearly full
        # disk keeps its own words.
        own_io = isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS)
        if own_io and out_of_space(dest.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(directory: Path) -> None:
    """Remove the temp files `atomic_path` left in `directory` when its writer was killed. Only for
    the holder of the directory's lock (core/lock.py): another writer's may be in progress."""
    for stale in directory.glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Its contents on disk before a rename makes them visible under their final name."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace(src: str | Path, dest: str | Path) -> None:
    """os.replace, then fsync the directory: POSIX keeps a rename in the directory, not in the file,
    so without it a power cut can bring back the old name after the caller went on."""
    os.replace(src, dest)
    fsync_dir(Path(dest).parent)


def fsync_dir(directory: Path) -> None:
    """A directory's entries on disk (its renames and new names). Windows cannot open a directory
    and needs no such sync; some network file systems refuse it (EINVAL): nothing more can be done."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory` (an .mlpackage about to be renamed into place), so a power
    cut after the rename cannot leave empty files under the final name."""
    for path in tree_files(directory):
        fsync_file(path)


def out_of_space(directory: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of `directory` has less than `margin` bytes left."""
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def home_path(path: str | os.PathLike) -> Path:
    """`path` with a leading "~" or "~/" as the home folder (a shell expands it only at a word's
    start, so it reaches the program from `--out=~/x`, `key=~/x` or Python). os.path's rule:
    "~draft.onnx", with no such user, stays itself, where Path.expanduser raises RuntimeError."""
    return Path(os.path.expanduser(os.fspath(path)))


def check_writable(directory: str | Path, what: str) -> None:
    """ValueError naming `what` unless `directory` exists as a writable directory or can be made
    one: checked before long work, so a bad output place never costs a training or a conversion."""
    directory = Path(directory)
    named = f"{what}{directory}" if what.endswith("=") else f"{what} {directory}"   # out=DIR, --out DIR
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{named}: {existing} is a file, not a directory; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{named}: {existing} is not writable (a read-only file system or no "
                         f"permission); choose another place")


def check_output_file(path: str | Path, what: str, *, reads: Iterable[str | Path] = (), suffix: str = ".json") -> None:
    """ValueError naming `what` unless `path` can be written as a result file: named `*suffix`, not a
    directory, none of the files the command reads (`reads`), in a directory that is writable or can
    be made. Checked before the work whose result it holds.

    Why the name and `reads`: a slip of the arguments (`--json model.tflite`, `--json manifest.json`,
    `--out <run>/best.safetensors`) replaced an input with the result, and the command said "wrote"."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name, e.g. {path / ('result' + suffix)}")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{what} {path}: the result is {suffix[1:].upper()}; give a file name ending in {suffix}, "
                         f"e.g. {path.with_name(path.stem + suffix)}")
    if path.exists() and any(Path(r).exists() and os.path.samefile(path, r) for r in reads):
        raise ValueError(f"{what} {path} is a file this command reads; give another file name, "
                         f"e.g. {path.with_name(path.stem + '-result' + suffix)}")
    # by its mode bits, not os.access (always true for root): the atomic rename would replace it anyway
    if path.is_file() and not path.stat().st_mode & 0o222:
        raise ValueError(f"{what} {path} is read-only, kept from being replaced; make it writable "
                         f"(chmod u+w {path}) or give another file name")
    check_writable(path.parent, what)


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str) -> None:
    write_bytes(dest, text.encode())


def json_default(value: Any) -> Any:
    """What json cannot write itself: a numpy scalar or array as its Python number(s) (not the
    string default=str made of it, which reads back as "0.5"), anything else as its str (a Path)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):   # numpy, without importing it here
        return value.tolist()
    return str(value)


def write_json(dest: str | Path, data: Any) -> None:
    write_text(dest, json.dumps(data, indent=2, default=json_default) + "\n")


def append_jsonl(dest: str | Path, record: dict) -> None:
    """Append one line; a torn last line (killed mid-write) is skipped by `read_jsonl`."""
    with open(dest, "a") as f:
        f.write(json.dumps(record, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path, fix: str):
    """The JSON document at `path`; ValueError naming the file and `fix` when it cannot be read
    (written atomically here, so a damaged one was edited by hand or hit by the disk)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({type(e).__name__}: {e}); {fix}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a line that is not JSON is skipped, wherever it is (a torn
    last line, killed mid-write; the resume that follows rewrites the file without it)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def check_sha256(path: str | Path, recorded: str, *, record: str, fix: str) -> str:
    """`path`'s sha256, after checking it against `recorded`; IntegrityError naming the record
    (e.g. "its run recorded") and the fix when they differ. Every place that uses recorded weights
    or artefacts checks them here, so each refusal reads the same way."""
    digest = sha256(path)
    if not matches_record(path, recorded, digest):
        now = digest[:12]
        if Path(path).is_dir():   # the record may be in either scheme: show the tree's digest in both
            now += f"; {tree_sha256_v1(path)[:12]} in the first scheme, until 2026-12-04"
        raise IntegrityError(f"{path} differs from the sha256 {record} ({recorded[:12]}, now {now}): {fix}")
    return digest


def matches_record(path: str | Path, recorded: str, digest: str | None = None) -> bool:
    """Whether `path` has the sha256 `recorded` (`digest`: its sha256, if already computed). A
    directory recorded in the first scheme (until 2026-12-04) matches that scheme (`tree_sha256_v1`)."""
    if (digest or sha256(path)) == recorded:
        return True
    path = Path(path)
    files = tree_files(path) if path.is_dir() else []
    # v1's digest of an empty tree is an empty file's: never taken for one
    return bool(files) and tree_sha256_v1(path, files) == recorded


def sha256(path: str | Path) -> str:
    """sha256 of a file (the plain `sha256sum`), or of a directory such as an .mlpackage: its files
    in sorted order, each as its relative path and its contents, both preceded by their length in
    8 bytes, so that no two different sets of files hash alike (empty directories are not hashed)."""
    path = existing(path)
    if path.is_file():
        return file_digest(path, hashlib.sha256()).hexdigest()
    digest = hashlib.sha256(TREE_V2)
    for f in tree_files(path):
        name = os.fsencode(f.relative_to(path).as_posix())   # "/" on every OS; any byte a name holds
        digest.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        file_digest(f, digest)
    return digest.hexdigest()


TREE_V2 = b"densekit tree sha256 v2\0"   # sets directory digests apart from file digests and from v1


def tree_sha256_v1(path: str | Path, files: list[Path] | None = None) -> str:
    """The directory digest of the first scheme (until 2026-12-04): relative path, NUL, contents, with no
    lengths, so a file's contents could run into the next name. Only checked, never recorded. `files`:
    `tree_files(path)`, if already listed."""
    path = existing(path)
    digest = hashlib.sha256()
    for f in tree_files(path) if files is None else files:
        digest.update(str(f.relative_to(path)).encode() + b"\0")
        file_digest(f, digest)
    return digest.hexdigest()


def existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: nothing to hash")
    return path


def tree_bytes(path: Path) -> int:
    """A file's size, or the summed sizes of a directory's files (an .mlpackage)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_files(directory: Path) -> list[Path]:
    # ordered by the path's parts, case-sensitive on every OS (Windows paths compare case-blind)
    return sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).parts)


def file_digest(path: Path, digest):
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest
