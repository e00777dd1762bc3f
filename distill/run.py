"""`python -m distill.run RECIPE [key=value ...]` - train a recipe.

    python -m distill.run --list                  recipes and what each is for
    python -m distill.run v3 --help               the recipe's story and every key with its default
    python -m distill.run v3 train.epochs=5 data.height=96 data.width=128
    python -m distill.run v1 preflight=warn       reproduce seed 000's unit failure on purpose
    python -m distill.run v3 resume=runs/v3-20261121T120000Z

From Python: `distill.train_recipe("v3", overrides=["train.epochs=3"])`; this command wraps it.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Sequence

from core.cli import ArgumentParser, command, user_path
from core.config import ConfigError, apply_overrides, flat_keys, override_list, to_dict
from core.io import check_writable
from distill.data import refuse_path_to_rendered
from distill.recipes import RECIPES, Recipe, check_values, get_recipe, load_saved, recipe_summary


def describe_keys(recipe) -> str:
    """Every key with its default; a size left to the device shows what each device kind gets."""
    sized = {}   # "train.epochs" -> "cpu 16, cuda 30"
    for kind, table in recipe.device_defaults.items():
        for section, values in table.items():
            for key, value in values.items():
                sized.setdefault(f"{section}.{key}", []).append(f"{kind} {value}")

    def walk(cfg, prefix=""):
        for f in fields(cfg):
            value, key = getattr(cfg, f.name), prefix + f.name
            if is_dataclass(value):
                yield from walk(value, key + ".")
            else:
                shown = f"None: {', '.join(sized[key])}" if value is None and key in sized else repr(value)
                yield f"  {key:<26} {shown:<28} {f.type}"
    return "\n".join(walk(recipe))


def check_override_list(overrides: Sequence[str]) -> list[str]:
    """`overrides` as a list, refused when it is one string or sets the recipe's name (a v3 saved
    as v4 would be rebuilt, exported and quantised as v4)."""
    overrides = override_list(overrides)
    for item in overrides:
        if item.partition("=")[0].strip() == "name":
            raise ConfigError(f"{item}: the recipe's name is not a key; the recipe is the first argument "
                              f"(python -m distill.run v4 ...)")
    return overrides


def resolve(recipe: Recipe | str, overrides: list[str]) -> Recipe:
    """The recipe (a name or a Recipe) with overrides applied; with `resume=DIR`, the saved config
    of that run, which must be a run of the same recipe."""
    overrides = check_override_list(overrides)
    given = recipe
    recipe = apply_overrides(get_recipe(recipe) if isinstance(recipe, str) else recipe, overrides)
    # "~" as the home folder where no shell expanded it: from Python, or `resume=~/x` in quotes
    recipe = replace(recipe, out_dir=user_path(recipe.out_dir), resume=user_path(recipe.resume))
    check_values(recipe)
    if not recipe.resume:
        refuse_path_to_rendered(recipe.data)
        return recipe
    saved_path = Path(recipe.resume) / "config.json"
    if not Path(recipe.resume).exists():
        raise ConfigError(f"resume={recipe.resume}: it does not exist; give the run directory to continue "
                          f"(runs/<recipe>-<time>)")
    if not saved_path.is_file():
        raise ConfigError(f"resume={recipe.resume}: no config.json there; is it a run directory (runs/<recipe>-<time>)?")
    saved_recipe = load_saved(recipe.resume, type(recipe))
    # a run saved before "~" was expanded recorded it literally: the same folder as out_dir=~/x now
    saved_recipe = replace(saved_recipe, out_dir=user_path(saved_recipe.out_dir), resume=recipe.resume)
    if saved_recipe.name != recipe.name:
        raise ConfigError(f"resume={recipe.resume} is a {saved_recipe.name} run, not {recipe.name}; continue it with "
                          f"python -m distill.run {saved_recipe.name} resume={recipe.resume}")
    now, saved = to_dict(recipe), to_dict(saved_recipe)
    asked = [k.split("=")[0].strip() for k in overrides if not k.startswith("resume=")]
    if not isinstance(given, str):   # a Recipe object: what its caller set is where it leaves its class's defaults
        defaults = to_dict(type(given)())
        asked += [k for k in flat_keys(given) if k != "resume" and k not in asked
                  and flat_get(now, k) != flat_get(defaults, k)]
    differing = [f"{k}={flat_get(now, k)}" for k in asked if flat_get(saved, k) != flat_get(now, k)]
    where = [k for k in differing if k.split("=")[0] in RESUME_ANYWHERE]
    if len(where) < len(differing):
        raise ConfigError(f"resume continues the saved config of {recipe.resume}; these overrides differ from it: "
                          f"{', '.join(k for k in differing if k not in where)}. Drop them, or start a new run "
                          f"(on resume only {', '.join(RESUME_ANYWHERE)} may change: where it runs, not what it trains)")
    return apply_overrides(saved_recipe, where) if where else saved_recipe


# Where and how fast a run computes, not what it trains: a resume on another machine may change them
# (train.device saved as cuda:1 would otherwise have no way forward on a machine without it)
RESUME_ANYWHERE = ("train.device", "data.workers", "data.root", "data.cache_mb")


def flat_get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def train_recipe(recipe: Recipe | str, *, overrides: Sequence[str] = (), progress: bool = True, log=print) -> Path:
    """Train `recipe` (a name such as "v3", or a Recipe) with dotted `key=value` overrides; returns
    the run directory. `resume=DIR` continues that run from its saved config. Raises ConfigError or
    UnknownNameError for a bad recipe or override, FileNotFoundError for a data set or weights file
    that is not there, SupervisionError for options that cannot work together, and PreflightError
    when the pre-flight refuses the units or ranges, all before any step.

    The caller's random streams (Python, NumPy, torch) are as they were when it returns. TensorFlow
    stays hidden from this process afterwards (TensorBoard would import it, and it must not share a
    process with torch: docs/TOOLCHAIN.md). Under torchrun every process calls it and every process
    returns once rank 0 has written the run; a process group the caller made is left to the caller."""
    recipe = resolve(recipe, overrides)
    if not recipe.resume:
        check_writable(recipe.out_dir, "out_dir=")
    from distill.training import train  # heavy imports only once the recipe is valid
    return train(recipe, progress=progress, log=log)


@command("python -m distill.run")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m distill.run", add_help=False,
                                     description="Train a distillation recipe.", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help=f"one of {', '.join(RECIPES.names())}")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    parser.add_argument("--help", "-h", action="store_true", help="show help (with a recipe: its keys)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)

    if args.list:
        for name in RECIPES.names():
            print(f"{name:<4} {recipe_summary(name)}")
        return 0
    if args.recipe is None:
        if args.help:
            parser.print_help()
            return 0
        raise ConfigError(f"give a recipe to train, e.g. python -m distill.run v3 (the recipes: "
                          f"{', '.join(RECIPES.names())}; --list says what each is, --help how to use this)")
    if args.help:
        recipe = get_recipe(args.recipe)
        print(f"{inspect.cleandoc(type(recipe).__doc__)}\n\nKeys (set with key=value):\n{describe_keys(recipe)}")
        return 0
    train_recipe(args.recipe, overrides=args.overrides, progress=not args.quiet)   # errors: core/cli.py
    return 0


if __name__ == "__main__":
    sys.exit(main())
