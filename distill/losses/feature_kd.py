"""Feature-level distillation between matching stages (D3epth, seed 003, section 4.1, Table 3).

D3epth aligns teacher and student blocks of matching spatial size. Our student (a timm CNN) and
teacher (a ViT with a DPT neck) differ in channels and strides, so stages are matched by order:
the student's encoder levels fine -> coarse against the teacher's feature maps shallow -> deep
(the last k of each when the counts differ). Each student map goes through a learned 1x1
projection to the teacher's channels and is resized to the teacher map's grid; the loss is
1 - cosine similarity over channels, averaged over positions and pairs. Teacher maps are
detached. The projections train with the decoder and are never exported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureDistiller(nn.Module):
    def __init__(self, student_channels: list[int], teacher_channels: list[int]):
        super().__init__()
        k = min(len(student_channels), len(teacher_channels))
        if k == 0:
            raise ValueError("feature KD needs at least one student and one teacher feature map")
        self.k = k
        self.project = nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in
                                     zip(student_channels[-k:], teacher_channels[-k:]))

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """student: maps (B, C_s, h, w) fine -> coarse; teacher: (B, C_t, h', w') shallow -> deep."""
        if len(student) < self.k or len(teacher) < self.k:
            raise ValueError(f"feature KD was built for {self.k} pairs, got {len(student)} student and "
                             f"{len(teacher)} teacher maps")
        losses = []
        for proj, s, t in zip(self.project, student[-self.k:], teacher[-self.k:]):
            s = F.interpolate(proj(s.float()), size=t.shape[-2:], mode="bilinear", align_corners=False)
            losses.append((1 - F.cosine_similarity(s, t.detach().float(), dim=1)).mean())
        return torch.stack(losses).mean()
