"""Dataset registry: `build_datasets(data_config)` -> (train, val) datasets of the sample schema.

Sample schema (DESIGN.md): dict with `image` (3, H, W) float normalised, `depth` (1, H, W)
metres with 0 where invalid, `valid` (1, H, W) bool, `seg` (H, W) int64 with IGNORE_INDEX where
unlabelled, `intrinsics` (4,) fx, fy, cx, cy in pixels at this size, `index` int. Training sets
also expose `set_epoch(epoch)` so augmentation is a function of (seed, epoch, index).
"""
from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from distill.registry import Registry

DATASETS: Registry = Registry("dataset")


def cache_root(root: str = "") -> Path:
    """Where generated and cached data live: `root`, else $DENSEKIT_CACHE, else ~/.cache/densekit."""
    return Path(root or os.environ.get("DENSEKIT_CACHE", "~/.cache/densekit")).expanduser()


@DATASETS.register("synthrooms")
def synthrooms(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
    """The embedded default: generated on first use into the cache, reused afterwards."""
    from distill.data.synthrooms import SynthRoomsDataset, generate

    path = generate(cache_root(cfg.root) / "synthrooms", num_train=cfg.num_train, num_val=cfg.num_val,
                    height=cfg.height, width=cfg.width, seed=cfg.seed, progress=progress)
    return (SynthRoomsDataset(path, "train", augment=cfg.augment, seed=cfg.seed),
            SynthRoomsDataset(path, "val", augment=False, seed=cfg.seed))


def build_datasets(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
    name = cfg.dataset.split(":", 1)[0]
    return DATASETS.get(name)(cfg, progress=progress)


__all__ = ["DATASETS", "build_datasets", "cache_root"]
