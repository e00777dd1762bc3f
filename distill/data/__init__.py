"""Dataset registry: `build_datasets(data_config)` -> (train, val) datasets of the sample schema.

Sample schema (DESIGN.md): dict with `image` (3, H, W) float normalised, `depth` (1, H, W)
metres with 0 where invalid, `valid` (1, H, W) bool, `seg` (H, W) int64 with IGNORE_INDEX where
unlabelled, `intrinsics` (4,) fx, fy, cx, cy in pixels at this size (NaN when unknown), `index`
int, `flipped` bool (augmentation mirrored it; a cached pseudo-label follows). Training sets also
expose `set_epoch(epoch)` so augmentation is a function of (seed, epoch, index), and every dataset
exposes `content_hash(index) -> str` (sha256 of the sample's source image, before augmentation)
so a pseudo-label cache can prove it was made from these very images.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Dataset

from core.io import home_path
from core.registry import Registry

DATASETS: Registry = Registry("dataset")
NYU_LAYOUTS = ("nyu-labeled", "nyu-bts", "nyu-h5")
# the datasets read from a path ("name:path"), and those with no validation split of their own
FROM_PATH = ("nyu", *NYU_LAYOUTS, "folder")
UNLABELLED = ("folder",)


def cache_root(root: str = "") -> Path:
    """Where generated and cached data live: `root`, else $DENSEKIT_CACHE, else ~/.cache/densekit."""
    return home_path(root or os.environ.get("DENSEKIT_CACHE", "~/.cache/densekit"))


@DATASETS.register("synthrooms")
def synthrooms(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
    """The embedded default: generated on first use into the cache, reused afterwards."""
    from distill.data.synthrooms import SynthRoomsDataset, generate

    path = generate(cache_root(cfg.root) / "synthrooms", num_train=cfg.num_train, num_val=cfg.num_val,
                    height=cfg.height, width=cfg.width, seed=cfg.seed, progress=progress)
    # the loader's workers end with each epoch (they must see set_epoch), and their caches with them:
    # filled again every epoch, a cache in a worker is memory spent for nothing
    cache_mb = cfg.cache_mb if cfg.workers == 0 else 0
    return (SynthRoomsDataset(path, "train", augment=cfg.augment, seed=cfg.seed, cache_mb=cache_mb),
            SynthRoomsDataset(path, "val", augment=False, seed=cfg.seed, cache_mb=cache_mb))


@DATASETS.register("nyu")
def nyu_datasets(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
    """NYU Depth V2 (distill/data/nyu.py), `nyu:<path>`; the layout is detected from the path: a
    .mat file (official labelled set + splits.mat), a directory with BTS's lists or sync/, or one
    with train/ and val/ of .h5 files (FastDepth / TFDS). 13 classes where labelled; 480x640 when
    data.height/width are None; data.num_train / num_val keep the first N of each split.
    (Named nyu_datasets, not nyu, so that the submodule distill.data.nyu does not shadow it.)"""
    from distill.data.nyu import build

    return build(dataset_path(cfg), cfg)


def _nyu_layout(layout: str):
    def factory(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
        """NYU Depth V2 in one named layout (nyu-labeled:<.mat>, nyu-bts:<dir>, nyu-h5:<dir>)."""
        from distill.data.nyu import build

        return build(dataset_path(cfg), cfg, layout=layout)
    return factory


for _layout in NYU_LAYOUTS:
    DATASETS.register(_layout, _nyu_layout(_layout))


@DATASETS.register("folder")
def folder_datasets(cfg, progress: bool = True) -> tuple[Dataset, None]:
    """An unlabelled image folder (`folder:<path>`, distill/data/folder.py): training images only,
    no validation split, so `data.val_dataset` is required. data.num_train keeps the first N."""
    from distill.data.folder import ImageFolder

    size = (cfg.height or 480, cfg.width or 640)
    return ImageFolder(dataset_path(cfg), size=size, augment=cfg.augment, seed=cfg.seed, limit=cfg.num_train), None


def build_datasets(cfg, progress: bool = True) -> tuple[Dataset, Dataset]:
    """(train, val) for a `DataConfig`: `cfg.dataset` is "name" or "name:path"; validation comes from
    `cfg.val_dataset` when set (unlabelled folders have no validation split of their own)."""
    check_sources(cfg)
    train, val = DATASETS.get(cfg.dataset.split(":", 1)[0])(training_config(cfg), progress=progress)
    if cfg.val_dataset:
        # num_train=1: only its validation split is used (SynthRooms would render 4000 scenes)
        _, val = DATASETS.get(cfg.val_dataset.split(":", 1)[0])(replace(cfg, dataset=cfg.val_dataset, num_train=1),
                                                                 progress=progress)
    if val is None:
        raise ValueError(f"data.dataset={cfg.dataset} has no ground truth to validate on; set "
                         f"data.val_dataset (e.g. data.val_dataset=synthrooms or nyu:/data/nyu).")
    from distill.data.nyu import AbsentSplit
    if isinstance(val, AbsentSplit):   # a download of the training set alone, and no data.val_dataset
        raise val.error
    return train, val


def training_config(cfg):
    """`cfg` as the training dataset's own loader takes it: with data.val_dataset set and data.num_val
    left empty, its own (unused) validation split gets `unused_val_size`."""
    return cfg if not cfg.val_dataset or cfg.num_val else replace(cfg, num_val=unused_val_size(cfg))


def unused_val_size(cfg) -> int:
    """data.num_val for a training set whose own validation split goes unused (data.val_dataset is
    set): SynthRooms takes a set already rendered with this training split, whatever its validation
    size (a new num_val would render all the training scenes again), else one validation image."""
    if cfg.dataset.partition(":")[0] == "synthrooms":
        from distill.data.synthrooms import rendered_val_sizes

        rendered = rendered_val_sizes(cache_root(cfg.root) / "synthrooms", height=cfg.height, width=cfg.width,
                                      seed=cfg.seed, num_train=cfg.num_train)
        return rendered[0] if rendered else 1
    return 1


def check_sources(cfg) -> None:
    """Both datasets' names and paths, before either renders or reads anything: a mistyped
    validation set must not cost the training set's render first."""
    for key in ("dataset", "val_dataset"):
        spec = getattr(cfg, key)
        if not spec:
            continue
        name, _, path = spec.partition(":")
        DATASETS.get(name)   # UnknownNameError, with the closest name
        if name in FROM_PATH and not path:
            raise ValueError(f'data.{key}={spec!r} needs a path: "{name}:/path/to/data"')
        if path and not home_path(path).exists():   # a shell leaves "nyu:~/..." unexpanded
            raise FileNotFoundError(f"data.{key}={spec}: {path} does not exist; give the path of the data")
    if unlabelled(cfg.val_dataset):
        raise ValueError(f"data.val_dataset={cfg.val_dataset}: an image folder has no ground truth to validate on; "
                         f"name a labelled set (e.g. data.val_dataset=synthrooms or nyu:/data/nyu)")


def refuse_path_to_rendered(cfg) -> None:
    """A new run's "synthrooms:/x": the path was ignored and a set rendered under data.root instead.
    (Runs recorded with such a spec still evaluate and export: they trained on that render.)"""
    for key in ("dataset", "val_dataset"):
        name, _, path = getattr(cfg, key).partition(":")
        if name == "synthrooms" and path:
            raise ValueError(f"data.{key}={getattr(cfg, key)!r}: synthrooms is rendered, not read from a path; write "
                             f"data.{key}=synthrooms, and data.root={path} to keep its rendered sets there")


def unlabelled(spec: str) -> bool:
    """Whether a dataset spec ("name" or "name:path") names data without ground truth (an image folder)."""
    return spec.partition(":")[0] in UNLABELLED


def dataset_path(cfg) -> str:
    """The path part of "name:path" in `cfg.dataset`; raises when it is missing."""
    name, _, path = cfg.dataset.partition(":")
    if not path:
        raise ValueError(f'data.dataset={cfg.dataset!r} needs a path: "{name}:/path/to/data".')
    return path


__all__ = ["DATASETS", "build_datasets", "cache_root", "check_sources", "dataset_path", "unlabelled"]
