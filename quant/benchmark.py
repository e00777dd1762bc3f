"""The benchmark table of an export: one row per artefact with size, gates, drift and host latency.

Like Ultralytics' `benchmark()`, with drift: every row comes from executing the artefact, for
accuracy (quant/validate.py) and for speed (`python -m edge.bench`, one child process per
artefact so that runtimes do not share a process and peak memory is the artefact's own). The
efficiency column is the fraction of the host's matrix-product peak the artefact reaches:
achieved ops/s = 2 x MACs / p50 latency (1 MAC = 2 ops), divided by the int8 peak for int8
artefacts and by the fp32 peak otherwise, both measured in the same run (`python -m edge.peak`).
It says how far a model is from what this CPU can do, not how fast a phone will be: latency on
the device comes from the scripts in edge/device/.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from core import io
from core.formats import FORMATS, INTEGER_PRECISIONS
from edge.host import describe_cpu


def child(module: str, *args: str) -> dict:
    """Run `python -m module args... --json FILE` and return the JSON it wrote."""
    from quant.artefacts import run_module

    with tempfile.TemporaryDirectory(prefix="densekit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        run_module(module, *args, "--json", str(out), tail_lines=10)
        if not out.is_file():   # our failure, not a path the user gave (FileNotFoundError would say so)
            raise RuntimeError(f"python -m {module} exited 0 without writing its --json file")
        return json.loads(out.read_text())


def host_peak(threads: int) -> dict:
    return child("edge.peak", "--threads", str(threads))


def bench_artefact(path: Path, threads: int, runs: int, warmup: int) -> dict:
    return child("edge.bench", str(path), "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup))


def runs_here(fmt: str) -> bool:
    """Whether host latency means something for `fmt` here (Core ML's only on macOS: elsewhere its
    reference executor measures accuracy, not speed)."""
    return FORMATS[fmt].timed_here()


def benchmark(export_dir: Path, artefacts: list[dict], *, threads: int, runs: int, warmup: int, macs: int,
              log=print) -> dict:
    """{"host_peak": {...} (None when nothing runs here), "macs": int, "threads": int,
    "artefacts": {path: bench JSON + efficiency, or {"skipped": why}}}."""
    peak = None
    if any(runs_here(a["format"]) for a in artefacts):
        peak = host_peak(threads)
        log(f"host peak ({threads} threads): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, "
            f"int8 {peak['int8_gops']:.1f} GOP/s")
    results = {}
    for a in artefacts:
        if not runs_here(a["format"]):
            results[a["path"]] = {"skipped": FORMATS[a["format"]].untimed.format(name=a["path"], runs=runs)}
            continue
        b = bench_artefact(Path(export_dir) / a["path"], threads, runs, warmup)
        b["efficiency"] = efficiency(macs, b["latency_ms"]["p50"], peak, a["precision"])
        results[a["path"]] = b
        log(f"  bench {a['path']}: p50 {b['latency_ms']['p50']:.2f} ms, p90 {b['latency_ms']['p90']:.2f} ms, "
            f"{b['throughput_ips']:.1f} img/s, {100 * b['efficiency']['of_peak']:.1f}% of the "
            f"{b['efficiency']['peak']} peak")
    summary = {"host_peak": peak, "macs": macs, "threads": threads, "artefacts": results}
    io.write_json(Path(export_dir) / "benchmark.json", summary)
    return summary


def efficiency(macs: int, p50_ms: float, peak: dict, precision: str) -> dict:
    achieved = 2 * macs / (p50_ms / 1e3) / 1e9
    name, value = ("int8", peak["int8_gops"]) if precision in INTEGER_PRECISIONS else ("fp32", peak["fp32_gflops"])
    return {"achieved_gops": achieved, "peak": name, "peak_gops": value, "of_peak": achieved / value}


def table(manifest_artefacts: list[dict], bench: dict | None, budget_ms: float | None = None) -> str:
    """Markdown table: one row per artefact of the manifest (with its `validation`)."""
    header = ("| artefact | MB | gates | Δabs_rel | Δmiou (pt) | host p50 / p90 / p99 ms | img/s | peak RSS MB "
              "| GOP/s | % of peak |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for a in manifest_artefacts:
        v = a.get("validation") or {}
        gate = "pass" if v.get("pass") else ("**FAIL**" if v else "not run")
        rel = (f"{100 * v['delta']['abs_rel'] / v['float']['abs_rel']:+.2f}%" if v.get("float", {}).get("abs_rel")
               else "-")
        miou = f"{100 * v['delta']['miou']:+.2f}" if "miou" in v.get("delta", {}) else "-"
        b = (bench or {}).get("artefacts", {}).get(a["path"], {})
        if "latency_ms" in b:
            lat = b["latency_ms"]
            speed = (f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} | {b['throughput_ips']:.1f} | "
                     f"{b['memory_mb']['peak_rss']:.0f} | {b['efficiency']['achieved_gops']:.1f} | "
                     f"{100 * b['efficiency']['of_peak']:.1f}% {b['efficiency']['peak']}")
        else:
            speed = f"{b.get('skipped', 'not measured')} | | | |"
        lines.append(f"| {a['path']} | {a['bytes'] / 1e6:.2f} | {gate} | {rel} | {miou} | {speed} |")
    notes = []
    if bench and bench["host_peak"]:
        p = bench["host_peak"]
        notes.append(f"Host: {describe_cpu(p['cpu'])}, {bench['threads']} threads; measured peak fp32 "
                     f"{p['fp32_gflops']:.1f} GFLOP/s, int8 {p['int8_gops']:.1f} GOP/s ({p['method']}); "
                     f"model {bench['macs'] / 1e6:.0f} M MACs.")
    if budget_ms:
        notes.append(f"Device latency budget: {budget_ms} ms, to be checked with the device's own measurement "
                     f"(device/README.md), not this host's.")
    return "\n".join(lines + [""] + notes) + "\n"
