"""Choose the calibration images of post-training int8 quantisation, stratified by depth and class.

Why: int8 activation ranges are measured on these images alone. Mostly-near scenes give the depth
head a min/max range that clips far depths (every far pixel saturates at the calibration maximum),
and a class that never appears leaves its logit channels' ranges set by other classes. So the set
must span the depth range and contain every class the data has, rare ones included.

`select_calibration`, deterministic for a given dataset, arguments and `seed`:
1. Candidates: up to `candidates` indices spread evenly over the dataset (seed 0), or drawn at
   random from it by `seed` (another seed: another calibration draw). Pass a dataset WITHOUT
   augmentation (e.g. the training split built with augment=False): random flips and jitter
   would make the written images irreproducible.
2. Per candidate: median valid depth (metres, depth > 0) and the classes present, i.e. with >=
   PRESENCE (0.5%) of the labelled pixels (IGNORE_INDEX excluded): that drops stray boundary
   pixels and label noise but keeps small objects (0.5% of 96x128 is ~60 pixels).
3. Depth bins: edges at quantiles of the candidates' medians (equally populated bins); quotas as
   equal as possible summing to `size`, round-robin from the nearest bin (a bin short of
   candidates passes its remainder on).
4. Picks: round-robin over bins, one per bin per round while its quota lasts: the bin's candidate
   maximising (classes not yet covered, sum over its classes of 1 / (1 + chosen images with the
   class)); ties go to a `seed`-permuted order.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from distill.data.classes import IGNORE_INDEX, NYU13_NAMES

PRESENCE = 0.005  # a class is present in an image with >= 0.5% of its labelled pixels


@dataclass
class Selection:
    indices: list[int]            # dataset indices chosen, in pick order
    depth_bin_edges: list[float]  # metres, depth_bins + 1 values
    per_bin: list[int]            # images chosen per depth bin
    class_images: list[int]       # per class: chosen images where it is present
    candidates: int = 0           # candidate images looked at
    seed: int = 0
    stratified_by: list[str] = field(default_factory=list)   # "depth", "classes": what the candidates had

    def basis(self) -> str:
        """How the images were chosen, for logs: an unlabelled image folder gives neither."""
        if not self.stratified_by:
            return ("not stratified: the candidates have no ground-truth depth or labels (an image folder), "
                    "so the draw is the seed's; far depths may be missing from the activation ranges")
        return f"stratified by {' and '.join(self.stratified_by)}, per depth bin {self.per_bin}"

    def describe(self) -> dict:
        """JSON-able summary for manifests."""
        d = asdict(self)
        names = NYU13_NAMES if len(self.class_images) == len(NYU13_NAMES) else None
        d["class_images"] = {(names[c] if names else str(c)): n for c, n in enumerate(self.class_images)}
        d.update(images=len(self.indices), presence_fraction=PRESENCE)
        return d


def _stats(sample: dict, num_classes: int) -> tuple[float, np.ndarray]:
    depth = torch.as_tensor(sample["depth"]).float()
    valid = depth[depth > 0]
    median = float(valid.median()) if valid.numel() else float("nan")
    seg = torch.as_tensor(sample["seg"]).long().flatten()
    seg = seg[seg != IGNORE_INDEX]
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= num_classes):
        raise ValueError(f"seg has labels outside 0..{num_classes - 1} and {IGNORE_INDEX}; pass the "
                         "dataset's num_classes.")
    counts = torch.bincount(seg, minlength=num_classes).numpy()
    return median, counts >= PRESENCE * max(seg.numel(), 1)


CANDIDATES = 1024   # images scanned for the draw by default: enough to fill every depth bin and class


def check_calibration_size(calib: int, train_images: int) -> None:
    """The commands' `--calib`, refused before any work for it: the images are drawn from the run's
    training split, among at most CANDIDATES of them (the selection itself knows no flags)."""
    most = min(train_images, CANDIDATES)
    if calib > most:
        raise ValueError(f"--calib {calib}: the calibration images are drawn from {most} candidates (the run's "
                         f"training split holds {train_images} images, of which at most {CANDIDATES} are "
                         f"scanned); pass --calib {most} or fewer")


def select_calibration(dataset, size: int, *, candidates: int = CANDIDATES, depth_bins: int = 4,
                       num_classes: int = 13, seed: int = 0, progress: bool = True) -> Selection:
    """Pick `size` calibration images of `dataset` (not augmenting); see the module docstring."""
    n = len(dataset)
    m = min(int(candidates), n)
    if size <= 0 or depth_bins <= 0:
        raise ValueError(f"calibration size and depth_bins must be positive, got {size} and "
                         f"{depth_bins}; typical sizes are 100-500.")
    if size > m:
        raise ValueError(f"calibration size {size} exceeds the {m} candidate images (dataset of {n}, "
                         f"candidates={candidates}); lower the size or raise candidates / use a "
                         "larger dataset.")
    idx = (np.unique(np.linspace(0, n - 1, m).round().astype(np.int64)) if seed == 0
           else np.sort(np.random.default_rng(seed).choice(n, m, replace=False)))
    stats = [_stats(dataset[int(i)], num_classes)
             for i in tqdm(idx, desc="calibration candidates", disable=not progress,
                           mininterval=0.5 if sys.stderr.isatty() else 30)]   # a log file: a line per 30 s
    medians, present = np.array([s[0] for s in stats]), np.stack([s[1] for s in stats])
    finite = medians[np.isfinite(medians)]
    edges = (np.quantile(finite, np.linspace(0, 1, depth_bins + 1)) if finite.size
             else np.zeros(depth_bins + 1))
    # images without valid depth (nan median) land in the nearest bin
    bins = np.searchsorted(edges[1:-1], np.nan_to_num(medians, nan=-np.inf), side="right")
    members = [list(np.flatnonzero(bins == b)) for b in range(depth_bins)]
    quota, left = [0] * depth_bins, size
    while left:
        for b in range(depth_bins):
            if left and quota[b] < len(members[b]):
                quota[b], left = quota[b] + 1, left - 1
    tiebreak = np.random.default_rng(seed).permutation(len(idx))
    counts, chosen, per_bin = np.zeros(num_classes, np.int64), [], [0] * depth_bins
    while len(chosen) < size:
        for b in range(depth_bins):
            if per_bin[b] == quota[b]:
                continue
            p = present[members[b]]
            new = (p & (counts == 0)).sum(1)
            gain = (p / (1.0 + counts)).sum(1)
            best = max(range(len(members[b])), key=lambda k: (new[k], gain[k], -tiebreak[members[b][k]]))
            chosen.append(members[b].pop(best))
            counts += present[chosen[-1]]
            per_bin[b] += 1
    return Selection(indices=[int(idx[j]) for j in chosen], depth_bin_edges=[float(e) for e in edges],
                     per_bin=per_bin, class_images=[int(c) for c in counts], candidates=len(idx),
                     seed=seed, stratified_by=[k for k, had in (("depth", finite.size > 0),
                                                                ("classes", bool(present.any()))) if had])
