"""Segmentation losses: pixel-wise cross-entropy that ignores unlabelled pixels without NaN, with
optional class weights from the training set's label frequencies (`class_weights`), and the
Lovasz-softmax surrogate of the mean IoU (`lovasz_softmax`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.classes import IGNORE_INDEX


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX,
                  weight: Tensor | None = None, hard_fraction: float = 1.0) -> Tensor:
    """Mean cross-entropy over the labelled pixels of the batch; with `weight` (C,), each pixel
    counts with its class's weight (the weighted mean, as `F.cross_entropy`).

    `hard_fraction` < 1 is online hard example mining (OHEM, Shrivastava et al. 2016, as used
    for segmentation): only that fraction of the labelled pixels, those of highest cross-entropy
    in the batch, enter the mean. Easy pixels (the walls and floors the student already gets)
    stop diluting the gradient of the rare, hard ones.

    logits: (B, C, H, W) float, unnormalised class scores (computed in float32, autocast-safe).
    target: (B, H, W) integer class ids in [0, C), `ignore_index` for unlabelled pixels.
    Returns a 0-d float32 tensor. When every pixel is ignored (an unlabelled crop) it returns a 0
    that keeps the graph (all gradients 0), where `F.cross_entropy(reduction="mean")` gives NaN.
    """
    check_logits_and_target(logits, target)
    if not 0 < hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
    per_pixel = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index,
                                reduction="none")  # 0 at ignored pixels
    labelled = target != ignore_index
    if hard_fraction < 1:
        labelled = labelled & hardest(per_pixel, labelled, hard_fraction)
        per_pixel = per_pixel * labelled
    if weight is None:
        return per_pixel.sum() / labelled.sum().clamp_min(1)
    pixel_weight = weight.to(per_pixel)[torch.where(labelled, target, 0).long()] * labelled
    return (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


def check_logits_and_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}.")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = {(b, h, w)} to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}; "
                         "drop a channel dimension with `.squeeze(1)`.")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids (int64), got dtype {target.dtype}; "
                         "convert with `.long()` after checking the values are ids.")


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, stride: int = 1) -> Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU, averaged over
    the classes present in the batch's labels. Cross-entropy counts pixels, so a class of 1% of the
    pixels weighs 1% of it; here every present class weighs the same, as in the mean IoU.

    Per class c: the errors |[label = c] - p_c| of the labelled pixels, sorted in decreasing order,
    dotted with the increments of the Jaccard loss as the pixels are added to the mispredicted set
    in that order (the Lovasz extension; with 0/1 probabilities it equals 1 - IoU exactly).
    `stride` > 1 takes every stride-th pixel along height and width: each class sorts its pixels,
    which costs more than the whole cross-entropy at full resolution on a CPU.
    Returns a 0-d float32 tensor; 0 (graph kept) when no pixel is labelled.
    """
    check_logits_and_target(logits, target)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    logits, target = logits[..., ::stride, ::stride], target[..., ::stride, ::stride]
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    labelled = labels != ignore_index
    if not labelled.any():
        return logits.float().sum() * 0.0
    probs, labels = probs[labelled], labels[labelled].long()
    present = labels.unique()
    foreground = (present[:, None] == labels[None, :]).float()            # (present classes, pixels)
    errors, order = (foreground - probs[:, present].T).abs().sort(dim=1, descending=True)
    return (errors * jaccard_increments(foreground.gather(1, order))).sum(1).mean()


def jaccard_increments(foreground_sorted: Tensor) -> Tensor:
    """Increments of the Jaccard loss 1 - |F minus M| / |F union M| as the mispredicted set M grows by
    one pixel at a time, in the given order along the last dim (F: the pixels whose
    `foreground_sorted` is 1; one row per class)."""
    total = foreground_sorted.sum(-1, keepdim=True)
    intersection = total - foreground_sorted.cumsum(-1)
    union = total + (1 - foreground_sorted).cumsum(-1)
    loss = 1 - intersection / union
    return torch.cat([loss[..., :1], loss[..., 1:] - loss[..., :-1]], dim=-1)


def hardest(per_pixel: Tensor, labelled: Tensor, fraction: float) -> Tensor:
    """Mask of the ceil(fraction * labelled) labelled pixels of highest loss (ties: any of them)."""
    k = math.ceil(fraction * int(labelled.sum()))
    mask = torch.zeros_like(labelled)
    if k > 0:
        ranked = torch.where(labelled, per_pixel.detach(), torch.full_like(per_pixel, -1.0)).flatten()
        mask.view(-1)[ranked.topk(k, sorted=False).indices] = True
    return mask


def class_frequencies(dataset, num_classes: int, ignore_index: int = IGNORE_INDEX,
                      max_images: int = 512) -> Tensor:
    """(C,) share of labelled pixels per class over up to `max_images` evenly spaced items of
    `dataset` (items with a `seg` (H, W) map of ids); zeros when no pixel is labelled. ValueError for
    an id outside [0, num_classes) that is not `ignore_index` (e.g. NYU's 40 or 894 classes unmapped)."""
    n = len(dataset)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in torch.linspace(0, n - 1, min(n, max_images)).round().long().unique().tolist():
        seg = torch.as_tensor(dataset[i]["seg"])
        labels = seg[seg != ignore_index].flatten().long()
        outside = labels[(labels < 0) | (labels >= num_classes)].unique()
        if len(outside):
            raise ValueError(f"training item {i}'s segmentation holds ids {outside[:5].tolist()} outside 0-{num_classes - 1} "
                             f"(and {ignore_index}, unlabelled): map its labels to the {num_classes} classes, or "
                             f"to {ignore_index}")
        counts += torch.bincount(labels, minlength=num_classes)
    return counts / counts.sum().clamp_min(1)   # all zero when nothing is labelled (an image folder)


def class_weights(frequencies: Tensor, power: float, max_ratio: float = 10.0) -> Tensor:
    """(C,) weights proportional to frequency^-power (0: plain cross-entropy, 0.5: inverse square
    root, 1: inverse frequency), scaled so that the average labelled pixel weighs 1 (the loss keeps
    its scale beside the depth term) and clipped to `max_ratio` times the smallest, so that a class
    seen in a handful of pixels cannot dominate. Absent classes get the largest weight."""
    present = frequencies > 0
    raw = torch.where(present, frequencies.clamp_min(1e-12) ** -power, torch.zeros_like(frequencies))
    raw = torch.where(present, raw, raw.max())
    raw = raw.clamp(max=float(raw[present].min()) * max_ratio)
    return (raw / (raw * frequencies).sum()).float()
