"""`python -m distill.cache_teacher TEACHER data=SPEC out=DIR [key=value ...]` - label a dataset once.

    python -m distill.cache_teacher da2-metric teacher.source=/models/da2-metric data=nyu:/data/nyu out=/data/cache/da2
    torchrun --nproc_per_node 4 -m distill.cache_teacher da2-metric ... out=DIR      # shards split over ranks
    python -m distill.run v3 teacher.name=da2-metric teacher.source=/models/da2-metric teacher.cache=/data/cache/da2

Keys:
  data=SPEC        the dataset (= data.dataset), e.g. nyu:/data/nyu, folder:/imgs; default synthrooms
  out=DIR          where the cache is written (required)
  split=S          train (default), val, or all (train then val)
  shard_size=N     samples per shard file (default 256)
  batch_size=N     images per teacher call (default 8)
  max_shards=N     write at most N new shards, then exit 75: run the same command again to continue
                   (chunked jobs on preemptible machines); 0, the default: no limit
  recipe=NAME      whose sizes (resolved for this device) the cache uses (default v3: the cache then
                   matches `python -m distill.run v3` on this machine)
  device=D         auto (default: cuda if available, under torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:N
  data.* teacher.* any key of the recipe's data and teacher sections (python -m distill.run v3 --help)

Images are labelled without augmentation at the dataset's size, in index order. A kill loses at
most the shard being written; the same command resumes, and refuses a DIR holding another job.
The layout is described in distill/teachers/cache.py.
Exit codes: 0 complete, 75 partial (max_shards), 2 bad arguments or another job in DIR,
1 the teacher gave non-finite or fp16-overflowing labels (nothing written for that shard).
Under torchrun every process exits with that code; torchrun reports any non-zero one as a failure.
"""
from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from core import io
from core.cli import command, debug_asked, one_line
from core.config import ConfigError, apply_overrides
from core.io import check_writable
from core.lock import LockHeld, exclusive
from core.registry import UnknownNameError
from core.weights import save_weights
from distill.teachers.cache import FORMAT, CachedTeacher, CacheMismatchError, shard_name, teacher_tensors
from distill.training import distributed
from distill.training.distributed import pick_device, to_device

OPTIONS = {"out": str, "split": str, "shard_size": int, "batch_size": int, "max_shards": int, "recipe": str,
           "device": str}
DEFAULTS = {"split": "train", "shard_size": 256, "batch_size": 8, "max_shards": 0, "recipe": "v3", "device": "auto"}
SPLITS = ("train", "val", "all")
PARTIAL = 75                 # EX_TEMPFAIL: try again
FP16_MAX = 65504.0           # largest finite float16: beyond it a label would be stored as inf


# ----------------------------------------------------------------------------- command line

def parse(argv: list[str]) -> tuple[object, dict, list[str]]:
    """(recipe with overrides, options, the data/teacher overrides given) from `TEACHER key=value ...`."""
    from distill.recipes import check_values, get_recipe

    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise ConfigError("usage: python -m distill.cache_teacher TEACHER data=SPEC out=DIR [key=value ...] "
                          "(TEACHER first, e.g. synthetic-metric or da2-metric; --help for the keys)")
    options, overrides = dict(DEFAULTS), [f"teacher.name={argv[0]}"]
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
            raise ConfigError(f'unknown key "{key}": use data=, {", ".join(f"{k}=" for k in OPTIONS)} '
                              f"or data.* / teacher.* keys (--help lists them)")
    check_options(options)
    recipe = apply_overrides(get_recipe(options["recipe"]), overrides)
    check_values(recipe)   # before any image is rendered or a teacher loaded
    check_writable(options["out"], "out=")
    return recipe, options, overrides


def check_options(options: dict) -> None:
    if "out" not in options or not options["out"]:
        raise ConfigError("out=DIR is required: where the cache is written")
    if options["split"] not in SPLITS:
        raise ConfigError(f"split={options['split']!r}: must be one of {', '.join(SPLITS)}")
    for key in ("shard_size", "batch_size"):
        if options[key] < 1:
            raise ConfigError(f"{key}={options[key]}: must be at least 1")
    if options["max_shards"] < 0:
        raise ConfigError(f"max_shards={options['max_shards']}: must be 0 or more (0, the default: no limit)")


# ----------------------------------------------------------------------------- what is labelled

class Splits(Dataset):
    """The samples of one split, or of train then val (split=all), at cache positions 0..N-1.
    Samples keep their own split's `index`, so a teacher labels them as it does in training."""

    def __init__(self, parts: dict[str, Dataset]):
        self.parts, self.ranges, start = parts, {}, 0
        for name, dataset in parts.items():
            self.ranges[name] = [start, start + len(dataset)]
            start += len(dataset)

    def __len__(self) -> int:
        return sum(len(d) for d in self.parts.values())

    def locate(self, g: int) -> tuple[str, int]:
        """(split, index in it) of cache position `g`."""
        for name, (start, stop) in self.ranges.items():
            if start <= g < stop:
                return name, g - start
        raise IndexError(f"cache position {g} is outside 0..{len(self) - 1}")

    def __getitem__(self, g: int) -> dict:
        name, i = self.locate(g)
        return self.parts[name][i]

    def content_hash(self, g: int) -> str:
        name, i = self.locate(g)
        return self.parts[name].content_hash(i)

    def describe(self, g: int) -> str:
        """"train index 4, /data/x.png": where position `g` comes from, for error messages."""
        name, i = self.locate(g)
        return f"{name} index {i}, {sample_source(self.parts[name], i)}"


def sample_source(dataset: Dataset, i: int) -> str:
    """The file of sample `i` where the dataset keeps one in a known form, else its class."""
    if hasattr(dataset, "source"):                               # NYU's layouts name their own
        return dataset.source(i)
    entries = next((e for e in (getattr(dataset, "files", None), getattr(dataset, "items", None)) if e is not None),
                   None)
    entry = entries[i] if entries is not None else None
    if isinstance(entry, dict) and "rgb" in entry:                # SynthRooms
        return str(Path(getattr(dataset, "path", "")) / entry["rgb"])
    if isinstance(entry, (str, Path)):                           # image folders
        return str(entry)
    return f"{type(dataset).__name__}[{i}]" + (f" of {dataset.path}" if hasattr(dataset, "path") else "")


def build_split(data_cfg, split: str, progress: bool) -> Splits:
    """The samples to label, augmentation off. For split=train only the training half is built
    (what build_datasets returns as train; an unlabelled folder needs no validation set for it)."""
    from distill.data import DATASETS, build_datasets, training_config

    data_cfg = replace(data_cfg, augment=False)
    if split == "train":
        loader = DATASETS.get(data_cfg.dataset.split(":", 1)[0])
        return Splits({"train": loader(training_config(data_cfg), progress=progress)[0]})
    train, val = build_datasets(data_cfg, progress=progress)
    return Splits({"val": val} if split == "val" else {"train": train, "val": val})


def job_for(recipe, teacher, data: Splits, hashes: list[str], split: str, shard_size: int) -> dict:
    """job.json: everything a resumed run must share with the first one (cache.py's docstring)."""
    height, width = data[0]["image"].shape[-2:]
    return {**job_before_data(recipe, teacher, split, shard_size), "splits": data.ranges,
            "height": int(height), "width": int(width), "count": len(data),
            "images": hashlib.sha256("\n".join(hashes).encode()).hexdigest()}


def job_before_data(recipe, teacher, split: str, shard_size: int) -> dict:
    """The part of job.json known before any image is read or rendered."""
    return {"format": FORMAT, "teacher": teacher.identity(), "space": teacher.space.value,
            "range": [teacher.range.low, teacher.range.high],
            "recipe_teacher": {"name": recipe.teacher.name, "source": recipe.teacher.source},
            "dataset": recipe.data.dataset, "val_dataset": recipe.data.val_dataset if split != "train" else "",
            "split": split, "shard_size": shard_size, "dtype": "float16", "tensors": list(teacher_tensors(teacher))}


# ----------------------------------------------------------------------------- the directory

def claim(out: Path, job: dict) -> None:
    """Write job.json, or check that the one in `out` is this job (resume); clear a kill's temp files."""
    if (out / "job.json").is_file():
        refuse_another_job(out, job)
    else:
        io.write_json(out / "job.json", job)
    io.remove_stale_temp_files(out)   # a killed run's


def refuse_another_job(out: Path, job: dict, keys: set[str] | None = None) -> None:
    """ConfigError when the job.json in `out` differs from `job` (on `keys`; None: every key of either)."""
    path = out / "job.json"
    if not path.is_file():
        return
    old = io.read_json(path, f"delete {out} and label again")
    keys = {*job, *old} if keys is None else keys
    differ = [f"{k}: {old.get(k)!r} in {out}, now {job.get(k)!r}" for k in sorted(keys) if old.get(k) != job.get(k)]
    if differ:
        raise ConfigError(f"{out} holds a cache of another job:\n  - " + "\n  - ".join(differ)
                          + f"\nUse another out=, or delete {out} to start over.")


def bounds(k: int, job: dict) -> tuple[int, int]:
    """[start, stop) cache positions of shard `k`."""
    return k * job["shard_size"], min((k + 1) * job["shard_size"], job["count"])


def shard_is_current(path: Path, start: int, stop: int, hashes: list[str], tensors: list[str]) -> bool:
    """Whether `path` is a shard of samples [start, stop) of these very images, holding `tensors`."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = json.loads(f.metadata()["shard"]), sorted(f.keys())
    except Exception:   # unreadable (e.g. edited by hand): label it again
        return False
    return meta == {"start": start, "stop": stop, "content_hashes": hashes[start:stop]} and keys == sorted(tensors)


def plan(out: Path, job: dict, hashes: list[str]) -> list[int]:
    """Shards still to write; a cache being repaired loses its manifest until it is complete again.
    While the manifest is there, a shard whose sha256 differs from it is written again too: a
    changed file keeps a valid header, and the manifest rewritten at the end would vouch for it."""
    total = math.ceil(job["count"] / job["shard_size"])
    recorded = recorded_sha256(out)
    todo = [k for k in range(total)
            if not shard_is_current(out / shard_name(k), *bounds(k, job), hashes, job["tensors"])
            or (shard_name(k) in recorded and io.sha256(out / shard_name(k)) != recorded[shard_name(k)])]
    if todo:   # the shards first: once the manifest is gone, a changed shard's intact header would vouch for it
        for k in todo:
            (out / shard_name(k)).unlink(missing_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
    return todo


def recorded_sha256(out: Path) -> dict[str, str]:
    """{shard file: sha256} of the manifest of a complete cache in `out` ({} without one)."""
    path = out / "manifest.json"
    if not path.is_file():
        return {}
    manifest = io.read_json(path, f"delete {path} and run again: every shard is then checked by its header")
    return {s["file"]: s["sha256"] for s in manifest.get("shards", [])}


def write_manifest(out: Path, job: dict) -> None:
    total = math.ceil(job["count"] / job["shard_size"])
    shards = [{"file": shard_name(k), "start": bounds(k, job)[0], "stop": bounds(k, job)[1],
               "sha256": io.sha256(out / shard_name(k))} for k in range(total)]
    io.write_json(out / "manifest.json", {**job, "shards": shards})


# ----------------------------------------------------------------------------- labelling

def label_batch(teacher, batch: dict, tensors: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """{name: (B, C, H, W) float32 on the CPU} of one collated batch."""
    batch = to_device(batch, device)
    with torch.no_grad():
        out = {"depth": teacher(batch)}
        if "seg_logits" in tensors:
            out["seg_logits"] = teacher.seg_logits(batch)
    return {k: v.float().cpu() for k, v in out.items()}


def check_labels(labels: dict[str, torch.Tensor], positions: list[int], data: Splits, teacher, shard: int) -> None:
    """Raise FloatingPointError naming the first sample whose labels are non-finite or beyond fp16."""
    for name, values in labels.items():
        flat = values.flatten(1)
        bad = ~torch.isfinite(flat).all(1) | (flat.abs().nan_to_num(0.0) > FP16_MAX).any(1)
        if bad.any():
            g = positions[int(bad.nonzero()[0])]
            row = flat[bad.nonzero()[0]]
            what = "non-finite values" if not torch.isfinite(row).all() else f"values beyond fp16's {FP16_MAX:g}"
            raise FloatingPointError(
                f"teacher {teacher.name} gave {what} in {name} for sample {g} ({data.describe(g)}); nothing was "
                f"written for shard {shard_name(shard)}. Check that image and the teacher, then run the same command")


def label_shards(teacher, data: Splits, job: dict, shards: list[int], out: Path, options: dict,
                 workers: int, device: torch.device, show: bool) -> int:
    """Label and write `shards` (batches never cross a shard, so the bytes do not depend on who
    wrote them); every shard file is written atomically once all its labels are checked.
    Returns the number of images labelled."""
    batches = [list(range(b, min(b + options["batch_size"], bounds(k, job)[1])))
               for k in shards for b in range(bounds(k, job)[0], bounds(k, job)[1], options["batch_size"])]
    loader = DataLoader(data, batch_sampler=batches, num_workers=workers)
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"caching {teacher.name}", unit="img", disable=not show)
    parts: list[dict[str, torch.Tensor]] = []
    for positions, batch in zip(batches, loader):
        k = positions[0] // job["shard_size"]
        labels = label_batch(teacher, batch, job["tensors"], device)
        if labels["depth"].shape != (len(positions), 1, job["height"], job["width"]):
            raise ValueError(f"teacher {teacher.name} returned depth {tuple(labels['depth'].shape)} for a batch of "
                             f"{len(positions)} images of {job['height']}x{job['width']}; a Teacher returns "
                             "(B, 1, H, W) at the batch's image size")
        check_labels(labels, positions, data, teacher, k)
        parts.append(labels)
        bar.update(len(positions))
        start, stop = bounds(k, job)
        if positions[-1] == stop - 1:
            tensors = {name: torch.cat([p[name] for p in parts]).half() for name in job["tensors"]}
            save_weights(out / shard_name(k), tensors, {"shard": json.dumps(
                {"start": start, "stop": stop, "content_hashes": [data.content_hash(g) for g in range(start, stop)]})})
            parts = []
    bar.close()
    return sum(len(b) for b in batches)


# ----------------------------------------------------------------------------- the job

def prepare(recipe, options: dict, rank, device: torch.device, progress: bool):
    """(recipe resolved for the device, the samples, the teacher, the device kind's filled sizes)."""
    from distill.data import unlabelled
    from distill.recipes import resolve_for_device
    from distill.teachers import teacher_for
    from distill.teachers.base import needs_a_real_teacher

    recipe, filled = resolve_for_device(recipe, device.type)
    teacher = teacher_for(recipe.teacher).to(device)   # first: a bad name or source fails before any data work
    if teacher.needs_ground_truth and options["split"] != "val" and unlabelled(recipe.data.dataset):
        raise ConfigError(needs_a_real_teacher(teacher.name, recipe.data.dataset))   # its labels would all be zeros
    # what job.json says without the images, checked before they are rendered (80 s at the CPU defaults)
    known = job_before_data(recipe, teacher, options["split"], options["shard_size"])
    if recipe.data.height and recipe.data.width:   # every dataset delivers its images at the recipe's size
        known.update(height=recipe.data.height, width=recipe.data.width)
    refuse_another_job(Path(options["out"]), known, set(known))
    if not rank.main:   # rank 0 builds (generates) the data first; the others reuse it
        distributed.barrier(rank)
    data = build_split(recipe.data, options["split"], progress)
    if rank.main:
        distributed.barrier(rank)
    if len(data) == 0:
        raise ConfigError(f"data.dataset={recipe.data.dataset} has no {options['split']} samples to label")
    if isinstance(teacher, CachedTeacher):   # a cache of a cache: its labels must be of these images
        if options["split"] == "all":
            raise ConfigError("teacher.cache: label from a cache one split at a time (split=train or split=val)")
        teacher.verify(data.parts[options["split"]], height=data[0]["image"].shape[-2],
                       width=data[0]["image"].shape[-1], split=options["split"])
    return recipe, data, teacher, filled


def how_to_train(options: dict, overrides: list[str], filled: dict, out: Path) -> str:
    """The training command that reads this cache: the same teacher, data and (device-filled) sizes."""
    # every teacher key (the cache refuses another input_size) but the cache's own
    keys = [o for o in overrides if o.startswith(("teacher.", "data.")) and not o.startswith("teacher.cache=")]
    keys += [f"{k}={v}" for k, v in filled.items() if k.startswith("data.")]
    return " ".join(["python -m distill.run", options["recipe"], *map(shlex.quote, keys),
                     shlex.quote(f"teacher.cache={out}")])


def run(recipe, options: dict, overrides: list[str], log=print, progress: bool = True) -> int:
    """Label (this rank's share of) the missing shards; rank 0 writes job.json first and
    manifest.json last. Returns 0 (complete) or PARTIAL (max_shards reached)."""
    rank = distributed.from_environment()
    try:
        device = pick_device(options["device"], rank.local_rank, key="device", world=rank.world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    distributed.init(rank, device)
    if not rank.main:
        log, progress = (lambda *args, **kwargs: None), False
    out = Path(options["out"])
    made = [p for p in (out, *out.parents) if not p.exists()]   # what taking the lock creates, innermost first
    lock = out / f".writer-rank{rank.rank}.lock"
    try:
        # one job per cache directory (each torchrun rank holds its own lock)
        with exclusive(lock, f"the cache {out}"):
            try:
                return label_missing(recipe, options, overrides, out, rank, device, log, progress)
            except BaseException:
                if made and not (out / "job.json").exists():   # refused before any work: leave no folder behind
                    lock.unlink(missing_ok=True)
                    remove_empty(made)
                raise
    finally:
        distributed.shutdown(rank)


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` in order while each is empty (another rank's lock or the user's files stop it)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def label_missing(recipe, options: dict, overrides: list[str], out: Path, rank, device: torch.device, log,
                  progress: bool) -> int:
    """`run`'s work once this process is the directory's only writer."""
    recipe, data, teacher, filled = prepare(recipe, options, rank, device, progress)
    state: dict = {}
    if rank.main:
        try:
            hashes = [data.content_hash(g) for g in range(len(data))]
            job = job_for(recipe, teacher, data, hashes, options["split"], options["shard_size"])
            claim(out, job)
            state = {"job": job, "todo": plan(out, job, hashes)}
        except ConfigError as e:   # every rank stops with rank 0's message
            state = {"error": str(e)}
    state = distributed.broadcast(rank, state)
    if "error" in state:
        raise ConfigError(state["error"])
    job, todo = state["job"], state["todo"]
    if not todo:
        if (out / "manifest.json").is_file():
            log(f"complete: {out} already holds all {job['count']} labels of {teacher.name}; nothing to do")
            return 0
        # every shard is current, but a kill (or a full disk) came between the last shard and the manifest
        return finish(out, job, teacher, options, overrides, filled, rank, log)
    now = todo[:options["max_shards"] or len(todo)]
    t0 = time.time()
    mine = label_shards(teacher, data, job, [k for k in now if k % rank.world == rank.rank], out, options,
                        recipe.data.workers, device, progress)
    distributed.barrier(rank)
    seconds, labelled = time.time() - t0, sum(bounds(k, job)[1] - bounds(k, job)[0] for k in now)
    log(f"labelled {labelled} images in {seconds:.1f} s ({labelled / max(seconds, 1e-9):.1f} images/s"
        + (f"; {rank.world} processes, rank 0 labelled {mine}" if rank.active else "") + f") into {out}")
    if len(now) < len(todo):
        log(f"partial: {len(todo) - len(now)} shards left; run the same command again to continue")
        return PARTIAL
    return finish(out, job, teacher, options, overrides, filled, rank, log)


def finish(out: Path, job: dict, teacher, options: dict, overrides: list[str], filled, rank, log) -> int:
    """Write the manifest that makes the cache complete, and say how to train from it."""
    if rank.main:
        write_manifest(out, job)
    log(f"complete: {job['count']} labels of {teacher.name} in {out}")
    if options["split"] != "val":
        log(f"train with: {how_to_train(options, overrides, filled, out)}")
    return 0


@command("python -m distill.cache_teacher")
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank = distributed.from_environment()
    try:
        recipe, options, overrides = parse(argv)
        return run(recipe, options, overrides)
    except (ConfigError, UnknownNameError, CacheMismatchError, FileNotFoundError, LockHeld) as e:
        if debug_asked():   # --debug (stripped from argv by @command) or DENSEKIT_DEBUG: the traceback
            raise
        if rank.main:   # every rank has the same error (rank 0's, broadcast)
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except FloatingPointError as e:   # only the rank that labelled the sample knows
        if debug_asked():
            raise
        print(f"error{f' (rank {rank.rank})' if rank.active else ''}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
