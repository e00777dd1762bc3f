"""Turn a trained student into deployable artefacts: prune -> QAT -> convert -> run -> manifest.

    python -m quant.export --target tflite                      # newest v3 run, fp32 + fp16 + int8
    python -m quant.export --target coreml --run runs/v4-20261121T101500Z
    python -m quant.export --target onnx --precision int8 --qat-steps 0     # int8 by PTQ only
    python -m quant.export --target tflite --prune 0.3 --overwrite          # prune 30% of channels
    python -m quant.export --target tflite --prune macs=0.5x                # or to half the MACs

Writes exports/<run name>/<target>/: the artefacts, manifest.json (path, format, precision, bytes,
sha256, the conversion check and the task metrics of each artefact on validation images, tool
versions, the export config) and the converters' logs. Each converter runs in its own process
(targets/job.py); every artefact is executed by its runtime right after conversion (CoreML only
on macOS) and scored against the float PyTorch model on the same images.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    # format: {"all": precisions it can produce, "default": produced when --precision is not given}
    "tflite": {"all": ("fp32", "fp16", "int8"), "default": ("fp32", "fp16", "int8")},
    "coreml": {"all": ("fp32", "fp16", "w8", "palette4", "palette6"), "default": ("fp16", "w8", "palette4", "palette6")},
    "onnx": {"all": ("fp32", "int8"), "default": ("fp32", "int8")},
}
DEFAULT_QAT_STEPS = 300
DEFAULT_CALIB = 128
DEFAULT_CHECK = 64


class ExportError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quant.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--run", help="training run directory (default: the newest v3 run under --runs-dir)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="exports", help="exports root (default: exports/)")
    p.add_argument("--precision", nargs="+", help="precisions to produce (default: all of the target's)")
    p.add_argument("--prune", help='channel ratio ("0.3") or MAC target ("macs=80M", "macs=0.5x")')
    p.add_argument("--prune-steps", type=int, default=300, help="distillation fine-tune steps after pruning")
    p.add_argument("--qat-steps", type=int, default=DEFAULT_QAT_STEPS,
                   help=f"QAT steps for int8 (0 = post-training quantisation only; default {DEFAULT_QAT_STEPS})")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--float-ops", default="DIV",
                   help="TFLite op types an int8 file keeps in float (default DIV; see targets/tflite.py)")
    p.add_argument("--calib", type=int, default=DEFAULT_CALIB, help="calibration images for int8")
    p.add_argument("--check", type=int, default=DEFAULT_CHECK, help="validation images each artefact is run on")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tune batch size (pruning and QAT)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the runtime's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of this run and target")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def precisions_for(target: str, requested: list[str] | None) -> list[str]:
    if target not in FORMATS:
        from distill.registry import suggest
        raise ExportError(f'unknown target "{target}"; valid targets: {", ".join(FORMATS)}.{suggest(target, list(FORMATS))}')
    if not requested:
        return list(FORMATS[target]["default"])
    bad = [p for p in requested if p not in FORMATS[target]["all"]]
    if bad:
        raise ExportError(f"{target} cannot produce {', '.join(bad)}; it produces {', '.join(FORMATS[target]['all'])}")
    return list(dict.fromkeys(requested))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from quant.artefacts import ConversionError, ExportExistsError
    from quant.source import RunNotFoundError
    try:
        precisions = precisions_for(args.target, args.precision)
        export(args, precisions)
    except (ValueError, RunNotFoundError, ExportExistsError) as e:  # bad input: nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- the pipeline

def export(args: argparse.Namespace, precisions: list[str], log=print) -> Path:
    from distill.data import build_datasets
    from distill.students import count_macs, count_params
    from quant import artefacts, source

    t_start = time.time()
    source.set_threads(args.threads)
    run = source.load_run(source.find_run(args.run, args.runs_dir))
    h, w = run.input_size
    log(f"run {run.path} ({run.recipe.name}, {run.recipe.model.student}, {h}x{w}, weights {run.weights.name} "
        f"sha256 {run.weights_sha256[:12]})")
    staging = artefacts.ExportDir(Path(args.out) / run.name / args.target, args.overwrite)
    work = Path(tempfile.mkdtemp(prefix="densekit-export-"))
    try:
        train_ds, _ = build_datasets(run.recipe.data, progress=not args.quiet)
        plain_train, val_ds = build_datasets(replace(run.recipe.data, augment=False), progress=False)
        float_model, config = run.model, {"run": str(run.path), "recipe": run.recipe.name, "target": args.target,
                                          "precisions": precisions, "input_size": [h, w],
                                          "source_checkpoint": {"path": str(run.weights), "sha256": run.weights_sha256}}
        config["model"] = {"params": count_params(float_model), "macs": count_macs(float_model, h, w)}
        if args.prune:
            float_model, config["prune"] = prune_stage(run, float_model, train_ds, val_ds, args, log)
        int8_model, calibration = float_model, {}
        if "int8" in precisions:
            int8_model, calibration, config["int8"] = int8_stage(run, float_model, train_ds, plain_train, work,
                                                                 args, log)
        job = build_job(args.target, precisions, float_model, int8_model, calibration, run, val_ds, work,
                        staging.staging, config, args)
        log(f"converting to {args.target}: {', '.join(precisions)}")
        result = artefacts.run_converter(job, work, log)
        scored = [score(a, job, val_ds, run) for a in result["artefacts"]]
        shutil.copyfile(work / f"{args.target}.log", staging.staging / f"{args.target}.log")  # the converter's log
        tools = {**result["tools"], **parent_tools()}
        config["wall_s"] = round(time.time() - t_start, 1)
        manifest = artefacts.write_manifest(staging.staging, scored, tools, config)
        final = staging.commit()
    except BaseException:
        staging.discard()
        log(f"export failed; nothing was replaced. Scratch files kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(summary_table(manifest))
    log(f"wrote {final}/manifest.json ({len(manifest['artefacts'])} artefacts, {time.time() - t_start:.0f} s)")
    return final


def prune_stage(run, model, train_ds, val_ds, args, log):
    from quant.finetune import finetune
    from quant.prune import PruneTarget, prune_student

    target = PruneTarget.parse(args.prune)
    h, w = run.input_size
    before = evaluate(model, val_ds, run.recipe)
    reference = copy.deepcopy(model).eval()
    pruned = copy.deepcopy(model)
    report = prune_student(pruned, target, (h, w), log=log)
    finetune(pruned, reference, run.recipe, train_ds, steps=args.prune_steps, lr=5e-4, batch_size=args.batch_size,
             desc="prune fine-tune", progress=not args.quiet, log=log)
    after = evaluate(pruned, val_ds, run.recipe)
    report.update({"finetune_steps": args.prune_steps, "val_before": before, "val_after": after})
    log(f"pruned: params {report['params_before'] / 1e6:.2f} M -> {report['params_after'] / 1e6:.2f} M, "
        f"MACs {report['macs_before'] / 1e6:.0f} M -> {report['macs_after'] / 1e6:.0f} M, "
        f"abs_rel {before['abs_rel']:.4f} -> {after['abs_rel']:.4f}, miou {before.get('miou', 0):.3f} -> {after.get('miou', 0):.3f}")
    return pruned, report


def int8_stage(run, model, train_ds, plain_train, work, args, log):
    """Calibration set; then QAT (or PTQ only when --qat-steps 0).
    Returns the int8 source model, the calibration files (targets.job forms) and a report."""
    from quant import ptq, qat
    from quant.finetune import finetune

    calib = ptq.calibration_set(plain_train, args.calib, work / "calibration", progress=not args.quiet)
    report = {"calibration": calib.selection.describe(), "method": "qat" if args.qat_steps > 0 else "ptq"}
    log(f"calibration: {len(calib.selection.indices)} images, per depth bin {calib.selection.per_bin}")
    if args.qat_steps <= 0:
        return model, calib.files, report
    fake = ptq.simulate(model, calib, log_depth="EXP" in float_ops(args))
    finetune(fake, model, run.recipe, train_ds, steps=args.qat_steps, lr=args.qat_lr, batch_size=args.batch_size,
             desc="QAT", progress=not args.quiet, log=log)
    report.update({"qat_steps": args.qat_steps, "qat_lr": args.qat_lr, "activation_ranges": qat.activation_ranges(fake)})
    return qat.finalize(fake), calib.files, report


def float_ops(args) -> list[str]:
    return [op.strip().upper() for op in args.float_ops.split(",") if op.strip()]


def evaluate(model, dataset, recipe) -> dict:
    import torch

    from distill.train import evaluate as evaluate_model, make_loader
    loader = make_loader(dataset, 16, train=False, seed=0, workers=0)
    metrics = evaluate_model(model, loader, torch.device("cpu"), None, recipe)
    model.eval()
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def unit_images(dataset, count: int):
    """The first `count` images of `dataset` as (N, 3, H, W) RGB in [0, 1], the artefacts' input."""
    import torch

    from distill.data.transforms import unit_rgb
    return torch.stack([unit_rgb(dataset[i]["image"]) for i in range(count)])


def build_job(fmt, precisions, float_model, int8_model, calibration, run, val_ds, work, out_dir, config, args):
    from quant import deploy
    from targets.job import Job

    h, w = run.input_size
    check_dir = work / "check"
    check_dir.mkdir()
    inputs = unit_images(val_ds, min(args.check, len(val_ds)))
    np.save(check_dir / "inputs.npy", inputs.numpy())
    check = {"inputs": str(check_dir / "inputs.npy")}
    sources = {}
    for name, model in (("float", float_model), ("int8", int8_model)):
        if name == "int8" and "int8" not in precisions:
            continue
        if name == "int8" and model is float_model:   # PTQ: the int8 files come from the float model
            sources["int8"] = sources["float"]
            check.update(int8_depth=check["float_depth"], int8_seg=check["float_seg"])
            continue
        depth, seg = deploy.reference_outputs(model, inputs)
        for key, value in (("depth", depth), ("seg", seg)):
            np.save(check_dir / f"{name}_{key}.npy", value.numpy())
            check[f"{name}_{key}"] = str(check_dir / f"{name}_{key}.npy")
        if fmt == "coreml":
            sources[name] = str(deploy.export_program(model, work / f"{name}.pt2", h, w))
        else:
            sources[name] = str(deploy.export_onnx(model, work / f"{name}.onnx", h, w))
    # Absolute paths: a converter may change its working directory (onnx2tf's sample file).
    return Job(format=fmt, precisions=precisions, sources=sources, out_dir=str(Path(out_dir).resolve()),
               work_dir=str(work.resolve()),
               stem=run.name, input_shape=[1, 3, h, w], metadata=artefact_metadata(run, config, fmt),
               calibration=calibration, check=check, threads=args.threads or 2,
               float_ops=float_ops(args))


def artefact_metadata(run, config: dict, fmt: str) -> dict:
    from distill.data.classes import NYU13_NAMES
    from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from distill.spaces import DepthSpace
    from distill.teachers import TEACHERS

    h, w = run.input_size
    space = DepthSpace.METRIC if run.recipe.target == "ground_truth" else TEACHERS.get(run.recipe.teacher).space
    return {
        "producer": "densekit", "recipe": run.recipe.name, "run": run.name, "student": run.recipe.model.student,
        "input_name": "image", "input_shape": [1, h, w, 3] if fmt == "tflite" else [1, 3, h, w],
        "input_layout": "NHWC" if fmt == "tflite" else "NCHW", "input_range": "RGB float32 in [0, 1]",
        "normalisation": f"inside the model: (x - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)}",
        "depth_units": space.describe(), "depth_space": space.value,
        "outputs": {"depth": "(1, 1, H, W) depth" + (" (NHWC in TFLite)" if fmt == "tflite" else ""),
                    "seg": f"(1, {len(NYU13_NAMES)}, H, W) class logits"},
        "classes": list(NYU13_NAMES), "source_checkpoint": Path(run.weights).name, "source_sha256": run.weights_sha256,
        "pruned": "prune" in config, "int8_method": config.get("int8", {}).get("method", ""),
    }


def score(artefact: dict, job, val_ds, run) -> dict:
    """Task metrics of the artefact's own outputs and of the float model's, on the check images."""
    import torch

    from distill.data.classes import IGNORE_INDEX, NYU13_NAMES
    from distill.metrics import DepthMetrics, SegMetrics
    from targets.job import outputs_path

    path = outputs_path(job, artefact["precision"])
    if not path.exists():  # not executed (CoreML off macOS)
        return artefact
    out = np.load(path)
    ref_depth = np.load(job.check["float_depth"])
    ref_labels = np.load(job.check["float_seg"]).argmax(1)
    ec = run.recipe.eval
    n = len(out["depth"])
    gt = [val_ds[i] for i in range(n)]
    gt_depth = torch.stack([g["depth"] for g in gt]); gt_valid = torch.stack([g["valid"] for g in gt])
    gt_seg = torch.stack([g["seg"] for g in gt])
    results = {}
    for name, depth, labels in (("float", ref_depth, ref_labels), ("artefact", out["depth"], out["labels"])):
        dm = DepthMetrics(min_depth=ec.min_depth, max_depth=ec.max_depth, eigen_crop=ec.eigen_crop)
        sm = SegMetrics(len(NYU13_NAMES), ignore_index=IGNORE_INDEX, class_names=list(NYU13_NAMES))
        dm.update(torch.from_numpy(np.asarray(depth, np.float32)), gt_depth, gt_valid)
        sm.update(torch.from_numpy(np.asarray(labels, np.int64)), gt_seg)
        metrics = {**dm.compute(), **sm.compute()}
        results[name] = {k: metrics[k] for k in ("abs_rel", "rmse", "d1", "miou") if k in metrics}
    rel = np.abs(out["depth"] - ref_depth) / np.maximum(ref_depth, 1e-6)
    results["delta"] = {k: results["artefact"][k] - results["float"][k] for k in results["float"]}
    results["vs_float"] = {"depth_rel_median": float(np.median(rel)), "depth_rel_p95": float(np.percentile(rel, 95)),
                           "seg_agreement": float((out["labels"] == ref_labels).mean())}
    results["images"] = n
    return {**artefact, "validation": results}


def parent_tools() -> dict:
    from targets.job import tool_versions
    return tool_versions("torch", "timm", "torch-pruning", "densekit")


def summary_table(manifest: dict) -> str:
    rows = [f"{'artefact':<44} {'MB':>7} {'abs_rel':>8} {'Δabs_rel%':>10} {'miou':>6} {'Δmiou':>7} {'seg agree':>9}"]
    for a in manifest["artefacts"]:
        v = a.get("validation")
        if v:
            f, d = v["float"], v["delta"]
            rel = 100 * d["abs_rel"] / f["abs_rel"] if f.get("abs_rel") else float("nan")
            rows.append(f"{a['path']:<44} {a['bytes'] / 1e6:>7.2f} {v['artefact']['abs_rel']:>8.4f} {rel:>+10.2f} "
                        f"{v['artefact'].get('miou', float('nan')):>6.3f} {d.get('miou', float('nan')):>+7.3f} "
                        f"{v['vs_float']['seg_agreement']:>9.4f}")
        else:
            rows.append(f"{a['path']:<44} {a['bytes'] / 1e6:>7.2f}   (not executed here: "
                        f"{a.get('check', {}).get('reason', 'no runtime')})")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
