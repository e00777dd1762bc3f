"""Turn a trained student into deployable artefacts: prune -> QAT -> convert -> validate -> bench.

    python -m quant.export --target tflite                      # newest v3 run, fp32 + fp16 + int8
    python -m quant.export --target pixel8                      # a device profile (targets/devices.json)
    python -m quant.export --target coreml --run runs/v4-20261121T101500Z
    python -m quant.export --target onnx --recipe v4                  # the newest v4 run
    python -m quant.export --target coreml --precision w4block palette4g sparse-palette4 w8a8   # iOS18 compression
    python -m quant.export --target onnx --precision int8 --qat-steps 0     # int8 by PTQ only (faster; v3's QAT keeps more miou)
    python -m quant.export --target tflite --converter litert-torch --layout NCHW   # TFLite through litert-torch
    python -m quant.export --target tflite --prune 0.3 --overwrite          # prune 30% of channels
    python -m quant.export --target tflite --prune macs=0.5x                # or to half the MACs

Writes exports/<run name>/<target>/ (`<target>-pruned-<X>/` for `--prune X`, `<target>-<converter>/`
for a converter other than the format's default, `-nchw` for that layout): the artefacts;
drift.json (each artefact executed by its own runtime on validation images and scored against the
float PyTorch model, with pass or fail against the gates of its precision); benchmark.json (host
latency, throughput, memory, efficiency against the host's measured matrix-product peak); report.md
with the drift histogram, the error maps and the compression table of every export of the run in
this format (quant/compression.py); README.md, the model card (quant/model_card.py); manifest.json
(sizes, hashes, tool versions, config); device/ (the on-device bench scripts and the
commands for this export). Each converter runs in its own process (targets/job.py).

From Python: `quant.export_run(run, target="tflite", qat_steps=0)` (keyword options: the fields of
`ExportOptions`) returns an `ExportResult`; this command is a thin wrapper around it.

Exit status: 0 every artefact passed its gates; 3 an artefact failed a gate (the export is written
and drift.json says which metric, value and tolerance); 1 a converter failed (nothing replaced);
2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import copy
import json
import numbers
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from core import io
from core.cli import ArgumentParser, add_run_arguments, at_least, command, threads_option, user_path
from core.formats import CALIBRATED_PRECISIONS, FORMATS, INTEGER_PRECISIONS, PRECISIONS, Converter, Format
from core.io import check_writable
from core.lock import exclusive
from core.registry import suggest
from distill.recipes import DEFAULT_RECIPE
from edge import kit
from quant import benchmark, compression
from quant.model_card import train_at, write_model_card
from targets.profiles import check_gate, device_names
from targets.stem import DEFAULT_FLOAT_STEM

# Distillation steps after pruning: what brings v3 at half its MACs back within 1.05x abs_rel and 1.5
# miou points of its float model. 2000 did for the 12-epoch student; the 16-epoch one needed more
# (docs/EXPORT.md, "Pruning to a MAC budget").
DEFAULT_PRUNE_STEPS = 4000
DEFAULT_CALIB = 128
# Validation images per artefact: the whole SynthRooms CPU-default validation split. On the first
# 64 images four int8 files drifted about twice as much as on all 200 (abs_rel +2.59 / +2.96 /
# +3.54 / +2.42% against +1.07 / +1.78 / +1.61 / +1.11%) and failed a 2% gate they pass on 200.
DEFAULT_CHECK = 200
PARITY_IMAGES = 8      # a converter's own parity check against its source model (validation uses `check`)
EXIT_GATE_FAILED = 3


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    """How to export; every field is a keyword of `export_run` and a flag of the command."""
    precisions: tuple[str, ...] = ()          # () = the target's defaults (core/formats.py)
    converter: str = ""                       # "" = the format's default converter (core/formats.py)
    layout: str = ""                          # input layout, "NHWC" or "NCHW"; "" = the format's
    prune: str = ""                           # channel ratio ("0.3") or MAC target ("macs=80M", "macs=0.5x")
    prune_steps: int = DEFAULT_PRUNE_STEPS    # distillation fine-tune steps after pruning (docs/EXPORT.md: pruning figures)
    prune_importance: str = "taylor"          # how channels are ranked: quant/prune.py IMPORTANCE (docs/EXPORT.md: seeds)
    prune_lr: float = 2e-3                    # peak learning rate of the fine-tune after pruning (cosine decay)
    prune_stages: int = 1                     # > 1: iterative pruning, the fine-tune steps split between the stages
    qat_steps: int | None = None              # None = the recipe's (v3 300, v4 0); 0 = post-training quantisation only
    qat_lr: float = 1e-4
    float_ops: tuple[str, ...] = ("DIV",)     # TFLite op types an int8 file keeps in float
    float_stem: int = DEFAULT_FLOAT_STEM      # int8 files, Core ML w8a8: the first N weighted layers stay float
    equalize: bool = True                     # int8: equalise conv -> ReLU -> conv ranges (quant/equalize.py)
    calib: int = DEFAULT_CALIB                # calibration images for int8, Core ML w8a8 and palettes
    input_size: str = ""                      # "HxW"; "" = the device profile's, else the run's
    check: int = DEFAULT_CHECK                # validation images each artefact is run on
    tolerances: dict = field(default_factory=dict)   # {"int8": {"abs_rel_change": 0.03}}: gate overrides
    bench_runs: int = 30                      # timed runs per artefact on this host (0 = no bench)
    bench_warmup: int = 3
    batch_size: int = 16                      # fine-tune batch size (pruning and QAT)
    seed: int = 0                             # the calibration draw and the fine-tunes' batches
    threads: int = 0                          # 0 = the device profile's (else 2), capped at this host's cores
    out: str = "exports"                      # exports root
    overwrite: bool = False                   # replace an existing export of this run and target
    progress: bool = True


@dataclass
class ExportResult:
    """What `export_run` wrote: the export directory, one drift report per artefact, the manifest."""
    path: Path
    reports: list            # quant.validate.DriftReport, in the manifest's order
    manifest: dict
    benchmark: dict | None
    warning: str = ""        # set when exported at another size than the run trained at

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)

    def failures(self) -> list[str]:
        return [f for r in self.reports for f in r.failures()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m quant.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help=f"a format ({', '.join(FORMATS)}) or a device profile ({', '.join(device_names())})")
    add_run_arguments(p, DEFAULT_RECIPE)
    p.add_argument("--out", default="exports", type=user_path, help="exports root (default: exports/)")
    p.add_argument("--precision", nargs="+",
                   help="precisions to produce (default: the target's defaults, core/formats.py)")
    p.add_argument("--converter", default="",
                   help="how the format is made (tflite: onnx2tf, litert-torch; default: the first, core/formats.py)")
    p.add_argument("--layout", default="", type=str.upper, help="input layout NHWC or NCHW (litert-torch only; "
                   "default: the format's, NHWC for TFLite)")
    p.add_argument("--prune", help='channel ratio ("0.3") or MAC target ("macs=80M", "macs=0.5x")')
    p.add_argument("--prune-steps", type=int, default=DEFAULT_PRUNE_STEPS,
                   help=f"distillation fine-tune steps after pruning (default {DEFAULT_PRUNE_STEPS}: what recovers "
                        f"v3 at 0.5x MACs; about 28 min of export on 2 cores)")
    p.add_argument("--prune-stages", type=int, default=1,
                   help="iterative pruning: reach a MAC target in N stages, each followed by its share of "
                        "--prune-steps (default 1: prune once, then fine-tune)")
    p.add_argument("--prune-lr", type=float, default=2e-3,
                   help="learning rate of the fine-tune after pruning (cosine decay from it)")
    p.add_argument("--prune-importance", default="taylor",
                   help="how channels are ranked for pruning: taylor (|weight x gradient| of the task losses over 16 "
                        "training batches; default), magnitude (group L2 norm) or bn_scale (|BN gamma|)")
    p.add_argument("--qat-steps", type=int, default=None,
                   help="QAT steps for int8 (default: the recipe's, v3 300, v4 0; 0 = post-training quantisation "
                        "only, a sixth of v3's export time)")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--float-ops", default="DIV",
                   help="TFLite op types an int8 file keeps in float (default DIV; see targets/tflite_file.py)")
    p.add_argument("--float-stem", type=int, default=DEFAULT_FLOAT_STEM,
                   help=f"int8 files (TFLite, ONNX) and Core ML w8a8 keep the first N weighted layers from the input "
                        f"in float (default {DEFAULT_FLOAT_STEM}: v3's stem and the layers reading it, where its int8 "
                        f"drift began; 0 = all int8; see targets/stem.py)")
    p.add_argument("--no-equalize", dest="equalize", action="store_false",
                   help="int8: keep the activation ranges of convolution -> ReLU -> convolution chains as trained "
                        "(default: equalise their channels, the same float function; see quant/equalize.py)")
    p.add_argument("--calib", type=int, default=DEFAULT_CALIB,
                   help="calibration images for int8, Core ML w8a8 and Core ML palettes' bias correction")
    p.add_argument("--input-size", help="HxW to export at (default: the device profile's, else the run's)")
    p.add_argument("--check", type=int, default=DEFAULT_CHECK,
                   help=f"validation images each artefact is run on (default {DEFAULT_CHECK})")
    p.add_argument("--tolerance", action="append", metavar="PRECISION.KEY=VALUE",
                   help="override a drift gate, e.g. int8.abs_rel_change=0.03; keys: abs_rel_change and "
                        "depth_rel_p99 (fractions), miou_drop_pt (points), seg_agreement_min (a share in [0, 1])")
    p.add_argument("--bench-runs", type=int, default=30, help="timed runs per artefact on this host (0 = no bench)")
    p.add_argument("--bench-warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="fine-tune batch size (pruning and QAT)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the calibration draw (0: evenly spaced candidates) and the order of the fine-tunes' "
                        "batches; their augmentation follows the run's data.seed")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the fine-tunes, the torch-based converters (litert-torch, Core ML), the "
                        "checks and the bench (0 = the device profile's, else 2, capped at this host's cores; a "
                        "number given is used as given); TensorFlow's and onnxruntime's quantisers choose their own")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of this run and target")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    from targets.profiles import parse_tolerances

    return ExportOptions(
        precisions=tuple(args.precision or ()), converter=args.converter, layout=args.layout,
        prune=args.prune or "", prune_steps=args.prune_steps, prune_importance=args.prune_importance,
        prune_stages=args.prune_stages,
        prune_lr=args.prune_lr,
        qat_steps=args.qat_steps, qat_lr=args.qat_lr,
        float_ops=tuple(op.strip().upper() for op in args.float_ops.split(",") if op.strip()),
        float_stem=args.float_stem, equalize=args.equalize, calib=args.calib,
        input_size=args.input_size or "", check=args.check, tolerances=parse_tolerances(args.tolerance),
        bench_runs=args.bench_runs, bench_warmup=args.bench_warmup, batch_size=args.batch_size, seed=args.seed,
        threads=args.threads, out=args.out, overwrite=args.overwrite, progress=not args.quiet)


def command_flags(opts: ExportOptions, recipe_qat_steps: int | None = None) -> list[str]:
    """The flags that ask for `opts` again: every option that differs from its default (`qat_steps`:
    from the recipe's, `recipe_qat_steps`), except where the export is written and how its progress
    shows (the model card's rebuild command)."""
    default, flags = ExportOptions(qat_steps=recipe_qat_steps), []
    for f in fields(ExportOptions):
        value = getattr(opts, f.name)
        if f.name in ("out", "overwrite", "progress") or value == getattr(default, f.name):
            continue
        if f.name == "precisions":
            flags += ["--precision", *value]
        elif f.name == "float_ops":
            flags += ["--float-ops", ",".join(value)]
        elif f.name == "equalize":
            flags.append("--no-equalize")
        elif f.name == "tolerances":
            flags += [item for precision, gate in value.items() for key, tolerance in gate.items()
                      for item in ("--tolerance", f"{precision}.{key}={tolerance:g}")]
        else:
            flags += [f"--{f.name.replace('_', '-')}", str(value)]
    return flags


@dataclass(frozen=True)
class Plan:
    """What to produce: the target's name, its format, precisions, device profile (if any), size and threads."""
    target: str
    format: Format
    converter: Converter
    layout: str                # the artefacts' input layout
    precisions: list[str]
    profile: object            # targets.profiles.DeviceProfile | None
    input_size: tuple[int, int] | None   # None = the run's training size
    threads: int


def plan_for(target: str, options: ExportOptions) -> Plan:
    import os

    from targets.profiles import device

    profile = None
    requested = list(options.precisions)
    if target in FORMATS:
        fmt, precisions = FORMATS[target], precisions_for(FORMATS[target], requested)
    else:
        profile = device(target)   # an unknown name lists formats and devices
        if requested and requested != [profile.precision]:
            raise ExportError(f"{profile.name} is defined as {profile.format} {profile.precision} (targets/devices.json); "
                              f"for other precisions use --target {profile.format} --precision ...")
        fmt, precisions = FORMATS[profile.format], [profile.precision]
    size = parse_size(options.input_size) if options.input_size else (profile.input_size if profile else None)
    check_options(options, fmt)
    converter, layout = converter_for(fmt, options)
    threads = options.threads or min((profile.threads if profile else None) or 2, os.cpu_count() or 1)
    return Plan(target, fmt, converter, layout, precisions, profile, size, threads)


def idle_options(opts: ExportOptions, plan: Plan, recipe_qat_steps: int) -> list[str]:
    """A line for each option set away from its default that this export never uses (a gate for a
    precision it does not make, a fine-tune setting with nothing to fine-tune, ...). `opts` as the
    user gave them (qat_steps None: the recipe's `recipe_qat_steps`)."""
    default, notes = ExportOptions(), []
    qat_steps = recipe_qat_steps if opts.qat_steps is None else opts.qat_steps

    def changed(*names: str) -> list[str]:
        flag = {"equalize": "--no-equalize", "tolerances": "--tolerance"}
        return [flag.get(n, "--" + n.replace("_", "-")) for n in names if getattr(opts, n) != getattr(default, n)]

    idle_gates = sorted(set(opts.tolerances) - set(plan.precisions))
    if idle_gates:
        notes.append(f"--tolerance for {', '.join(idle_gates)}: this export makes no {' or '.join(idle_gates)}; "
                     f"those gates apply to nothing here")
    int8 = set(plan.precisions) & set(INTEGER_PRECISIONS)
    idle = [] if opts.prune else changed("prune_steps", "prune_importance", "prune_lr", "prune_stages")
    if idle:
        notes.append(f"{', '.join(idle)}: no --prune, so nothing is pruned or fine-tuned after pruning")
    if not int8 and "w8a8" not in plan.precisions and changed("float_stem"):
        notes.append(f"--float-stem: for int8 files and Core ML's w8a8, and this export makes "
                     f"{', '.join(plan.precisions)}")
    tflite = plan.format.name == "tflite"
    if not tflite and changed("float_ops"):
        notes.append(f"--float-ops: TFLite op types, and this export writes {plan.format.name} files (their int8 "
                     f"files keep their first layers in float with --float-stem N)")
    idle = [] if int8 else changed("qat_steps", "qat_lr", *(("float_ops",) if tflite else ()), "equalize")
    if idle:
        notes.append(f"{', '.join(idle)}: for int8 files, and this export makes {', '.join(plan.precisions)}")
    elif int8 and qat_steps == 0 and changed("qat_lr"):
        whose = "" if opts.qat_steps is not None else " (the recipe's)"
        notes.append(f"--qat-lr: --qat-steps 0{whose} runs no QAT (post-training quantisation only)")
    if not set(plan.precisions) & set(CALIBRATED_PRECISIONS) and changed("calib"):
        notes.append(f"--calib: calibration images serve {', '.join(CALIBRATED_PRECISIONS)}; this export makes "
                     f"{', '.join(plan.precisions)}")
    fine_tuned = opts.prune or (int8 and qat_steps != 0)
    if not fine_tuned and changed("batch_size"):
        notes.append("--batch-size: the fine-tune batch size, and this export fine-tunes nothing (no --prune, no QAT)")
    return notes


def converter_for(fmt: Format, options: ExportOptions) -> tuple[Converter, str]:
    """The converter `--converter` names and the layout `--layout` asks of it, both checked."""
    try:
        converter = fmt.converter(options.converter)
    except ValueError as e:
        raise ExportError(f"--converter: {e}") from None
    missing = converter.missing()
    if missing:
        raise ExportError(f"--converter {converter.name} needs {', '.join(missing)}, which is not installed: "
                          f"pip install -e '.[{converter.extra}]'")
    layouts = converter.layouts or (fmt.input_layout,)
    layout = (options.layout or fmt.input_layout).upper()
    if layout not in layouts:
        others = [c.name for c in fmt.converters if layout in (c.layouts or (fmt.input_layout,))]
        raise ExportError(f"--layout {layout}: the {converter.name} converter writes {', '.join(layouts)}"
                          + (f"; --converter {others[0]} writes {layout}" if others else ""))
    return converter, layout


def check_options(options: ExportOptions, fmt: Format) -> None:
    """Refuse values that cannot work before a model is loaded or a file converted."""
    from quant.artefacts import silence_limit
    silence_limit()   # $DENSEKIT_CONVERTER_SILENCE_S, read now rather than after QAT
    for flag, value, low in (("--check", options.check, 1), ("--calib", options.calib, 1),
                             ("--qat-steps", 0 if options.qat_steps is None else options.qat_steps, 0),
                             ("--prune-steps", options.prune_steps, 0),
                             ("--float-stem", options.float_stem, 0),
                             ("--prune-stages", options.prune_stages, 1),
                             ("--bench-runs", options.bench_runs, 0), ("--bench-warmup", options.bench_warmup, 0),
                             ("--batch-size", options.batch_size, 1), ("--seed", options.seed, 0)):
        at_least(flag, value, low)
    threads_option("--threads", options.threads, 0)
    for flag, lr in (("--qat-lr", options.qat_lr), ("--prune-lr", options.prune_lr)):
        if not 0 < lr < float("inf"):   # inf reached the fine-tune, whose non-finite loss then suggested it again
            raise ExportError(f"{flag} {lr}: must be positive and finite")
    unknown = sorted(set(options.tolerances) - set(PRECISIONS))
    if unknown:
        raise ExportError(f"--tolerance for {', '.join(unknown)}: no such precision; the precisions are "
                          f"{', '.join(PRECISIONS)} ({fmt.name}: {', '.join(fmt.precisions)})")
    for precision, gate in options.tolerances.items():   # here, not at validation after the conversion
        try:
            check_gate(gate, f"--tolerance {precision}")
        except ValueError as e:
            raise ExportError(str(e)) from None
    check_float_ops(options.float_ops, fmt)
    if options.prune:
        check_prune(options)
    check_writable(options.out, "--out")


def check_float_ops(float_ops: tuple[str, ...], fmt: Format) -> None:
    """--float-ops names TFLite op types: an unknown one would keep nothing in float without a word.
    Another format's export leaves them alone (`idle_options` says so: one set of flags may serve
    several targets)."""
    if fmt.name != "tflite":
        return
    from edge.op_profile import builtin_op_names

    try:
        known = sorted(builtin_op_names().values())
    except ImportError:   # no ai-edge-litert: converter_for names the missing package and the extra
        return
    for op in float_ops:
        if op not in known:
            raise ExportError(f"--float-ops {op}: not a TFLite op type (e.g. DIV, MEAN, RESIZE_BILINEAR: the "
                              f"names in a manifest's ops_by_dtype).{suggest(op, known)}")


def check_prune(options: ExportOptions) -> None:
    from quant.prune import IMPORTANCE, PruneTarget

    try:
        target = PruneTarget.parse(options.prune)
    except ValueError as e:
        raise ExportError(f"--prune: {e}") from None
    if options.prune_stages > 1 and target.macs is None:
        raise ExportError(f'--prune-stages {options.prune_stages}: iterative pruning needs a MAC target '
                          f'(--prune macs=0.5x or macs=80M), not the channel ratio "{options.prune}"')
    if options.prune_importance not in IMPORTANCE:
        raise ExportError(f'--prune-importance "{options.prune_importance}": use one of {", ".join(IMPORTANCE)}')


def parse_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit()) or int(h) % 32 or int(w) % 32 or not int(h) or not int(w):
        raise ExportError(f'--input-size "{text}": expected HxW with both sides positive multiples of 32 '
                          f'(the students downsample by 32), e.g. 256x320')
    return int(h), int(w)


def precisions_for(fmt: Format, requested: list[str]) -> list[str]:
    if not requested:
        return list(fmt.defaults)
    bad = [p for p in requested if p not in fmt.precisions]
    if bad:
        raise ExportError(f"{fmt.name} cannot produce {', '.join(bad)}; it produces {', '.join(fmt.precisions)}")
    return list(dict.fromkeys(requested))


@command("python -m quant.export")
def main(argv: list[str]) -> int:
    """Exit status (core/cli.py): 2 bad input or a busy target (nothing written), 1 a converter
    failed (nothing replaced), 3 a drift gate failed (the export is written)."""
    args = parse_args(argv)
    result = export_run(args.run, target=args.target, runs_dir=args.runs_dir, recipe=args.recipe,
                        options=options_from_args(args))
    if not result.passed:
        print(f"error: {gate_failure_message(result)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


# What to try when a precision fails its gates (the float ones should never: a converter problem)
FAILURE_HINTS = {
    "int8": "int8: try QAT or more QAT steps (--qat-steps N), or keep layers in float (--float-stem N; TFLite: "
            "--float-ops).",
    "w8a8": "w8a8: try more calibration images (--calib N), keep more layers in float16 (--float-stem N), or w8 "
            "(weights only).",
    "palette4": "palette4 (16 values per tensor): palette6, or on iOS18 w4block, keep more of the weights.",
    "palette6": "palette6: w8 keeps more of the weights.",
    "w8": "w8 (8-bit weights): fp16 keeps every weight.",
    "palette4g": "palette4g: w4block or palette6 keep more of the weights.",
    "w4block": "w4block: palette6 or w8 keep more of the weights.",
    "sparse-palette4": "sparse-palette4: prune after training costs a dense student; prefer w4block.",
}


def gate_failure_message(result: ExportResult) -> str:
    failures = result.failures()
    failed = dict.fromkeys(r.precision for r in result.reports if not r.passed)
    hints = [FAILURE_HINTS.get(p, f"{p}: a float file should match its model; report drift.json with the versions "
                                   f"in manifest.json") for p in failed]
    return (f"{len(failures)} drift gate(s) failed (see {result.path / 'drift.json'}):\n  " + "\n  ".join(failures)
            + "\nGates: targets/devices.json; --tolerance PRECISION.KEY=VALUE overrides one for this export.\n"
            + "\n".join(hints) + (f"\n{result.warning}" if result.warning else ""))


# ----------------------------------------------------------------------------- the pipeline

def export_run(run: str | Path | None = None, *, target: str, runs_dir: str | Path = "runs",
               recipe: str | None = None, options: ExportOptions | None = None, log=print,
               **option_values) -> ExportResult:
    """Prune (optionally), quantise, convert, validate and bench the run's student for `target` (a
    format of core/formats.py or a device profile of targets/devices.json).

    run: a training run directory; None = the newest run of `recipe` (None: v3) under `runs_dir`; a
    recipe beside a run must be the run's. Options are the fields of `ExportOptions`, as keywords
    (`qat_steps=0`) or as one `options=` value. A failed
    gate does not raise: the export is written and `result.passed` is False (drift.json says why).
    Raises ValueError (bad options), RunNotFoundError, ExportExistsError (nothing written) and
    ConversionError (nothing replaced).
    """
    unknown = sorted(set(option_values) - {f.name for f in fields(ExportOptions)})
    if unknown:
        raise ExportError(f"unknown export option(s) {unknown}; the options are the fields of ExportOptions: "
                          f"{', '.join(f.name for f in fields(ExportOptions))}")
    options = checked_options(replace(options or ExportOptions(), **option_values))
    return export(run, plan_for(target, options), options, runs_dir=runs_dir, recipe=recipe, log=log)


def checked_options(options: ExportOptions) -> ExportOptions:
    """The Python API's values in the types the command's parser gives, or an ExportError naming the
    field: `precisions` and `float_ops` take a tuple or a comma-separated string, `input_size` "HxW"
    or (H, W), `out` a path, `prune` a ratio as a number too; numbers must be numbers (a string
    would fail deep inside, far from its cause). `out` takes "~" as the home folder."""
    default, changes = ExportOptions(), {}
    for f in fields(ExportOptions):
        value, kind = getattr(options, f.name), int if f.name == "qat_steps" else type(getattr(default, f.name))
        if f.name in ("precisions", "float_ops"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise ExportError(f"{f.name}={value!r}: expected a tuple of names, e.g. ('fp32', 'int8'), or 'fp32,int8'")
            value = tuple(v.strip().upper() if f.name == "float_ops" else v.strip() for v in items if v.strip())
        elif kind is str and isinstance(value, os.PathLike):   # out=Path("exports")
            value = os.fspath(value)
        elif f.name == "prune" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = repr(float(value))   # prune=0.3 (or a numpy float): the command's "0.3"
        elif f.name == "input_size" and isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ExportError(f"input_size={value!r}: expected (height, width) in pixels or 'HxW', e.g. (256, 320)")
            value = f"{value[0]}x{value[1]}"
        elif not (f.name == "qat_steps" and value is None):
            # numpy's numbers too (calib=np.int64(16)); an int where a float is meant
            number = {int: numbers.Integral, float: numbers.Real}.get(kind)
            fits = isinstance(value, number) if number else isinstance(value, kind)
            if isinstance(value, bool) != (kind is bool) or not fits:
                like = getattr(default, f.name)
                raise ExportError(f"{f.name}={value!r}: expected {kind.__name__}"
                                  + (f", like its default {like!r}" if like is not None else ""))
            value = kind(value) if number else value
        changes[f.name] = user_path(value) if f.name == "out" else value   # the shell's "~" from Python too
    return replace(options, **changes)


def export(run_path: str | Path | None, plan: Plan, opts: ExportOptions, *, runs_dir: str | Path = "runs",
           recipe: str | None = None, log=print) -> ExportResult:
    """`export_run` once the plan is made, on the plan's threads; the caller's thread count is restored."""
    import torch

    before = torch.get_num_threads()
    if plan.threads > 0:
        torch.set_num_threads(plan.threads)
    try:
        return export_on_threads(run_path, plan, opts, runs_dir=runs_dir, recipe=recipe, log=log)
    finally:
        torch.set_num_threads(before)   # a notebook that called export_run keeps its own setting


def export_on_threads(run_path: str | Path | None, plan: Plan, opts: ExportOptions, *, runs_dir: str | Path,
                      recipe: str | None, log) -> ExportResult:
    """`export`'s work: holds the target's lock from staging to the rename."""
    from distill.training import find_run, load_run
    from quant import artefacts
    from targets.deploy import check_both_tasks

    t_start = time.time()
    run = load_run(find_run(run_path, runs_dir, recipe))
    idle = idle_options(opts, plan, run.recipe.int8_qat_steps)   # the options as the user set them
    if opts.qat_steps is None:
        opts = replace(opts, qat_steps=run.recipe.int8_qat_steps)
    size = plan.input_size or run.input_size
    try:
        check_both_tasks(run.model)
    except ValueError as e:
        raise ExportError(f"run {run.name}: {e}") from None
    if {"int8", "w8a8"} & set(plan.precisions):
        check_float_stem(run.model, opts.float_stem, size)
    check_cached_labels(run, plan, opts, size)
    log(f"run {run.path} ({run.recipe.name}, {run.recipe.model.student}, weights {run.weights.name} "
        f"sha256 {run.weights_sha256[:12]}); exporting {plan.format.name} {', '.join(plan.precisions)} "
        f"({plan.converter.name}, {plan.layout}) at "
        f"{size[0]}x{size[1]}" + (f" for {plan.profile.name}" if plan.profile else ""))
    for note in idle:   # said, not refused: one set of flags may serve several targets
        log(note)
    final = Path(opts.out) / run.name / export_name(plan, opts.prune)
    with exclusive(final.parent / f".{final.name}.lock", f"the export {final}"):   # one writer per target
        staging = artefacts.ExportDir(final, opts.overwrite)
        if staging.leftovers:
            log(f"removed the leftovers of a killed export: {', '.join(p.name for p in staging.leftovers)}")
        work = staging.work
        try:
            result = build_export(run, plan, opts, size, work, staging.staging, final.name, t_start, log)
            result.path = staging.commit()
        except BaseException:
            if staging.committed:   # stopped while removing the export it replaced
                log(f"stopped after {final} was written; the export it replaced may be left as .{final.name}.old-*, "
                    f"which the next export of this target removes")
                raise
            kept = staging.discard()
            log("export failed; nothing was replaced." + (f" Scratch files kept in {work}" if kept else ""))
            raise
        shutil.rmtree(work, ignore_errors=True)
    files = "README.md (model card), report.md, drift.json, manifest.json" + (", benchmark.json" if result.benchmark else "")
    log(f"wrote {result.path} ({files}; {len(result.reports)} artefacts, {time.time() - t_start:.0f} s)")
    if result.warning:
        log(result.warning)
    return result


def check_cached_labels(run, plan: Plan, opts: ExportOptions, size: tuple[int, int]) -> None:
    """A run that learnt from a pseudo-label cache fine-tunes (QAT, pruning) on that cache's labels,
    which exist at the run's size only: another size is refused here, before any data is built (the
    cache's own check would stop the fine-tune once calibration and equalisation had run)."""
    cache, trained = run.recipe.teacher.cache, tuple(run.input_size)
    if not cache or tuple(size) == trained:
        return
    prune_tunes = False
    if opts.prune:
        from quant.prune import NEEDS_GRADIENTS   # torch-pruning: imported only where pruning is asked for
        prune_tunes = opts.prune_steps > 0 or opts.prune_importance in NEEDS_GRADIENTS
    tunes = [what for what, on in (("QAT", "int8" in plan.precisions and opts.qat_steps > 0),
                                   ("the pruning fine-tune", prune_tunes)) if on]
    if tunes:
        raise ExportError(
            f"run {run.name} learnt from teacher.cache={cache}, labels at {trained[0]}x{trained[1]}; "
            f"{' and '.join(tunes)} would train at {size[0]}x{size[1]} on them. Export at the run's size "
            f"(--input-size {trained[0]}x{trained[1]}), or without fine-tuning (--qat-steps 0"
            + (", --prune-steps 0 --prune-importance magnitude" if opts.prune else "") + ")")


def export_name(plan: Plan, prune: str) -> str:
    """`tflite`; `tflite-litert-torch-nchw` for another converter and layout than the format's defaults;
    `tflite-pruned-0.5x` for `--prune macs=0.5x`: such exports sit beside the default one."""
    name = plan.target
    if plan.converter != plan.format.converters[0]:
        name += f"-{plan.converter.name}"
    if plan.layout != plan.format.input_layout:
        name += f"-{plan.layout.lower()}"
    if not prune:
        return name
    from quant.prune import prune_label
    return f"{name}-pruned-{prune_label(prune)}"


def build_export(run, plan: Plan, opts: ExportOptions, size: tuple[int, int], work: Path, out: Path, dir_name: str,
                 t_start: float, log) -> ExportResult:
    """Everything of one export, written into the staging directory `out` of the export `dir_name`."""
    from distill.data import build_datasets
    from distill.students import count_macs, count_params
    from quant import artefacts

    if opts.prune:
        check_prune_budget(run.model, opts.prune, size)
    data = replace(run.recipe.data, height=size[0], width=size[1])
    train_ds, _ = build_datasets(data, progress=opts.progress)
    plain_train, val_ds = build_datasets(replace(data, augment=False), progress=False)
    if set(plan.precisions) & set(CALIBRATED_PRECISIONS):
        from calibration import check_calibration_size
        check_calibration_size(opts.calib, len(plain_train))   # before QAT, naming the flag
    float_model, config = run.model, {"run": str(run.path), "recipe": run.recipe.name, "target": plan.target,
                                      "format": plan.format.name, "converter": plan.converter.name,
                                      "layout": plan.layout, "precisions": plan.precisions, "seed": opts.seed,
                                      "input_size": list(size), "device": plan.profile.name if plan.profile else None,
                                      "source_checkpoint": {"path": str(run.weights), "sha256": run.weights_sha256},
                                      "command": shlex.join(["python", "-m", "quant.export", "--target", plan.target,
                                                             "--run", str(run.path),
                                                             *command_flags(opts, run.recipe.int8_qat_steps)])}
    config["model"] = {"params": count_params(float_model), "macs": count_macs(float_model, *size)}
    if opts.prune:
        float_model, config["prune"] = prune_stage(run, float_model, train_ds, val_ds, size, opts, log)
        config["model"].update(exported_params=count_params(float_model), exported_macs=count_macs(float_model, *size))
    int8_model, calibration = float_model, {}
    if "int8" in plan.precisions:
        int8_model, calibration, config["int8"] = int8_stage(run, float_model, train_ds, plain_train, work, opts, log,
                                                             plan.converter)
    elif set(plan.precisions) & set(CALIBRATED_PRECISIONS):   # Core ML w8a8 and palettes: measured by the converter
        calibration, config["calibration"] = calibration_stage(plain_train, work, opts, log)
    job = build_job(plan, opts, float_model, int8_model, calibration, run, size, val_ds, work, out, config)
    for name, exporter in config.get("source_exporter", {}).items():
        if not exporter.startswith("torch.export"):
            log(f"warning: the {name} graph left PyTorch through the deprecated exporter: {exporter}")
    log(f"converting to {plan.format.name}: {', '.join(plan.precisions)}")
    result = artefacts.run_converter(job, work, log)
    shutil.copyfile(work / f"{plan.format.name}.log", out / f"{plan.format.name}.log")  # the converter's log
    reports, drift_md = validation_stage(result["artefacts"], float_model, val_ds, run, plan, opts, out, work, log)
    bench = None
    if opts.bench_runs > 0:
        log(f"bench on this host: {opts.bench_runs} runs after {opts.bench_warmup} warm-up, {plan.threads} threads")
        bench = benchmark.benchmark(out, result["artefacts"], threads=plan.threads, runs=opts.bench_runs,
                                    warmup=opts.bench_warmup,
                                    macs=config["model"].get("exported_macs", config["model"]["macs"]), log=log)
    kit.write_device_kit(out, result["artefacts"], plan.profile)
    entries = [{**a, "validation": r.to_json(), **({"bench": bench["artefacts"][a["path"]]} if bench else {})}
               for a, r in zip(result["artefacts"], reports)]
    config["wall_s"] = round(time.time() - t_start, 1)
    manifest = artefacts.write_manifest(out, entries, {**result["tools"], **parent_tools()}, config)
    table = benchmark.table(manifest["artefacts"], bench, plan.profile.latency_budget_ms if plan.profile else None)
    warning = size_warning(run, size, reports)
    # the run's other exports of this format, and this one, still in staging
    others, left_out = compression.exports(out.parent, plan.format.name)
    compared = {**others, dir_name: manifest}
    notes = [f"{path.name} left out: {why}" for path, why in left_out.items()]
    for note in notes:
        log(f"warning: the compression table's {note}")
    io.write_text(out / "report.md", report_markdown(run, plan, config, drift_md, table, warning)
                  + f"\n## Compression: every {plan.format.name} export of {run.name}\n\n"
                  + compression.markdown(compression.rows(compared)) + "".join(f"\n- {n}" for n in notes))
    write_model_card(out, run, job.metadata)   # what the artefacts embed
    log(table)
    return ExportResult(out, reports, manifest, bench, warning)


def check_float_stem(model, float_stem: int, size: tuple[int, int]) -> None:
    """ExportError when `--float-stem` would keep every convolution of `model` in float: nothing is
    left to quantise, and the converter failed only after calibration and QAT, with its own words."""
    import torch

    from quant.qat import input_stem

    convs = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    if float_stem and convs <= input_stem(model, torch.zeros(1, 3, *size), float_stem):
        raise ExportError(f"--float-stem {float_stem}: every convolution of the student ({len(convs)}) lies within "
                          f"{float_stem} weighted layers of the input, so none would be quantised; give a smaller "
                          f"number (the default, {DEFAULT_FLOAT_STEM}, keeps the stem convolution and the first "
                          f"depthwise one in float), or export --precision fp16 for a float file")


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
            f"size: {train_at(run, size)}")


def validation_stage(artefacts: list[dict], float_model, val_ds, run, plan: Plan, opts: ExportOptions,
                     export_dir: Path, work: Path, log):
    """Execute every artefact on --check validation images and gate its drift against the float model.
    The runs' inputs and outputs (50-200 MB) go to the export's `work` directory, which the next export
    clears if this one is killed (the system's temp directory would keep them)."""
    from quant.drift_report import write_drift
    from quant.validate import ValidationData, validate_artefact
    from targets.profiles import gate_for

    data = ValidationData.from_dataset(val_ds, opts.check)
    fewer = f" (--check {opts.check}: the split holds {len(data.inputs)})" if opts.check > len(data.inputs) else ""
    log(f"validating {len(artefacts)} artefacts on {len(data.inputs)} validation images{fewer}")
    reports = []
    for a in artefacts:
        report = validate_artefact(export_dir / a["path"], reference=float_model, data=data, precision=a["precision"],
                                   gate=gate_for(a["precision"], plan.profile, opts.tolerances),
                                   eval_config=run.recipe.eval, threads=plan.threads, scratch=work)
        rel = 100 * report.delta["abs_rel"] / report.float["abs_rel"]
        log(f"  {'pass' if report.passed else 'FAIL'} {a['path']}: abs_rel {report.artefact['abs_rel']:.4f} "
            f"({rel:+.2f}%), miou {report.artefact.get('miou', float('nan')):.3f} "
            f"({100 * report.delta.get('miou', float('nan')):+.2f} pt) [{report.executor}]")
        reports.append(report)
    drift_md = write_drift(export_dir, reports, data, float_model)
    for report in reports:   # drawn into the report's figures; the ExportResult need not hold them (82 MB each at 256x320)
        report.outputs = None
    return reports, drift_md


def report_markdown(run, plan: Plan, config: dict, drift_md: str, table: str, warning: str = "") -> str:
    h, w = config["input_size"]
    target = f"{plan.profile.name}: {plan.profile.description}" if plan.profile else plan.format.name
    return (f"# Export of {run.name} ({run.recipe.name}, {run.recipe.model.student})\n\n"
            f"Target {target}; {', '.join(plan.precisions)} at {h}x{w}; "
            f"{config['model']['macs'] / 1e6:.0f} M MACs"
            + (f", pruned to {config['model']['exported_macs'] / 1e6:.0f} M" if "exported_macs" in config["model"] else "")
            + (f"; int8 by {config['int8']['method']}" if "int8" in config else "") + ".\n\n"
            + (f"**{warning}**\n\n" if warning else "")
            + f"## Benchmark\n\n{table}\n{drift_md}")


def check_prune_budget(model, prune: str, size: tuple[int, int]) -> None:
    """A MAC target that prunes nothing or cannot be reached, refused before the datasets and fine-tunes."""
    from quant.prune import PruneTarget, check_budget

    try:
        check_budget(PruneTarget.parse(prune), model, size)
    except ValueError as e:
        raise ExportError(f"--prune {prune}: {e}") from None


def prune_stage(run, model, train_ds, val_ds, size: tuple[int, int], opts: ExportOptions, log):
    """Prune to `--prune` in `--prune-stages` stages, each followed by its share of the fine-tune."""
    from distill.students import count_macs
    from quant.finetune import finetune, loss_gradients
    from quant.prune import NEEDS_GRADIENTS, PruneTarget, prune_student, stage_targets, weight_shapes

    h, w = size
    before = evaluate(model, val_ds, run.recipe)
    reference = copy.deepcopy(model).eval()
    pruned = copy.deepcopy(model)
    targets = stage_targets(PruneTarget.parse(opts.prune), count_macs(model, h, w), opts.prune_stages)
    shapes = weight_shapes(model)
    stages, kept = [], 1.0
    for i, target in enumerate(targets, 1):
        if opts.prune_importance in NEEDS_GRADIENTS:
            loss_gradients(pruned, run.recipe, train_ds, batch_size=opts.batch_size, seed=opts.seed + i - 1, log=log)
        stages.append(prune_student(pruned, target, (h, w), importance=opts.prune_importance, log=log))
        pruned.zero_grad(set_to_none=True)
        kept *= 1 - stages[-1]["ratio"]
        steps = opts.prune_steps * i // len(targets) - opts.prune_steps * (i - 1) // len(targets)
        stage = f" {i}/{len(targets)}" if len(targets) > 1 else ""
        finetune(pruned, reference, run.recipe, train_ds, steps=steps, lr=opts.prune_lr, batch_size=opts.batch_size,
                 seed=opts.seed + i - 1, desc=f"prune fine-tune{stage}", progress=opts.progress, log=log,
                 lr_flag="--prune-lr")
    after = evaluate(pruned, val_ds, run.recipe)
    report = {**stages[-1], "params_before": stages[0]["params_before"], "macs_before": stages[0]["macs_before"],
              "ratio": round(1 - kept, 4), "stages": len(targets),
              "pruned_layers": sum(shape != shapes[name] for name, shape in weight_shapes(pruned).items()),
              "finetune_steps": opts.prune_steps, "finetune_lr": opts.prune_lr,
              "val_before": before, "val_after": after}
    log(f"pruned: params {report['params_before'] / 1e6:.2f} M -> {report['params_after'] / 1e6:.2f} M, "
        f"MACs {report['macs_before'] / 1e6:.0f} M -> {report['macs_after'] / 1e6:.0f} M, "
        f"abs_rel {before['abs_rel']:.4f} -> {after['abs_rel']:.4f}, miou {before.get('miou', 0):.3f} -> {after.get('miou', 0):.3f}")
    return pruned, report


def int8_stage(run, model, train_ds, plain_train, work, opts: ExportOptions, log, converter: Converter):
    """Calibration set; then QAT (or PTQ only when --qat-steps 0), simulating int8 files that keep
    the first `--float-stem` weighted layers from the input in float (TFLite's and ONNX's), store
    weights in [-weight_max, weight_max] and round the upsampled outputs again or not, as the
    converter's files do (core/formats.py `Converter`). Returns the int8 source model, the
    calibration files (targets.job forms) and a report."""
    from quant import ptq, qat
    from quant.equalize import equalize
    from quant.finetune import finetune

    weight_max = converter.int8_weight_max
    calib = ptq.calibration_set(plain_train, opts.calib, work / "calibration", seed=opts.seed, progress=opts.progress)
    report = {"calibration": calib.selection.describe(), "method": "qat" if opts.qat_steps > 0 else "ptq",
              "float_stem": opts.float_stem, "weight_range": [-weight_max, weight_max]}
    log(f"calibration: {len(calib.selection.indices)} images, {calib.selection.basis()}")
    if opts.equalize:
        model, report["equalized"] = equalize(model, calib.images[:1], calib.batches())
        log(f"equalised the activation ranges of {len(report['equalized'])} convolution -> ReLU -> convolution "
            f"chains (the same float function; --no-equalize keeps them as trained)")
    if opts.qat_steps <= 0:
        log(f"int8 by post-training quantisation, no QAT ({run.recipe.name} defaults to "
            f"{run.recipe.int8_qat_steps} QAT steps; --qat-steps N chooses)")
        return model, calib.files, report
    # The heads' last convolutions write int8 log-depth; the upsampling runs in float (TFLite) or
    # re-rounds on its input's scale (onnxruntime), and EXP runs in float in both.
    fake = ptq.simulate(model, calib, converter, log_depth=True, float_stem=opts.float_stem)
    finetune(fake, model, run.recipe, train_ds, steps=opts.qat_steps, lr=opts.qat_lr, batch_size=opts.batch_size,
             seed=opts.seed, desc="QAT", progress=opts.progress, log=log, lr_flag="--qat-lr")
    qat.calibrate(fake, calib.batches(), fresh=True)   # QAT's ranges moved by EMA; the converter measures these
    report.update({"qat_steps": opts.qat_steps, "qat_lr": opts.qat_lr, "activation_ranges": qat.activation_ranges(fake)})
    return qat.finalize(fake), calib.files, report


def calibration_stage(plain_train, work, opts: ExportOptions, log) -> tuple[dict, dict]:
    """The calibration set alone (no QAT), for precisions whose converter calibrates the float model."""
    from quant import ptq

    calib = ptq.calibration_set(plain_train, opts.calib, work / "calibration", seed=opts.seed, progress=opts.progress)
    log(f"calibration: {len(calib.selection.indices)} images, {calib.selection.basis()}")
    return calib.files, calib.selection.describe()


def evaluate(model, dataset, recipe) -> dict:
    import torch

    from distill.training import evaluate as evaluate_model
    from distill.training import make_loader
    loader = make_loader(dataset, 16, train=False, seed=0, workers=0)
    metrics = evaluate_model(model, loader, torch.device("cpu"), None, recipe)
    model.eval()
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def unit_images(dataset, count: int):
    """The first `count` images of `dataset` as (N, 3, H, W) RGB in [0, 1], the artefacts' input."""
    import torch

    from distill.data.transforms import unit_rgb
    return torch.stack([unit_rgb(dataset[i]["image"]) for i in range(count)])


def build_job(plan: Plan, opts: ExportOptions, float_model, int8_model, calibration, run, size, val_ds, work,
              out_dir, config):
    from targets import deploy
    from targets.job import Job, source_for

    h, w = size
    check_dir = work / "check"
    check_dir.mkdir()
    inputs = unit_images(val_ds, min(PARITY_IMAGES, len(val_ds)))
    np.save(check_dir / "inputs.npy", inputs.numpy())
    check = {"inputs": str(check_dir / "inputs.npy")}
    sources = {}
    needed = {source_for(precision) for precision in plan.precisions}
    for name, model in (("float", float_model), ("int8", int8_model)):
        if name not in needed:   # e.g. an int8-only file: no float graph to export (seconds per export)
            continue
        # PTQ beside float files: the int8 files come from the float model, already exported
        ptq = name == "int8" and model is float_model and "float" in needed
        form = f"{plan.converter.deploy_form}-{name}" if plan.converter.deploy_form else ""
        if ptq:
            check.update(int8_depth=check["float_depth"], int8_seg=check["float_seg"])
        else:
            depth, seg = deploy.reference_outputs(model, inputs)
            for key, value in (("depth", depth), ("seg", seg)):
                np.save(check_dir / f"{name}_{key}.npy", value.numpy())
                check[f"{name}_{key}"] = str(check_dir / f"{name}_{key}.npy")
        if ptq and not form:   # the same graph; a deploy form differs between float and int8
            sources[name] = sources["float"]
            continue
        path, exporter = deploy.export_source(model, plan.converter.source_graph, work / name, h, w, form)
        sources[name] = str(path)
        config.setdefault("source_exporter", {})[name] = exporter
    # Absolute paths: a converter may change its working directory (onnx2tf's sample file).
    return Job(format=plan.format.name, converter=plan.converter.name, precisions=plan.precisions, sources=sources,
               out_dir=str(Path(out_dir).resolve()), work_dir=str(work.resolve()), stem=run.name,
               input_shape=[1, 3, h, w], metadata=metadata_for(run, config, plan.layout), calibration=calibration,
               check=check, threads=plan.threads, float_ops=list(opts.float_ops), float_stem=opts.float_stem)


def metadata_for(run, config: dict, layout: str) -> dict:
    from core.contract import artefact_metadata
    from core.spaces import DepthSpace
    from distill.data.classes import NYU13_NAMES
    from distill.teachers import TEACHERS

    space = DepthSpace.METRIC if run.recipe.target == "ground_truth" else TEACHERS.get(run.recipe.teacher.name).space
    return artefact_metadata(recipe=run.recipe.name, run=run.name, student=run.recipe.model.student,
                             size=tuple(config["input_size"]), layout=layout, depth_space=space.value,
                             depth_units=space.describe(), classes=list(NYU13_NAMES),
                             checkpoint=Path(run.weights).name, checkpoint_sha256=run.weights_sha256,
                             pruned="prune" in config, int8_method=config.get("int8", {}).get("method", ""))


def parent_tools() -> dict:
    from targets.job import tool_versions
    return tool_versions("torch", "timm", "torch-pruning", "densekit")


if __name__ == "__main__":
    sys.exit(main())
