"""The artefact contract: what every exported file takes, returns and says about itself.

One definition shared by the torch side that builds artefacts (targets/deploy.py wraps the
student in it), the converter processes (targets/), the runners (edge/) and validation (quant/):

- input `image`: float32 RGB in [0, 1], (1, 3, H, W) or (1, H, W, 3) as the format's layout says
  (core/formats.py); the ImageNet normalisation is inside the artefact, so apps feed pixels / 255;
- outputs `depth` (1, 1, H, W) in the run's depth space (metres for metric recipes) and `seg`
  (1, C, H, W) class logits, two tensors so that an int8 file gives each its own scale;
- metadata embedded in every artefact, with the keys of `artefact_metadata`.

numpy only: runtime processes import this beside TensorFlow, which must never meet torch.
"""
from __future__ import annotations

import numpy as np

INPUT_NAME = "image"
DEPTH, SEG = "depth", "seg"
OUTPUT_NAMES = (DEPTH, SEG)
INPUT_RANGE = "RGB float32 in [0, 1]"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)   # the students' input normalisation
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PRODUCER = "densekit"


def input_shape(layout: str, height: int, width: int) -> list[int]:
    return [1, height, width, 3] if layout == "NHWC" else [1, 3, height, width]


def artefact_metadata(*, recipe: str, run: str, student: str, size: tuple[int, int], layout: str,
                      depth_space: str, depth_units: str, classes: list[str], checkpoint: str,
                      checkpoint_sha256: str, pruned: bool, int8_method: str) -> dict:
    """The metadata every artefact carries (strings, lists and flags; converters embed it as is)."""
    h, w = size
    nhwc = " (NHWC in TFLite)" if layout == "NHWC" else ""
    return {
        "producer": PRODUCER, "recipe": recipe, "run": run, "student": student,
        "input_name": INPUT_NAME, "input_shape": input_shape(layout, h, w), "input_layout": layout,
        "input_range": INPUT_RANGE,
        "normalisation": f"inside the model: (x - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)}",
        "depth_units": depth_units, "depth_space": depth_space,
        "outputs": {DEPTH: "(1, 1, H, W) depth" + nhwc, SEG: f"(1, {len(classes)}, H, W) class logits" + nhwc},
        "classes": list(classes), "source_checkpoint": checkpoint, "source_sha256": checkpoint_sha256,
        "pruned": pruned, "int8_method": int8_method,
    }


def precision_metadata(metadata: dict, precision: str) -> dict:
    """`metadata` as one artefact of `precision` embeds it: its precision, and how its integer
    activations were made (`int8_method`: the export's "qat" or "ptq" for an int8 file, "ptq" for
    Core ML's w8a8, calibrated by the reference executor, "" for files without them: the export-wide
    value said "ptq" in fp16 files)."""
    method = metadata.get("int8_method", "") if precision == "int8" else "ptq" if precision == "w8a8" else ""
    return {**metadata, "precision": precision, "int8_method": method}


def compare(depth: np.ndarray, seg: np.ndarray, ref_depth: np.ndarray, ref_seg: np.ndarray) -> dict:
    """Parity of one artefact's outputs against a reference's (the PyTorch model, or another executor).

    depth_rel_*: |d - d_ref| / d_ref per pixel; depth_max_abs in metres; seg_agreement: fraction
    of pixels with the same argmax; seg_max_abs: largest logit difference. The figures are over
    the finite differences (None when there is none: JSON has no NaN), so one NaN pixel does not
    hide the rest; `depth_non_finite` and `seg_non_finite` give the share left out, and `finite`
    says whether both outputs are finite everywhere.
    """
    if depth.shape != ref_depth.shape or seg.shape != ref_seg.shape:
        raise ValueError(f"artefact output shapes depth {depth.shape}, seg {seg.shape} differ from the "
                         f"model's {ref_depth.shape}, {ref_seg.shape}")
    depth_abs = np.abs(depth.astype(np.float64) - ref_depth)
    rel = depth_abs / np.maximum(np.abs(ref_depth), 1e-6)
    seg_abs = np.abs(seg.astype(np.float64) - ref_seg)
    finite_rel, finite_abs, finite_seg = (a[np.isfinite(a)] for a in (rel, depth_abs, seg_abs))
    return {
        "images": int(depth.shape[0]),
        "depth_rel_median": statistic(np.median, finite_rel),
        "depth_rel_p99": statistic(lambda a: np.percentile(a, 99), finite_rel),
        "depth_rel_max": statistic(np.max, finite_rel),
        "depth_max_abs": statistic(np.max, finite_abs),
        "depth_non_finite": 1.0 - finite_rel.size / rel.size,
        "seg_agreement": float((seg.argmax(1) == ref_seg.argmax(1)).mean()),
        "seg_max_abs": statistic(np.max, finite_seg),
        "seg_non_finite": 1.0 - finite_seg.size / seg_abs.size,
        "finite": bool(np.isfinite(depth).all() and np.isfinite(seg).all()),
    }


def statistic(reduce, values: np.ndarray) -> float | None:
    """`reduce(values)` as a float, or None for no values."""
    return float(reduce(values)) if values.size else None
