"""Atomic file writes and checkpoints. A killed process never leaves a half file that looks whole.

Everything goes to a temporary name in the destination's directory, is fsynced, then renamed
over the destination (rename is atomic within one filesystem).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success fsync it and rename it to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600: a cache or run others cannot read
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, data: Any) -> None:
    write_text(dest, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(dest: str | Path, record: dict) -> None:
    """Append one line; a torn last line (killed mid-write) is skipped by `read_jsonl`."""
    with open(dest, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_weights(dest: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Model weights as safetensors (never a pickle); `metadata` values must be strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_checkpoint(ckpt_dir: Path, epoch: int, weights: dict[str, torch.Tensor], state: dict,
                    metadata: dict[str, str], keep: int = 1) -> Path:
    """Write `ckpt_dir/epoch-NNNN/{model.safetensors,state.pt}` atomically as one unit.

    Both files go to a hidden temp directory that is renamed into place, so weights and the
    optimizer/scheduler state of the same epoch always travel together. Keeps the newest `keep`.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpt_dir))
    try:
        save_weights(tmp / "model.safetensors", weights, metadata)
        with atomic_path(tmp / "state.pt") as t:
            torch.save(state, t)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in ckpt_dir.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `epoch-NNNN` directory, or None (hidden temp dirs are ignored)."""
    done = sorted(p for p in ckpt_dir.glob("epoch-*") if (p / "state.pt").is_file() and (p / "model.safetensors").is_file())
    return done[-1] if done else None


def load_state(path: str | Path) -> dict:
    # weights_only: optimizer/scheduler state is tensors and plain containers; never run pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory (e.g. an .mlpackage) as its sorted (relative path,
    content) pairs. For a file it is the plain `sha256sum`."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
