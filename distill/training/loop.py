"""Training a student, top to bottom: data -> teacher -> pre-flight -> optimise -> evaluate -> report.

`train(recipe)` creates `runs/<recipe>-<UTC time>/` (or continues `recipe.resume`) and writes
config.json, preflight.json, metrics.jsonl, tensorboard/, checkpoints/epoch-NNNN/ (safetensors
weights + optimizer/scheduler state), best.safetensors, summary.json, report.md, preview.png.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from core import config as cfgio
from core import io
from core.config import ConfigError
from core.io import check_sha256, sha256
from core.lock import exclusive
from core.spaces import DepthSpace
from core.weights import (check_checkpoint, latest_checkpoint, load_metadata, load_weights, save_checkpoint,
                          save_weights)
from distill.data import build_datasets
from distill.data.classes import NYU13_NAMES
from distill.losses.feature_kd import FeatureDistiller
from distill.recipes import Recipe, check_values, resolve_for_device
from distill.students import build_student, check_pretrained, count_macs, load_weights_into, shipped_state
from distill.students.model import AUX_PREFIX
from distill.teachers import Teacher
from distill.teachers.base import needs_a_real_teacher
from distill.training import distributed
from distill.training.distributed import pick_device, to_device
from distill.training.evaluation import (constant_baseline, evaluate, evaluate_fit, make_loader, teacher_reference,
                                         with_references)
from distill.training.objective import (Objective, depth_target, labelled_tasks, seg_weights_for, weighted_total,
                                        weighting_for)
from distill.training.optim import build_optimizer
from distill.training.preflight import PreflightError, enforce, run_preflight
from distill.training.supervision import check_options, feature_teachers, supervision_for

PREFLIGHT_BATCHES = 3
AUX_LEVELS = 2   # loss.aux_weight > 0: deep supervision on the decoder's two coarsest outputs (stride 16 and 8)
BEST = "best.safetensors"
STAGED_BEST = BEST + ".next"   # a new best until the checkpoint that records it is written
# seconds an epoch spends waiting for its batches / in the teacher -> their shares of the training time
TIME_SHARES = (("data_wait_s", "data_wait_share"), ("teacher_s", "teacher_share"))


# ----------------------------------------------------------------------------- setup

def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where `train.amp` asks for it; `auto`: on GPUs that compute bf16 natively (Ampere
    and later). Before them torch emulates bf16, slower than float32: auto stays float32 there."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(recipe.out_dir) / f"{recipe.name}-{stamp}"
    for n in range(1, 100):  # two runs started in the same second get distinct directories
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            run_dir = Path(recipe.out_dir) / f"{recipe.name}-{stamp}-{n}"
    raise FileExistsError(f"could not create a fresh run directory under {recipe.out_dir}")


def training_median_depth(ds: Dataset, fallback: Dataset | None = None, max_images: int = 256) -> float:
    """Median ground-truth depth (m) of the training set, from every (len // `max_images`)-th image
    (up to 2 x `max_images` - 1 of them; the baselines of every recorded run were measured so); of
    `fallback` (the validation set) when the training images have none (a folder)."""
    samples = (ds[i] for i in range(0, len(ds), max(1, len(ds) // max_images)))   # each read once
    values = torch.cat([s["depth"][s["valid"]] for s in samples])
    if values.numel() == 0 and fallback is not None:
        return training_median_depth(fallback, None, max_images)
    return values.median().item()


def known_camera(sample: dict) -> bool:
    """Whether a sample carries finite, positive focal lengths (an image folder without
    intrinsics.json gives NaN: the sample format's "unknown")."""
    k = sample.get("intrinsics")
    return k is not None and bool(torch.isfinite(torch.as_tensor(k)).all()) and bool((torch.as_tensor(k)[:2] > 0).all())


# Keys a run may set from its data (below): its config.json can hold another value than was asked for.
ADAPTED_TO_DATA = ("loss.normal_weight",)


def without_unusable_normals(recipe: Recipe, sample: dict, teacher: Teacher, log) -> Recipe:
    """The recipe with `loss.normal_weight` 0 where surface normals cannot be had: images without a
    camera, or a target that is not metric depth (a relative teacher's normals are not the scene's).
    As seg_balance without labels: the default adapts to the data, said once, saved in config.json."""
    lc = recipe.loss
    if lc.normal_weight <= 0 or "depth" not in recipe.model.tasks:
        return recipe
    if not known_camera(sample):
        why = (f"{recipe.data.dataset}'s images carry no camera intrinsics (an image folder without intrinsics.json), "
               f"which surface normals need; the term is off for this run (add intrinsics.json to the folder to train it)")
    elif recipe.target == "teacher" and teacher.space != DepthSpace.METRIC:
        why = (f"the teacher {teacher.name} outputs {teacher.space.value} depth, whose surface normals are not the "
               f"scene's; the term is off for this run (use a metric teacher to train it)")
    else:
        return recipe
    log(f"loss.normal_weight={lc.normal_weight}: {why}")
    return dataclasses.replace(recipe, loss=dataclasses.replace(lc, normal_weight=0.0))


def warmup_cosine(total_steps: int, warmup_frac: float, floor: float):
    """LR multiplier of update `step` (0-based): linear warm-up to 1 at step warmup - 1, then cosine
    from 1 at step warmup to `floor` at step total_steps, one past the last update (which runs
    (1 - floor) * (1 - cos(pi / n)) / 2 above the floor, n = total_steps - warmup: 4e-8 at the CPU
    defaults' 8,000 steps). Every recorded figure trained with this form."""
    warmup = max(1, int(round(warmup_frac * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------- the run

def train(recipe: Recipe, *, progress: bool = True, log=print) -> Path:
    """Train `recipe`; returns the run directory. Raises PreflightError before any step if refused.

    Under `torchrun` every process runs this function: each trains on its share of every global
    batch (`train.batch_size` is the global batch), rank 0 alone writes files and logs.
    """
    rank = distributed.from_environment()
    device = pick_device(recipe.train.device, rank.local_rank, world=rank.world)
    created = distributed.init(rank, device)
    if not rank.main:
        log, progress = (lambda *args, **kwargs: None), False
    try:
        # the caller's random streams come back as they were: a run reseeds them (`seed_everything`)
        with contextlib.ExitStack() as holds, caller_random_state():
            return _train(recipe, rank, device, progress, log, holds)
    finally:
        if created:   # a group the caller made is the caller's to end
            distributed.shutdown(rank)


@contextlib.contextmanager
def caller_random_state():
    """Python's, NumPy's and torch's random states (every GPU's too: torch.manual_seed reseeds
    them all) restored on leaving."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _train(recipe: Recipe, rank: distributed.Dist, device: torch.device, progress: bool, log,
           holds: contextlib.ExitStack) -> Path:
    t_start = time.time()
    if recipe.resume and rank.main:   # one writer per run: a second resume of the same run is refused
        holds.enter_context(exclusive(Path(recipe.resume) / ".lock", f"the run {recipe.resume}"))
        io.remove_stale_temp_files(Path(recipe.resume))   # the killed run's
    recipe, filled = resolve_for_device(recipe, device.type)
    if filled:
        log(f"{device.type.upper()} defaults: " + ", ".join(f"{k}={v}" for k, v in filled.items())
            + "  (override any with key=value)")
    check_values(recipe, processes=rank.world)   # before any image is rendered
    check_options(recipe)                        # teacher options that cannot work together, too
    if not recipe.resume:   # a resume loads its checkpoint instead
        check_pretrained(recipe.model.student, recipe.model.pretrained)   # a file of other weights, before any render
    resumed = resume_point(Path(recipe.resume)) if recipe.resume else None
    if resumed is not None and finished_intact(Path(recipe.resume), resumed[1]["progress"], recipe.train.epochs):
        log(f"{recipe.resume} is finished ({resumed[1]['progress']['epoch']} of {recipe.train.epochs} epochs, "
            f"summary.json written): nothing to train or write; python -m distill.evaluate {recipe.resume} "
            f"measures it again")
        return Path(recipe.resume)
    amp = autocast_dtype(recipe.train.amp, device)
    tc, dc = recipe.train, recipe.data
    seed_everything(tc.seed)

    train_ds, val_ds = build_datasets(dc, progress=progress)
    if resumed is not None:   # before the run's files change
        check_same_training_set(Path(recipe.resume), resumed[1]["progress"], len(train_ds), dc.dataset)
    train_loader = make_loader(train_ds, tc.batch_size // rank.world, train=True, seed=tc.seed,
                               workers=dc.workers, rank=rank.rank, world=rank.world, shuffle_stride=tc.shuffle_stride)
    val_loader = make_loader(val_ds, tc.batch_size, train=False, seed=tc.seed, workers=dc.workers)
    if len(train_loader) == 0:
        raise ConfigError(f"{dc.dataset} has {len(train_ds)} usable training images, fewer than "
                          f"train.batch_size={tc.batch_size}; lower train.batch_size")
    # teacher.align=dataset fits its scale on the single-process batches (rank 0's share would make it
    # depend on the number of processes, and change under a resume with another number)
    whole_batches = make_loader(train_ds, tc.batch_size // rank.world, train=True, seed=tc.seed, workers=dc.workers,
                                shuffle_stride=tc.shuffle_stride) if rank.active else train_loader   # one GPU's batch
    supervision = supervision_for(recipe, device, train_ds, whole_batches, rank=rank, log=log)
    teacher = supervision.teacher
    recipe = without_unusable_normals(recipe, train_ds[0], teacher, log)
    model = student_for(recipe, device, rank, log)

    run_dir = Path(recipe.resume) if recipe.resume else distributed.broadcast(rank, new_run_dir(recipe) if rank.main else None)
    if rank.main and not recipe.resume:
        holds.enter_context(exclusive(run_dir / ".lock", f"the run {run_dir}"))
    if rank.main:
        io.write_json(run_dir / "config.json", {**cfgio.to_dict(as_recorded(recipe)), "device": str(device),
                                                "processes": rank.world})
    # the constant predictor at the training set's median depth: the number to beat
    baseline_depth = training_median_depth(train_ds, val_ds) if rank.main else None
    baseline = constant_baseline(baseline_depth, val_loader, recipe) if rank.main else None
    teacher_val = teacher_reference(teacher, val_loader, device, recipe, log) if rank.main else {}

    preflight_stage(model, train_loader, teacher, recipe, device, run_dir if rank.main else None, log,
                    assistant=supervision.assistant)

    if rank.active and device.type == "cuda":  # batch statistics over the global batch, as in one process
        model = distributed.sync_batchnorm(model)
    probes = [train_ds[i] for i in sorted({0, len(train_ds) // 2, len(train_ds) - 1})]
    weighting = weighting_for(recipe, labelled_tasks(recipe, probes, log)).to(device)
    feature_kd = feature_distiller(model, teacher, train_loader, device) if recipe.distill.feature_weight > 0 else None
    optimizer = build_optimizer(model, weighting, tc, feature_kd)
    total_steps = tc.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, tc.warmup_frac, tc.min_lr_ratio))
    objective = Objective(recipe, feature_kd, seg_weights=seg_weights_for(recipe, train_ds, log))
    state = {"epoch": 0, "step": 0, "best": None, "train_time": 0.0, "train_images": 0,
             "data_wait_s": 0.0, "teacher_s": 0.0, "train_set": len(train_ds), "wall_s": 0.0}
    if recipe.resume:
        state = restore(run_dir, resumed, model, weighting, optimizer, scheduler, log, write=rank.main,
                        feature_kd=feature_kd)
        if state["epoch"] >= tc.epochs:   # killed after its last checkpoint, before summary.json
            log(f"nothing left to train ({state['epoch']} of {tc.epochs} epochs done): the kept weights are measured "
                f"again and summary.json, report.md and preview.png written anew")
    # wall time of the processes before this one, each up to its last checkpoint (0 for checkpoints
    # before 2026-12-06, which did not record it): a resumed run's wall_s covers the whole run
    wall_before = state.get("wall_s", 0.0)
    # DDP broadcasts rank 0's weights (its pre-flight depth initialisation included) on wrapping;
    # the modules beside the student start from rank 0's values too.
    net = torch.nn.parallel.DistributedDataParallel(model) if rank.active else model
    distributed.broadcast_module(rank, weighting)
    distributed.broadcast_module(rank, feature_kd)

    from distill.training.tensorboard import summary_writer
    # a resume drops what was logged after its checkpoint's last step (steps count from 1), then logs it anew
    purge = state["step"] + 1 if recipe.resume else None
    writer = summary_writer(run_dir / "tensorboard", purge_step=purge) if rank.main else NullWriter()
    holds.callback(writer.close)   # also when a step fails: its thread and unflushed events (an ablation runs many)
    val = None
    t_loop, first_epoch = time.time(), state["epoch"]
    for epoch in range(state["epoch"], tc.epochs):
        train_ds.set_epoch(epoch)
        train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        means = train_one_epoch(net, train_loader, supervision, objective, weighting, optimizer, scheduler,
                                device, amp, recipe, epoch, state, writer, progress, rank)
        means = distributed.mean_across(rank, means)
        epoch_time = time.time() - t0
        images = len(train_loader) * tc.batch_size
        state["train_time"] += epoch_time
        state["train_images"] += images
        # shares of the epoch's wall time: waiting for the loader's next batch, and labelling it
        # with the teacher (a GPU left idle by either is what faster data or a cache would buy)
        for key, share in TIME_SHARES:
            state[key] = state.get(key, 0.0) + means[key]
            means[share] = means.pop(key) / epoch_time
        weighting.epoch_end({t: means[f"loss_{t}"] for t in weighting.tasks})  # unweighted, per task
        state["epoch"] = epoch + 1
        if rank.main:
            # measured in float32 on every device, as distill.evaluate and the export's float reference
            # are: under bf16 autocast (CUDA) the summary's figures moved by its rounding
            val = with_references(evaluate(model, val_loader, device, None, recipe), baseline, teacher_val)
            record = {"epoch": epoch + 1, "step": state["step"], "train": {**means, "images_per_s": images / epoch_time},
                      "val": val}
            io.append_jsonl(run_dir / "metrics.jsonl", record)
            per_epoch = (time.time() - t_loop) / (epoch + 1 - first_epoch)   # training, evaluation and saving
            log_epoch(writer, record, log, left_s=per_epoch * (tc.epochs - epoch - 1))
            # A new best is staged beside best.safetensors, committed by the checkpoint that records
            # it, then moved in: a kill at any point leaves the kept weights the checkpoint names.
            staged = keep_best(run_dir, model, recipe, state, val)
            state["wall_s"] = wall_before + time.time() - t_start
            save(run_dir, model, weighting, optimizer, scheduler, state, recipe, val, feature_kd)
            if staged:
                io.replace(staged, run_dir / BEST)
        distributed.barrier(rank)   # nobody starts the next epoch (or returns) before the checkpoint
    writer.close()

    if rank.main:
        from distill.training.report import write_outputs
        # The summary, the fit and the preview describe the weights that ship: with the last epoch's
        # weights unless an earlier epoch's were kept; a run resumed after its last checkpoint measures anew.
        if use_kept_weights(model, run_dir, state, log) or val is None:
            val = with_references(evaluate(model, val_loader, device, None, recipe), baseline, teacher_val)
        fit = fit_reference(model, train_ds, len(val_ds), recipe, device, val, log)
        summary = {**val, **fit, "baseline_depth": baseline_depth, "best": state["best"],
                   "train_set": len(train_ds), "val_set": len(val_ds),
                   "train_images_per_s": state["train_images"] / max(state["train_time"], 1e-9),
                   **{share: state.get(key, 0.0) / max(state["train_time"], 1e-9) for key, share in TIME_SHARES},
                   "wall_s": wall_before + time.time() - t_start, "epochs": tc.epochs, "device": str(device),
                   "processes": rank.world}
        write_outputs(run_dir, recipe, summary, model, teacher, val_ds, device, log)
    distributed.barrier(rank)   # no rank returns a run that rank 0 is still measuring and writing
    return run_dir


def fit_reference(model, train_ds, count: int, recipe: Recipe, device: torch.device, val: dict, log) -> dict:
    """The kept student on `count` of its training images (as many as the validation split has; no
    augmentation), said beside the validation figure: how much of the error is generalisation."""
    t0 = time.time()
    fit = evaluate_fit(model, train_ds, count, recipe.train.batch_size, device, None, recipe)
    if "train_abs_rel" in fit and "abs_rel" in val:
        log(f"on {min(count, len(train_ds))} of its training images: abs_rel {fit['train_abs_rel']:.4f} "
            f"(validation {val['abs_rel']:.4f}; {time.time() - t0:.0f} s)")
    return fit


def student_for(recipe: Recipe, device: torch.device, rank: distributed.Dist, log) -> torch.nn.Module:
    """The recipe's student on `device`, its size said once."""
    mc, dc, tc = recipe.model, recipe.data, recipe.train
    model = build_student(mc.student, tasks=mc.tasks, num_classes=len(NYU13_NAMES), decoder_channels=mc.decoder_channels,
                          output_stride=mc.output_stride, separable=mc.separable, fine_convs=mc.fine_convs,
                          depth_activation=mc.depth_activation,
                          pretrained="" if recipe.resume else mc.pretrained,   # a resume loads its checkpoint's
                          aux_heads=AUX_LEVELS if recipe.loss.aux_weight > 0 else 0,
                          aux_normals=recipe.loss.normal_weight > 0 and "depth" in mc.tasks).to(device)
    if tc.channels_last:   # oneDNN's and cuDNN's convolutions run NHWC natively
        model = model.to(memory_format=torch.channels_last)
    shipped = sum(p.numel() for name, p in model.named_parameters()
                  if not name.startswith(AUX_PREFIX))   # training-only heads never ship (shipped_state's rule)
    log(f"student {mc.student}: {shipped / 1e6:.2f} M params, "
        f"{count_macs(model, dc.height, dc.width) / 1e6:.0f} M MACs at {dc.height}x{dc.width}"
        + (f"; {rank.world} processes x {tc.batch_size // rank.world} images per step" if rank.active else ""))
    return model


def keep_best(run_dir: Path, model, recipe: Recipe, state: dict, val: dict) -> Path | None:
    """best.safetensors follows the lowest eval.best_metric so far (state["best"] records which). A new
    best is written to best.safetensors.next and returned: the caller moves it in once a checkpoint
    records it, so the file never runs ahead of the checkpoint a resume starts from."""
    score = val.get(recipe.eval.best_metric)
    if score is None or (state["best"] is not None and score >= state["best"]["value"]):
        return None
    staged = run_dir / STAGED_BEST
    save_weights(staged, shipped_state(model.state_dict()), weight_metadata(recipe, state["epoch"], val))
    state["best"] = {"epoch": state["epoch"], "metric": recipe.eval.best_metric, "value": score,
                     "sha256": sha256(staged)}   # checked where it is exported
    return staged


def finished_intact(run_dir: Path, progress: dict, epochs: int) -> bool:
    """The run trained every epoch and wrote summary.json (its last file), and its kept weights are
    the ones its checkpoint records: a resume has nothing to train, repair or write."""
    return (progress["epoch"] >= epochs and (run_dir / "summary.json").is_file()
            and not (run_dir / STAGED_BEST).exists() and kept_as_recorded(run_dir / BEST, progress["best"]))


def kept_as_recorded(final: Path, best: dict | None) -> bool:
    """best.safetensors is the file the checkpoint's record names (or no epoch was kept yet)."""
    return best is None or (final.is_file() and sha256(final) == best["sha256"])


def settle_best(run_dir: Path, best: dict | None, ckpt: Path, epoch: int, log) -> None:
    """After a resume from checkpoint `ckpt` (of `epoch`): best.safetensors as that checkpoint recorded
    it. A kill between the checkpoint and the move leaves the recorded file staged (moved in now); a
    kill before the checkpoint leaves a staged file that no checkpoint names (removed: the epoch is
    trained again). A kept file that differs from its record is written again from the checkpoint
    when the checkpoint's epoch is the kept one. Otherwise the kept epoch's weights are gone (the file
    deleted or changed, or a run stopped during its checkpoint by a densekit before 2026-12-05, which
    wrote the best first; only the newest checkpoint is kept): the checkpoint's epoch becomes the kept
    one, said in a warning, and the epochs trained now replace it if one scores better. Refusing at the
    end instead left a run that no resume could finish."""
    staged, final = run_dir / STAGED_BEST, run_dir / BEST
    if staged.is_file():
        if best is not None and sha256(staged) == best["sha256"]:
            io.replace(staged, final)
            log(f"best.safetensors: epoch {best['epoch']}'s weights, staged when the run was stopped, moved in")
        else:
            staged.unlink()
    if kept_as_recorded(final, best):
        return
    problem = "differed from its record" if final.is_file() else "was missing"
    weights = ckpt / "model.safetensors"
    metadata = load_metadata(weights)
    value = json.loads(metadata.get("val", "{}")).get(best["metric"])
    if best["epoch"] != epoch and not isinstance(value, (int, float)):   # refused before anything is written
        raise ConfigError(f"resume={run_dir}: {final} {problem}, and {ckpt.name} does not record its "
                          f"{best['metric']}; restore {final.name} from a copy of the run, or start a new run")
    save_weights(final, shipped_state(load_weights(weights)), metadata)
    if best["epoch"] == epoch:
        log(f"best.safetensors {problem}; written again from {ckpt.name}, which holds epoch {epoch}'s weights")
    else:
        lost = dict(best)
        best.update(epoch=epoch, value=float(value))
        log(f"warning: {final} {problem}: epoch {lost['epoch']}'s kept weights ({lost['metric']} {lost['value']:.4f}) "
            f"are lost. The kept weights are now {ckpt.name}'s (epoch {epoch}, {best['metric']} {value:.4f}), and "
            f"the epochs trained now replace them if one scores better")
    best["sha256"] = sha256(final)


def use_kept_weights(model, run_dir: Path, state: dict, log) -> bool:
    """Load best.safetensors into `model` when an earlier epoch than the last was kept (its sha256
    checked against the record); True if the weights changed."""
    best = state["best"]
    if best is None or best["epoch"] == state["epoch"]:
        return False
    path = run_dir / BEST
    check_sha256(path, best["sha256"], record=f"recorded when epoch {best['epoch']} kept it",
                 fix="the run directory was changed while training")
    load_weights_into(model, load_weights(path), path, fix="the run directory was changed while training",
                      training_only_may_miss=True)   # best.safetensors leaves the training-only heads out
    log(f"kept: epoch {best['epoch']}'s weights ({best['metric']} {best['value']:.4f}); the summary measures them, "
        f"not the last epoch's")
    return True


class NullWriter:
    """TensorBoard writer of the ranks that do not write."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def feature_distiller(model, teacher: Teacher, loader: DataLoader, device: torch.device) -> FeatureDistiller:
    """D3epth's feature KD: the student's encoder levels paired with the teacher's feature maps,
    whose channels one teacher call on a first batch tells."""
    teacher_maps = teacher.features(to_device(next(iter(loader)), device))
    if teacher_maps is None:
        raise ValueError(f"distill.feature_weight > 0 needs a teacher with feature maps; {teacher.name} has none "
                         f"({', '.join(feature_teachers())} have them); set distill.feature_weight=0")
    student_channels = [model.encoder.feature_info.channels()[i] for i in model.levels]
    return FeatureDistiller(student_channels, [f.shape[1] for f in teacher_maps]).to(device)


def preflight_stage(model, loader: DataLoader, teacher: Teacher, recipe: Recipe, device: torch.device,
                    run_dir: Path | None, log, assistant: Teacher | None = None) -> None:
    """Pre-flight on real batches before any step (writes preflight.json, raises when refused);
    an assistant teacher's labels of the same batches are checked beside the teacher's.

    It also places the depth head's initial output at the training targets' median (seed 001:
    a log-depth head starting at 1 m learns far depth slowly), so the table shows the student's
    true starting point.
    """
    probe = [attach_teacher(to_device(b, device), teacher) for b, _ in zip(loader, range(PREFLIGHT_BATCHES))]
    if assistant is not None:
        for b in probe:
            b["assistant_depth"] = assistant(b)
    predictions = []
    if "depth" in model.heads:
        targets = [depth_target(b, recipe) for b in probe]
        supervised = torch.cat([t[v] for t, v in targets])
        if supervised.numel() == 0:
            raise PreflightError(f"pre-flight: no pixel of the first {len(probe)} batches has a training target: "
                                 f"{needs_a_real_teacher(teacher.name, recipe.data.dataset)} or a dataset with depth")
        model.heads["depth"].init_depth(supervised.median().item())
        with torch.no_grad():
            model.eval()
            predictions = [model(b["image"])["depth"] for b in probe]
            model.train()
    report = run_preflight(probe, predictions, target=recipe.target,
                           target_space=teacher.space if recipe.target == "teacher" else DepthSpace.METRIC,
                           target_range=teacher.range, eval_space=DepthSpace(recipe.eval_space),
                           teacher_name=teacher.name, target_masks=[depth_target(b, recipe)[1] for b in probe],
                           assistant_name=assistant.name if assistant else "",
                           assistant_range=assistant.range if assistant else None)
    if run_dir is not None:  # rank 0 under torchrun
        io.write_json(run_dir / "preflight.json", report.to_json())
    log(f"pre-flight (units and ranges, first {len(probe)} batches):\n{report.table()}")
    for warning in enforce(report, recipe.preflight):
        log(f"WARNING (preflight=warn, training anyway): {warning}")


def attach_teacher(batch: dict, teacher: Teacher) -> dict:
    batch["teacher_depth"] = teacher(batch)
    return batch


def train_one_epoch(model, loader, supervision, objective, weighting, optimizer, scheduler, device, amp,
                    recipe, epoch, state, writer, progress, rank=distributed.Dist()) -> dict[str, float]:
    """One pass over the training set; returns epoch-averaged losses and effective weights."""
    tc = recipe.train
    sums: dict[str, float] = {}
    # Redraw often on a terminal, rarely in a log file (CI, nohup) so logs stay readable.
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    features = objective.feature_kd is not None
    waited = labelled = 0.0   # seconds getting the next batch onto the device, and labelling it
    ready = time.perf_counter()
    for batch in bar:
        batch, teacher = to_device(batch, device), None
        fetched = time.perf_counter()
        waited += fetched - ready
        if recipe.target == "teacher":
            batch, teacher = supervision.prepare(batch, state["step"], features=features)
        labelled += time.perf_counter() - fetched
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            image = batch["image"].contiguous(memory_format=torch.channels_last) if tc.channels_last else batch["image"]
            out = model(image, features=True) if features else model(image)
        losses = objective(out, batch, teacher)
        total, weights = weighted_total(weighting, losses)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1}, step {state['step']}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                + ". Lower train.lr_decoder / train.lr_encoder, or check the data with the pre-flight table.")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        extra = list(weighting.parameters()) + (list(objective.feature_kd.parameters()) if features else [])
        distributed.average_gradients(rank, extra)
        trained = list(model.parameters()) + extra
        norm = (torch.nn.utils.clip_grad_norm_(trained, tc.grad_clip) if tc.grad_clip > 0 else   # 0: measured only
                torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None]))
        if not torch.isfinite(norm):   # a finite loss, an overflowing backward: the step would write NaN weights
            raise FloatingPointError(
                f"non-finite gradient norm at epoch {epoch + 1}, step {state['step']} (loss {total.item():.4g}); "
                f"the weights were not updated. Lower train.lr_decoder / train.lr_encoder, or check the data "
                f"with the pre-flight table.")
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        for k, v in {"loss": total.item(), **{f"loss_{k}": v.item() for k, v in losses.items()},
                     **{f"weight_{k}": float(v) for k, v in weights.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{total.item():.4f}", refresh=False)   # redrawn at mininterval, not per step
        if state["step"] % tc.log_every == 0:
            writer.add_scalar("train/loss", total.item(), state["step"])
            for g in optimizer.param_groups:
                writer.add_scalar(f"lr/{g['name']}", g["lr"], state["step"])
        ready = time.perf_counter()
    return {**{k: v / len(loader) for k, v in sums.items()}, "data_wait_s": waited, "teacher_s": labelled}


def log_epoch(writer, record: dict, log, left_s: float = 0.0) -> None:
    """TensorBoard scalars, and one terminal line with the time the remaining epochs will take. The
    epoch's scalars are logged at the step it ended on, as the per-step ones are: a resume's purge
    (every step after its checkpoint) then drops an epoch logged before the kill, which by epoch
    number it kept, so the epoch trained again appeared twice."""
    epoch, val, step = record["epoch"], record["val"], record["step"]
    for k, v in val.items():
        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            writer.add_scalar(f"val/{k}", v, step)
    for k, v in record["train"].items():
        writer.add_scalar(f"train_epoch/{k}", v, step)
    parts = [f"epoch {epoch}", f"loss {record['train']['loss']:.4f}"]
    parts += [f"{k} {val[k]:.4f}" for k in ("abs_rel", "rmse", "d1", "miou") if val.get(k) is not None]
    if left_s > 0:
        parts.append(f"~{left_s / 60:.1f} min left" if left_s >= 60 else f"~{left_s:.0f} s left")
    log("  ".join(parts))


def as_recorded(recipe: Recipe) -> Recipe:
    """The recipe as the run's files record it: without `resume`, which says how this process
    started, not what it trains (with it, the saved config would resume instead of rebuilding, and
    a resumed run's weights would hash apart from the same weights trained straight through)."""
    return dataclasses.replace(recipe, resume="")


def weight_metadata(recipe: Recipe, epoch: int, val: dict) -> dict[str, str]:
    return {"format": "densekit-student", "config": cfgio.dumps(as_recorded(recipe)), "epoch": str(epoch),
            "val": json.dumps({k: v for k, v in val.items() if not isinstance(v, dict)})}


def save(run_dir: Path, model, weighting, optimizer, scheduler, state: dict, recipe: Recipe, val: dict,
         feature_kd=None) -> None:
    full_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "weighting": weighting.state_dict(), "progress": dict(state),
                  "feature_kd": feature_kd.state_dict() if feature_kd is not None else None,
                  # Augmentation and teacher noise are seeded per (seed, epoch, index); torch's
                  # global generator is the only other source of randomness in a step.
                  "torch_rng": torch.get_rng_state()}
    save_checkpoint(run_dir / "checkpoints", state["epoch"], model.state_dict(), full_state,
                       weight_metadata(recipe, state["epoch"], val))


def check_same_training_set(run_dir: Path, state: dict, images: int, dataset: str) -> None:
    """A resume trains on the images its run started with: another count moves the epochs' ends, the
    learning-rate schedule and the batch order (checkpoints before 2026-12-05 did not record it)."""
    recorded = state.setdefault("train_set", images)
    if recorded != images:
        raise ConfigError(f"resume={run_dir}: its training split had {recorded} images and {dataset} has {images} "
                          f"now; the schedule and the batch order would change. Restore the data it trained on, "
                          f"or start a new run")


def resume_point(run_dir: Path) -> tuple[Path, dict]:
    """(the run's latest complete checkpoint, its state, hash-checked): a resume is refused before
    any image is rendered or a file of the run changes when there is none."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None and (run_dir / "summary.json").is_file():
        raise ConfigError(f"resume={run_dir}: the run finished (summary.json), and no complete checkpoint is left "
                          f"under {run_dir / 'checkpoints'} to continue from; python -m distill.evaluate {run_dir} "
                          f"measures it again, and a new run trains further")
    if ckpt is None:
        raise ConfigError(f"resume={run_dir}: no complete checkpoint under {run_dir / 'checkpoints'} (killed "
                          f"before its first epoch ended); start a new run instead")
    return ckpt, check_checkpoint(ckpt)


def restore(run_dir: Path, resumed: tuple[Path, dict], model, weighting, optimizer, scheduler, log,
            write: bool = True, feature_kd=None) -> dict:
    """The state of `resumed` (`resume_point`'s checkpoint and state, its training set checked by
    then) loaded into the model, optimizer, scheduler and weighting."""
    ckpt, full = resumed
    load_weights_into(model, load_weights(ckpt / "model.safetensors"), ckpt / "model.safetensors",
                      fix=f"restore {run_dir / 'config.json'} as the run wrote it, or start a new run")
    optimizer.load_state_dict(full["optimizer"])
    scheduler.load_state_dict(full["scheduler"])
    weighting.load_state_dict(full["weighting"])
    if feature_kd is not None:
        feature_kd.load_state_dict(full["feature_kd"])
    torch.set_rng_state(full["torch_rng"])
    state = full["progress"]
    if write:
        settle_best(run_dir, state["best"], ckpt, state["epoch"], log)
    metrics = run_dir / "metrics.jsonl"
    if write and metrics.exists():  # drop epochs logged after the checkpoint we continue from
        kept = [r for r in io.read_jsonl(metrics) if r["epoch"] <= state["epoch"]]
        io.write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    log(f"resumed {run_dir} from {ckpt.name} (epoch {state['epoch']}, step {state['step']})")
    return state
