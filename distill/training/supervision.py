"""Where a training step's pseudo-labels come from: teacher or assistant, full image or shared crop.

The recipe's `teacher` section names the teachers (`teacher_for`); its `distill` section says how
they supervise (Distill Any Depth, seed 004): with probability `shared_crop` the step trains on a
random crop that teacher and student both see (shared-context distillation); with an assistant,
each step's labels come from the assistant with probability `assistant_ratio` (7:3). Every draw is
a function of (seed, step), so a resumed run and every torchrun rank make the same choice.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch

from core.spaces import DepthSpace
from distill.data.transforms import keyed_rng
from distill.teachers import TEACHERS, Teacher, teacher_for
from distill.teachers.cache import CacheMismatchError, CachedTeacher
from distill.training import distributed
from distill.training.cross_context import AssistantSchedule, crop_batch, sample_shared_crop


class SupervisionError(ValueError):
    """A teacher / distillation combination that cannot work; the message names the fix."""


def gives_features(kind: type[Teacher]) -> bool:
    """Whether a teacher class has feature maps (for D3epth's feature KD): it overrides `features`."""
    return kind.features is not Teacher.features


def feature_teachers() -> list[str]:
    """The registered teachers that give feature maps."""
    return [name for name in TEACHERS if gives_features(TEACHERS.get(name))]


def teacher_traits(tc) -> tuple[DepthSpace, bool]:
    """(space, gives feature maps) of the teacher a `TeacherConfig` names, from its cache's manifest
    (checked to be this teacher's) or its class: no network is loaded, no image read."""
    if tc.cache:
        try:
            return CachedTeacher.open(tc.cache, tc).space, False
        except (CacheMismatchError, FileNotFoundError) as e:   # a cache that is not this run's
            raise SupervisionError(str(e)) from e
    kind = TEACHERS.get(tc.name)
    return kind.space, gives_features(kind)


def check_sources(tc) -> None:
    """A teacher that loads a checkpoint (and its assistant) must have one at its source, in the form
    it reads, and its package installed: known without loading it, so said before any data is built."""
    online = [] if tc.cache else [(tc.name, tc.source, "teacher.source")]
    assistant = [(tc.assistant, tc.assistant_source, "teacher.assistant_source")] if tc.assistant else []
    for name, source, key in [*online, *assistant]:
        check_ready = getattr(TEACHERS.get(name), "check_ready", None)
        if check_ready is not None:
            try:
                check_ready(source, key)
            except (ValueError, FileNotFoundError, ImportError) as e:
                raise SupervisionError(str(e)) from e


def check_options(recipe) -> None:
    """Refuse distillation options that cannot work together, before any teacher is loaded or any
    image rendered: a teacher's space and features are known from its class or its cache's manifest."""
    tc, dc = recipe.teacher, recipe.distill
    online_only = {"distill.shared_crop": dc.shared_crop > 0, "distill.local_global_weight": dc.local_global_weight > 0,
                   "teacher.assistant": bool(tc.assistant)}
    if tc.cache and any(online_only.values()):
        keys = ", ".join(k for k, on in online_only.items() if on)
        raise SupervisionError(
            f"{keys} need(s) the teacher online (it labels crops it has not seen, or a second teacher), "
            f"but teacher.cache={tc.cache} holds full-image labels of one teacher; drop teacher.cache or those options")
    shaping = {**online_only, "distill.normalization": dc.normalization != "none",
               "distill.feature_weight": dc.feature_weight > 0}
    if recipe.target != "teacher" and any(shaping.values()):
        keys = ", ".join(k for k, on in shaping.items() if on)
        raise SupervisionError(f"{keys} shape(s) teacher supervision, but target={recipe.target} trains on "
                               f"ground truth; set target=teacher or drop them")
    if tc.assistant and dc.feature_weight > 0:   # its projections fit the primary's features only
        raise SupervisionError(
            f"distill.feature_weight={dc.feature_weight} distils the primary teacher's features, but "
            f"teacher.assistant={tc.assistant} labels some steps, whose features are another network's; "
            f"drop teacher.assistant or set distill.feature_weight=0")
    check_sources(tc)
    space, has_features = teacher_traits(tc)
    named = f"teacher.cache={tc.cache}" if tc.cache else f"teacher.name={tc.name}"
    if dc.feature_weight > 0 and not has_features:
        raise SupervisionError(
            f"distill.feature_weight={dc.feature_weight} needs a teacher with feature maps; {named} has none "
            f"({', '.join(feature_teachers())} have them, run online); set distill.feature_weight=0")
    assistant_space = TEACHERS.get(tc.assistant).space if tc.assistant else space
    if assistant_space != space:
        raise SupervisionError(
            f"teacher.assistant={tc.assistant} outputs {assistant_space.value} depth but {named} "
            f"outputs {space.value}; pick an assistant in the same space (labels are drawn from either at random)")
    if tc.align == "dataset" and space != DepthSpace.METRIC:
        raise SupervisionError(f"teacher.align=dataset scales metric depth, but {named} outputs {space.value} "
                               f"({space.describe()}); use a metric teacher or teacher.align=none")


class Supervision:
    """`prepare(batch, step) -> (batch with teacher_depth [and teacher_features], teacher used)`."""

    def __init__(self, recipe, device: torch.device):
        tc = recipe.teacher
        check_options(recipe)
        self.recipe, self.seed = recipe, recipe.train.seed
        try:
            self.teacher: Teacher = teacher_for(tc).to(device)
        except (CacheMismatchError, FileNotFoundError) as e:   # a cache that is not this run's
            if not tc.cache:
                raise
            raise SupervisionError(str(e)) from e
        self.assistant: Teacher | None = None
        if tc.assistant:
            self.assistant = teacher_for(replace(tc, name=tc.assistant, source=tc.assistant_source, cache="")).to(device)
            self.schedule = AssistantSchedule(tc.assistant_ratio, self.seed)   # its space: check_options

    def teacher_at(self, step: int) -> Teacher:
        if self.assistant is not None and self.schedule.use_assistant(step):
            return self.assistant
        return self.teacher

    def prepare(self, batch: dict, step: int, *, features: bool = False) -> tuple[dict, Teacher]:
        """Crop (maybe), then attach `teacher_depth` (B, 1, H, W) and, with `features`, the teacher's
        feature maps as `teacher_features`."""
        dc = self.recipe.distill
        if dc.shared_crop > 0:
            rng = keyed_rng(0x5C, self.seed, step)   # [seed, step, 0x5C] was scene 92's stream at steps 0 and 1
            if rng.random() < dc.shared_crop:
                h, w = batch["image"].shape[-2:]
                batch = crop_batch(batch, sample_shared_crop(h, w, min_frac=dc.crop_min, rng=rng), (h, w))
        teacher = self.teacher_at(step)
        if features:
            batch["teacher_depth"], batch["teacher_features"] = teacher.depth_and_features(batch)
            if batch["teacher_features"] is None:
                raise SupervisionError(f"distill.feature_weight > 0 needs teacher features, but {teacher.name} "
                                       f"has none (real Depth Anything teachers do); set distill.feature_weight=0")
        else:
            batch["teacher_depth"] = teacher(batch)
        return batch, teacher

    def check_cache(self, dataset, data_cfg, log) -> None:
        """A pseudo-label cache must hold labels of these very images at this size (content
        hashes), all finite; otherwise stop before any step."""
        try:
            self.teacher.verify(dataset, height=data_cfg.height, width=data_cfg.width, split="train")
        except CacheMismatchError as e:
            raise SupervisionError(str(e)) from e
        bad = self.teacher.scan_finite()
        if bad:
            raise SupervisionError(f"teacher.cache={self.recipe.teacher.cache} holds non-finite labels for "
                                   f"{len(bad)} images (first indices {bad[:5]}); rebuild those shards with "
                                   f"python -m distill.cache_teacher")
        log(f"teacher cache {self.recipe.teacher.cache}: {len(dataset)} labels of {self.teacher.name} match "
            f"the training images (content hashes) and are finite")

    def align(self, batches, rank, log) -> None:
        """teacher.align=dataset: scale the teacher by one factor fitted to ground truth (a metric
        teacher trained on other data, e.g. DA2 metric-indoor on NYU) on `batches` (on the
        teacher's device). Rank 0 fits; all use it. An assistant gets its own factor on the same
        images: its labels train the same student, so they must be in the same metres."""
        from distill.teachers.align import Replay, ScaleAligned, fit_scale

        batches = Replay(batches) if rank.main else []
        for role in ("teacher", "assistant"):
            teacher = getattr(self, role)
            if teacher is None:
                continue
            scale = distributed.broadcast(rank, fit_scale(teacher, batches) if rank.main else None)
            log(f"teacher.align=dataset: {teacher.name} x {scale:.4f} (median ground truth / teacher ratio)")
            setattr(self, role, ScaleAligned(teacher, scale))


def supervision_for(recipe, device: torch.device, train_ds, train_batches: Iterable[dict], *,
                    rank: distributed.Dist = distributed.Dist(), log=print) -> Supervision:
    """The one way a loop gets its labels, for training and for the fine-tunes after pruning and
    under QAT alike: the recipe's teacher (or its cache, checked against `train_ds`), its assistant,
    and with teacher.align=dataset the scale fitted on `train_batches` (moved to `device` here)."""
    supervision = Supervision(recipe, device)
    if recipe.teacher.cache:
        supervision.check_cache(train_ds, recipe.data, log)
    if recipe.teacher.align == "dataset":
        supervision.align((distributed.to_device(b, device) for b in train_batches), rank, log)
    return supervision
