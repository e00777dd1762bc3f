"""Which tensors make a student's int8 drift: `python -m quant.sensitivity [--run RUN | --recipe NAME]`.

The int8 files are simulated in PyTorch (`quant.ptq.simulate`: every tensor they store gets a
fake quantiser, ranges by min/max on the export's calibration set). Quantisers that see one
tensor (a convolution's activated output and the next convolution's input) form one group; each
group is left float in turn, and the table ranks the groups by how much of the drift from the
float model goes away. The drift is per pixel, against the float model on validation images: mean
|d - d_float| / d_float and the share of labels that differ.

This found the stem of v3's int8 drift (docs/TRAINING.md): the
stem convolution's output and the input of the layers reading it, now kept float by
`quant.export --float-stem`. Read the top rows as candidates for `--float-stem`, or for a
student whose tensor ranges suit int8 better; the export's drift gates decide.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from core.cli import ArgumentParser, add_run_arguments, at_least, command
from core.formats import FORMATS
from calibration import check_calibration_size
from quant import ptq, qat
from quant.equalize import equalize
from distill.recipes import DEFAULT_RECIPE
from distill.training import find_run, load_run

DEFAULT_IMAGES = 32


def parse_args(argv: list[str] | None):
    p = ArgumentParser(prog="python -m quant.sensitivity", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, DEFAULT_RECIPE)
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help=f"validation images the drift is measured on (default {DEFAULT_IMAGES})")
    p.add_argument("--calib", type=int, default=128, help="calibration images (the export's default: 128)")
    p.add_argument("--float-stem", type=int, default=0,
                   help="weighted layers from the input left float, as quant.export --float-stem (default 0: "
                        "rank the stem too)")
    p.add_argument("--format", choices=[f for f in FORMATS if "int8" in FORMATS[f].precisions], default="tflite",
                   help="the int8 file simulated: its converter's weight grid (core/formats.py; onnx stores "
                        "weights in [-64, 64], tflite in [-127, 127]; default tflite)")
    p.add_argument("--no-equalize", dest="equalize", action="store_false",
                   help="simulate the int8 file of quant.export --no-equalize (default: equalised, as the export)")
    p.add_argument("--top", type=int, default=15, help="rows to print (default 15)")
    p.add_argument("--seed", type=int, default=0, help="the calibration draw, as quant.export --seed")
    args = p.parse_args(argv)
    for flag, value, low in (("--images", args.images, 1), ("--calib", args.calib, 1),
                             ("--float-stem", args.float_stem, 0), ("--top", args.top, 1), ("--seed", args.seed, 0)):
        at_least(flag, value, low)
    return args


def tensor_groups(model: qat.QuantStudent, images: torch.Tensor) -> list[list[str]]:
    """Quantiser names grouped by the tensor they quantise: a quantiser whose input is exactly
    another's output, or another's input, quantises that same tensor (found by tensor identity in
    one forward pass)."""
    quantizers = {m: n for n, m in model.named_modules() if isinstance(m, qat.ActivationQuantizer)}
    made_by: dict[int, tuple[str, torch.Tensor]] = {}
    read_by: dict[int, tuple[str, torch.Tensor]] = {}
    group_of = {n: n for n in quantizers.values()}

    def root(name: str) -> str:
        while group_of[name] != name:
            name = group_of[name]
        return name

    def before(module, inputs):
        for known in (made_by, read_by):
            hit = known.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0]:
                group_of[root(quantizers[module])] = root(hit[0])
        read_by.setdefault(id(inputs[0]), (quantizers[module], inputs[0]))

    def after(module, _inputs, output):
        made_by[id(output)] = (quantizers[module], output)

    hooks = [h for m in quantizers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.no_grad():
            model.eval()(images[:1])
    finally:
        for h in hooks:
            h.remove()
    groups: dict[str, list[str]] = {}
    for name in quantizers.values():   # in module order: the first member names the group
        groups.setdefault(root(name), []).append(name)
    return list(groups.values())


@torch.no_grad()
def drift(model: torch.nn.Module, images: torch.Tensor, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-pixel drift from the float outputs: mean relative depth error, share of labels changed."""
    out = model.eval()(images)
    result = {}
    if "depth" in reference:
        result["depth_rel"] = ((out["depth"] - reference["depth"]).abs() / reference["depth"]).mean().item()
    if "seg" in reference:
        result["labels_changed"] = (out["seg"].argmax(1) != reference["seg"].argmax(1)).float().mean().item()
    return result


def without(groups: list[list[str]], model: qat.QuantStudent, images, reference, *,
            progress: bool = False) -> list[dict]:
    """The drift with each group's quantisers left float (an unobserved quantiser passes its input)."""
    modules = dict(model.named_modules())
    rows = []
    for members in tqdm(groups, desc="tensors left float", unit="tensor", disable=not progress, leave=False,
                        mininterval=0.5 if sys.stderr.isatty() else 30):
        seen = [modules[n].seen.clone() for n in members]
        for n in members:
            modules[n].seen.fill_(False)
        rows.append({"tensor": members, "range": [modules[members[0]].lo.item(), modules[members[0]].hi.item()],
                     **drift(model, images, reference)})
        for n, was in zip(members, seen):
            modules[n].seen.copy_(was)
    return rows


def table(baseline: dict[str, float], rows: list[dict], top: int) -> str:
    key = "depth_rel" if "depth_rel" in baseline else "labels_changed"
    ranked = sorted(rows, key=lambda r: r[key])[:top]
    lines = [f"int8 simulation: depth drift {100 * baseline.get('depth_rel', 0):.2f}%, labels changed "
             f"{100 * baseline.get('labels_changed', 0):.2f}% (mean over pixels, against the float model)",
             "", "| tensor left float | range | depth drift | labels changed |", "|---|---|---|---|"]
    for r in ranked:
        name = r["tensor"][0].removeprefix("student.")
        for attr, role in ((".input_quant", " input"), (".output_quant", " output"), (".gate_quant", " gate")):
            name = name.replace(attr, role)
        also = f" (+{len(r['tensor']) - 1})" if len(r["tensor"]) > 1 else ""
        lines.append(f"| {name}{also} | {r['range'][0]:.2f} .. {r['range'][1]:.2f} | "
                     f"{100 * r.get('depth_rel', 0):.2f}% | {100 * r.get('labels_changed', 0):.2f}% |")
    return "\n".join(lines)


@command("python -m quant.sensitivity")
def main(argv: list[str]) -> int:
    from distill.data import build_datasets

    args = parse_args(argv)
    run = load_run(find_run(args.run, args.runs_dir, args.recipe))
    plain_train, val_ds = build_datasets(replace(run.recipe.data, augment=False), progress=False)
    check_calibration_size(args.calib, len(plain_train))
    count = min(args.images, len(val_ds))
    if count == 0:
        raise ValueError(f"{run.name}'s validation split is empty, and the drift is measured on it: train with "
                         f"validation images (data.num_val, or a val/ folder beside train/)")
    if count < args.images:   # said, as the export says it: the figures are of fewer images than asked
        print(f"--images {args.images}: {run.name}'s validation split holds {count}; measuring on all {count}")
    images = torch.stack([torch.as_tensor(val_ds[i]["image"]).float() for i in range(count)])
    calib = ptq.calibration_set(plain_train, args.calib, None, seed=args.seed, progress=False)
    converter = FORMATS[args.format].converter()
    student = equalize(run.model, calib.images[:1], calib.batches())[0] if args.equalize else run.model
    model = ptq.simulate(student, calib, converter, log_depth=True, float_stem=args.float_stem)
    with torch.no_grad():
        reference = run.model.eval()(images)
    groups = tensor_groups(model, images)
    weight_max = converter.int8_weight_max
    print(f"{run.name}: {args.format} int8 (weights in [-{weight_max}, {weight_max}]), {sum(map(len, groups))} "
          f"quantisers on {len(groups)} tensors, {count} validation images, {len(calib.images)} calibration images",
          flush=True)
    print(table(drift(model, images, reference), without(groups, model, images, reference, progress=True), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
