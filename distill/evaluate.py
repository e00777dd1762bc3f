"""`python -m distill.evaluate [RUN] [key=value ...]` - measure a finished run again, on any validation split.

    python -m distill.evaluate runs/v3-20261204T043208Z                    its own split (summary.json's figures)
    python -m distill.evaluate runs/v3-20261204T043208Z data.seed=1 data.num_val=1000   1,000 rooms it never saw
    python -m distill.evaluate runs/v3-20261204T043208Z data.dataset=nyu:/data/nyu data.num_val=None
    python -m distill.evaluate                                             the newest finished v3 run under runs/
    python -m distill.evaluate --recipe v4 data.seed=1 data.num_val=1000   the newest finished v4 run

The student is the run's `best.safetensors`, checked against the sha256 the run recorded. Overrides
change `data.*` (which split: dataset, seed, num_val, size) and `eval.*` (the metric range, the
teacher's reference); the run's own values stand for the rest, so NYU at a CPU run's num_val=200 reads
its first 200 test images. SynthRooms renders only the validation split; NYU's test pairs alone
suffice (a BTS or FastDepth download of the test split). The metrics (summary.json's
keys, with the teacher's and gap_closed where they can be measured) are printed and written to
`<run>/evaluations/<the overrides, sorted by key>.json` (`validation.json` without them; `--out` a file or a
directory elsewhere).

From Python: `distill.evaluate_run(run_dir, overrides=["data.seed=1"])` returns the same dict.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

from core import io
from core.cli import ArgumentParser, add_run_arguments, command, user_path
from distill.recipes import DEFAULT_RECIPE


def default_output(run_dir: Path, overrides: list[str]) -> Path:
    """`<run>/evaluations/validation.json` for the run's own split, else the overrides made a file name:
    each key with the value that applies (its last), sorted by key, so that one split has one file
    however its overrides were ordered."""
    applied = {item.partition("=")[0].strip(): item for item in overrides}
    raw = "_".join(applied[k] for k in sorted(applied)) or "validation"
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    if len(name) > 180:   # cut, with a digest of the whole so that two long override sets keep two files
        name = name[:167] + "-" + digest
    elif name != raw:     # folder:/x/y and folder:/x-y would both read folder-x-y: the digest tells them apart
        name = f"{name}-{digest}"
    return run_dir / "evaluations" / (name + ".json")


def looks_like_override(text: str) -> bool:
    """`data.seed=1`, not a run directory (an ablation's run paths hold "=" too: 01-weighting=fixed/...)."""
    key, eq, _ = text.partition("=")
    return bool(eq) and "/" not in key and not Path(text).exists()


@command("python -m distill.evaluate")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m distill.evaluate", epilog=__doc__,
                            description="Measure a finished run on a validation split.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=user_path,
                        help="a run directory (default: the newest finished run of --recipe under --runs-dir)")
    parser.add_argument("overrides", nargs="*", help="data.* and eval.* key=value overrides, e.g. data.seed=1")
    add_run_arguments(parser, DEFAULT_RECIPE, run_flag=False)
    parser.add_argument("--out", type=user_path, help="the JSON file (or a directory for it) to write "
                                                 "(default: <run>/evaluations/<overrides>.json)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)
    items = [a for a in (args.run, *args.overrides) if a]   # the run may come anywhere among the overrides
    runs = [a for a in items if not looks_like_override(a)]
    if len(runs) > 1:
        bare = [a for a in runs if re.fullmatch(r"(data|eval)\.\w+", a) and not Path(a).exists()]
        if bare:   # data.num_val without its value read as a second run
            raise ValueError(f"{bare[0]}: an override needs a value, e.g. {bare[0]}=<value> (key=value)")
        raise ValueError(f"give one run directory; got {', '.join(runs)}")
    args.run, args.overrides = (runs[0] if runs else None), [a for a in items if looks_like_override(a)]

    from distill.training import find_run
    from distill.training.evaluation import evaluate_run
    from distill.training.report import evaluation_table

    run_dir = find_run(args.run, args.runs_dir, args.recipe, flag="RUN")
    default = default_output(run_dir, args.overrides)
    out = Path(args.out) if args.out else default
    if args.out and (out.is_dir() or args.out.endswith(("/", os.sep))):   # --out results/: the run's file name, there
        out = out / default.name
    # before any image renders; never onto the run's own files (its weights, config, summary)
    io.check_output_file(out, "--out" if args.out else "the run's evaluations/",
                         reads=[path for path in run_dir.iterdir() if path.is_file()])
    result = evaluate_run(run_dir, overrides=args.overrides, device=args.device, progress=not args.quiet)
    io.write_json(out, result)
    print(evaluation_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
