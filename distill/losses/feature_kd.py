"""Feature-level distillation between matching stages (D3epth, seed 003, section 4.1, Table 3).

D3epth aligns teacher and student blocks of matching feature-map size, shallow with shallow and
deep with deep (Table 3: adding deeper pairs helps). Our student (a timm CNN) and teacher (a ViT
with a DPT neck) differ in channels and strides, so "matching stages" are matched by *order of
depth*: the student's encoder maps fine -> coarse against the teacher's maps shallow -> deep, by
default the last k of each (k = the shorter list: the deepest stages pair up), or an explicit
list of (student index, teacher index) pairs. Each student map goes through a learned 1x1
projection to its teacher map's channels and is resized (bilinear) to the teacher map's grid:
the spatial matching of D3epth, done on the teacher's side so the teacher's features are never
resampled. The loss is 1 - cosine similarity over channels, averaged over positions, then over
pairs. Teacher maps are detached. The projections train with the decoder and are never exported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureDistiller(nn.Module):
    """`FeatureDistiller(student_channels, teacher_channels, *, pairs=None)(student, teacher) -> 0-d`.

    student_channels: channels of every student map, fine -> coarse (e.g. the student's
    `encoder.feature_info.channels()` of the levels it returns); teacher_channels: of every teacher
    map, shallow -> deep. pairs: (student index, teacher index) per pair, in those lists;
    default: the last k of each, in order. Built up front so the optimizer can hold the
    projections before the first step.
    """

    def __init__(self, student_channels: list[int], teacher_channels: list[int], *,
                 pairs: list[tuple[int, int]] | None = None):
        super().__init__()
        self.student_channels, self.teacher_channels = list(student_channels), list(teacher_channels)
        ns, nt = len(self.student_channels), len(self.teacher_channels)
        if pairs is None:
            k = min(ns, nt)
            pairs = list(zip(range(ns - k, ns), range(nt - k, nt)))
        if not pairs:
            raise ValueError(f"feature KD needs at least one pair of maps; got {ns} student and {nt} teacher "
                             f"channel counts (does the teacher return features?)")
        for s, t in pairs:
            if not (0 <= s < ns and 0 <= t < nt):
                raise ValueError(f"feature KD pair (student {s}, teacher {t}) is out of range for {ns} student "
                                 f"and {nt} teacher maps; indices count from 0, fine/shallow first")
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.project = nn.ModuleList(nn.Conv2d(self.student_channels[s], self.teacher_channels[t], 1)
                                     for s, t in self.pairs)

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """student: maps (B, C_s, h, w) fine -> coarse; teacher: (B, C_t, h', w') shallow -> deep,
        as many as at construction. Returns the mean over pairs of mean(1 - cos) (float32, 0-d)."""
        self.check(student, teacher)
        losses = []
        for proj, (si, ti) in zip(self.project, self.pairs):
            t = teacher[ti].detach().float()
            s = F.interpolate(proj(student[si].float()), size=t.shape[-2:], mode="bilinear", align_corners=False)
            losses.append((1 - F.cosine_similarity(s, t, dim=1)).mean())
        return torch.stack(losses).mean()

    def check(self, student: list[Tensor], teacher: list[Tensor]) -> None:
        if len(student) != len(self.student_channels) or len(teacher) != len(self.teacher_channels):
            raise ValueError(f"feature KD was built for {len(self.student_channels)} student and "
                             f"{len(self.teacher_channels)} teacher maps, got {len(student)} and {len(teacher)}; "
                             f"build it from the same model and teacher that produce the maps")
        for name, maps, channels in (("student", student, self.student_channels),
                                     ("teacher", teacher, self.teacher_channels)):
            got = [m.shape[1] if m.dim() == 4 else None for m in maps]
            if got != channels:
                raise ValueError(f"feature KD {name} maps must be (B, C, h, w) with C = {channels}, got "
                                 f"shapes {[tuple(m.shape) for m in maps]}")
        if student[0].shape[0] != teacher[0].shape[0]:
            raise ValueError(f"feature KD batch sizes differ: student {student[0].shape[0]}, "
                             f"teacher {teacher[0].shape[0]}")
