"""Turn a trained student into deployable artefacts: prune -> QAT -> convert -> validate -> bench.

    python -m quant.export --target tflite                      # newest v3 run, fp32 + fp16 + int8
    python -m quant.export --target pixel8                      # a device profile (targets/devices.json)
    python -m quant.export --target coreml --run runs/v4-20261121T101500Z
    python -m quant.export --target onnx --precision int8 --qat-steps 0     # int8 by PTQ only
    python -m quant.export --target tflite --prune 0.3 --overwrite          # prune 30% of channels
    python -m quant.export --target tflite --prune macs=0.5x                # or to half the MACs

Writes exports/<run name>/<target>/: the artefacts; drift.json (each artefact executed by its own
runtime on validation images and scored against the float PyTorch model, with pass or fail against
the gates of its precision); benchmark.json (host latency, throughput, memory, efficiency against
the host's measured matrix-product peak); report.md with the drift histogram and error maps;
manifest.json (sizes, hashes, tool versions, config); device/ (the on-device bench scripts and the
commands for this export). Each converter runs in its own process (targets/job.py).

Exit status: 0 every artefact passed its gates; 3 an artefact failed a gate (the export is written
and drift.json says which metric, value and tolerance); 1 a converter failed (nothing replaced);
2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distill import io
from edge import kit
from quant import benchmark
from targets.profiles import device_names

FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    # format: {"all": precisions it can produce, "default": produced when --precision is not given}
    "tflite": {"all": ("fp32", "fp16", "int8"), "default": ("fp32", "fp16", "int8")},
    "coreml": {"all": ("fp32", "fp16", "w8", "palette4", "palette6"), "default": ("fp16", "w8", "palette4", "palette6")},
    "onnx": {"all": ("fp32", "fp16", "int8"), "default": ("fp32", "fp16", "int8")},
}
DEFAULT_QAT_STEPS = 300
DEFAULT_CALIB = 128
DEFAULT_CHECK = 64
PARITY_IMAGES = 8      # a converter's own parity check against its source model (validation uses --check)
EXIT_GATE_FAILED = 3


class ExportError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quant.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help=f"a format ({', '.join(FORMATS)}) or a device profile ({', '.join(device_names())})")
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
    p.add_argument("--input-size", help="HxW to export at (default: the device profile's, else the run's)")
    p.add_argument("--check", type=int, default=DEFAULT_CHECK, help="validation images each artefact is run on")
    p.add_argument("--tolerance", action="append", metavar="PRECISION.KEY=VALUE",
                   help="override a drift gate, e.g. int8.abs_rel_change=0.03 (keys: abs_rel_change, miou_drop_pt)")
    p.add_argument("--bench-runs", type=int, default=30, help="timed runs per artefact on this host (0 = no bench)")
    p.add_argument("--bench-warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="fine-tune batch size (pruning and QAT)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for conversion and bench (0 = the device profile's, capped at this host's cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of this run and target")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """What to produce: the format, its precisions, the device profile (if any), size and threads."""
    format: str
    precisions: list[str]
    profile: object            # targets.profiles.DeviceProfile | None
    input_size: tuple[int, int] | None   # None = the run's training size
    threads: int
    tolerances: dict
    float_ops: list[str]       # TFLite op types an int8 file keeps in float


def plan_for(args: argparse.Namespace) -> Plan:
    from targets.profiles import device, parse_tolerances

    profile = None
    if args.target in FORMATS:
        fmt, precisions = args.target, precisions_for(args.target, args.precision)
    else:
        profile = device(args.target)   # an unknown name lists formats and devices
        if args.precision and args.precision != [profile.precision]:
            raise ExportError(f"{profile.name} is defined as {profile.format} {profile.precision} (targets/devices.json); "
                              f"for other precisions use --target {profile.format} --precision ...")
        fmt, precisions = profile.format, [profile.precision]
    size = parse_size(args.input_size) if args.input_size else (profile.input_size if profile else None)
    threads = args.threads or min((profile.threads if profile else None) or 2, os.cpu_count() or 1)
    float_ops = [op.strip().upper() for op in args.float_ops.split(",") if op.strip()]
    return Plan(fmt, precisions, profile, size, threads, parse_tolerances(args.tolerance), float_ops)


def parse_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit()) or int(h) % 32 or int(w) % 32 or not int(h) or not int(w):
        raise ExportError(f'--input-size "{text}": expected HxW with both sides positive multiples of 32 '
                          f'(the students downsample by 32), e.g. 256x320')
    return int(h), int(w)


def precisions_for(target: str, requested: list[str] | None) -> list[str]:
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
    from quant.validate import GateFailure
    try:
        export(args, plan_for(args))
    except (ValueError, RunNotFoundError, ExportExistsError) as e:  # bad input: nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except GateFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


# ----------------------------------------------------------------------------- the pipeline

def export(args: argparse.Namespace, plan: Plan, log=print) -> Path:
    from distill.data import build_datasets
    from distill.students import count_macs, count_params
    from quant import artefacts, source
    from quant.validate import GateFailure

    t_start = time.time()
    source.set_threads(plan.threads)
    run = source.load_run(source.find_run(args.run, args.runs_dir))
    h, w = plan.input_size or run.input_size
    log(f"run {run.path} ({run.recipe.name}, {run.recipe.model.student}, weights {run.weights.name} "
        f"sha256 {run.weights_sha256[:12]}); exporting {plan.format} {', '.join(plan.precisions)} at {h}x{w}"
        + (f" for {plan.profile.name}" if plan.profile else ""))
    staging = artefacts.ExportDir(Path(args.out) / run.name / args.target, args.overwrite)
    work = Path(tempfile.mkdtemp(prefix="densekit-export-"))
    try:
        data = replace(run.recipe.data, height=h, width=w)
        train_ds, _ = build_datasets(data, progress=not args.quiet)
        plain_train, val_ds = build_datasets(replace(data, augment=False), progress=False)
        float_model, config = run.model, {"run": str(run.path), "recipe": run.recipe.name, "target": args.target,
                                          "format": plan.format, "precisions": plan.precisions, "input_size": [h, w],
                                          "device": plan.profile.name if plan.profile else None,
                                          "source_checkpoint": {"path": str(run.weights), "sha256": run.weights_sha256}}
        config["model"] = {"params": count_params(float_model), "macs": count_macs(float_model, h, w)}
        if args.prune:
            float_model, config["prune"] = prune_stage(run, float_model, train_ds, val_ds, (h, w), args, log)
            config["model"].update(exported_params=count_params(float_model),
                                   exported_macs=count_macs(float_model, h, w))
        int8_model, calibration = float_model, {}
        if "int8" in plan.precisions:
            int8_model, calibration, config["int8"] = int8_stage(run, float_model, train_ds, plain_train, work,
                                                                 plan, args, log)
        job = build_job(plan, float_model, int8_model, calibration, run, (h, w), val_ds, work, staging.staging,
                        config)
        log(f"converting to {plan.format}: {', '.join(plan.precisions)}")
        result = artefacts.run_converter(job, work, log)
        shutil.copyfile(work / f"{plan.format}.log", staging.staging / f"{plan.format}.log")  # the converter's log
        reports, drift_md = validation_stage(result["artefacts"], float_model, val_ds, run, plan, staging.staging,
                                             args, log)
        bench = None
        if args.bench_runs > 0:
            log(f"bench on this host: {args.bench_runs} runs after {args.bench_warmup} warm-up, {plan.threads} threads")
            bench = benchmark.benchmark(staging.staging, result["artefacts"], threads=plan.threads,
                                        runs=args.bench_runs, warmup=args.bench_warmup,
                                        macs=config["model"].get("exported_macs", config["model"]["macs"]), log=log)
        kit.write_device_kit(staging.staging, result["artefacts"], plan.profile)
        entries = [{**a, "validation": r.to_json(), **({"bench": bench["artefacts"][a["path"]]} if bench else {})}
                   for a, r in zip(result["artefacts"], reports)]
        config["wall_s"] = round(time.time() - t_start, 1)
        manifest = artefacts.write_manifest(staging.staging, entries, {**result["tools"], **parent_tools()}, config)
        table = benchmark.table(manifest["artefacts"], bench, plan.profile.latency_budget_ms if plan.profile else None)
        resized = size_warning(run, (h, w), reports)
        io.write_text(staging.staging / "report.md", report_markdown(run, plan, config, drift_md, table, resized))
        final = staging.commit()
    except BaseException:
        staging.discard()
        log(f"export failed; nothing was replaced. Scratch files kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(table)
    files = "report.md, drift.json, manifest.json" + (", benchmark.json" if bench else "")
    log(f"wrote {final} ({files}; {len(reports)} artefacts, {time.time() - t_start:.0f} s)")
    if resized:
        log(resized)
    failures = [f for r in reports for f in r.failures()]
    if failures:
        raise GateFailure(f"{len(failures)} drift gate(s) failed (see {final / 'drift.json'}):\n  "
                          + "\n  ".join(failures) + "\nGates: targets/devices.json; --tolerance PRECISION.KEY=VALUE "
                          "overrides one for this export. Try QAT (--qat-steps) or keep an op in float (--float-ops)."
                          + (f"\n{resized}" if resized else ""))
    return final


def size_warning(run, size: tuple[int, int], reports) -> str:
    """When exporting at another size than the run trained at, how the float model itself fares
    there: the reference every gate compares with. QAT at the new size also fine-tunes the model to
    it, so its int8 file may be *better* than that reference, and fail the gate for it."""
    if size == run.input_size or not reports:
        return ""
    summary = run.path / "summary.json"
    trained = json.loads(summary.read_text()).get("abs_rel") if summary.exists() else None
    here = reports[0].float["abs_rel"]
    return (f"warning: {run.name} was trained at {run.input_size[0]}x{run.input_size[1]}"
            + (f" (abs_rel {trained:.4f})" if trained is not None else "")
            + f"; at {size[0]}x{size[1]} the float model itself has abs_rel {here:.4f}. For this target, train at its "
            f"size: python -m distill.run {run.recipe.name} data.height={size[0]} data.width={size[1]}")


def validation_stage(artefacts: list[dict], float_model, val_ds, run, plan: Plan, export_dir: Path, args, log):
    """Execute every artefact on --check validation images and gate its drift against the float model."""
    from quant.drift_report import write_drift
    from quant.validate import ValidationData, validate
    from targets.profiles import gate_for

    data = ValidationData.from_dataset(val_ds, args.check)
    log(f"validating {len(artefacts)} artefacts on {len(data.inputs)} validation images")
    reports = []
    for a in artefacts:
        report = validate(export_dir / a["path"], float_model, data, precision=a["precision"],
                          gate=gate_for(a["precision"], plan.profile, plan.tolerances), eval_config=run.recipe.eval,
                          threads=plan.threads)
        rel = 100 * report.delta["abs_rel"] / report.float["abs_rel"]
        log(f"  {'pass' if report.passed else 'FAIL'} {a['path']}: abs_rel {report.artefact['abs_rel']:.4f} "
            f"({rel:+.2f}%), miou {report.artefact.get('miou', float('nan')):.3f} "
            f"({100 * report.delta.get('miou', float('nan')):+.2f} pt) [{report.executor}]")
        reports.append(report)
    return reports, write_drift(export_dir, reports, data, float_model)


def report_markdown(run, plan: Plan, config: dict, drift_md: str, table: str, warning: str = "") -> str:
    h, w = config["input_size"]
    target = f"{plan.profile.name}: {plan.profile.description}" if plan.profile else plan.format
    return (f"# Export of {run.name} ({run.recipe.name}, {run.recipe.model.student})\n\n"
            f"Target {target}; {', '.join(plan.precisions)} at {h}x{w}; "
            f"{config['model']['macs'] / 1e6:.0f} M MACs"
            + (f", pruned to {config['model']['exported_macs'] / 1e6:.0f} M" if "exported_macs" in config["model"] else "")
            + (f"; int8 by {config['int8']['method']}" if "int8" in config else "") + ".\n\n"
            + (f"**{warning}**\n\n" if warning else "")
            + f"## Benchmark\n\n{table}\n{drift_md}")


def prune_stage(run, model, train_ds, val_ds, size: tuple[int, int], args, log):
    from quant.finetune import finetune
    from quant.prune import PruneTarget, prune_student

    target = PruneTarget.parse(args.prune)
    h, w = size
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


def int8_stage(run, model, train_ds, plain_train, work, plan: Plan, args, log):
    """Calibration set; then QAT (or PTQ only when --qat-steps 0).
    Returns the int8 source model, the calibration files (targets.job forms) and a report."""
    from quant import ptq, qat
    from quant.finetune import finetune

    calib = ptq.calibration_set(plain_train, args.calib, work / "calibration", progress=not args.quiet)
    report = {"calibration": calib.selection.describe(), "method": "qat" if args.qat_steps > 0 else "ptq"}
    log(f"calibration: {len(calib.selection.indices)} images, per depth bin {calib.selection.per_bin}")
    if args.qat_steps <= 0:
        return model, calib.files, report
    # Both int8 converters quantise depth before the heads' float tails (upsampling, EXP): log-depth.
    fake = ptq.simulate(model, calib, log_depth=True)
    finetune(fake, model, run.recipe, train_ds, steps=args.qat_steps, lr=args.qat_lr, batch_size=args.batch_size,
             desc="QAT", progress=not args.quiet, log=log)
    report.update({"qat_steps": args.qat_steps, "qat_lr": args.qat_lr, "activation_ranges": qat.activation_ranges(fake)})
    return qat.finalize(fake), calib.files, report


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


def build_job(plan: Plan, float_model, int8_model, calibration, run, size, val_ds, work, out_dir, config):
    from quant import deploy
    from targets.job import Job

    h, w = size
    check_dir = work / "check"
    check_dir.mkdir()
    inputs = unit_images(val_ds, min(PARITY_IMAGES, len(val_ds)))
    np.save(check_dir / "inputs.npy", inputs.numpy())
    check = {"inputs": str(check_dir / "inputs.npy")}
    sources = {}
    for name, model in (("float", float_model), ("int8", int8_model)):
        if name == "int8" and "int8" not in plan.precisions:
            continue
        ptq = name == "int8" and model is float_model   # PTQ: the int8 files come from the float model
        if ptq:
            check.update(int8_depth=check["float_depth"], int8_seg=check["float_seg"])
        else:
            depth, seg = deploy.reference_outputs(model, inputs)
            for key, value in (("depth", depth), ("seg", seg)):
                np.save(check_dir / f"{name}_{key}.npy", value.numpy())
                check[f"{name}_{key}"] = str(check_dir / f"{name}_{key}.npy")
        same_file = ptq
        sources[name] = sources["float"] if same_file else source_file(plan.format, name, model, work, (h, w))
    # Absolute paths: a converter may change its working directory (onnx2tf's sample file).
    return Job(format=plan.format, precisions=plan.precisions, sources=sources, out_dir=str(Path(out_dir).resolve()),
               work_dir=str(work.resolve()), stem=run.name, input_shape=[1, 3, h, w],
               metadata=artefact_metadata(run, config, plan.format), calibration=calibration, check=check,
               threads=plan.threads, float_ops=plan.float_ops)


def source_file(fmt: str, name: str, model, work: Path, size: tuple[int, int]) -> str:
    """What the converter reads: a torch.export program for CoreML, else ONNX (the TFLite converter
    reshapes it for XNNPACK itself: targets/litert_graph.py)."""
    from quant import deploy

    if fmt == "coreml":
        return str(deploy.export_program(model, work / f"{name}.pt2", *size))
    return str(deploy.export_onnx(model, work / f"{name}.onnx", *size))


def artefact_metadata(run, config: dict, fmt: str) -> dict:
    from distill.data.classes import NYU13_NAMES
    from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from distill.spaces import DepthSpace
    from distill.teachers import TEACHERS

    h, w = config["input_size"]
    space = DepthSpace.METRIC if run.recipe.target == "ground_truth" else TEACHERS.get(run.recipe.teacher.name).space
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


def parent_tools() -> dict:
    from targets.job import tool_versions
    return tool_versions("torch", "timm", "torch-pruning", "densekit")


if __name__ == "__main__":
    sys.exit(main())
