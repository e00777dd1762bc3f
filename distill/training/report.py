"""What a finished run shows a person: summary.json, report.md, preview.png and a terminal table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core import io
from core.figures import RAMP, colorize, colorize_seg, compose
from distill.data.transforms import denormalize
from distill.metrics import BOUNDARY_DEFINITION, DEPTH_RANGES, MIOU_AVERAGING, SILOG_VARIANT

HEADLINE = ["abs_rel", "baseline_abs_rel", "teacher_abs_rel", "gap_closed", "train_abs_rel", "rmse", "d1", "silog",
            "s_star", "abs_rel_aligned", "dbe_acc", "dbe_comp", "teacher_dbe_acc", "teacher_dbe_comp", "miou",
            "pixel_acc", "seg_boundary_f1"]
COLUMNS = ["RGB", "GT depth", "teacher", "student", "AbsRel error", "GT seg", "pred seg"]


@torch.no_grad()
def preview_rows(model, teacher, dataset, device, count: int) -> list[list[np.ndarray]]:
    """One row of COLUMNS tiles per validation image; the teacher's tile is blank without a teacher
    (None: a pseudo-label cache holds training-split labels only)."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(device) for k in items[0]}
    model.eval()
    out = model(batch["image"])
    model.train()
    teacher_depth = teacher(batch) if teacher is not None else None
    rows = []
    for i in range(len(items)):
        gt = batch["depth"][i, 0].cpu().numpy()
        valid = gt > 0
        lo, hi = (gt[valid].min(), gt[valid].max()) if valid.any() else (0.0, 1.0)
        pred = out["depth"][i, 0].float().cpu().numpy() if "depth" in out else np.zeros_like(gt)
        err = np.where(valid, np.abs(pred - gt) / np.maximum(gt, 1e-6), np.nan)
        if teacher is None:
            teacher_tile = np.zeros((*gt.shape, 3), np.uint8)
        else:
            label = teacher_depth[i, 0].float().cpu().numpy()
            # metres on ground truth's scale; a relative or disparity label (DA2's is unbounded) on its own
            finite = label[np.isfinite(label)]
            t_lo, t_hi = (lo, hi) if teacher.space.value == "metric" else (
                tuple(np.percentile(finite, [2, 98])) if finite.size else (0.0, 1.0))
            teacher_tile = colorize(label, t_lo, t_hi, zero_invalid=teacher.space.value == "metric")
        rows.append([denormalize(batch["image"][i].cpu()), colorize(gt, lo, hi), teacher_tile,
                     colorize(pred, lo, hi), colorize(err, 0.0, 0.5, RAMP[[0, 3, 4]], zero_invalid=False),
                     colorize_seg(batch["seg"][i].cpu().numpy()),
                     colorize_seg(out["seg"][i].argmax(0).cpu().numpy()) if "seg" in out else np.zeros_like(gt, np.uint8)[..., None].repeat(3, -1)])
    return rows


def terminal_table(summary: dict) -> str:
    width = max(len(k) for k in headline_keys(summary))
    shares = [f"{label} {summary[key]:.0%}" for key, label in
              (("data_wait_share", "waiting for data"), ("teacher_share", "teacher labelling")) if key in summary]
    timing = [f"{'train img/s':<{width}}  {summary['train_images_per_s']:.1f}"
              + (f" ({', '.join(shares)} of the time)" if shares else ""),
              f"{'wall_s':<{width}}  {summary['wall_s']:.0f}"]
    return metric_table(summary, timing)


def evaluation_table(result: dict) -> str:
    """`python -m distill.evaluate`'s table: the metrics of a run on the split it was given."""
    overrides = " ".join(result["overrides"]) or "its own validation split"
    return metric_table(result, [f"{result['images']} images ({overrides})"])


def headline_keys(summary: dict) -> list[str]:
    return [k for k in HEADLINE if isinstance(summary.get(k), (int, float))]


def metric_table(summary: dict, extra: list[str]) -> str:
    keys = headline_keys(summary)
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {summary[k]:.4f}" for k in keys]
    bar = "-" * (width + 12)
    return "\n".join([bar, *lines, *extra, *range_lines(summary), *per_class_lines(summary.get("iou_per_class") or {}),
                      bar])


def range_lines(summary: dict) -> list[str]:
    """AbsRel and the prediction/GT ratio per GT depth range: where the depth error is, and which way."""
    cells = [f"{low:g}-{high:g} m: abs_rel {summary[f'abs_rel_{name}']:.3f}, x{summary[f'ratio_{name}']:.2f}"
             for name, low, high in DEPTH_RANGES if isinstance(summary.get(f"ratio_{name}"), float)]
    return ["depth by GT range (x: prediction / GT, geometric mean):", "  " + "   ".join(cells)] if cells else []


def per_class_lines(iou: dict[str, float | None], per_line: int = 4) -> list[str]:
    """Per-class IoU, a few classes a line, lowest first: the classes the student misses lead."""
    if not iou:
        return []
    ranked = sorted(iou.items(), key=lambda kv: (kv[1] is None, kv[1] if kv[1] is not None else 0.0))
    width = max(len(name) for name in iou)
    cells = [f"{name:<{width}} {'-' if v is None else f'{v:.3f}':>5}" for name, v in ranked]
    return ["per-class IoU (lowest first):"] + ["  " + "   ".join(cells[i:i + per_line])
                                                 for i in range(0, len(cells), per_line)]


def markdown_report(run_dir: Path, recipe, summary: dict, size: tuple[int, int]) -> str:
    """report.md; `size` (H, W) is the images' (a file dataset's None in the recipe means its own)."""
    preflight = json.loads((run_dir / "preflight.json").read_text())
    doc = (type(recipe).__doc__ or "").strip()
    lines = [f"# Run {run_dir.name}", "", f"Recipe **{recipe.name}**: {doc.splitlines()[0] if doc else ''}", "",
             f"Student `{recipe.model.student}` ({', '.join(recipe.model.tasks)}), teacher `{recipe.teacher.name}`, "
             f"depth loss `{recipe.loss.depth}`, weighting `{recipe.loss.weighting}`, "
             f"{size[0]}x{size[1]}, {summary['train_set']} training images "
             f"({summary['val_set']} validating), "
             f"{recipe.train.epochs} epochs on {summary['device']}.", "", "## Pre-flight", "",
             "| tensor | space | min | max | mean | median |", "|---|---|---|---|---|---|"]
    for name, s in preflight["stats"].items():   # null: the tensor had no finite value
        cells = " | ".join("-" if s[k] is None else f"{s[k]:.4g}" for k in ("min", "max", "mean", "median"))
        lines.append(f"| {name} | {s['space']} | {cells} |")
    lines += [""] + [f"- {'ok' if c['ok'] else '**FAIL**'}: {c['message']}" for c in preflight["checks"]]
    kept = (summary.get("best") or {}).get("epoch")
    lines += ["", f"## Validation (the kept weights, best.safetensors{f': epoch {kept}' if kept else ''})", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in summary.items() if isinstance(v, float)]
    if summary.get("iou_per_class"):
        lines += ["", "Per-class IoU: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -"
                                                    for k, v in summary["iou_per_class"].items())]
    lines += ["", f"- silog: {SILOG_VARIANT}", f"- miou: {MIOU_AVERAGING}",
              "- baseline_abs_rel: AbsRel of a constant prediction equal to the training set's median depth",
              "- gap_closed: (baseline_abs_rel - abs_rel) / (baseline_abs_rel - teacher_abs_rel), the teacher "
              "measured against GT on the same validation images",
              "- train_*: the kept student on as many training images as there are validation images, "
              "without augmentation: what it fitted, beside what carries to new images",
              "- abs_rel_A_B, ratio_A_B: over the pixels whose GT lies in [A, B) m ([5, 10] for the last), AbsRel and the prediction's "
              "geometric-mean ratio to GT (> 1: that range is predicted too far)",
              f"- boundaries: {BOUNDARY_DEFINITION}",
              f"- best checkpoint: {summary.get('best')}", ""]
    if recipe.eval.preview_images:   # 0 turns the preview off
        lines += ["## Preview", "", "![preview](preview.png)", ""]
    return "\n".join(lines)


def write_outputs(run_dir: Path, recipe, summary: dict, model, teacher, val_ds, device, log=print) -> None:
    """preview.png and report.md, then summary.json: the file that marks a run finished comes last,
    so a run stopped while writing them is resumed (and writes them), not taken as finished."""
    if recipe.eval.preview_images:   # 0: no preview.png
        shown = None if recipe.teacher.cache else teacher   # its labels are of training images, not these
        rows = preview_rows(model, shown, val_ds, device, recipe.eval.preview_images)
        with io.atomic_path(run_dir / "preview.png") as tmp:
            compose(rows, COLUMNS).save(tmp, format="PNG")
    io.write_text(run_dir / "report.md", markdown_report(run_dir, recipe, summary, tuple(val_ds[0]["image"].shape[-2:])))
    io.write_json(run_dir / "summary.json", summary)
    log(f"\n{recipe.name} finished: {run_dir}\n{terminal_table(summary)}")
