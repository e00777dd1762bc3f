"""What an export's validation leaves on disk: drift.json, a drift histogram, error maps, report.md.

drift.json = {"artefacts": [DriftReport.to_json(), ...]} (quant/validate.py). The figures are PNGs
drawn with PIL (no plotting library is a dependency):
- drift_histogram.png: per artefact, the share of pixels per decade of relative depth difference
  |d - d_float| / d_float (below 1e-6, one bar per decade, 1 or more), the picture behind the
  per-pixel percentiles;
- errors_<precision>.png: per artefact, the validation images where it drifted most: RGB, float
  depth, artefact depth, relative difference (0 to 5 %), and the pixels whose label changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core import io
from core.figures import RAMP, colorize, compose
from quant.validate import DriftReport, ValidationData, relative_difference

# Histogram bins of relative depth difference: below 1e-6, one per decade up to 1, and 1 or more.
BIN_EDGES = np.array([0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, np.inf])
BIN_LABELS = ["<1e-6", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1", ">=1"]
ERROR_COLUMNS = ["RGB", "float depth", "artefact depth", "|d - d_float| / d_float (0-5%)", "label changed"]
WORST_IMAGES = 2


def write_drift(export_dir: Path, reports: list[DriftReport], data: ValidationData, float_model) -> str:
    """Write drift.json and the figures into `export_dir`; return the report.md section."""
    export_dir = Path(export_dir)
    io.write_json(export_dir / "drift.json", {"artefacts": [r.to_json() for r in reports]})
    executed = [r for r in reports if r.outputs is not None]
    if executed:
        save_png(histogram(executed, data, float_model), export_dir / "drift_histogram.png")
    for r in executed:
        save_png(error_maps(r, data, float_model), export_dir / f"errors_{r.precision}.png")
    return markdown(reports)


def save_png(image: Image.Image, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def histogram(reports: list[DriftReport], data: ValidationData, float_model) -> Image.Image:
    """One strip per artefact: bars = share of pixels per decade of relative depth difference."""
    ref_depth, _ = data.float_outputs(float_model)
    bar_w, bar_h, label_w, pad = 48, 60, 160, 6
    sheet = Image.new("RGB", (label_w + bar_w * len(BIN_LABELS) + 2 * pad, (bar_h + 2 * pad) * len(reports) + 24),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(BIN_LABELS):
        draw.text((label_w + i * bar_w + pad, 4), label, fill="black")
    for row, report in enumerate(reports):
        rel = relative_difference(report.outputs[0], ref_depth).ravel()
        share = np.histogram(rel, bins=BIN_EDGES)[0] / max(rel.size, 1)
        top = 24 + row * (bar_h + 2 * pad)
        draw.text((pad, top + bar_h // 2 - 6), f"{report.precision} ({report.format})", fill="black")
        for i, s in enumerate(share):
            x0, y0 = label_w + i * bar_w + pad, top + bar_h - int(s * bar_h)
            draw.rectangle([x0, y0, x0 + bar_w - 4, top + bar_h], fill=(65, 105, 225))
            if s > 0:
                draw.text((x0, max(y0 - 11, top - 4)), f"{100 * s:.0f}%", fill="black")
    return sheet


def error_maps(report: DriftReport, data: ValidationData, float_model) -> Image.Image:
    """The WORST_IMAGES images with the largest mean relative depth difference."""
    depth, labels = report.outputs
    ref_depth, ref_labels = data.float_outputs(float_model)
    rel = relative_difference(depth, ref_depth)
    worst = np.argsort(-np.where(np.isfinite(rel), rel, 1e9).mean(axis=(1, 2, 3)))[:WORST_IMAGES]
    rows = []
    for i in worst:
        lo, hi = float(np.nanmin(ref_depth[i])), float(np.nanmax(ref_depth[i]))
        rgb = (np.clip(data.inputs[i].transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
        changed = np.where(labels[i] != ref_labels[i], 255, 0).astype(np.uint8)
        rows.append([rgb, colorize(ref_depth[i, 0], lo, hi), colorize(depth[i, 0], lo, hi),
                     colorize(np.minimum(rel[i, 0], 1.0), 0.0, 0.05, RAMP[[0, 3, 4]], zero_invalid=False),
                     np.repeat(changed[..., None], 3, axis=-1)])
    return compose(rows, ERROR_COLUMNS)


def markdown(reports: list[DriftReport]) -> str:
    lines = ["## Drift against the float model", "",
             "Each artefact executed by its runtime on the same validation images as the float PyTorch model; "
             "deltas are artefact minus float. Gates: targets/devices.json.", "",
             "| artefact | executor | images | abs_rel (float -> artefact) | Δabs_rel | miou (float -> artefact) "
             "| Δmiou (pt) | depth rel. diff. p50 / p95 | label agreement | gates |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        f, a, p = r.float, r.artefact, r.per_pixel
        rel = 100 * r.delta["abs_rel"] / f["abs_rel"] if f.get("abs_rel") else float("nan")
        verdict = "pass" if r.passed else "**FAIL**: " + "; ".join(x.split(": ", 1)[1] for x in r.failures())
        lines.append(f"| {r.path} | {r.executor} | {r.images} | {f['abs_rel']:.4f} -> {a['abs_rel']:.4f} | "
                     f"{rel:+.2f}% | {f.get('miou', float('nan')):.3f} -> {a.get('miou', float('nan')):.3f} | "
                     f"{100 * r.delta.get('miou', float('nan')):+.2f} | {percent(p['depth_rel_p50'])} / "
                     f"{percent(p['depth_rel_p95'])} | {100 * p['seg_agreement']:.2f}% | {verdict} |")
    lines += ["", "![drift histogram](drift_histogram.png)", ""]
    lines += [f"![errors {r.precision}](errors_{r.precision}.png)" for r in reports if r.outputs is not None]
    return "\n".join(lines) + "\n"


def percent(share: float | None) -> str:
    """A per-pixel share as a percentage; "none finite" for None (no pixel of the depth was finite)."""
    return "none finite" if share is None else f"{100 * share:.3f}%"
