"""Pictures a person reads: colour ramps for depth and error maps, a palette for the 13 classes,
and a captioned sheet of tiles (run previews, export error maps).

numpy and PIL only, so any stage can draw without pulling torch.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# 13 distinct colours, one per NYU13 class (bed, books, ceiling, chair, floor, furniture, objects,
# picture, sofa, table, tv, wall, window); ignored pixels are black.
SEG_PALETTE = np.array([[214, 39, 40], [255, 187, 120], [200, 200, 200], [148, 103, 189], [140, 86, 75],
                        [31, 119, 180], [227, 119, 194], [255, 127, 14], [44, 160, 44], [188, 189, 34],
                        [23, 190, 207], [127, 127, 127], [174, 199, 232]], dtype=np.uint8)
# Anchors of a perceptually ordered ramp (dark purple -> blue -> green -> yellow), near = dark.
RAMP = np.array([[48, 18, 59], [65, 105, 225], [32, 178, 120], [170, 220, 50], [253, 231, 37]], dtype=np.float32)


def colorize(values: np.ndarray, lo: float, hi: float, ramp: np.ndarray = RAMP, *,
             zero_invalid: bool = True) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 along `ramp`; NaN, and with `zero_invalid` <= 0 (invalid
    metric depth), is black. Error maps and relative or disparity labels, where 0 is a value, pass
    zero_invalid=False."""
    t = np.nan_to_num(np.clip((values - lo) / max(hi - lo, 1e-9), 0, 1)) * (len(ramp) - 1)
    i = np.minimum(t.astype(int), len(ramp) - 2)
    frac = (t - i)[..., None]
    rgb = ramp[i] * (1 - frac) + ramp[i + 1] * frac
    rgb[~np.isfinite(values) | ((values <= 0) if zero_invalid else False)] = 0
    return rgb.astype(np.uint8)


def colorize_seg(labels: np.ndarray) -> np.ndarray:
    out = np.zeros((*labels.shape, 3), np.uint8)
    known = labels < len(SEG_PALETTE)
    out[known] = SEG_PALETTE[labels[known]]
    return out


def compose(rows: list[list[np.ndarray]], columns: list[str]) -> Image.Image:
    h, w = rows[0][0].shape[:2]
    pad, header = 4, 16
    sheet = Image.new("RGB", (len(columns) * (w + pad) + pad, header + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((pad + c * (w + pad), 2), name, fill="black")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(Image.fromarray(tile), (pad + c * (w + pad), header + pad + r * (h + pad)))
    return sheet
