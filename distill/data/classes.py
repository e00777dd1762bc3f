"""NYU Depth V2 class sets (13-class protocol of MTAN / LibMTL; 40-class of Gupta et al.).

The maps ship as package data (`nyuv2_class_maps.json`, read from ankurhanda/nyuv2-meta-data; its
`source` field says from which files). Ids in the file are 1-based with 0 = unlabelled; the
project trains on 0-based ids with `IGNORE_INDEX` for unlabelled pixels.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

IGNORE_INDEX = 255


@lru_cache(maxsize=1)
def class_maps() -> dict:
    return json.loads(resources.files(__package__).joinpath("nyuv2_class_maps.json").read_text())


NYU13_NAMES: tuple[str, ...] = tuple(class_maps()["names_13"])
NYU40_NAMES: tuple[str, ...] = tuple(class_maps()["names_40"])


def nyu13_id(name: str) -> int:
    """0-based training id of a 13-class name, e.g. nyu13_id("wall") == 11."""
    return NYU13_NAMES.index(name)


def raw894_to_train13(raw: np.ndarray) -> np.ndarray:
    """Map raw NYU labels (0 = unlabelled, 1..894) to 0-based 13-class ids, IGNORE_INDEX for 0."""
    maps = class_maps()
    lut40 = np.array([0] + maps["map_894_to_40"], dtype=np.int64)
    lut13 = np.array([0] + maps["map_40_to_13"], dtype=np.int64)
    l13 = lut13[lut40[raw]]
    return np.where(l13 == 0, IGNORE_INDEX, l13 - 1).astype(np.uint8)
