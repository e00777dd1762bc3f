"""Teacher registry. Each entry is a factory returning a `Teacher` that declares its space and range.

Embedded: `synthetic-metric` (metres) and `synthetic-relative` (inverse depth normalised to
[0, 1] per image: relative, as seed 000's teacher was). Real Depth Anything adapters register here too, loading from a local
directory or a hub id the user names.
"""
from __future__ import annotations

from core.registry import Registry
from distill.teachers.base import Teacher
from distill.teachers.depth_anything import DA2Metric, DA2Relative, DA3Metric
from distill.teachers.synthetic import (
    SyntheticAssistantTeacher,
    SyntheticMetricTeacher,
    SyntheticRelativeTeacher,
    TeacherErrorModel,
)

TEACHERS: Registry = Registry("teacher")
TEACHERS.register("synthetic-metric", SyntheticMetricTeacher)
TEACHERS.register("synthetic-relative", SyntheticRelativeTeacher)
TEACHERS.register("synthetic-assistant", SyntheticAssistantTeacher)
TEACHERS.register("da2-relative", DA2Relative)
TEACHERS.register("da2-metric", DA2Metric)
TEACHERS.register("da3-metric", DA3Metric)


def build_teacher(name: str, **options) -> Teacher:
    return TEACHERS.get(name)(**options)


def teacher_for(cfg) -> Teacher:
    """The teacher a recipe's `teacher` section (a `TeacherConfig`) names, built from its options;
    with `cfg.cache`, its labels read from that pseudo-label cache (checked to be this teacher's)."""
    if cfg.cache:
        from distill.teachers.cache import CachedTeacher

        return CachedTeacher.open(cfg.cache, cfg)
    return TEACHERS.get(cfg.name).from_config(cfg)


__all__ = ["TEACHERS", "Teacher", "build_teacher", "teacher_for", "TeacherErrorModel"]
