"""The teacher pseudo-label cache: labels written once (`python -m distill.cache_teacher`), read by
training as a teacher (`teacher.cache=DIR`).

Layout of DIR:
    job.json                  what is being cached (written first; a resumed run must match it):
                              format, teacher identity, space and range, the recipe's teacher
                              name/source, dataset, split and where each split lies ("splits":
                              {"train": [0, n]}; split=all holds train then val), height, width,
                              count, shard_size, dtype float16, tensors, and "images" (sha256 of the
                              samples' content hashes in order)
    shard-NNNNN.safetensors   samples [k * shard_size, ...) of the job: `depth` (n, 1, H, W) float16
                              and, where the teacher provides them, `seg_logits` (n, C, H, W)
                              float16; metadata key "shard" = JSON {start, stop, content_hashes}
                              (one key, the first fix for safetensors' per-call key order; now
                              core.weights.save_weights sorts every header, so a shard's bytes
                              never depend on who wrote it). Each shard is
                              written atomically, so a kill never leaves a half shard.
    manifest.json             job.json + "shards": [{file, start, stop, sha256}], written last: a
                              cache without it is incomplete and is refused
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from core.io import home_path, read_json, sha256
from core.spaces import DepthSpace, ValueRange
from core.weights import load_weights
from distill.teachers.base import Teacher

FORMAT = "densekit.teacher-cache/1"
TENSORS = ("depth", "seg_logits")     # what a shard may hold; `depth` always
OPEN_SHARDS = 8                       # memory-mapped shard files kept open (batches are shuffled)


class CacheMismatchError(ValueError):
    """A cache that does not belong to this training run; the message lists every difference."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_metadata(path: Path) -> dict:
    """{start, stop, content_hashes} recorded in a shard file."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["shard"])


def teacher_tensors(teacher: Teacher) -> tuple[str, ...]:
    """The tensors a teacher's cache holds: `depth`, plus `seg_logits` where the teacher declares
    `provides_seg_logits` and has `seg_logits(batch) -> (B, C, H, W)` (none of ours does yet)."""
    return TENSORS if getattr(teacher, "provides_seg_logits", False) else ("depth",)


def check_weights(path: Path, manifest: dict, source: str) -> None:
    """The weights now at a local `source` must be those the cache was made with (the digest its
    teacher recorded): the same path can hold another checkpoint. Hashing a 1.3 GB teacher takes
    about 0.9 s here (page cache, 2 cores); a hub id is compared by name only."""
    from distill.teachers.depth_anything import weights_digest

    recorded, folder = manifest["teacher"].get("weights"), home_path(source) if source else None
    if not recorded or folder is None or not folder.is_dir():
        return
    now = weights_digest(folder)
    if now != recorded:
        raise CacheMismatchError(f"teacher.cache={path} was made with other weights than those now at "
                                 f"teacher.source={source} (sha256 {recorded[:12]} in the cache, {now[:12]} there); "
                                 f"rebuild the cache with python -m distill.cache_teacher, or point teacher.source "
                                 f"at the weights it was made with")


class CachedTeacher(Teacher):
    """Labels from a finished cache, looked up by `batch["index"]` in the split it serves
    (`train` unless opened or verified for another), mirrored where `batch["flipped"]`."""

    needs_ground_truth = False

    def __init__(self, path: str | Path, manifest: dict, split: str = "train"):
        self.path, self.manifest = Path(path), manifest
        self.name = manifest["teacher"]["name"]
        self.space = DepthSpace(manifest["space"])
        self.range = ValueRange(*manifest["range"])
        self.provides_seg_logits = "seg_logits" in manifest["tensors"]
        self.split = split if split in manifest["splits"] else manifest["split"]
        self._open: OrderedDict[int, object] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, cfg=None, *, split: str = "train") -> "CachedTeacher":
        """Open a finished cache; with a `TeacherConfig`, refuse one made by another teacher."""
        path = home_path(path)   # a shell leaves "teacher.cache=~/..." unexpanded
        if not (path / "manifest.json").is_file():
            if (path / "job.json").is_file():
                raise FileNotFoundError(f"teacher.cache={path} is incomplete (no manifest.json: the caching run "
                                        f"stopped before the end); run python -m distill.cache_teacher with "
                                        f"out={path} and the same arguments to finish it")
            raise FileNotFoundError(f"teacher.cache={path} is not a pseudo-label cache (no manifest.json); build "
                                    f"one with python -m distill.cache_teacher <teacher> data=... out=DIR, or drop "
                                    f"teacher.cache to label online")
        manifest = read_json(path / "manifest.json", "rebuild the cache with python -m distill.cache_teacher")
        if manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{path}/manifest.json has format {manifest.get('format')!r}; this code reads "
                                     f"{FORMAT}. Rebuild the cache with python -m distill.cache_teacher")
        if cfg is not None:
            made = manifest["recipe_teacher"]
            differ = [f"teacher.{k}: cache {made[k]!r}, recipe {getattr(cfg, k)!r}" for k in ("name", "source")
                      if made[k] != getattr(cfg, k)]
            # a ViT teacher's labels depend on the size it saw; only real teachers record one
            made_size = manifest["teacher"].get("input_size")
            if made_size is not None and made_size != cfg.input_size:
                differ.append(f"teacher.input_size: cache {made_size}, recipe {cfg.input_size}")
            if differ:
                raise CacheMismatchError(
                    f"teacher.cache={path} was made by another teacher ({'; '.join(differ)}); set "
                    f"teacher.name={made['name']}" + (f" teacher.source={made['source']}" if made["source"] else "")
                    + (f" teacher.input_size={made_size}" if made_size is not None else "")
                    + ", or build a cache for this teacher with python -m distill.cache_teacher")
            check_weights(path, manifest, cfg.source)
        return cls(path, manifest, split)

    def identity(self) -> dict:
        """The identity of the teacher that made the cache (a cache of this cache records the same)."""
        return self.manifest["teacher"]

    # ------------------------------------------------------------------ reading labels

    def _shard(self, k: int):
        """Shard `k`'s file, memory-mapped: rows are read on demand, a few files kept open."""
        if k not in self._open:
            self._open[k] = safe_open(str(self.path / shard_name(k)), "pt")
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def _rows(self, name: str, batch: dict) -> torch.Tensor:
        """(B, C, H, W) float32 rows of tensor `name` for the batch's samples, mirrored where flipped."""
        first, stop = self.manifest["splits"][self.split]
        size, rows = self.manifest["shard_size"], []
        flipped = torch.as_tensor(batch.get("flipped", False)).expand(len(batch["index"])).tolist()
        for i, flip in zip(torch.as_tensor(batch["index"]).tolist(), flipped):
            g = first + i
            if not 0 <= i < stop - first:
                raise IndexError(f"sample {i} of split {self.split!r} is not in teacher.cache={self.path} "
                                 f"({stop - first} samples): the dataset is not the cached one; run verify()")
            row = self._shard(g // size).get_slice(name)[g % size:g % size + 1][0].float()
            rows.append(row.flip(-1) if flip else row)
        return torch.stack(rows).to(batch["image"].device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        """(B, 1, H, W) float32 cached depth of `batch["index"]`, on the batch's device."""
        return self._rows("depth", batch)

    @torch.no_grad()
    def seg_logits(self, batch: dict) -> torch.Tensor | None:
        """(B, C, H, W) float32 cached segmentation logits, or None when the teacher had none."""
        return self._rows("seg_logits", batch) if self.provides_seg_logits else None

    # ------------------------------------------------------------------ checks before training

    def verify(self, dataset, *, height: int, width: int, split: str = "train") -> None:
        """Raise CacheMismatchError unless the cache holds labels of exactly these images (content
        hashes) of `split` at height x width; on success the teacher serves `split`."""
        m, problems = self.manifest, []
        if split not in m["splits"]:
            problems.append(f"split: cache {m['split']!r}, training {split!r}")
        if (m["height"], m["width"]) != (height, width):
            problems.append(f"resolution: cache {m['height']}x{m['width']}, training {height}x{width}")
        # a one-split cache is compared as it is (count, images) even when it is of another split
        first, stop = m["splits"].get(split) or next(iter(m["splits"].values()))
        missing = [s["file"] for s in m["shards"] if not (self.path / s["file"]).is_file()]
        changed = [s["file"] for s in m["shards"]
                   if s["file"] not in missing and sha256(self.path / s["file"]) != s["sha256"]]
        if missing:
            problems.append(f"shard files missing: {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        elif changed:
            problems.append(f"{len(changed)} shard(s) differ from the sha256 in manifest.json, so their labels changed "
                            f"after caching: {', '.join(changed[:3])}" + (" ..." if len(changed) > 3 else ""))
        elif stop - first != len(dataset):
            problems.append(f"samples: cache {stop - first}, dataset {len(dataset)}")
        else:
            problems += self._image_problems(dataset, first)
        if problems:
            raise CacheMismatchError(f"teacher.cache={self.path} does not match this run (cache of {m['dataset']} "
                                     f"by {self.name}):\n  - " + "\n  - ".join(problems) + "\nBuild a cache for this "
                                     "data, split and size with python -m distill.cache_teacher, or drop teacher.cache")
        self.split = split

    def _image_problems(self, dataset, first: int) -> list[str]:
        """Content hashes of `dataset` against the cached ones from global position `first`."""
        cached = [h for s in self.manifest["shards"] for h in shard_metadata(self.path / s["file"])["content_hashes"]]
        hashes = (dataset.content_hash(i) for i in range(len(dataset)))   # each file read once
        wrong = [(i, cached[first + i], h) for i, h in enumerate(hashes) if h != cached[first + i]]
        if not wrong:
            return []
        shown = "; ".join(f"{i}: cache {a[:12]}, dataset {b[:12]}" for i, a, b in wrong[:3])
        return [f"images: {len(wrong)} of {len(dataset)} differ from the cached ones (sha256 content hashes; "
                f"{shown}): the cache was made from other images, or from photos that image folders turn "
                f"upright by their EXIF orientation since 2026-12-05 (core/images.py), or from an image folder with "
                f"an intrinsics.json, whose camera is part of each image's hash since 2026-12-06, or from NYU's BTS "
                f"lists, whose focal column is since 2026-12-07 (da3-metric's metres depend on both): label it "
                f"again with python -m distill.cache_teacher"]

    def scan_finite(self) -> list[int]:
        """Indices (as in batch["index"]) of the served split's samples with any non-finite cached value."""
        first, stop = self.manifest["splits"][self.split]
        bad: list[int] = []
        for shard in self.manifest["shards"]:
            lo, hi = max(shard["start"], first), min(shard["stop"], stop)
            if lo >= hi:
                continue
            tensors = load_weights(self.path / shard["file"])
            for t in tensors.values():
                rows = t[lo - shard["start"]:hi - shard["start"]].float()
                bad += [lo - first + r for r in (~torch.isfinite(rows)).flatten(1).any(1).nonzero().flatten().tolist()]
        return sorted(set(bad))
