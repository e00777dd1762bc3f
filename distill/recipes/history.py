"""The recipe versions. Each docstring tells why it exists (seed 000 is the story).

On a machine without the real teachers, every recipe runs on the embedded SynthRooms data with
an embedded teacher in the same output space as the real one it stands for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from distill.recipes.base import DistillConfig, LossConfig, ModelConfig, Recipe, TeacherConfig, TrainConfig


@dataclass(frozen=True)
class V1(Recipe):
    """v1 - the baseline that failed: MobileNetV3-Small, one depth head, relative teacher, MSE.

    Originally distilled from Depth Anything 2 Large, whose output is relative depth normalised
    to [0, 1]; evaluated in metres on NYU Depth V2 it gave 75.37 m RMSE. The student learned the
    teacher's ordering perfectly; the ordering had no metric anchor. Here the embedded stand-in
    is `synthetic-relative` (per-image normalised inverse depth in [0, 1], DA2's space).

    Pre-flight refuses it: the training target's space (relative) differs from the evaluation
    space (metric). `python -m distill.run v1 preflight=warn` trains anyway and reproduces the
    failure: the metrics show errors of metres. Real teacher: `depth-anything/Depth-Anything-V2-Large-hf`.
    """

    name: str = "v1"
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="synthetic-relative"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        student="mobilenetv3_small_100", tasks=("depth",)))
    loss: LossConfig = field(default_factory=lambda: LossConfig(depth="mse", weighting="fixed"))


@dataclass(frozen=True)
class V2(V1):
    """v2 - the diagnostic: v1's setup with a segmentation head under loss-reweighting variants.

    It asks whether balancing the losses could rescue v1. Run it under each weighting,
    `loss.weighting=fixed|kendall|dwa`: depth stays metres off in every variant, because a
    weight rescales gradients but cannot give a relative target metric units. Unit-mismatched
    supervision dominates any signal a reweighting can provide; only after units are fixed (v3)
    do the loss shape and the balance of tasks matter. It knowingly trains in the wrong space, so
    pre-flight reports the mismatch as a warning instead of stopping.
    """

    name: str = "v2"
    preflight: Literal["strict", "warn"] = "warn"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        student="mobilenetv3_small_100", tasks=("depth", "seg")))
    loss: LossConfig = field(default_factory=lambda: LossConfig(depth="mse", weighting="kendall"))


@dataclass(frozen=True)
class V3(Recipe):
    r"""v3 - the first working recipe: metric teacher, berHu at p80, depth + segmentation, Kendall.

    Three changes from v1, each necessary:
    1. a metric teacher, so the training target is in metres, the evaluation's space (real:
       Depth Anything 3 Metric Large, metres = focal_px * output / 300; embedded:
       `synthetic-metric`, renderer depth through a teacher-error model);
    2. berHu loss, L1 below and L2 above the 80th percentile of the batch's absolute residuals,
       bounding the pull of far pixels where the teacher is least certain. The residual is
       log(student / teacher) since 2026-11-30 (`loss.berhu_residual`, every recipe): in metres,
       near pixels learned last (docs/TRAINING.md);
    3. Kendall uncertainty weighting of depth (regression form) and segmentation
       (classification form) with learned log-variances, instead of a manual weight sweep.
    Since 2026-12-01 it also trains with deep supervision (`loss.aux_weight=0.5`: both tasks'
    losses on the decoder's stride-16 and stride-8 outputs, training-only heads): +1.0 miou
    point over 3 seeds at the reduced size, +2.2 and +2.4 at full length on two seeds, abs_rel
    unchanged (docs/TRAINING.md). Since 2026-12-04 a training-only
    head learns the surface normals of the teacher's depth (`loss.normal_weight=1`, 1 - cos, in the
    depth term): at the reduced size, 3 seeds, on 1,000 new rooms, abs_rel 0.2355 against 0.2422
    and +1.6 miou points; at full length better on both seeds (docs/TRAINING.md, "Surface normals").
    Since 2026-12-06 it trains its hidden convolutions with Muon (`train.optimizer=muon`: orthogonalised
    momentum; AdamW for the rest): at the reduced size, 3 seeds, +4.1 miou points on 1,000 new rooms
    and better depth on every seed; at full length, seeds 0 / 1, abs_rel 0.1475 / 0.1468 against
    AdamW's 0.1539 / 0.1520 (0.1463 / 0.1459 against 0.1563 / 0.1504 on the new rooms) and miou
    0.574 / 0.576 against 0.539 / 0.546 (docs/TRAINING.md, "Muon"). Its step is 0.8 x lr in RMS
    (`train.muon_rms`), four times the AdamW-sized step of those runs: at full length abs_rel
    0.1454 / 0.1431 (0.1452 / 0.1426 on the new rooms), miou 0.574 / 0.585 (docs/TRAINING.md,
    "Muon's step size").

    The real run, on NYU Depth V2 with Depth Anything 3 Metric Large (its package installs in its
    own environment, so its labels come through the cache):
        python -m distill.cache_teacher da3-metric teacher.source=depth-anything/DA3METRIC-LARGE \
            data=nyu:/data/nyu/nyu_depth_v2_labeled.mat out=/data/cache/da3-nyu
        python -m distill.run v3 data.dataset=nyu:/data/nyu/nyu_depth_v2_labeled.mat teacher.name=da3-metric \
            teacher.source=depth-anything/DA3METRIC-LARGE teacher.cache=/data/cache/da3-nyu
    """

    name: str = "v3"
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="synthetic-metric"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(student="mobilenetv3_small_100"))
    loss: LossConfig = field(default_factory=lambda: LossConfig(
        depth="berhu", berhu_threshold="p80", weighting="kendall", aux_weight=0.5, normal_weight=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="muon"))


@dataclass(frozen=True)
class V4(V3):
    """v4 - v3 with an EfficientViT-B1 encoder (linear attention; ~4.6M encoder parameters).

    MobileNetV3-Small was kept through v3 and replaced here for accuracy per MAC on phones.
    Note for export: its int8 TFLite needs care with the attention's division (docs/TOOLCHAIN.md).
    """

    name: str = "v4"
    # The stride-2 level (`model.output_stride=2`) and doubled learning rates, measured on v4
    # (docs/TRAINING.md): better depth and edges, but 3.5 miou points
    # lower and 2 minutes longer at the CPU defaults (one full run), so v4 never left the stride-4
    # decoder that every recipe has again since 2026-12-03. Its rates are 4x the first (1e-3 /
    # 2e-3), and its CPU batches 16: 3 seeds at reduced size against 2x, 8x and batches of 8, then
    # two full runs (docs/TRAINING.md, v4's table).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(student="efficientvit_b1"))
    # v3's Muon since 2026-12-06 (evening): at the reduced size, 3 seeds, on 1,000 new rooms abs_rel 0.2146
    # against AdamW's 0.2354 and miou 0.379 against 0.315, every seed better; at 0.8x the images per
    # second (docs/TRAINING.md, "Muon on v4")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr_encoder=4e-3, lr_decoder=8e-3, optimizer="muon"))
    # v3's loss, deep supervision included: on v4, 3 seeds at reduced size gave -0.009 abs_rel and
    # +1.3 miou points, and the full CPU-default runs improved on both seeds (docs/TRAINING.md, v4's table).
    # Without v3's surface-normal head: on v4 its gains stayed within the seed spread (3 seeds at the
    # reduced size, docs/TRAINING.md, "Surface normals"), so v4 trains as its published figures were measured.
    loss: LossConfig = field(default_factory=lambda: LossConfig(
        depth="berhu", berhu_threshold="p80", weighting="kendall", aux_weight=0.5))
    # An image costs twice v3's on a CPU: 9 epochs of batches of 16 take 21.6-21.7 min on 2 cores
    # with the data rendered (with Muon, 2026-12-06; 10.3-10.5 min on 2026-12-01, before deep
    # supervision and Muon); 9 beat 6 on two seeds and every metric (docs/TRAINING.md, v4's table).
    device_defaults: ClassVar[dict] = {
        **V3.device_defaults,
        "cpu": {"data": V3.device_defaults["cpu"]["data"], "train": {"epochs": 9, "batch_size": 16}}}
    # int8 by PTQ: on the 9-epoch student, over 3 seeds, PTQ drifted abs_rel +0.86% +- 0.26 and
    # QAT 300 steps +1.09% +- 0.69, miou within the spread, at 8x the export time (README, "QAT or PTQ")
    int8_qat_steps: ClassVar[int] = 0


@dataclass(frozen=True)
class V5(V3):
    """v5 - v3 distilled the Distill Any Depth way: hybrid normalisation and an assistant teacher.

    What seed 004's techniques do for a *metric* multi-task student, measured on SynthRooms with
    `python -m distill.ablate` (README, "Distill Any Depth and D3epth options"):
    1. berHu stays, on log depth as in every recipe (the metric anchor: normalised losses are
       scale-and-shift invariant and cannot teach metres), plus an L1 on hybrid-normalised depth
       (contexts at S = 1, 2, 4 depth segments), the best of the four normalisations on abs_rel_aligned and miou;
    2. an assistant teacher labels 30% of the steps (7:3): real, a second model (e.g. a diffusion
       depth model, or DA2 metric beside DA3 metric); embedded, `synthetic-assistant` (sharper
       edges, weaker global scale);
    3. no shared-context crops: a crop resized to the input zooms, and a metric student then sees
       the same metres at another apparent distance (every crop setting cost 0.08-0.10 abs_rel);
       local-global patches did not help either at this size, so both stay off (`distill.*`).
    Real teachers, both online (a cache holds one teacher's labels):
    `teacher.name=da3-metric teacher.source=...` (primary) with `teacher.assistant=da2-metric
    teacher.assistant_source=...`; feature KD (`distill.feature_weight=0.1`, D3epth) distils one
    teacher's features, so it goes without an assistant.
    Since 2026-12-06 (night) it trains with v3's Muon: at the reduced size, 3 seeds, on 1,000 new
    rooms abs_rel 0.2312 against AdamW's 0.2407 and miou 0.354 against 0.295, every seed better; at
    full length, seed 0, on the new rooms, abs_rel 0.1470 against 0.1576 and miou 0.587 against 0.534
    (docs/TRAINING.md, "Muon on v5 and v6").
    """

    name: str = "v5"
    # v3's loss without its surface-normal head: on v5 with Muon the head moved abs_rel on 1,000 new
    # rooms by -0.0011 (3 seeds at the reduced size, within the spread; docs/TRAINING.md)
    loss: LossConfig = field(default_factory=lambda: LossConfig(
        depth="berhu", berhu_threshold="p80", weighting="kendall", aux_weight=0.5))
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(
        name="synthetic-metric", assistant="synthetic-assistant", assistant_ratio=0.3))
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(normalization="hybrid"))


@dataclass(frozen=True)
class V6(V3):
    """v6 - v3 with segmentation weighted up: fixed task weights (depth 2, segmentation 1.2), not Kendall's.

    Segmentation teaches v3's depth: the same student trained on depth alone (`model.tasks=depth`)
    was 0.025 abs_rel worse over 3 seeds at the reduced size (1,000 rooms x 6 epochs: 0.2675
    against 0.2422 on 1,000 new rooms). Kendall weighting settles where each task's weighted loss
    is the same (about 2 x depth, 0.37 x segmentation at the end of a CPU run); these weights give
    segmentation about three times that share. At the reduced size, 3 seeds, on the new rooms:
    abs_rel 0.2397 against 0.2422, miou 0.315 against 0.285. At the CPU defaults, three seeds, on
    1,000 new rooms: miou 0.544 +- 0.010 against v3's 0.511 +- 0.001, sharper segmentation
    boundaries on every seed, abs_rel 0.1597 +- 0.0003 against 0.1586 +- 0.0022 (docs/TRAINING.md,
    "Segmentation weighted up"). Depth is issue 13's binding bar, so v3 keeps Kendall's weighting,
    its character; v6 trades about a thousandth of abs_rel for 3 miou points. It does not train
    v3's surface-normal head (2026-12-04), which was not measured with these weights.
    Since 2026-12-06 (night) it trains with v3's Muon: at the reduced size, 3 seeds, on 1,000 new
    rooms abs_rel 0.2263 against AdamW's 0.2383 and miou 0.370 against 0.315, every seed better; at
    full length, seed 0, on the new rooms, abs_rel 0.1536 against 0.1593-0.1599 and miou 0.583
    against 0.536-0.555 (AdamW's three seeds of 2026-12-04). With Muon, v3 segments about as well
    (0.574-0.576 on the new rooms) with depth 0.008-0.011 better; v6 keeps the most complete depth
    edges (docs/TRAINING.md, "Muon on v5 and v6").
    """

    name: str = "v6"
    loss: LossConfig = field(default_factory=lambda: LossConfig(
        depth="berhu", berhu_threshold="p80", weighting="fixed", depth_weight=2.0, seg_weight=1.2, aux_weight=0.5))
