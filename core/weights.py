"""Weights and checkpoints: safetensors for weights (never a pickle), one directory per checkpoint.

A checkpoint is `epoch-NNNN/{model.safetensors, state.pt}`, renamed into place as one unit so the
weights and the optimizer/scheduler state of one epoch always travel together.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.io import atomic_path


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
