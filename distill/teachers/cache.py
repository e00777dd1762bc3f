"""The teacher pseudo-label cache: labels written once (`python -m distill.cache_teacher`), read by
training as a teacher (`teacher.cache=DIR`).

Layout of DIR:
    job.json                  what is being cached: teacher identity and units, dataset, split,
                              size, count, shard size (written first; a resumed run must match it)
    shard-NNNNN.safetensors   `depth` (n, 1, H, W) float16 of samples [start, stop), with start,
                              stop and the samples' content hashes in its metadata (one JSON key,
                              so the bytes are reproducible), each written atomically
    manifest.json             job.json + every shard's sha256, written last: a cache without it is
                              incomplete and is refused
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from distill.spaces import DepthSpace, ValueRange
from distill.teachers.base import Teacher

FORMAT = "densekit.teacher-cache/1"


class CacheMismatchError(ValueError):
    """A cache that does not belong to this training run; the message lists every difference."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def read_shard_hashes(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["shard"])["content_hashes"]


class CachedTeacher(Teacher):
    """Labels from a finished cache, looked up by `batch["index"]`, mirrored where `flipped`."""

    needs_ground_truth = False

    def __init__(self, path: str | Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.name = manifest["teacher"]["name"]
        self.space = DepthSpace(manifest["space"])
        self.range = ValueRange(*manifest["range"])
        self._shards: OrderedDict[int, torch.Tensor] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, cfg=None) -> "CachedTeacher":
        """Open a finished cache; with a `TeacherConfig`, refuse one made by another teacher."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            state = "is incomplete (no manifest.json: the caching run was stopped)" if (path / "job.json").is_file() \
                else "is not a pseudo-label cache"
            raise FileNotFoundError(f"teacher.cache={path} {state}; run python -m distill.cache_teacher with the same "
                                    f"arguments to finish it")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT}")
        if cfg is not None:
            made = manifest["recipe_teacher"]
            differ = [f"teacher.{k}: cache {made[k]!r}, recipe {getattr(cfg, k)!r}" for k in ("name", "source")
                      if made[k] != getattr(cfg, k)]
            if differ:
                raise CacheMismatchError(f"teacher.cache={path} was made by another teacher ({'; '.join(differ)}); "
                                         f"set teacher.name/teacher.source to the cache's, or build a cache for this teacher")
        return cls(path, manifest)

    def identity(self) -> dict:
        return self.manifest["teacher"]

    def shard(self, k: int) -> torch.Tensor:
        if k not in self._shards:
            with safe_open(str(self.path / shard_name(k)), "pt") as f:
                self._shards[k] = f.get_tensor("depth")
            while len(self._shards) > 4:   # a few shards in memory: batches are shuffled
                self._shards.popitem(last=False)
        return self._shards[k]

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        size = self.manifest["shard_size"]
        labels = []
        for i, flipped in zip(torch.as_tensor(batch["index"]).tolist(), torch.as_tensor(batch["flipped"]).tolist()):
            label = self.shard(i // size)[i % size].float()
            labels.append(label.flip(-1) if flipped else label)
        return torch.stack(labels).to(batch["image"].device)

    def verify(self, dataset, *, height: int, width: int, split: str = "train") -> None:
        """Raise CacheMismatchError unless the cache holds labels of exactly these images at this size."""
        m, problems = self.manifest, []
        if m["split"] not in (split, "all"):
            problems.append(f"split: cache {m['split']!r}, training {split!r}")
        if (m["height"], m["width"]) != (height, width):
            problems.append(f"resolution: cache {m['height']}x{m['width']}, training {height}x{width}")
        if m["count"] != len(dataset):
            problems.append(f"samples: cache {m['count']}, dataset {len(dataset)}")
        else:
            cached = [h for s in m["shards"] for h in read_shard_hashes(self.path / s["file"])]
            wrong = [i for i in range(len(dataset)) if dataset.content_hash(i) != cached[i]]
            if wrong:
                problems.append(f"images: {len(wrong)} of {len(dataset)} differ from the cached ones (content hashes; "
                                f"first indices {wrong[:5]}): the cache was made from other images")
        if problems:
            raise CacheMismatchError(f"teacher.cache={self.path} does not match this run ({m['dataset']}):\n  - "
                                     + "\n  - ".join(problems) + "\nBuild a cache for this data and size with "
                                     "python -m distill.cache_teacher, or drop teacher.cache")

    def scan_finite(self) -> list[int]:
        """Indices of samples with any non-finite cached value."""
        size, bad = self.manifest["shard_size"], []
        for k, _ in enumerate(self.manifest["shards"]):
            depth = self.shard(k)
            rows = (~torch.isfinite(depth.float())).flatten(1).any(1).nonzero().flatten().tolist()
            bad += [k * size + r for r in rows]
        return bad
