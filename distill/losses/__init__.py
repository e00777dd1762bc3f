"""Losses and multi-task weighting: depth losses (registry `DEPTH_LOSSES`), segmentation
cross-entropy, surface normals of a depth map, and loss weightings (registry `WEIGHTINGS`)."""
from distill.losses.depth import (
                                  DEPTH_LOSSES,
                                  DepthLoss,
                                  align_scale_shift,
                                  berhu,
                                  build_depth_loss,
                                  gradient_huber,
                                  modified_huber,
                                  mse,
                                  parse_berhu_threshold,
                                  quantile,
                                  silog,
                                  ssi,
)
from distill.losses.normals import cosine_distance, surface_normals
from distill.losses.seg import class_frequencies, class_weights, cross_entropy, lovasz_softmax
from distill.losses.weighting import (
                                  TASK_KINDS,
                                  WEIGHTINGS,
                                  DWAWeighting,
                                  FixedWeighting,
                                  KendallWeighting,
                                  LossWeighting,
                                  build_weighting,
)

__all__ = [
    "DEPTH_LOSSES", "DepthLoss", "align_scale_shift", "berhu", "build_depth_loss",
    "gradient_huber", "modified_huber", "mse", "parse_berhu_threshold", "quantile", "silog", "ssi",
    "class_frequencies", "class_weights", "cross_entropy", "lovasz_softmax", "cosine_distance", "surface_normals",
    "TASK_KINDS", "WEIGHTINGS", "DWAWeighting", "FixedWeighting", "KendallWeighting",
    "LossWeighting", "build_weighting",
]
