"""`python -m distill.ablate RECIPE GRID [key=value ...]` - a grid of training runs, one table.

    python -m distill.ablate v3 distill.normalization=none,global,hybrid,local distill.shared_crop=0,1 \\
        train.epochs=3 data.num_train=600 data.height=64 data.width=96
    python -m distill.ablate v3 loss.weighting=fixed,kendall,dwa --dry-run
    python -m distill.ablate v3 loss.depth=berhu,silog --metrics abs_rel,d1,rmse --out runs/ablate-loss
    python -m distill.ablate v3 loss.seg_balance=0,0.5 --seeds 3 train.epochs=6 data.num_train=1000
    python -m distill.ablate v3 model.output_stride=2,4 --seeds 3 --heldout "data.seed=1 data.num_val=1000"
    python -m distill.ablate v3 --help            the recipe's keys

An item with several comma-separated values (`key=v1,v2,...`) is a grid axis; an item with one
value is an override common to every run. For a tuple-valued key (`model.tasks=depth,seg`) the
commas belong to one value: separate its alternatives with "|" ('model.tasks=depth|depth,seg').
Every combination of the axes (the cartesian product, the first axis slowest) is one ordinary
training run (`distill.training.train`) in OUT/NN-<values>/ (OUT: `--out`, default
runs/ablate-<UTC time>/). All combinations are checked against the recipe before the first run
starts (an unknown key or a bad value exits 2, as `distill.run` does); a run that fails is
recorded with its error and the grid goes on. After every run OUT/ablation.json and
OUT/ablation.md are rewritten (atomically): one row per combination, the axes' values, the
chosen metrics from the run's summary.json and the wall time, the best value of each metric
marked. With `--seeds N` (or a list) every combination is trained once per seed (`train.seed`, the
last axis) and the table shows each row's mean ± sample standard deviation over its seeds, every
run listed below it: one seed per row is an anecdote. With `--heldout "data.seed=1 data.num_val=1000"`
every finished run is also measured on that split (`python -m distill.evaluate`; the file lands in
the run's evaluations/) and its metrics join the row as `heldout_<metric>`: the 200 images of a
CPU-default validation split move a student's abs_rel about as much as a seed does; a run whose
held-out measurement fails keeps its own figures, with the error beside them. An OUT that already
holds an ablation is refused, unless `--resume` is given with the same command: the rows that
finished are kept, a run stopped after a checkpoint continues from it (`resume=`), a finished run
whose held-out measurement was cut short is measured, and the rest train; a run that trained
another recipe than the command builds now (a default changed since, or the device) is refused,
since its row would not compare with the rest. Exit status: 0 all runs
finished and measured, 1 some failed, 2 a bad command line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, get_origin

from core import io
from core.cli import ArgumentParser, command, user_path
from core.config import ConfigError, apply_overrides, field_types, flat_keys, to_dict
from core.io import check_writable
from core.lock import exclusive
from core.registry import suggest
from distill.recipes import RECIPES, Recipe, check_values, get_recipe, renders, resolve_for_device

# How each summary.json metric ranks: -1 lower is better, +1 higher is better, 0 closest to 1 (a
# scale: by |log|, so that x0.8 and x1.25, the same error in depth, tie).
DIRECTION: dict[str, int] = {
    **{k: -1 for k in ("abs_rel", "abs_rel_aligned", "sq_rel", "rmse", "rmse_log", "log10", "silog",
                       "abs_rel_0_2", "abs_rel_2_5", "abs_rel_5_10", "dbe_acc", "dbe_comp", "wall_s",
                       "train_abs_rel", "train_abs_rel_aligned")},
    **{k: +1 for k in ("d1", "d2", "d3", "miou", "pixel_acc", "seg_boundary_f1", "seg_boundary_precision",
                       "seg_boundary_recall", "gap_closed", "train_images_per_s", "train_d1", "train_miou")},
    **{k: 0 for k in ("s_star", "ratio_0_2", "ratio_2_5", "ratio_5_10")},   # scales: 1 is right
}
# `--heldout`: the same metrics of the runs on a second split (training-time figures have no twin there)
DIRECTION.update({f"heldout_{k}": d for k, d in list(DIRECTION.items())
                  if not k.startswith("train_") and k != "wall_s"})
DEFAULT_METRICS = ("abs_rel", "abs_rel_aligned", "d1", "miou")
HELDOUT_METRICS = ("heldout_abs_rel", "heldout_miou")   # added to the default metrics by --heldout
HELDOUT = "heldout_"
SEED_KEY = "train.seed"
RESERVED = {"out_dir": "--out places the runs", "resume": "an ablation starts fresh runs",
            "name": "the recipe is the first argument"}


@dataclass(frozen=True)
class Grid:
    """axes: key -> its alternatives (str, as typed), in command-line order; common: key=value."""
    axes: dict[str, tuple[str, ...]]
    common: tuple[str, ...]

    def combinations(self) -> list[dict[str, str]]:
        """The cartesian product of the axes, first axis slowest: [{key: value}, ...]."""
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*self.axes.values())]


# ----------------------------------------------------------------------------- command line

def is_tuple_key(recipe: Recipe, key: str) -> bool:
    """Whether dotted `key` is a tuple field of `recipe` (False for unknown keys: checked later)."""
    cfg, parts = recipe, key.split(".")
    for part in parts[:-1]:
        cfg = getattr(cfg, part, None)
        if not is_dataclass(cfg):
            return False
    if parts[-1] not in {f.name for f in fields(cfg)}:
        return False
    return get_origin(field_types(type(cfg))[parts[-1]]) is tuple


def parse_grid(items: list[str], recipe: Recipe, seeds: tuple[str, ...] = ()) -> Grid:
    """Split `key=value` items into grid axes (several values) and common overrides (one value);
    `seeds` (--seeds) become the last axis, `train.seed`, over which the table averages."""
    axes: dict[str, tuple[str, ...]] = {}
    common: list[str] = []
    seen: set[str] = set()
    if seeds and any(item.partition("=")[0].strip() == SEED_KEY for item in items):
        raise ConfigError(f"give the seeds once: --seeds {','.join(seeds)} or {SEED_KEY}=..., not both")
    for item in items:
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ConfigError(f'"{item}" is not key=value or key=v1,v2,... (e.g. distill.normalization=none,hybrid)')
        if key in seen:
            raise ConfigError(f'"{key}" is given twice; give it once (several values make it a grid axis)')
        if key.split(".")[0] in RESERVED:
            raise ConfigError(f'"{key}" cannot be set in an ablation: {RESERVED[key.split(".")[0]]}')
        seen.add(key)
        values = [v.strip() for v in text.split("|" if is_tuple_key(recipe, key) else ",")]
        if len(values) > 1 and not all(values):
            raise ConfigError(f'"{item}" has an empty alternative; write key=v1,v2 without empty values')
        if len(values) > 1:
            check_distinct(item, key, values, recipe)
            axes[key] = tuple(values)
        else:
            common.append(f"{key}={text}")
    if seeds:
        axes[SEED_KEY] = seeds
    if not axes:
        raise ConfigError("nothing to ablate: give at least one grid axis key=v1,v2,... "
                          "(e.g. distill.normalization=none,global,hybrid,local)")
    return Grid(axes, tuple(common))


def check_distinct(item: str, key: str, values: list[str], recipe: Recipe) -> None:
    """Refuse an axis that names one value twice ("0,00"): one run twice, averaged as two. A key or
    value that does not parse is left to build_recipes, which names it."""
    try:
        parsed = [flat_value(apply_overrides(recipe, [f"{key}={v}"]), key) for v in values]
    except ValueError:
        return
    if len(set(map(repr, parsed))) < len(parsed):
        raise ConfigError(f'"{item}" gives one value twice ({", ".join(map(str, parsed))}); give each once')


def flat_value(recipe: Recipe, key: str):
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def parse_seeds(text: str) -> tuple[str, ...]:
    """--seeds: "3" = seeds 0, 1, 2; "0,5,7" = those seeds."""
    text = text.strip()
    if not text:
        return ()
    try:
        seeds = tuple(str(int(v)) for v in text.split(",")) if "," in text else tuple(map(str, range(int(text))))
    except ValueError:
        raise ConfigError(f'--seeds {text!r}: give a count ("3" = seeds 0, 1, 2) or a list ("0,5,7")') from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def overrides_for(grid: Grid, combination: dict[str, str]) -> list[str]:
    return [*grid.common, *(f"{k}={v}" for k, v in combination.items())]


def build_recipes(recipe_name: str, grid: Grid) -> list[Recipe]:
    """Every combination's recipe; the first bad key or value raises the config system's error."""
    from distill.training.supervision import check_options  # options that cannot work together

    recipes = []
    for i, combination in enumerate(grid.combinations()):
        recipe = apply_overrides(get_recipe(recipe_name), overrides_for(grid, combination))
        try:
            check_values(sized(recipe))   # with the sizes the device fills in, as distill.run checks them
            check_options(recipe)
        except ValueError as e:
            raise ConfigError(f"combination {run_name(i, combination)}: {e}") from None
        recipes.append(recipe)
    return recipes


def sized(recipe: Recipe) -> Recipe:
    """`recipe` with the sizes the training device fills in (what its run will record)."""
    from distill.training.distributed import pick_device

    return resolve_for_device(recipe, pick_device(recipe.train.device).type)[0]


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        if name not in DIRECTION:
            raise ConfigError(f'--metrics: unknown metric "{name}".{suggest(name, list(DIRECTION))} '
                              f"Valid: {', '.join(DIRECTION)}")
    if not names:
        raise ConfigError(f"--metrics is empty; name some of {', '.join(DIRECTION)}")
    return names


def run_name(index: int, combination: dict[str, str]) -> str:
    """'03-normalization=hybrid_shared_crop=1': the key's last part unless two axes share it."""
    leaves = [k.rsplit(".", 1)[-1] for k in combination]
    names = leaves if len(set(leaves)) == len(leaves) else list(combination)
    slug = "_".join(f"{n}={v}" for n, v in zip(names, combination.values()))
    return f"{index + 1:02d}-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", slug)[:120]


# ----------------------------------------------------------------------------- running

def run_one(recipe: Recipe, run_out: Path, echo: Callable[[str], None] | None, heldout: tuple[str, ...] = (),
            resume: bool = False) -> dict:
    """Train `recipe` with its runs under `run_out`, then measure it on the `heldout` split if given;
    returns the row's status, run_dir, metrics. `resume`: continue the run a stopped grid left in
    `run_out` (from its saved config, as `python -m distill.run ... resume=` does) instead."""
    from distill.run import resolve
    from distill.training import train  # heavy imports only once the grid is valid

    run_out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_out / "train.log", "a") as log_file:
        def log(*args, **_kwargs) -> None:
            line = " ".join(str(a) for a in args)
            log_file.write(line + "\n")
            log_file.flush()
            if echo is not None:
                echo(line)
        try:
            run_dir = left_behind(run_out) if resume else None
            if run_dir is None:
                run_dir = train(replace(recipe, out_dir=str(run_out)), progress=False, log=log)
            elif not (run_dir / "summary.json").is_file():
                run_dir = train(resolve(recipe.name, [f"resume={run_dir}"]), progress=False, log=log)
            summary = json.loads((run_dir / "summary.json").read_text())
        except Exception as e:   # noqa: BLE001 - a failed run is a row of the table, not the end
            log_file.write(traceback.format_exc())
            message = f"{type(e).__name__}: {e}"
            return {"status": "failed", "error": message, "run_dir": None, "wall_s": time.time() - start,
                    "metrics": {}}
        error, measured = None, time.time()
        if heldout:
            try:
                summary.update(measure_heldout(run_dir, heldout, log))
            except Exception as e:   # noqa: BLE001 - the trained run and its own figures stay in the table
                log_file.write(traceback.format_exc())
                error = f"--heldout: {type(e).__name__}: {e}"
                log(f"the run trained, but its held-out measurement failed: {error}")
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # the run's own wall_s spans every process that trained it (a resumed row's, or a row only
    # re-measured here, would otherwise count only this process's share), plus the held-out measurement
    trained_s = summary.get("wall_s", measured - start)
    return {"status": "ok", "error": error, "run_dir": str(run_dir), "wall_s": trained_s + time.time() - measured,
            "metrics": metrics}


def left_behind(run_out: Path) -> Path | None:
    """The run an interrupted grid left in `run_out` (a row's folder): its newest run with a
    checkpoint, finished or not; None for a fresh row (or one stopped before its first checkpoint)."""
    from core.weights import latest_checkpoint

    runs = sorted(p for p in run_out.glob("*/config.json") if latest_checkpoint(p.parent / "checkpoints"))
    return runs[-1].parent if runs else None


def measure_heldout(run_dir: Path, heldout: tuple[str, ...], log) -> dict:
    """The run on the `--heldout` split, as `heldout_<metric>`; the evaluation's file goes where
    `python -m distill.evaluate` puts it."""
    from distill.evaluate import default_output
    from distill.training.evaluation import evaluate_run

    result = evaluate_run(run_dir, overrides=heldout, progress=False, log=log)
    io.write_json(default_output(run_dir, list(heldout)), result)
    return {HELDOUT + k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def best_rows(rows: list[dict], metric: str) -> set[int]:
    """Indices of the finished rows holding the best value of `metric`, compared at the table's
    precision (4 decimals): values that print alike tie, and ties all win. A seed group missing
    seeds ("partial") competes only when no group is complete: its mean is over other seeds."""
    ranked = ("ok",) if any(row["status"] == "ok" for row in rows) else ("ok", "partial")
    scored = {}
    for i, row in enumerate(rows):
        value = row_value(row, metric)
        if row["status"] in ranked and isinstance(value, (int, float)) and math.isfinite(value):
            value, direction = round(value, 4), DIRECTION[metric]
            if direction == 0:
                scored[i] = round(-abs(math.log(value)), 9) if value > 0 else -math.inf   # 9: x0.8 ties x1.25
            else:
                scored[i] = direction * value
    if len(scored) < 2:   # a lone figure beats nothing
        return set()
    top = max(scored.values())
    return {i for i, s in scored.items() if s == top}


def row_value(row: dict, metric: str):
    return row["wall_s"] if metric == "wall_s" else row["metrics"].get(metric)


def seed_groups(rows: list[dict], axes: list[str]) -> list[dict]:
    """One row per combination of the axes other than train.seed: the mean of each metric over
    its finished seeds, their sample standard deviation in "sd" (0 for a single seed), and "n"."""
    others = [k for k in axes if k != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["values"][k] for k in others), []).append(row)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "ok"]
        names = sorted({m for r in done for m, v in r["metrics"].items() if isinstance(v, (int, float))})
        mean, sd = {}, {}
        for name in names:
            values = [r["metrics"][name] for r in done if isinstance(r["metrics"].get(name), (int, float))]
            if len(values) == len(done):       # a metric some seed could not measure is left out
                mean[name] = sum(values) / len(values)
                sd[name] = (math.sqrt(sum((v - mean[name]) ** 2 for v in values) / (len(values) - 1))
                            if len(values) > 1 else 0.0)
        walls = [r["wall_s"] for r in members if r["wall_s"] is not None]
        failed = [r for r in members if r["error"]]   # failed runs, and trained runs whose --heldout failed
        pending = any(r["status"] == "pending" for r in members)
        status = "ok" if len(done) == len(members) else "partial" if done else "pending" if pending else "failed"
        out.append({"values": dict(zip(others, key)), "seeds": [r["values"][SEED_KEY] for r in done],
                    "status": status,
                    "error": failed[0]["error"] if failed else None, "run_dir": None, "n": len(done),
                    "of": len(members), "metrics": mean, "sd": sd,
                    "wall_s": sum(walls) / len(walls) if walls else None})
    return out


# ----------------------------------------------------------------------------- the table

def table_cells(rows: list[dict], axes: list[str], metrics: list[str], bold: Callable[[str], str],
                out: Path) -> tuple[list[str], list[list[str]]]:
    """Header and cells: the axes' values, each metric (best marked by `bold`), wall time, run."""
    columns = [m for m in metrics if m != "wall_s"] + ["wall_s"]
    best = {m: best_rows(rows, m) for m in columns}
    body = []
    for i, row in enumerate(rows):
        cells = [row["values"][k] for k in axes]
        for m in columns:
            shown = row["status"] in ("ok", "partial") or (m == "wall_s" and row["status"] == "failed")
            value = row_value(row, m) if shown else None
            text = "-" if not isinstance(value, (int, float)) else f"{value:.0f}" if m == "wall_s" else f"{value:.4f}"
            cells.append(bold(text) if i in best[m] and m != "wall_s" else text)
            if "sd" in row and m != "wall_s" and m in row["sd"] and row["n"] > 1:
                cells[-1] += f" ± {row['sd'][m]:.4f}"
        cells.append(status_text(row, out))
        body.append(cells)
    return [*axes, *columns, "run"], body


def status_text(row: dict, out: Path) -> str:
    if "seeds" in row:
        seeds = f"{row['n']}/{row['of']} seeds ({', '.join(row['seeds'])})" if row["n"] else f"0/{row['of']} seeds"
        return seeds + (f"; FAILED {row['error'].splitlines()[0][:80]}" if row["error"] else "")
    if row["status"] == "ok" and row["run_dir"]:
        run_dir = Path(row["run_dir"])
        shown = str(run_dir.relative_to(out)) if run_dir.is_relative_to(out) else str(run_dir)
        return shown + (f"; FAILED {row['error'].splitlines()[0][:80]}" if row["error"] else "")
    if row["status"] == "failed":
        first = row["error"].splitlines()[0] if row["error"] else ""
        return "FAILED " + (first[:97] + "..." if len(first) > 100 else first)
    return row["status"]


def markdown_table(rows: list[dict], axes: list[str], metrics: list[str], out: Path) -> str:
    header, body = table_cells(rows, axes, metrics, lambda t: f"**{t}**", out)
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def terminal_table(rows: list[dict], axes: list[str], metrics: list[str], out: Path) -> str:
    header, body = table_cells(rows, axes, metrics, lambda t: f"{t}*", out)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def seeded(grid: Grid) -> bool:
    return len(grid.axes.get(SEED_KEY, ())) > 1


def summary_rows(rows: list[dict], grid: Grid) -> tuple[list[dict], list[str]]:
    """The rows the table leads with, and their axes: averaged over seeds when train.seed is an axis."""
    if seeded(grid):
        return seed_groups(rows, list(grid.axes)), [k for k in grid.axes if k != SEED_KEY]
    return rows, list(grid.axes)


def grid_identity(recipe_name: str, grid: Grid, metrics: list[str], heldout: tuple[str, ...]) -> dict:
    """What ablation.json records of the command that made it; --resume compares it with its own."""
    return {"recipe": recipe_name, "grid": {k: list(v) for k, v in grid.axes.items()}, "common": list(grid.common),
            "heldout": list(heldout), "metrics": metrics}


def write_report(out: Path, recipe_name: str, grid: Grid, metrics: list[str], rows: list[dict],
                 heldout: tuple[str, ...] = ()) -> None:
    """OUT/ablation.json (everything) and OUT/ablation.md (the table), both atomically."""
    columns = [m for m in metrics if m != "wall_s"] + ["wall_s"]
    lead, lead_axes = summary_rows(rows, grid)
    io.write_json(out / "ablation.json", {
        **grid_identity(recipe_name, grid, metrics, heldout), "runs": rows,
        "best": {m: sorted(best_rows(lead, m)) for m in columns},
        **({"groups": lead} if seeded(grid) else {})})
    legend = ", ".join(f"{m} {'lower' if DIRECTION[m] < 0 else 'higher' if DIRECTION[m] > 0 else 'closer to 1'}"
                       for m in metrics)
    seeds = (f"Mean ± sample standard deviation over seeds {', '.join(grid.axes[SEED_KEY])} (`{SEED_KEY}`), "
             "best mean in bold (a row missing seeds is not ranked against complete ones); every run below."
             if seeded(grid) else "")
    io.write_text(out / "ablation.md", "\n".join([
        f"# Ablation of {recipe_name}", "",
        f"Grid: {' x '.join(f'{k} ({len(v)})' for k, v in grid.axes.items())}; common overrides: "
        f"{' '.join(f'`{c}`' for c in grid.common) or 'none'}.", "",
        f"Best per metric in bold ({legend} is better); wall_s: seconds per run, data generation included. {seeds}",
        "", markdown_table(lead, lead_axes, metrics, out), "",
        *(["## Every run", "", markdown_table(rows, list(grid.axes), metrics, out), ""] if seeded(grid) else [])]))


# ----------------------------------------------------------------------------- main

def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m distill.ablate", add_help=False, epilog=__doc__,
                                     description="Train every combination of a grid of overrides; one table.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help=f"one of {', '.join(RECIPES.names())}")
    parser.add_argument("items", nargs="*", help="grid axes key=v1,v2,... and common overrides key=value")
    parser.add_argument("--out", default="", type=user_path,
                        help="directory of the ablation (default runs/ablate-<UTC time>)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"summary.json metrics to tabulate (default {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--seeds", default="", help='train each combination with these seeds ("3" = 0, 1, 2; '
                        '"0,5,7") and report mean ± sd per row')
    parser.add_argument("--heldout", default="", help='also measure every run on this split, as heldout_<metric> '
                        '(data.* and eval.* overrides in one string, e.g. "data.seed=1 data.num_val=1000")')
    parser.add_argument("--dry-run", action="store_true", help="list the combinations and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the ablation in --out (the same command): finished rows are kept")
    parser.add_argument("--verbose", action="store_true", help="print the runs' training logs too")
    parser.add_argument("--help", "-h", action="store_true", help="show help (with a recipe: its keys)")
    return parser


@command("python -m distill.ablate")
def main(argv: list[str]) -> int:
    parser = make_parser()
    args = parser.parse_intermixed_args(argv)
    if args.recipe is None or args.help:
        parser.print_help()
        if args.recipe is not None and args.recipe in RECIPES:
            from distill.run import describe_keys
            print(f"\nKeys of {args.recipe} (set with key=value):\n{describe_keys(get_recipe(args.recipe))}")
        return 0 if args.help else 2
    metrics = parse_metrics(args.metrics)
    grid = parse_grid(args.items, get_recipe(args.recipe), parse_seeds(args.seeds))
    recipes = build_recipes(args.recipe, grid)
    heldout = parse_heldout(args.heldout, recipes)
    if heldout and args.metrics == parser.get_default("metrics"):
        metrics += HELDOUT_METRICS
    elif not heldout and any(m.startswith(HELDOUT) for m in metrics):
        raise ConfigError(f"--metrics {args.metrics}: heldout_* metrics need --heldout (the split to measure)")
    if args.resume and not args.out:
        raise ConfigError("--resume continues the ablation in --out: give --out DIR (the folder it was started in)")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or f"runs/ablate-{stamp}")
    check_writable(out, "--out")
    if args.resume and not out.exists():   # (an existing --out may be another process's, just started: the lock says)
        ablation_to_resume(out)
    # one writer per --out: two --resume of it would train the same rows and overwrite each other's table
    with nullcontext() if args.dry_run else exclusive(out / ".ablation.lock", f"ablation {out}"):
        if not args.dry_run and not args.resume and (out / "ablation.json").exists():   # tables would mix
            raise ConfigError(f"--out {out} already holds an ablation (ablation.json); continue it with --resume "
                              f"(the same command), choose another --out, or move that one away to start again")
        rows = resumed_rows(out, args.recipe, grid, metrics, heldout) if args.resume else None
        if rows is not None:
            check_rows_trained_as_built(out, grid, recipes, rows)
        combos = grid.combinations()
        print(f"ablation of {args.recipe}: {len(combos)} runs ({' x '.join(grid.axes)}) -> {out}"
              + (f"; common: {' '.join(grid.common)}" if grid.common else ""))
        if heldout:
            print(f"each run then measured on {' '.join(heldout)} (heldout_*)")
        if args.dry_run:
            for i, combination in enumerate(combos):
                print(f"  {run_name(i, combination)}: {' '.join(overrides_for(grid, combination))}")
            return 0
        return run_grid(args.recipe, grid, recipes, out, metrics, verbose=args.verbose, heldout=heldout, rows=rows)


def parse_heldout(text: str, recipes: list[Recipe]) -> tuple[str, ...]:
    """--heldout's overrides, checked against every run's recipe now rather than after its training.
    A split that is a run's own validation split (the same data, the same SynthRooms seed) is refused:
    it chose the run's best.safetensors, so it is not held out."""
    from distill.training.evaluation import evaluation_recipe

    items = tuple(text.split())
    if not items:
        return ()
    for item in items:
        if "=" not in item:
            raise ConfigError(f'--heldout: "{item}" is not key=value (e.g. --heldout "data.seed=1 data.num_val=1000")')
    # what picks the validation images: the data, and for SynthRooms (rendered by seed) its seed
    split = lambda d: (d.val_dataset or d.dataset, d.seed if renders(d.val_dataset or d.dataset) else None)  # noqa: E731
    for recipe in recipes:
        try:
            held = evaluation_recipe(sized(recipe), items)   # as it will measure the run's recorded recipe
        except ValueError as e:
            raise ConfigError(f"--heldout: {e}") from None
        if split(held.data) == split(recipe.data):
            data, used = recipe.data.val_dataset or recipe.data.dataset, {r.data.seed for r in recipes}
            fix = (f"add data.seed={max(used) + 1} (rooms no run trains or validates on) or another data.dataset"
                   if data == "synthrooms" else "give another data.dataset (its seed does not pick its images)")
            raise ConfigError(f'--heldout "{text}": that is the validation split of a run it would measure '
                              f"({data}" + (f", data.seed={recipe.data.seed}" if data == "synthrooms" else "")
                              + f"), which chose its best.safetensors; {fix}")
    return items


def run_grid(recipe_name: str, grid: Grid, recipes: list[Recipe], out: Path, metrics: list[str], *,
             verbose: bool = False, heldout: tuple[str, ...] = (), rows: list[dict] | None = None) -> int:
    """Run every combination in order, rewriting the report after each; 0 if all finished, else 1.
    `rows`: a resumed ablation's rows (resumed_rows); those that finished are not run again."""
    combos, resuming = grid.combinations(), rows is not None
    rows = rows or [{"values": c, "overrides": overrides_for(grid, c), "status": "pending", "error": None,
                     "run_dir": None, "wall_s": None, "metrics": {}} for c in combos]
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, recipe_name, grid, metrics, rows, heldout)
    for i, (combination, recipe) in enumerate(zip(combos, recipes)):
        label = f"[{i + 1}/{len(combos)}] " + " ".join(f"{k}={v}" for k, v in combination.items())
        if finished(rows[i]):
            print(f"{label}: finished before, kept", flush=True)
            continue
        print(label, flush=True)
        rows[i].update(run_one(recipe, out / run_name(i, combination), print if verbose else None, heldout,
                               resume=resuming))
        row = rows[i]
        shown = ", ".join(f"{m} {row['metrics'][m]:.4f}" for m in metrics
                          if isinstance(row["metrics"].get(m), (int, float)))
        print(f"    {'done' if row['status'] == 'ok' else 'FAILED'} in {row['wall_s']:.0f} s: "
              f"{shown if row['status'] == 'ok' else row['error']}"
              + (f"; FAILED {row['error']}" if row["status"] == "ok" and row["error"] else ""), flush=True)
        write_report(out, recipe_name, grid, metrics, rows, heldout)
    lead, lead_axes = summary_rows(rows, grid)
    print(f"\n{terminal_table(lead, lead_axes, metrics, out)}\n\n(* best per metric"
          + (", mean ± sd over seeds" if seeded(grid) else "") + ")  "
          f"{out / 'ablation.md'}  {out / 'ablation.json'}")
    return 0 if all(finished(r) for r in rows) else 1


def finished(row: dict) -> bool:
    """Trained, and measured on the held-out split where one was asked for."""
    return row["status"] == "ok" and not row["error"]


def check_rows_trained_as_built(out: Path, grid: Grid, recipes: list[Recipe], rows: list[dict]) -> None:
    """ConfigError when a row's run (finished, or left with a checkpoint) trained another recipe than
    this command builds for it now: a default changed in the code (or the device did) since the grid
    started, so resuming would put rows trained under two rules in one table."""
    from distill.recipes import load_saved
    from distill.training import ADAPTED_TO_DATA

    for i, (combination, recipe, row) in enumerate(zip(grid.combinations(), recipes, rows)):
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else left_behind(out / run_name(i, combination))
        if run_dir is None or not (run_dir / "config.json").is_file():
            continue
        changed = [c for c in recipe_changes(load_saved(run_dir), sized(recipe)) if c[0] not in ADAPTED_TO_DATA]
        if changed:
            shown = ", ".join(f"{key}={before!r} (now {after!r})" for key, before, after in changed[:4])
            raise ConfigError(f"--resume: row {run_name(i, combination)} trained with {shown}"
                              + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
                              + f", which this command no longer builds (the code's defaults or the device changed "
                                f"since the grid started); its rows would not compare: start the grid again in "
                                f"another --out (the runs in {out} are kept)")


def recipe_changes(saved: Recipe, built: Recipe) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, built value) of every field the two recipes set differently; where
    the runs go and how a process started (`out_dir`, `resume`) are not what a run trains."""
    from distill.run import flat_get

    before, after = to_dict(saved), to_dict(built)
    return [(key, flat_get(before, key), flat_get(after, key)) for key in flat_keys(saved)
            if key not in ("out_dir", "resume") and flat_get(before, key) != flat_get(after, key)]


def ablation_to_resume(out: Path) -> Path:
    """`out`'s ablation.json, or ConfigError (also before the lock when `out` is not there: taking it
    would create the folder)."""
    path = out / "ablation.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no ablation.json; drop --resume to start this grid there")
    return path


def resumed_rows(out: Path, recipe_name: str, grid: Grid, metrics: list[str], heldout: tuple[str, ...]) -> list[dict]:
    """The rows of the ablation in `out`, after checking that it is the one this command describes:
    --resume continues a grid, it does not mix two."""
    path = ablation_to_resume(out)
    saved = io.read_json(path, fix="it was not written by distill.ablate; give another --out")
    rows = saved.get("runs") if isinstance(saved, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and "overrides" in row for row in rows):
        raise ConfigError(f"--resume: {path} has no rows of runs: it was not written by distill.ablate (or was "
                          f"edited); give another --out")
    now = grid_identity(recipe_name, grid, metrics, heldout)
    differ = [key for key, value in now.items() if saved.get(key, [] if key == "heldout" else None) != value]
    overrides = [overrides_for(grid, c) for c in grid.combinations()]
    if differ or [row["overrides"] for row in rows] != overrides:
        raise ConfigError(f"--resume: {path} is another grid ({', '.join(differ) or 'its rows'} differ); give the "
                          f"command that started it, or another --out")
    return rows


if __name__ == "__main__":
    sys.exit(main())
