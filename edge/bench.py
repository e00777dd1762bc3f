"""Latency and memory of one artefact on this host: `python -m edge.bench`.

    python -m edge.bench ARTEFACT [--threads N] [--runs K] [--warmup W] [--json OUT.json]
                         [--executor auto|predict]
    python -m edge.bench A.tflite B.tflite ...      # side by side: interleaved runs, speed-up vs A

Feeds one seeded random image of the artefact's shape, runs `warmup` untimed inferences, then
times each of `runs` inferences with time.perf_counter around the runner's invoke closure (for
LiteRT that is `invoke()` alone, as TFLite's benchmark_model times it; input copies are outside).
Writes JSON in the schema "densekit.bench/1", which the on-device scripts in edge/device/ write
too, so host and device figures sit side by side:

    {"schema", "artefact" (file name), "format", "runtime", "executor",
     "device": {"name": "host", "system", "machine", "processor", "cores", "simd", "int8_dot"}
                (edge/host.py: the CPU's SIMD and int8 dot-product instruction sets),
     "threads" (null = runtime default), "runs", "warmup", "input_shape",
     "latency_ms": {"mean", "std", "min", "p50", "p90", "p99", "max"}  (numpy, linear percentiles),
     "throughput_ips": runs / total timed seconds,
     "memory_mb": {"peak_rss", "baseline_rss", "model_rss"}  (MiB = 2**20 bytes),
     "source": "edge.bench", "created": UTC ISO 8601}

Memory: peak_rss is the process's peak resident set (VmHWM on Linux, ru_maxrss on macOS),
baseline_rss the resident set with the runtime imported, just before the model loads, model_rss their
difference (the model, its buffers and what the runtime allocates for them), as edge/device/linux_bench.py
measures it on a board: the two records compare. Peaks are per process, so run one artefact per process (quant/benchmark.py does).

With several artefacts, `compare` loads them all in one process and interleaves their runs in
turns (A x 20, B x 20, A x 20, ...), so that a noisy machine slows each of them alike: the ratios
are what to read (JSON schema "densekit.bench-compare/1", with "turn" and "settle"; no memory
figures, the process is shared). Each turn starts after a 50 ms pause and 2 untimed calls: a
runtime's worker threads keep spinning for a while after a call, and onnxruntime's then take the
cores from the next artefact. Alternating single calls (A, B, A, B) timed an ONNX fp32 file at
7.1 ms p50 against 2.1 ms alone and put its int8 twin at 3.0x instead of the 1.3-1.5x it runs at
alone and in turns (v3, 2 threads, 2026-12-03). A turn also runs each model warm in the caches,
as an app does.

The speed-up is also read round by round ("speedup_by_turn": over the rounds in which each
artefact takes one turn, p10, p50 and p90 of the first artefact's median time in the round over
this one's): a round lasts a fraction of a second, so each ratio sees one load of the host, and
the spread says how much the load moved it. On a shared 2-core host (v3 fp32 against int8, 2
threads, six runs of 1,000, 2026-12-07) the whole-run p50 ratio read 1.25-1.75x, the per-round
median 1.60-1.84x and its p10-p90 1.16-2.19x: read a speed-up with its spread, and rerun when the
spread is wide.

Core ML latency means something only under Core ML on Apple hardware: off macOS this refuses
(exit 2); measure it with edge/device/coreml_bench.py on a Mac.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.cli import ArgumentParser, at_least, command, threads_option
from core.formats import FORMATS
from core.io import check_output_file, home_path
from core.manifest import files_read, verify_artefact, verify_command_arguments
from edge.device.linux_bench import latency_summary, peak_rss_mb  # device and host measure alike
from edge.host import describe_cpu, device_cpu, host_device
from edge.run import write_json
from edge.runners import EXECUTORS, artefact_format, image_shape, open_runner, runner_class, threads_text

SCHEMA = "densekit.bench/1"
MIB = 2 ** 20
TURN = 20        # timed runs of one artefact before the next one's turn (compare)
SETTLE = 2       # untimed calls that start each turn, after a pause in which the previous
PAUSE_S = 0.05   # runtime's spinning threads give up the cores


class BenchRefused(ValueError):
    """A bench that would measure nothing meaningful, or bad arguments (exit status 2)."""


def current_rss_mb() -> float:
    """Resident set size of this process now, MiB (psutil, else /proc/self/statm on Linux, else the
    peak so far: a Mac without psutil has neither)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss / MIB
    except ImportError:
        statm = Path("/proc/self/statm")
        if not statm.is_file():
            return peak_rss_mb()
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def check_bench(path: str | Path, runs: int, warmup: int, executor: str, verify: bool = True) -> str:
    """The artefact's format after checking the arguments (and the file against its export's
    manifest, with `verify`); BenchRefused names what is wrong."""
    if runs < 1 or warmup < 0:
        raise BenchRefused(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0")
    try:
        fmt = FORMATS[artefact_format(path, executor)]
        if verify:
            verify_artefact(path)
    except ValueError as exc:
        raise BenchRefused(str(exc)) from exc
    if not fmt.timed_here() or executor == "reference":
        raise BenchRefused(f"not benchmarking {Path(path).name} here: "
                           + fmt.untimed.format(name=Path(path).name, runs=runs))
    if len(fmt.executors) > 1:   # Core ML on a Mac: "auto" falls back to the reference executor where
        refuse_reference_fallback(Path(path), executor)   # the macOS is older than the package needs
    return fmt.name


def refuse_reference_fallback(path: Path, executor: str) -> None:
    """BenchRefused where `executor` would run the MIL reference executor instead of Core ML: its
    time says nothing of the device's."""
    from edge.coreml import resolve_executor

    try:
        kind, why = resolve_executor(executor, path)
    except RuntimeError as exc:
        raise BenchRefused(str(exc)) from exc
    if kind == "reference":
        raise BenchRefused(f"not benchmarking {path.name} here: {why}, and the MIL reference executor's time "
                           f"is not Core ML's; time it on a Mac with that macOS (edge/device/coreml_bench.py)")


def threads_applied(runner, threads: int | None) -> int | None:
    """The thread count the runtime was given: MLModel.predict takes none (Core ML schedules its own)."""
    return None if getattr(runner, "kind", "") == "predict" else threads


def time_runs(fn, runs: int, warmup: int) -> list[float]:
    """Seconds of each of `runs` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_artefact(path: str | Path, *, threads: int | None = None, runs: int = 50, warmup: int = 5,
                   executor: str = "auto", verify: bool = True) -> dict:
    """Time `runs` single-image inferences of artefact `path`; returns the densekit.bench/1 dict.

    threads: the runtime's thread count (None: its default). Raises BenchRefused for bad
    arguments and for Core ML off macOS.
    """
    path = home_path(path)   # "~" from Python too, as the flags take it
    fmt = check_bench(path, runs, warmup, executor, verify)
    runner_class(path, executor).import_runtime()   # the baseline holds the runtime, as on the device
    baseline = current_rss_mb()
    runner = open_runner(path, threads=threads, executor=executor, verify=False)   # check_bench checked it
    image = np.random.default_rng(0).random((1, *image_shape(runner)), dtype=np.float32)
    seconds = time_runs(runner.invoke_fn(image), runs, warmup)
    peak = peak_rss_mb()
    return {
        "schema": SCHEMA, "artefact": Path(path).name, "format": fmt,
        "runtime": runner.runtime, "executor": runner.executor, "device": host_device(),
        "threads": threads_applied(runner, threads), "runs": runs, "warmup": warmup,
        "input_shape": [int(s) for s in runner.input_shape],
        "latency_ms": latency_summary([1e3 * t for t in seconds]),
        "throughput_ips": runs / sum(seconds),
        "memory_mb": {"peak_rss": peak, "baseline_rss": baseline, "model_rss": peak - baseline},
        "source": "edge.bench", "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def interleave_turns(calls: list, runs: int, turn: int = TURN, settle: int = SETTLE,
                     pause_s: float = PAUSE_S) -> list[list[float]]:
    """Seconds of `runs` timed calls of each of `calls`, taken in turns of `turn` calls (the last
    turn shorter), each turn after a pause of `pause_s` and `settle` untimed calls (why: the module doc)."""
    seconds: list[list[float]] = [[] for _ in calls]
    while len(seconds[0]) < runs:
        count = min(turn, runs - len(seconds[0]))
        for i, call in enumerate(calls):
            time.sleep(pause_s)
            seconds[i] += time_runs(call, count, settle)
    return seconds


def turn_speedups(first: list[float], other: list[float], turn: int) -> dict:
    """p10, p50, p90 over the rounds of `first`'s median time / `other`'s in the same round (a round:
    the `turn` consecutive calls each made in it, the last one maybe fewer), and the round count."""
    rounds = [float(np.median(first[i:i + turn]) / np.median(other[i:i + turn])) for i in range(0, len(first), turn)]
    p10, p50, p90 = np.percentile(rounds, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "turns": len(rounds)}


def bench_side_by_side(paths: list[str | Path], *, threads: int | None = None, runs: int = 50, warmup: int = 5,
                       executor: str = "auto", verify: bool = True) -> dict:
    """Interleaved runs of several artefacts in one process; speed-up of each against the first.
    Each entry records its format and input shape: artefacts of other sizes are timed as asked, and
    the printed table says so."""
    paths = [home_path(path) for path in paths]
    formats = [check_bench(path, runs, warmup, executor, verify) for path in paths]
    runners = [open_runner(path, threads=threads, executor=executor, verify=False) for path in paths]   # checked above
    calls = [r.invoke_fn(np.random.default_rng(0).random((1, *image_shape(r)), dtype=np.float32)) for r in runners]
    for call in calls:
        time_runs(call, 0, warmup)
    seconds = interleave_turns(calls, runs)
    stats = [latency_summary([1e3 * t for t in s]) for s in seconds]
    return {"schema": "densekit.bench-compare/1", "device": host_device(), "threads": threads, "runs": runs,
            "warmup": warmup, "turn": min(TURN, runs), "settle": SETTLE, "source": "edge.bench",
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "artefacts": [{"artefact": Path(p).name, "format": f, "executor": r.executor,
                           "threads": threads_applied(r, threads), "input_shape": [int(d) for d in r.input_shape],
                           "image_shape": list(image_shape(r)),   # (3, H, W) whatever the layout
                           "latency_ms": st, "speedup_vs_first": stats[0]["p50"] / st["p50"],
                           "speedup_by_turn": turn_speedups(seconds[0], s, TURN)}
                          for p, f, r, st, s in zip(paths, formats, runners, stats, seconds)]}


def compare_summary(result: dict) -> str:
    rows = [f"{'artefact':<44} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8} {'speed-up':>9}  {'by turn p50 (p10-p90)':>22}"]
    for a in result["artefacts"]:
        lat, turns = a["latency_ms"], a["speedup_by_turn"]
        rows.append(f"{a['artefact']:<44} {lat['p50']:>8.2f} {lat['p90']:>8.2f} {lat['min']:>8.2f} "
                    f"{a['speedup_vs_first']:>8.2f}x  {turns['p50']:>9.2f}x ({turns['p10']:.2f}-{turns['p90']:.2f})")
    sizes = {tuple(a["image_shape"][1:]) for a in result["artefacts"]}
    formats = {a["format"] for a in result["artefacts"]}
    notes = ([f"note: the input images differ in size ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}): the "
              f"speed-up includes the difference in pixels"] if len(sizes) > 1 else [])
    notes += ([f"note: the runtimes differ ({', '.join(sorted(formats))}): each times its own call (LiteRT "
               f"invoke(), ONNX Runtime run() with its output copies, Core ML predict() with its dicts)"]
              if len(formats) > 1 else [])
    return (f"{result['runs']} runs each, interleaved in turns of {result['turn']}, after {result['warmup']} warm-up, "
            f"{threads_text(result['threads'])}, p50 speed-up against the first, and turn by turn over "
            f"{result['artefacts'][0]['speedup_by_turn']['turns']} rounds\n"
            f"cpu: {describe_cpu(device_cpu(result['device']))}\n" + "\n".join(rows + notes))


def summary(result: dict) -> str:
    lat, mem = result["latency_ms"], result["memory_mb"]
    return (f"{result['artefact']} on {result['executor']}, input {tuple(result['input_shape'])}, "
            f"{result['runs']} runs after {result['warmup']} warmup\n"
            f"  latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
            f"mean {lat['mean']:.2f} +- {lat['std']:.2f}  min {lat['min']:.2f}  max {lat['max']:.2f}\n"
            f"  throughput {result['throughput_ips']:.1f} img/s; memory MiB: peak RSS {mem['peak_rss']:.0f}, "
            f"model {mem['model_rss']:.0f} over a baseline of {mem['baseline_rss']:.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m edge.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("artefact", nargs="+", help=".tflite or .onnx (.mlpackage on macOS); several = side by side")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    parser.add_argument("--runs", type=int, default=50, help="timed inferences (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed inferences first (default 5)")
    parser.add_argument("--json", default=None, help="write the result's JSON here (densekit.bench/1; "
                        "densekit.bench-compare/1 for several artefacts)")
    parser.add_argument("--executor", default="auto", choices=[e for e in EXECUTORS if e != "reference"],
                        help="Core ML only (on macOS); the MIL reference executor is not timed: use edge.run for it")
    parser.add_argument("--no-verify", action="store_true",
                        help="bench an artefact even if it differs from its export's manifest.json")
    return parser.parse_intermixed_args(argv)


@command("python -m edge.bench")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    threads_option("--threads", args.threads)
    at_least("--runs", args.runs, 1)   # in the flags' words, as the other edge commands say it
    at_least("--warmup", args.warmup, 0)
    if args.json:
        check_output_file(args.json, "--json", reads=files_read(args.artefact))
    if not args.no_verify:
        verify_command_arguments(args.artefact)
    if len(args.artefact) > 1:
        result = bench_side_by_side(args.artefact, threads=args.threads, runs=args.runs, warmup=args.warmup,
                                    executor=args.executor, verify=False)
    else:
        result = bench_artefact(args.artefact[0], threads=args.threads, runs=args.runs, warmup=args.warmup,
                                executor=args.executor, verify=False)
    print(compare_summary(result) if len(args.artefact) > 1 else summary(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
