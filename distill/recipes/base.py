"""The recipe schema: a frozen dataclass tree, overridable from the command line with dotted keys.

Fields left at `None` are sized for the device at run time (`resolve_for_device`): small images
and few epochs on a laptop CPU, real sizes on a GPU. The resolved values are printed and saved.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from core.config import ConfigError

# eval.best_metric: depth metrics of distill/metrics.py for which lower is better
BEST_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "abs_rel_aligned")
INPUT_MULTIPLE = 32   # the students' deepest stride: image sides must be multiples of it


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthrooms"          # registry name, "name:path" for files (nyu:/data/nyu, folder:/imgs)
    val_dataset: str = ""                # "" = the dataset's own validation split; required for folder:
    root: str = ""                       # "" = the cache dir ($DENSEKIT_CACHE or ~/.cache/densekit)
    height: int | None = None            # None: sized for the device; a multiple of 32
    width: int | None = None
    num_train: int | None = None         # None: SynthRooms renders the device's size; files: all of them
    num_val: int | None = None           # (an integer keeps a file split's first N)
    seed: int = 0                        # which scenes SynthRooms renders
    augment: bool = True                 # flip + photometric jitter on training images
    workers: int = 0                     # DataLoader worker processes (0 = in the main process)
    cache_mb: int = 1024                 # SynthRooms: MB of decoded images kept in memory per split (workers=0 only)


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "synthetic-metric"       # registry name (distill.teachers.TEACHERS)
    source: str = ""                     # real teachers: a local directory, or a hub id (downloads)
    input_size: int = 518                # ViT teachers: the shorter side they see (multiple of 14)
    align: Literal["none", "dataset"] = "none"   # dataset: one scale fitted to ground truth (NYU)
    cache: str = ""                      # a pseudo-label cache (python -m distill.cache_teacher); "" = online
    assistant: str = ""                  # Distill Any Depth: a second teacher chosen per iteration
    assistant_source: str = ""
    assistant_ratio: float = 0.3         # the assistant's share of iterations (7:3)


@dataclass(frozen=True)
class DistillConfig:
    """Distill Any Depth (seed 004) and D3epth (seed 003) options; all off by default."""
    normalization: Literal["none", "global", "hybrid", "local"] = "none"
    normalized_weight: float = 1.0       # weight of the L1 term on normalised depths (not "none")
    metric_weight: float = 1.0           # weight of loss.depth in metres: the metric anchor
    shared_crop: float = 0.0             # probability that a batch is a shared random crop for both
    crop_min: float = 0.5                # smallest crop side as a fraction of the image side
    local_global_weight: float = 0.0     # > 0: teacher on overlapping patches supervises the student
    local_global_grid: int = 2           # patches per side (overlapping by half a patch)
    feature_weight: float = 0.0          # > 0: D3epth feature KD from the teacher's hidden states


@dataclass(frozen=True)
class ModelConfig:
    student: str = "mobilenetv3_small_100"          # registry name (distill.students.STUDENTS)
    tasks: tuple[str, ...] = ("depth", "seg")      # or depth alone (an ablation axis); depth is always trained
    decoder_channels: int = 64
    output_stride: int = 4               # 4, or 2: a decoder level at half resolution (docs/TRAINING.md, "Stride 4 again")
    separable: bool = False              # depthwise-separable 3x3 convolutions in the levels of stride >= 4
    fine_convs: Literal["separable", "pointwise"] = "pointwise"   # the stride-2 level's and its heads' (docs/TRAINING.md)
    depth_activation: Literal["exp", "softplus"] = "exp"
    pretrained: str = ""                 # "" = from scratch, a local weights file, or "hub" to download


@dataclass(frozen=True)
class LossConfig:
    depth: str = "berhu"                 # registry name (distill.losses.DEPTH_LOSSES)
    berhu_threshold: str = "p80"         # "pNN" = NNth percentile of |residual| per batch; "laina" = 0.2 max; a number: fixed
    berhu_residual: Literal["absolute", "relative", "log"] = "log"   # log(pred/target): near pixels count (README)
    silog_lambda: float = 0.85
    silog_per_image: bool = True
    gradient_weight: float = 0.0         # > 0 adds the edge-aware gradient Huber loss to the depth term
    gradient_delta: float = 0.05
    gradient_scales: int = 1             # > 1: the gradient loss on every 2nd, 4th, ... pixel too (MiDaS)
    seg_balance: float = 0.5             # class weights ~ frequency^-seg_balance (0 = plain CE, 0.5 = 1/sqrt; README)
    seg_hard_fraction: float = 1.0       # < 1: OHEM, the cross-entropy of only the hardest pixels of a batch
    seg_lovasz_weight: float = 0.0       # > 0 adds the Lovasz-softmax loss (a mean-IoU surrogate) to the seg term
    aux_weight: float = 0.0              # > 0: deep supervision from the decoder's stride-16 and -8 outputs (README)
    normal_weight: float = 0.0           # > 0: a training-only head learns the target's surface normals (README)
    normal_weighting: Literal["depth", "fixed"] = "depth"   # the normal term in the depth task, or beside the weighting
    weighting: str = "kendall"           # registry name (distill.losses.WEIGHTINGS): fixed | kendall | dwa
    depth_weight: float = 1.0            # used by `fixed`
    seg_weight: float = 1.0
    dwa_temperature: float = 2.0


SHUFFLE_STRIDE = 1_000_003   # train.shuffle_stride's default; make_loader's (distill/training/evaluation.py)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None            # None: sized for the device
    batch_size: int | None = None
    lr_encoder: float = 8e-3             # 8x the first: 3-seed ablations, full runs, int8 gates (README)
    lr_decoder: float = 1.6e-2
    weight_decay: float = 0.01
    optimizer: Literal["adamw", "muon"] = "adamw"   # muon: Muon for the hidden dense convolutions, AdamW for the rest (docs/TRAINING.md)
    muon_rms: float = 0.8                # Muon's step in RMS per unit of learning rate: 4x AdamW's typical 0.2 (docs/TRAINING.md, "Muon's step size")
    muon_depthwise: bool = False         # with muon: the depthwise kernels too, a layer's filters as one matrix; not confirmed at full length (docs/TRAINING.md, "Muon on the depthwise kernels")
    warmup_frac: float = 0.05            # linear warm-up over this fraction of all steps, then cosine
    min_lr_ratio: float = 0.01           # cosine floor as a fraction of the peak learning rate
    grad_clip: float = 1.0               # max global gradient norm (0 = off)
    seed: int = 0
    shuffle_stride: int = SHUFFLE_STRIDE  # epoch e of seed s shuffles with s * this + e; 1 (before 2026-12-07) let seed s + 1 replay seed s's batch orders
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "off"] = "auto"   # training steps: auto = bf16 autocast on CUDA GPUs with native bf16 (Ampere+), else off (validation is float32)
    log_every: int = 20                  # steps between TensorBoard scalars
    channels_last: bool = True           # NHWC weights and images: measured 1.2-1.6x faster steps on a CPU


@dataclass(frozen=True)
class EvalConfig:
    min_depth: float = 1e-3              # metres; pixels outside (min, max) are not evaluated
    max_depth: float = 10.0
    eigen_crop: bool = False             # NYU Eigen crop, defined at 480x640 only
    best_metric: str = "abs_rel"         # lower is better; selects best.safetensors
    preview_images: int = 4              # rows of preview.png; 0 writes none
    teacher: bool = True                 # measure the teacher against GT too (its metrics, gap_closed)


@dataclass(frozen=True)
class Recipe:
    """A training recipe. Subclasses are the versions (v1, v2, ...); their docstrings tell why."""

    name: str = "base"
    target: Literal["teacher", "ground_truth"] = "teacher"   # what the depth loss supervises with
    eval_space: Literal["metric"] = "metric"                 # evaluation is in metres against GT
    preflight: Literal["strict", "warn"] = "strict"          # warn: report problems, train anyway
    out_dir: str = "runs"
    resume: str = ""                     # a run directory to continue from its last checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # Sizes per device kind for the fields left at None (a class attribute, not a field: a
    # version may resize itself, e.g. a slower encoder gets fewer CPU epochs). CPU: the demo's
    # budget is 15 minutes on 2 cores including data generation; batches of 8 give twice the steps
    # of 16 at 0.87x the images/s and trained the better v3 (3 seeds reduced, 2 full runs: docs/TRAINING.md);
    # 16 epochs instead of 12 for the student that still underfits. Since the stride-4 decoder
    # (2026-12-03) they take 19.8-24.4 min with rendering on AVX-512 hosts (v3's normal head of
    # 2026-12-04 adds about 4% to a step), over the budget: fewer
    # epochs cost depth, the binding bar (README, "What to expect on a laptop CPU"). CUDA: a real run.
    device_defaults: ClassVar[dict[str, dict[str, dict[str, int]]]] = {
        "cpu": {"data": {"height": 128, "width": 160, "num_train": 4000, "num_val": 200},
                "train": {"epochs": 16, "batch_size": 8}},
        "cuda": {"data": {"height": 256, "width": 320, "num_train": 8000, "num_val": 500},
                 "train": {"epochs": 30, "batch_size": 32}},
    }
    # QAT steps of an int8 export unless `quant.export --qat-steps` says (0 = post-training
    # quantisation only). QAT kept v3's segmentation closer to the float model than PTQ by more than
    # the seeds' spread (README, "QAT or PTQ"); a recipe whose student PTQ serves as well sets 0.
    int8_qat_steps: ClassVar[int] = 300


def renders(dataset: str) -> bool:
    """Whether `data.dataset`-style `dataset` is SynthRooms, whose split sizes are what it renders."""
    return dataset.partition(":")[0] == "synthrooms"


def resolve_for_device(recipe: Recipe, device_type: str) -> tuple[Recipe, dict[str, int]]:
    """Fill `None` sizes from the recipe's `device_defaults`; returns the recipe and the keys filled.
    A split's size is filled only where SynthRooms renders that split: a dataset of files keeps all
    its images (NYU's 654 test images are the benchmark, not the first 200 of them)."""
    table = recipe.device_defaults["cuda" if device_type == "cuda" else "cpu"]
    d = recipe.data
    of_files = {"num_train": not renders(d.dataset), "num_val": not renders(d.val_dataset or d.dataset)}
    filled: dict[str, int] = {}
    for section, defaults in table.items():
        current = getattr(recipe, section)
        changes = {k: v for k, v in defaults.items()
                   if getattr(current, k) is None and not (section == "data" and of_files.get(k))}
        filled.update({f"{section}.{k}": v for k, v in changes.items()})
        recipe = replace(recipe, **{section: replace(current, **changes)})
    return recipe, filled


def check_values(recipe: Recipe, processes: int = 1) -> None:
    """Refuse values that cannot train, naming the key and the fix, before any data is rendered or
    any model built. Sizes still None (device-sized) are checked once resolved."""
    d, t, e = recipe.data, recipe.train, recipe.eval
    problems = []
    for key, side in (("data.height", d.height), ("data.width", d.width)):
        if side is not None and (side < INPUT_MULTIPLE or side % INPUT_MULTIPLE):
            problems.append(f"{key}={side} must be a positive multiple of {INPUT_MULTIPLE} (the students "
                            f"downsample by {INPUT_MULTIPLE}), e.g. {max(INPUT_MULTIPLE, side // INPUT_MULTIPLE * INPUT_MULTIPLE)}")
    for key, value in (("data.num_train", d.num_train), ("data.num_val", d.num_val), ("train.epochs", t.epochs),
                       ("train.batch_size", t.batch_size), ("eval.preview_images", e.preview_images)):
        if value is not None and value < (0 if key == "eval.preview_images" else 1):
            problems.append(f"{key}={value} must be at least {0 if key == 'eval.preview_images' else 1}")
    if t.batch_size and processes > 1 and t.batch_size % processes:
        problems.append(f"train.batch_size={t.batch_size} (the global batch) is not divisible by the {processes} "
                        f"processes; pick a multiple of {processes}")
    if d.num_train and t.batch_size and 0 < d.num_train < t.batch_size:
        problems.append(f"data.num_train={d.num_train} is smaller than train.batch_size={t.batch_size}: no full "
                        f"batch to train on; lower train.batch_size or raise data.num_train")
    if e.best_metric not in BEST_METRICS:
        problems.append(f"eval.best_metric={e.best_metric!r} is not a depth metric where lower is better; "
                        f"choose one of {', '.join(BEST_METRICS)}")
    if not 0 <= t.warmup_frac < 1 or not 0 <= t.min_lr_ratio <= 1 or t.lr_encoder <= 0 or t.lr_decoder <= 0:
        problems.append(f"train.lr_encoder={t.lr_encoder} and train.lr_decoder={t.lr_decoder} must be positive, "
                        f"train.warmup_frac={t.warmup_frac} in [0, 1), train.min_lr_ratio={t.min_lr_ratio} in [0, 1]")
    if recipe.model.output_stride not in (2, 4):
        problems.append(f"model.output_stride={recipe.model.output_stride} must be 2 or 4 (where the decoder "
                        f"stops; the heads upsample the rest)")
    if t.shuffle_stride < 1:
        problems.append(f"train.shuffle_stride={t.shuffle_stride} must be >= 1")
    for key, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        if seed < 0:   # numpy's generators, which both seed, take non-negative integers only
            problems.append(f"{key}={seed} must be >= 0")
    if d.cache_mb < 0:
        problems.append(f"data.cache_mb={d.cache_mb} must be >= 0 (0 = decode every image every epoch)")
    if recipe.loss.gradient_scales < 1:
        problems.append(f"loss.gradient_scales={recipe.loss.gradient_scales} must be at least 1 "
                        f"(1 = full resolution only, 3 = also every 2nd and 4th pixel)")
    if not 0 < recipe.loss.seg_hard_fraction <= 1:
        problems.append(f"loss.seg_hard_fraction={recipe.loss.seg_hard_fraction} must be in (0, 1] "
                        f"(1 = every labelled pixel, 0.25 = the hardest quarter of each batch)")
    if recipe.loss.seg_lovasz_weight < 0:
        problems.append(f"loss.seg_lovasz_weight={recipe.loss.seg_lovasz_weight} must be >= 0 (0 = off, "
                        f"1 = the Lovasz-softmax loss beside the cross-entropy at equal weight)")
    if recipe.loss.normal_weight < 0:
        problems.append(f"loss.normal_weight={recipe.loss.normal_weight} must be >= 0 (0 = off, 1 = the surface "
                        f"normal term at the weight of v3's)")
    if recipe.loss.aux_weight < 0:
        problems.append(f"loss.aux_weight={recipe.loss.aux_weight} must be >= 0 (0 = off, 0.5 = deep supervision "
                        f"at half the weight of the output's own losses)")
    if recipe.loss.seg_balance < 0:
        problems.append(f"loss.seg_balance={recipe.loss.seg_balance} must be >= 0 (0 = plain cross-entropy, "
                        f"0.5 = inverse square root of class frequency)")
    problems += range_problems(recipe)
    problems += distill_problems(recipe.distill)
    problems += unknown_names(recipe)
    if problems:
        raise ConfigError("; ".join(problems))


def range_problems(recipe: Recipe) -> list[str]:
    """Values each checked only where it is first used (the evaluation after the first epoch, the
    loss or the optimizer after pre-flight), or never: refused before the data is rendered."""
    from distill.metrics import EIGEN_CROP_SIZE
    from distill.teachers.depth_anything import PATCH

    d, e, lc, m, t, te = recipe.data, recipe.eval, recipe.loss, recipe.model, recipe.train, recipe.teacher
    problems = []
    if not 0 < e.min_depth < e.max_depth:
        problems.append(f"eval.min_depth={e.min_depth} and eval.max_depth={e.max_depth} must satisfy 0 < min < max "
                        f"(metres; pixels outside are not evaluated)")
    if e.eigen_crop and d.height is not None and d.width is not None and (d.height, d.width) != EIGEN_CROP_SIZE:
        h, w = EIGEN_CROP_SIZE
        problems.append(f"eval.eigen_crop=true is defined at {h}x{w} only, and the data is {d.height}x{d.width}: "
                        f"set data.height={h} data.width={w} (NYU's size) or eval.eigen_crop=false")
    if te.assistant and not 0 <= te.assistant_ratio <= 1:
        problems.append(f"teacher.assistant_ratio={te.assistant_ratio} must be in [0, 1] (the assistant's share of "
                        f"iterations; 0.3 = 7:3)")
    if te.input_size < PATCH or te.input_size % PATCH:
        problems.append(f"teacher.input_size={te.input_size} must be a positive multiple of {PATCH} (the ViT patch), "
                        f"e.g. {max(PATCH, te.input_size // PATCH * PATCH)}")
    for key, value in (("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                       ("loss.depth_weight", lc.depth_weight), ("loss.seg_weight", lc.seg_weight)):
        if value < 0:
            problems.append(f"{key}={value} must be >= 0" + (" (0 = off)" if key == "train.grad_clip" else ""))
    for key, value in (("loss.gradient_delta", lc.gradient_delta), ("loss.dwa_temperature", lc.dwa_temperature),
                       ("train.muon_rms", t.muon_rms)):
        if not value > 0:
            problems.append(f"{key}={value} must be > 0")
    if t.muon_depthwise and t.optimizer != "muon":   # AdamW would ignore it unseen
        problems.append(f"train.muon_depthwise=true gives the depthwise kernels to Muon, and train.optimizer="
                        f"{t.optimizer}; add train.optimizer=muon, or drop train.muon_depthwise")
    if not 0 <= lc.silog_lambda <= 1:
        problems.append(f"loss.silog_lambda={lc.silog_lambda} must be in [0, 1] (1 = fully scale-invariant)")
    if m.decoder_channels < 2:
        problems.append(f"model.decoder_channels={m.decoder_channels} must be at least 2 (the depth head halves it); "
                        f"64 is the default")
    return problems


def distill_problems(dc: DistillConfig) -> list[str]:
    """The distill.* values that cannot train: found before the data, the teacher and the pre-flight
    run, not at the first shared crop or patch grid, hundreds of steps in."""
    problems = []
    if not 0 <= dc.shared_crop <= 1:
        problems.append(f"distill.shared_crop={dc.shared_crop} must be in [0, 1] (the probability that a batch "
                        f"is a shared crop; 0 = off)")
    if dc.shared_crop > 0 and not 0 < dc.crop_min <= 1:   # read only where shared crops are on
        problems.append(f"distill.crop_min={dc.crop_min} must be in (0, 1] (a fraction of the image side; 0.5 "
                        f"keeps crops at least half the image)")
    if dc.local_global_weight > 0 and dc.local_global_grid < 1:
        problems.append(f"distill.local_global_grid={dc.local_global_grid} must be >= 1 (patches per side; "
                        f"2 gives 4 patches)")
    for key in ("normalized_weight", "metric_weight", "local_global_weight", "feature_weight"):
        if getattr(dc, key) < 0:
            problems.append(f"distill.{key}={getattr(dc, key)} must be >= 0 (0 = off)")
    return problems


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def unknown_names(recipe: Recipe) -> list[str]:
    """The names and forms a recipe picks that nothing implements, each with the valid ones: found
    here rather than where the model, the loss or the teacher is built, after the data is rendered."""
    from core.registry import suggest
    from distill.losses import DEPTH_LOSSES, WEIGHTINGS, parse_berhu_threshold
    from distill.students import STUDENTS
    from distill.teachers import TEACHERS

    m, lc, t = recipe.model, recipe.loss, recipe.train
    picks = [("model.student", m.student, STUDENTS), ("loss.depth", lc.depth, DEPTH_LOSSES),
             ("loss.weighting", lc.weighting, WEIGHTINGS), ("teacher.name", recipe.teacher.name, TEACHERS)]
    if recipe.teacher.assistant:
        picks.append(("teacher.assistant", recipe.teacher.assistant, TEACHERS))
    problems = [f"{key}={name!r} is not a {registry.kind}; valid: {', '.join(registry.names())}."
                f"{suggest(name, registry.names())}" for key, name, registry in picks if name not in registry]
    try:
        parse_berhu_threshold(lc.berhu_threshold)
    except ValueError as e:
        problems.append(f"loss.berhu_threshold: {e}")
    if not m.tasks or set(m.tasks) - {"depth", "seg"}:
        problems.append(f"model.tasks={','.join(m.tasks)!r} must be depth or depth,seg")
    elif "depth" not in m.tasks:   # pre-flight, the kept weights (eval.best_metric) and the export gates measure depth
        problems.append(f"model.tasks={','.join(m.tasks)!r}: a student without depth is not supported (pre-flight, "
                        f"best.safetensors and the export's gates all measure depth); use model.tasks=depth,seg")
    if not DEVICE.fullmatch(t.device):
        problems.append(f"train.device={t.device!r} must be auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    if t.log_every < 1:
        problems.append(f"train.log_every={t.log_every} must be at least 1 (steps between TensorBoard scalars)")
    if recipe.data.workers < 0:
        problems.append(f"data.workers={recipe.data.workers} must be >= 0 (0 = load in the main process)")
    return problems
