"""`python -m distill.cache_teacher TEACHER data=SPEC out=DIR [key=value ...]` - label a dataset once.

    python -m distill.cache_teacher da2-metric teacher.source=/models/da2-metric data=nyu:/data/nyu out=/data/cache/da2
    torchrun --nproc_per_node 4 -m distill.cache_teacher da2-metric ... out=DIR     # shards split over ranks
    python -m distill.run v3 teacher.name=da2-metric teacher.source=/models/da2-metric teacher.cache=/data/cache/da2

Keys: `data=SPEC` (= data.dataset), `out=DIR` (required), `split=train|val` (default train),
`shard_size=256`, `batch_size=8`, `max_shards=N` (write at most N new shards, then exit 75: run
the same command again to continue), `recipe=v3` (whose sizes, resolved for this device, the
cache uses: by default it matches `python -m distill.run v3` here), and any `data.*` / `teacher.*`
key. Images are labelled without augmentation at the dataset's size; a kill loses at most the
shard being written, and the same command resumes. The layout is in `distill/teachers/cache.py`.
Exit codes: 0 complete, 75 partial (max_shards), 2 bad arguments or a different cache in DIR,
1 a teacher produced non-finite or fp16-overflowing labels.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from distill import distributed, io
from distill.config import ConfigError, apply_overrides
from distill.teachers.cache import FORMAT, read_shard_hashes, shard_name

OPTIONS = {"out": str, "split": str, "shard_size": int, "batch_size": int, "max_shards": int, "recipe": str, "device": str}
PARTIAL = 75
FP16_MAX = 65504.0


def parse(argv: list[str]) -> tuple[object, dict]:
    """(recipe with overrides, options) from `TEACHER key=value ...`; raises ConfigError."""
    from distill.recipes import get_recipe

    if not argv or "=" in argv[0]:
        raise ConfigError("usage: python -m distill.cache_teacher TEACHER data=SPEC out=DIR [key=value ...]")
    options = {"split": "train", "shard_size": 256, "batch_size": 8, "max_shards": 0, "recipe": "v3", "device": "auto"}
    overrides = [f"teacher.name={argv[0]}"]
    for item in argv[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f'"{item}" is not key=value')
        if key == "data":
            overrides.append(f"data.dataset={value}")
        elif key in OPTIONS:
            try:
                options[key] = OPTIONS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected {OPTIONS[key].__name__}") from None
        elif key.startswith(("data.", "teacher.")):
            overrides.append(item)
        else:
            raise ConfigError(f'unknown key "{key}": use data=, out=, {", ".join(k for k in OPTIONS if k != "out")}, '
                              f"or data.* / teacher.* keys")
    if "out" not in options:
        raise ConfigError("out=DIR is required: where the cache is written")
    if options["split"] not in ("train", "val"):
        raise ConfigError(f"split={options['split']!r}: must be train or val")
    return apply_overrides(get_recipe(options["recipe"]), overrides), options


def job_for(recipe, teacher, dataset, options: dict) -> dict:
    return {"format": FORMAT, "teacher": teacher.identity(), "space": teacher.space.value,
            "range": [teacher.range.low, teacher.range.high],
            "recipe_teacher": {"name": recipe.teacher.name, "source": recipe.teacher.source},
            "dataset": recipe.data.dataset, "split": options["split"], "height": recipe.data.height,
            "width": recipe.data.width, "count": len(dataset), "shard_size": options["shard_size"], "dtype": "float16"}


def claim(out: Path, job: dict) -> None:
    """Write job.json, or check that the one in `out` is this job (resume)."""
    path = out / "job.json"
    if path.is_file():
        old = json.loads(path.read_text())
        differ = [f"{k}: {old.get(k)!r} in DIR, now {job[k]!r}" for k in job if old.get(k) != job[k]]
        if differ:
            raise ConfigError(f"{out} holds a cache of another job:\n  - " + "\n  - ".join(differ)
                              + "\nUse another out=, or delete it to start over.")
        return
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(path, job)


def label_shard(teacher, dataset, start: int, stop: int, batch_size: int, device) -> torch.Tensor:
    """(n, 1, H, W) float16 labels of samples [start, stop); raises on non-finite or overflow."""
    parts = []
    for first in range(start, stop, batch_size):
        indices = range(first, min(first + batch_size, stop))
        batch = default_collate([dataset[i] for i in indices])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        depth = teacher(batch).float().cpu()
        for i, label in zip(indices, depth):
            if not torch.isfinite(label).all() or label.abs().max() > FP16_MAX:
                what = "non-finite values" if not torch.isfinite(label).all() else f"values beyond fp16 ({FP16_MAX:g})"
                raise FloatingPointError(f"teacher {teacher.name} gave {what} for sample {i} of {dataset_label(dataset)}; "
                                         f"nothing was written for its shard. Check that image and the teacher")
        parts.append(depth.half())
    return torch.cat(parts)


def dataset_label(dataset) -> str:
    return type(dataset).__name__


def run(recipe, options: dict, log=print) -> int:
    from distill.data import build_datasets
    from distill.recipes import resolve_for_device
    from distill.teachers import teacher_for
    from distill.train import pick_device

    rank = distributed.from_environment()
    device = pick_device(options["device"], rank.local_rank)
    distributed.init(rank, device)
    try:
        recipe, _ = resolve_for_device(recipe, device.type)
        train, val = build_datasets(replace(recipe.data, augment=False), progress=rank.main)
        dataset = train if options["split"] == "train" else val
        teacher = teacher_for(replace(recipe.teacher, cache="")).to(device)
        out, size = Path(options["out"]), options["shard_size"]
        job = job_for(recipe, teacher, dataset, options)
        if rank.main:
            claim(out, job)
            for stale in out.glob(".shard-*.tmp"):   # a killed run's half-written shard
                stale.unlink()
        distributed.barrier(rank)
        total = math.ceil(len(dataset) / size)
        todo = [k for k in range(total) if k % rank.world == rank.rank and not (out / shard_name(k)).is_file()]
        limit = options["max_shards"] or len(todo)
        t0, labelled = time.time(), 0
        for k in tqdm(todo[:limit], desc=f"caching {teacher.name}", disable=not rank.main, unit="shard"):
            start, stop = k * size, min((k + 1) * size, len(dataset))
            depth = label_shard(teacher, dataset, start, stop, options["batch_size"], device)
            hashes = [dataset.content_hash(i) for i in range(start, stop)]
            # One metadata key: safetensors writes several in hash-map order, and the shard's bytes
            # (its sha256 in the manifest) must not depend on the process that wrote it.
            io.save_weights(out / shard_name(k), {"depth": depth},
                            {"shard": json.dumps({"start": start, "stop": stop, "content_hashes": hashes})})
            labelled += stop - start
        distributed.barrier(rank)
        if not rank.main:
            return 0
        missing = [k for k in range(total) if not (out / shard_name(k)).is_file()]
        seconds = time.time() - t0
        log(f"labelled {labelled} images in {seconds:.1f} s ({labelled / max(seconds, 1e-9):.1f} images/s)")
        if missing:
            log(f"partial: {total - len(missing)} of {total} shards in {out}; run the same command again to continue")
            return PARTIAL
        shards = [{"file": shard_name(k), "start": k * size, "stop": min((k + 1) * size, len(dataset)),
                   "sha256": io.sha256(out / shard_name(k))} for k in range(total)]
        io.write_json(out / "manifest.json", {**job, "shards": shards})
        source = f" teacher.source={recipe.teacher.source}" if recipe.teacher.source else ""
        log(f"complete: {len(dataset)} labels of {teacher.name} in {out}\n"
            f"train with: python -m distill.run {options['recipe']} teacher.name={recipe.teacher.name}{source} "
            f"teacher.cache={out}")
        return 0
    finally:
        distributed.shutdown(rank)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        recipe, options = parse(argv)
        return run(recipe, options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
