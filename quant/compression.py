"""The compression report of a run: every artefact of every export of one format, side by side.

    python -m quant.compression exports/<run>                 # one table per format
    python -m quant.compression exports/<run> --format tflite

An export of `--prune X` lands in `exports/<run>/<target>-pruned-X/` beside the unpruned one, so a
run's exports hold float, int8, pruned and pruned+int8. Each row reads its export's manifest.json:
MACs and params of the model exported, size, the host latency that export measured, the artefact's
own accuracy on the validation images, and its drift against its float model (for a pruned export,
the pruned float model; what pruning cost is the accuracy column against the unpruned rows).
`quant.export` writes this table into every report.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli import ArgumentParser, command, user_path
from core.formats import FORMATS
from core.io import IntegrityError
from core.manifest import MANIFEST, read_manifest
from edge.host import describe_cpu, device_cpu

PRECISION_ORDER = ("fp32", "fp16", "int8", "w8", "palette6", "palette4", "w8a8")
HEADER = ("| export | artefact | MACs (M) | params (M) | MB | host p50 ms | images | abs_rel | miou "
          "| Δabs_rel vs its float | Δmiou (pt) | gates |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_of_directory(name: str) -> str | None:
    """The format of the export a directory is named for (`quant.export.export_name`:
    `<target>[-<converter>][-<layout>][-pruned-<X>]`, the target a format or a device profile of
    targets/devices.json, whose names may hold '-'), or None for a name no export has."""
    from targets.profiles import device, device_names

    targets = sorted([*FORMATS, *device_names()], key=len, reverse=True)   # jetson-orin before a shorter match
    target = next((t for t in targets if name == t or name.startswith(f"{t}-")), None)
    return None if target is None else target if target in FORMATS else device(target).format


def exports(run_exports: Path, fmt: str | None = None) -> tuple[dict[str, dict], dict[Path, str]]:
    """The finished exports under exports/<run>/ (of `fmt` if given), as {directory name: manifest},
    and the export directories left out (of `fmt` if given, by their name), each with why and the fix.
    Staging and scratch directories (hidden) are skipped; unreadable ones are only reported: one
    damaged export must not stop a new one's report."""
    found, unreadable = {}, {}
    for directory in sorted(p for p in run_exports.iterdir() if p.is_dir() and not p.name.startswith(".")):
        named_for = format_of_directory(directory.name)
        if fmt is not None and named_for not in (fmt, None):   # another format's export
            continue
        # with a format given, a damaged folder named for no export could be any format's: not reported
        reported = fmt is None or named_for == fmt
        path = directory / MANIFEST
        if not path.is_file():   # an export that lost its manifest, or a folder that is no export's
            if named_for is not None:
                unreadable[directory] = f"it has no {MANIFEST} (re-export it with --overwrite)"
            continue
        try:
            manifest = read_manifest(path.parent)
        except IntegrityError:
            if reported:
                unreadable[directory] = f"its manifest cannot be read (python -m quant.verify {directory})"
            continue
        missing = _missing_key(manifest)
        if missing:   # hand-edited, or from another tool: quant.verify (the files' hashes) would find it intact
            if reported:
                unreadable[directory] = f"its manifest lacks {missing}, which the table needs (re-export it with --overwrite)"
            continue
        gone = [a["path"] for a in manifest["artefacts"] if not (directory / a["path"]).exists()]
        if gone:   # a row for a file that is not there would read as a finished artefact
            if reported:
                unreadable[directory] = f"it lists {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} " \
                                        f"not there (restore it, or re-export with --overwrite)"
            continue
        if fmt is None or manifest["config"]["format"] == fmt:
            found[directory.name] = manifest
    return found, unreadable


TABLE_KEYS = (("config", "format"), ("config", "model", "macs"), ("config", "model", "params"))
ARTEFACT_KEYS = ("precision", "format", "bytes")


def _missing_key(manifest: dict) -> str:
    """The first key `rows` reads that the manifest lacks, dotted ("config.model.macs"), or ""."""
    for keys in TABLE_KEYS:
        node = manifest
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                return ".".join(keys[:depth + 1])
            node = node[key]
    listed = manifest.get("artefacts")
    if not isinstance(listed, list):
        return "artefacts"
    for i, a in enumerate(listed):
        for key in ARTEFACT_KEYS:
            if not isinstance(a, dict) or key not in a:
                return f"artefacts[{i}].{key}"
    return ""


def rows(manifests: dict[str, dict]) -> list[dict]:
    """One row per artefact of each export (its name: its manifest); unpruned exports first, then by
    MACs, largest first; precisions in a fixed order."""
    found = []
    for name, manifest in manifests.items():
        model = manifest["config"]["model"]
        for a in manifest["artefacts"]:
            validation, bench = a.get("validation", {}), a.get("bench")
            float_, artefact = validation.get("float", {}), validation.get("artefact", {})
            found.append({
                "export": name, "artefact": a["path"], "precision": a["precision"], "format": a["format"],
                "macs": model.get("exported_macs", model["macs"]),
                "params": model.get("exported_params", model["params"]),
                # an untimed artefact (Core ML off macOS) has a bench entry saying why, without latency
                "bytes": a["bytes"], "p50_ms": (bench or {}).get("latency_ms", {}).get("p50"),
                "images": validation.get("images"),
                "abs_rel": artefact.get("abs_rel"), "miou": artefact.get("miou"),
                "abs_rel_change": _ratio(artefact.get("abs_rel"), float_.get("abs_rel")),
                "miou_change_pt": _diff_pt(artefact.get("miou"), float_.get("miou")),
                "passed": validation.get("pass"), "pruned": "exported_macs" in model,
                "cpu": describe_cpu(device_cpu(bench["device"])) if "device" in (bench or {}) else None,
                "source_sha256": manifest["config"].get("source_checkpoint", {}).get("sha256")})
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(found, key=lambda r: (r["pruned"], -r["macs"], r["export"], order.get(r["precision"], len(order))))


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference - 1


def _diff_pt(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else 100 * (value - reference)


def _cell(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(table_rows: list[dict]) -> str:
    """The table, and what its latency column is (one export's bench, not an interleaved comparison)."""
    lines = [HEADER]
    for r in table_rows:
        gates = {True: "pass", False: "FAIL", None: "—"}[r["passed"]]
        lines.append(f"| {r['export']} | {r['precision']} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e6:.3f} "
                     f"| {r['bytes'] / 1e6:.2f} | {_cell(r['p50_ms'], '.2f')} | {_cell(r['images'], 'd')} "
                     f"| {_cell(r['abs_rel'], '.4f')} "
                     f"| {_cell(r['miou'], '.3f')} | {_cell(r['abs_rel_change'], '+.2%')} "
                     f"| {_cell(r['miou_change_pt'], '+.2f')} | {gates} |")
    return ("\n".join(lines) + f"\n\n{mixed_sources(table_rows)}Accuracy: each artefact executed on the first "
            "`images` validation images (quant.export --check; compare rows of equal counts). Latency: each export's "
            f"own bench, taken at different times {latency_hosts(table_rows)}; for a speed ratio, interleave the "
            "files on one host: python -m edge.bench A B --threads 2.\n")


def mixed_sources(table_rows: list[dict]) -> str:
    """A warning when the exports side by side were made from different weights of the run (one
    exported from a checkpoint while it trained, another after it finished or was resumed): their
    accuracy differences are then not what compression cost. Empty when they share one source."""
    sources: dict[str, list[str]] = {}
    for r in table_rows:   # an export that recorded no source (before the record) cannot be compared
        if r["source_sha256"] and r["export"] not in sources.setdefault(r["source_sha256"], []):
            sources[r["source_sha256"]].append(r["export"])
    if len(sources) <= 1:
        return ""
    return ("**These exports were made from DIFFERENT weights of the run**, so their accuracy differences are not "
            "what compression cost: " + "; ".join(f"sha256 {source[:12]} ({', '.join(exports)})"
                                                   for source, exports in sources.items())
            + ". Export them again from the run as it is now (python -m quant.export ... --overwrite).\n\n")


def latency_hosts(table_rows: list[dict]) -> str:
    """Where the latency column was measured: one CPU, or which export on which (a copied exports
    directory can hold benches of several hosts, whose latencies do not compare)."""
    cpus: dict[str, list[str]] = {}
    for r in table_rows:
        if r["cpu"] and r["export"] not in cpus.setdefault(r["cpu"], []):
            cpus[r["cpu"]].append(r["export"])
    if len(cpus) <= 1:
        return f"on {next(iter(cpus))}" if cpus else "on the export host"
    return ("on DIFFERENT CPUs, whose latencies do not compare: "
            + "; ".join(f"{cpu} ({', '.join(exports)})" for cpu, exports in cpus.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m quant.compression", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_exports", type=user_path, help="exports/<run>: the directory holding a run's export directories")
    p.add_argument("--format", choices=list(FORMATS), help="only this format's exports (default: one table per format)")
    return p.parse_args(argv)


def nothing_found(root: Path, fmt: str | None, left_out: int = 0) -> str:
    """Why `root` gave no table, and the directory to pass where the user named another level:
    one export (exports/<run>/<target>) or the folder of every run's (exports/)."""
    if not root.exists():
        return f"{root} does not exist; give the folder quant.export wrote a run's exports to (exports/<run>)"
    if not root.is_dir():
        return f"{root} is a file; give the folder quant.export wrote a run's exports to (exports/<run>)"
    if (root / MANIFEST).is_file():
        return f"{root} is one export; pass the run's folder that holds it: {root.parent}"
    runs = sorted({m.parent.parent for m in root.glob(f"*/*/{MANIFEST}")}) if root.is_dir() else []
    if runs:
        shown = ", ".join(map(str, runs[:6])) + (f" (and {len(runs) - 6} more)" if len(runs) > 6 else "")
        return f"{root} holds the exports of runs, not of one; pass one run's folder: {shown}"
    where = f"{root}: no finished export there" + (f" of format {fmt}" if fmt else "")
    if left_out:
        where += f" ({left_out} left out, see the warning{'s' if left_out > 1 else ''} above)"
    return f"{where}; make one with python -m quant.export --target {fmt or 'tflite'} [--prune macs=0.5x]"


@command("python -m quant.compression")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.run_exports)
    found, unreadable = exports(root, args.format) if root.is_dir() else ({}, {})
    for path, why in unreadable.items():
        print(f"warning: {path} left out: {why}", file=sys.stderr)
    if not found:
        raise ValueError(nothing_found(root, args.format, len(unreadable)))
    by_format: dict[str, dict[str, dict]] = {}
    for name, manifest in found.items():
        by_format.setdefault(manifest["config"]["format"], {})[name] = manifest
    for fmt, manifests in sorted(by_format.items()):
        table_rows = rows(manifests)
        if mixed_sources(table_rows):
            print(f"warning: the {fmt} exports of {root.name} were made from different weights of the run "
                  f"(see the table's note); export them again from the run as it is now", file=sys.stderr)
        print(f"## {root.name}: {fmt}\n\n" + markdown(table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
