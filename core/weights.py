"""Weights and checkpoints: safetensors for weights (never a pickle), one directory per checkpoint.

A checkpoint is `epoch-NNNN/{model.safetensors, state.pt}`, renamed into place as one unit so the
weights and the optimizer/scheduler state of one epoch always travel together.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save

from core.io import IntegrityError, as_umask_allows, atomic_path, check_sha256, replace, sha256

WEIGHTS_SHA256 = "weights_sha256"   # the key in state.pt


def save_weights(dest: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Model weights as safetensors (never a pickle); `metadata` values must be strings. The same
    weights and metadata always make the same bytes, so the same sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(dest) as tmp:
        tmp.write_bytes(canonical_header(save(tensors, metadata=metadata)))


def canonical_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted. The writer puts the metadata in
    hash-map order, which changes from call to call (16 orders in 20 saves of 4 keys), so two runs
    that trained bit-identical weights wrote files with different sha256s. Tensor offsets count
    from the end of the header, so re-writing it (padded with spaces to 8 bytes, as the writer
    pads) changes nothing else."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; IntegrityError naming the file when it cannot be read."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:   # safetensors raises its own error types for truncated or garbled files
        raise IntegrityError(f"{path} cannot be read as safetensors weights ({type(exc).__name__}: {exc}): the "
                             f"file is truncated or corrupt; restore it from a copy, or make it again") from None


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (the recipe, the epoch, its validation figures)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def save_checkpoint(ckpt_dir: Path, epoch: int, weights: dict[str, torch.Tensor], state: dict,
                    metadata: dict[str, str], keep: int = 1) -> Path:
    """Write `ckpt_dir/epoch-NNNN/{model.safetensors,state.pt}` atomically as one unit.

    Both files go to a hidden temp directory that is renamed into place, so weights and the
    optimizer/scheduler state of the same epoch always travel together. state.pt also records the
    weights' sha256, which `check_checkpoint` verifies before a resume. Keeps the newest `keep`.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: a checkpoint directory keeps at least the newest epoch")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".epoch-*"):   # a killed save's temp directory (the run's writer is locked)
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpt_dir))
    try:
        save_weights(tmp / "model.safetensors", weights, metadata)
        with atomic_path(tmp / "state.pt") as t:
            torch.save({**state, WEIGHTS_SHA256: sha256(tmp / "model.safetensors")}, t)
        if final.exists():
            shutil.rmtree(final)
        as_umask_allows(tmp)   # mkdtemp makes 0700: a checkpoint the run's group could not resume
        replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in by_epoch(p for p in ckpt_dir.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `epoch-NNNN` directory, or None (hidden temp dirs are ignored)."""
    done = by_epoch(p for p in ckpt_dir.glob("epoch-*") if (p / "state.pt").is_file() and (p / "model.safetensors").is_file())
    return done[-1] if done else None


def by_epoch(dirs: Iterable[Path]) -> list[Path]:
    """`epoch-N` directories in the order of N (by name, epoch-10000 would come before epoch-9999);
    a name that is not epoch-<number> (made by hand) sorts first, so it is never taken as the newest."""
    def number(p: Path) -> int:
        tail = p.name.removeprefix("epoch-")
        return int(tail) if tail.isdigit() else -1
    return sorted(dirs, key=lambda p: (number(p), p.name))


def load_state(path: str | Path) -> dict:
    """A checkpoint's state.pt; IntegrityError naming the file when it cannot be read."""
    try:
        # weights_only: optimizer/scheduler state is tensors and plain containers; never run pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise IntegrityError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): the "
                             f"checkpoint is truncated or corrupt") from None


def check_checkpoint(ckpt: Path) -> dict:
    """A checkpoint's state, after checking its weights against the sha256 that state.pt recorded
    (checkpoints written before that record are read as they are)."""
    return checked_checkpoint(ckpt)[0]


def checked_checkpoint(ckpt: Path) -> tuple[dict, str | None]:
    """`check_checkpoint`'s state and the weights' sha256 once verified against the record (None for
    checkpoints written before it), so a caller that names the weights need not hash them again."""
    state = load_state(ckpt / "state.pt")
    recorded = state.pop(WEIGHTS_SHA256, None)
    if recorded is None:
        return state, None
    return state, check_sha256(ckpt / "model.safetensors", recorded, record="its checkpoint recorded",
                               fix="the weights are corrupt. Resume from an intact copy of the run, or start a new run")
