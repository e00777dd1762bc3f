"""Latency and memory of one TFLite artefact on an Android phone, measured by TFLite's `benchmark_model`.

Runs on the host (Python >= 3.7, standard library only) and drives the phone over adb:

    python3 android_bench.py MODEL.tflite --benchmark-binary PATH/benchmark_model [--serial S] [--threads 4]
                             [--runs 50] [--warmup 5] [--delegate xnnpack|gpu|nnapi|none] [--json OUT.json]
                             [--dry-run]

It pushes the model and the binary to /data/local/tmp, makes the binary executable, runs it with
--graph, --num_threads, --num_runs, --warmup_runs, the delegate's flag and
--report_peak_memory_footprint=true, parses what it prints (`parse_benchmark_model`) and writes the
"densekit.bench/1" record (README.md next to this file). `--dry-run` prints the adb commands only.

Get `benchmark_model` for the phone's ABI (usually arm64-v8a) from TFLite's prebuilt nightly
binaries or build it (`bazel build -c opt --config=android_arm64
//tensorflow/lite/tools/benchmark:benchmark_model`). Flags and output follow
tensorflow/lite/tools/benchmark/benchmark_model.cc and tensorflow/lite/tools/delegates/*_provider.cc.

What the tool reports, and so what the JSON holds: latency from the timed runs' stat line
(`count=... first=... curr=... min=... max=... avg=... std=...`, microseconds; newer builds append
`p5=... median=... p95=...`, giving p50; p90/p99 are never printed and stay null). `runs` and
`warmup` are the counts the tool actually ran (it keeps running until --min_secs, 1 s by default,
so `runs` can exceed --runs). `peak_rss` is "Overall peak memory footprint (MB) via periodic
monitoring", `model_rss` the "Memory footprint delta from the start of the tool (MB)" overall value;
the tool prints no baseline, so `baseline_rss` is null.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

SCRIPT = "android_bench.py"
SCHEMA = "densekit.bench/1"
DEVICE_DIR = "/data/local/tmp"
# --use_xnnpack=false is how benchmark_model turns off the XNNPACK delegate it otherwise applies by default.
DELEGATE_FLAGS = {"xnnpack": "--use_xnnpack=true", "gpu": "--use_gpu=true", "nnapi": "--use_nnapi=true",
                  "none": "--use_xnnpack=false"}
ADB_HELP = ("adb not found on PATH. Install Android platform-tools (https://developer.android.com/tools/releases/"
            "platform-tools, or `sudo apt install adb`, or `brew install android-platform-tools`), put `adb` on "
            "PATH, then connect the phone by USB with USB debugging on (Settings > Developer options).")

STAT_LINE = re.compile(r"^\s*(?:INFO:\s*)?count=\d+")
KEY_VALUE = re.compile(r"(\w+)=([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))")
TIMINGS = re.compile(r"Inference timings in us: Init: ([^,]+), First inference: ([^,]+), "
                     r"Warmup \(avg\): ([^,]+), Inference \(avg\): (\S+)")
PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: (\S+)")
DELTA = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
                   r"init=(\S+) overall=(\S+)")
UNCONSUMED = re.compile(r"Unconsumed cmdline flags: (.*)")


class BenchError(Exception):
    """A failure the user can fix; main() prints it and exits with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def parse_stat_line(line: str) -> dict:
    """One `count=... first=... curr=... min=... max=... avg=... std=...` line -> floats (microseconds).

    A line whose values were all equal reads `count=N curr=X(all same)`: min = max = avg = X, std = 0."""
    values = {key: float(value) for key, value in KEY_VALUE.findall(line)}
    if "avg" not in values and "curr" in values:
        for key in ("min", "max", "avg", "first"):
            values.setdefault(key, values["curr"])
        values.setdefault("std", 0.0)
    return values


def parse_benchmark_model(text: str) -> dict:
    """What `benchmark_model` printed -> {"runs", "warmup", "latency_ms", "memory_mb", "init_ms", "first_ms",
    "warmup_avg_ms", "unconsumed_flags"}.

    Latency comes from the timed runs' stat line (the last `count=` line before "Inference timings in us",
    the first one being the warm-up's), converted from microseconds to ms; the "Inference (avg)" value
    stands in for the mean when no stat line was printed. Raises ValueError when the text holds no
    "Inference timings in us" line, i.e. the benchmark did not finish."""
    lines = [line.strip() for line in text.replace("\r", "").splitlines()]
    timings = TIMINGS.search("\n".join(lines))
    if timings is None:
        tail = "\n".join(line for line in lines[-15:] if line)
        raise ValueError("benchmark_model did not report 'Inference timings in us' (it failed or was cut "
                         "short); its last lines:\n" + tail)
    init_us, first_us, warmup_avg_us, avg_us = (float(g) for g in timings.groups())
    stats = [parse_stat_line(line) for line in lines if STAT_LINE.match(line)]
    timed = stats[-1] if stats else {}
    warm = stats[0] if len(stats) > 1 else {}
    return {"runs": int(timed["count"]) if "count" in timed else None,
            "warmup": int(warm["count"]) if "count" in warm else None,
            "latency_ms": latency_ms(timed, avg_us), "memory_mb": parse_memory(text),
            "init_ms": init_us / 1e3, "first_ms": first_us / 1e3, "warmup_avg_ms": warmup_avg_us / 1e3,
            "unconsumed_flags": first_group(UNCONSUMED, text)}


def latency_ms(stat: dict, avg_us: float) -> dict:
    """The timed runs' stat (microseconds) -> the schema's latency_ms. p50 is the `median=` of builds that print
    percentiles; p90/p99 are never printed (None); `avg_us` ("Inference (avg)") is the mean without a stat line."""
    ms = {key: value / 1e3 for key, value in stat.items() if key != "count"}
    return {"mean": ms.get("avg", avg_us / 1e3), "std": ms.get("std"), "min": ms.get("min"), "p50": ms.get("median"),
            "p90": None, "p99": None, "max": ms.get("max")}


def parse_memory(text: str) -> dict:
    """The footprint lines -> {"peak_rss", "baseline_rss" (never printed: None), "model_rss"} in MB."""
    delta = DELTA.search(text)
    peak = first_group(PEAK, text)
    return {"peak_rss": float(peak) if peak else None, "baseline_rss": None,
            "model_rss": float(delta.group(2)) if delta else None}


def first_group(pattern, text: str):
    """The first capture group of the first match, stripped, or None."""
    match = pattern.search(text)
    return match.group(1).strip() if match else None


def tflite_input_shape(path: str):
    """The first input's shape read from the .tflite flatbuffer (Model.subgraphs[0] -> inputs[0] -> tensor
    shape), with the standard library only; None when the file does not parse as a TFLite model."""
    import struct

    with open(path, "rb") as handle:
        data = handle.read()
    u32 = lambda pos: struct.unpack_from("<I", data, pos)[0]  # noqa: E731

    def field(table: int, index: int):
        vtable = table - struct.unpack_from("<i", data, table)[0]
        if 4 + 2 * index >= struct.unpack_from("<H", data, vtable)[0]:
            return None
        offset = struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0]
        return table + offset if offset else None

    def vector(table: int, index: int):  # (start of elements, length)
        pos = field(table, index)
        if pos is None:
            return None, 0
        start = pos + u32(pos)
        return start + 4, u32(start)

    try:
        if data[4:8] != b"TFL3":
            return None
        model = u32(0)
        subgraphs, _ = vector(model, 2)
        subgraph = subgraphs + u32(subgraphs)
        inputs, _ = vector(subgraph, 1)
        tensors, _ = vector(subgraph, 0)
        slot = tensors + 4 * struct.unpack_from("<i", data, inputs)[0]
        shape, rank = vector(slot + u32(slot), 0)
        return list(struct.unpack_from("<{}i".format(rank), data, shape))
    except (struct.error, TypeError):
        return None


def adb_prefix(adb: str, serial) -> list:
    return [adb] + (["-s", serial] if serial else [])


def benchmark_commands(args, adb: str = "adb") -> list:
    """The adb command lines, in order: push model, push binary, chmod, run benchmark_model."""
    base = adb_prefix(adb, args.serial)
    model = DEVICE_DIR + "/" + os.path.basename(args.model)
    binary = DEVICE_DIR + "/" + os.path.basename(args.benchmark_binary)
    run = [binary, "--graph=" + model, "--num_threads={}".format(args.threads), "--num_runs={}".format(args.runs),
           "--warmup_runs={}".format(args.warmup), DELEGATE_FLAGS[args.delegate],
           "--report_peak_memory_footprint=true"]
    return [base + ["push", args.model, model], base + ["push", args.benchmark_binary, binary],
            base + ["shell", "chmod +x " + shlex.quote(binary)],
            base + ["shell", " ".join(shlex.quote(part) for part in run)]]


def info_commands(adb: str, serial) -> dict:
    """The adb queries filling the schema's "device" block."""
    base = adb_prefix(adb, serial) + ["shell"]
    return {"name": base + ["getprop ro.product.model"], "abi": base + ["getprop ro.product.cpu.abi"],
            "soc": base + ["getprop ro.soc.model"], "board": base + ["getprop ro.board.platform"],
            "cores": base + ["nproc"]}


def run(command: list, timeout: float = 600) -> str:
    """Run one adb command; its stdout+stderr, or BenchError naming the command and its output (or
    that it hung: a phone unplugged mid-run leaves adb waiting)."""
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                              universal_newlines=True)
    except subprocess.TimeoutExpired:
        raise BenchError("`{}` gave no result in {:.0f} s: is the device still connected (`adb devices`)?".format(
            " ".join(command), timeout))
    except OSError as error:   # adb removed or not executable since find_adb
        raise BenchError("cannot run `{}`: {}".format(" ".join(command), error))
    if proc.returncode != 0:
        raise BenchError("`{}` failed (exit {}):\n{}".format(" ".join(command), proc.returncode, proc.stdout.strip()))
    return proc.stdout


def find_adb() -> str:
    adb = shutil.which("adb")
    if adb is None:
        raise BenchError(ADB_HELP, code=2)
    return adb


def connected_devices(listing: str) -> dict:
    """`adb devices` output -> {serial: state} ("device", "unauthorized", "offline"), skipping the header
    and the "* daemon started" lines."""
    rows = [line.split() for line in listing.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[0] != "*" and row[:2] != ["List", "of"]}


def check_device(adb: str, serial) -> str:
    """The serial to use: the one given if connected, else the only connected device; BenchError otherwise."""
    states = connected_devices(run([adb, "devices"]))
    ready = [s for s, state in states.items() if state == "device"]
    if serial and serial not in ready:
        raise BenchError("device {} is not connected and authorised (adb devices: {}); plug it in, accept the "
                         "USB-debugging prompt, or pick one of those with --serial.".format(serial, states or "none"),
                         code=2)
    if not serial and len(ready) != 1:
        problem = "no Android device is connected" if not ready else "several devices are connected: {}".format(ready)
        raise BenchError(problem + " (adb devices: {}). Connect one phone by USB with USB debugging on and accept its "
                         "prompt, or choose one with --serial.".format(states or "none"), code=2)
    return serial or ready[0]


def device_info(adb: str, serial: str) -> dict:
    """The "device" block, from getprop and nproc on the phone."""
    got = {key: run(command).strip() for key, command in info_commands(adb, serial).items()}
    cores = got["cores"]
    return {"name": got["name"] or serial, "system": "Android", "machine": got["abi"],
            "processor": got["soc"] or got["board"], "cores": int(cores) if cores.isdigit() else None}


def report(args, parsed: dict, device: dict) -> dict:
    """The "densekit.bench/1" record of this run."""
    mean = parsed["latency_ms"]["mean"]
    return {"schema": SCHEMA, "artefact": os.path.basename(args.model), "format": "tflite",
            "runtime": "benchmark_model " + args.runtime_version,
            "executor": "benchmark_model " + DELEGATE_FLAGS[args.delegate], "device": device,
            "threads": args.threads, "runs": parsed["runs"] if parsed["runs"] is not None else args.runs,
            "warmup": parsed["warmup"] if parsed["warmup"] is not None else args.warmup,
            "input_shape": tflite_input_shape(args.model), "latency_ms": parsed["latency_ms"],
            "throughput_ips": 1e3 / mean if mean else None, "memory_mb": parsed["memory_mb"],
            "source": "android_bench.py", "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def show(value, digits: int = 2) -> str:
    return "n/a" if value is None else "{:.{}f}".format(value, digits)


def print_summary(result: dict) -> None:
    """A few human lines: what ran, where, how fast, how much memory."""
    lat, mem, dev = result["latency_ms"], result["memory_mb"], result["device"]
    print("{}  on {} ({}, {}, {} cores)".format(result["artefact"], dev["name"], dev["system"], dev["processor"],
                                                dev["cores"]))
    print("  {}, {} threads; {} runs after {} warm-up".format(result["executor"], result["threads"], result["runs"],
                                                            result["warmup"]))
    print("  latency ms: mean {} std {} | min {} p50 {} max {}".format(*(show(lat[k]) for k in
                                                                        ("mean", "std", "min", "p50", "max"))))
    print("  throughput {} images/s; peak memory {} MB (model +{} MB)".format(
        show(result["throughput_ips"], 1), show(mem["peak_rss"], 1), show(mem["model_rss"], 1)))


def write_json(path: str, result: dict) -> None:
    """Write atomically: a temp file beside `path`, fsync, rename; nothing left behind on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600: a record others can read, as a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


MANIFEST = "manifest.json"   # quant.export writes it beside the artefacts, with each one's sha256


def manifest_beside(path: str) -> str:
    """The manifest.json an export wrote beside its artefact `path` (a file, or an .mlpackage folder)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)


def manifest_problem(path: str):
    """Why `path` differs from the manifest.json of the export beside it, or None when it matches
    (or no manifest is there: a file copied alone). The same check as densekit's core/manifest.py,
    so a copy cut short on its way to the device is not timed."""
    manifest = manifest_beside(path)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as handle:
            recorded = {entry["path"]: entry["sha256"] for entry in json.load(handle)["artefacts"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        return "{} is unreadable ({}: {})".format(manifest, type(error).__name__, error)
    name = os.path.basename(os.path.normpath(path))
    listed = name if name in recorded else next((n for n in recorded if n.casefold() == name.casefold()), None)
    if listed is None:
        return "{} is not listed in {}, so nothing recorded vouches for it".format(name, manifest)
    now = sha256_of(path)
    if now != recorded[listed]:
        return ("{} differs from the sha256 recorded in {} ({}, now {}): it changed after export (a copy cut "
                "short?); copy it again".format(name, manifest, recorded[listed][:12], now[:12]))
    return None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Parser(argparse.ArgumentParser):
    """densekit's convention on a device too: a bad flag is one `error:` line and exit 2 (argparse
    prints its usage first)."""

    def error(self, message):
        sys.stderr.write("error: {}: {} (see {} --help)\n".format(SCRIPT, message, SCRIPT))
        raise SystemExit(2)


def parse_args(argv=None):
    parser = Parser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .tflite artefact (on this host)")
    parser.add_argument("--benchmark-binary", required=True, help="benchmark_model built for the phone's ABI")
    parser.add_argument("--serial", help="adb serial of the phone (needed when several are connected)")
    parser.add_argument("--threads", type=int, default=4, help="--num_threads (default 4)")
    parser.add_argument("--runs", type=int, default=50, help="--num_runs (default 50; the tool may run more)")
    parser.add_argument("--warmup", type=int, default=5, help="--warmup_runs (default 5)")
    parser.add_argument("--delegate", choices=sorted(DELEGATE_FLAGS), default="xnnpack",
                        help="xnnpack (CPU, default), gpu, nnapi, or none (TFLite's own CPU kernels)")
    parser.add_argument("--runtime-version", default="unknown",
                        help="the benchmark_model build, for the JSON's runtime field (the tool does not print it)")
    parser.add_argument("--json", help="write the densekit.bench/1 record here")
    parser.add_argument("--dry-run", action="store_true", help="print the adb commands, run nothing")
    parser.add_argument("--no-verify", action="store_true",
                        help="push the model even if it differs from the manifest.json beside it")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1 and --warmup >= 0")
    if not os.path.isfile(args.model):
        parser.error("model file not found: {}".format(args.model))
    if not args.model.lower().endswith(".tflite"):
        parser.error("{} is not a .tflite file; benchmark_model times TFLite artefacts".format(args.model))
    problem = None if args.no_verify else manifest_problem(args.model)
    if problem:
        parser.error(problem + "; or pass --no-verify to time it anyway")
    if not os.path.isfile(args.benchmark_binary):
        parser.error("--benchmark-binary file not found: {}. Download TFLite's prebuilt benchmark_model for the "
                     "phone's ABI (android_aarch64_benchmark_model for arm64-v8a, from the TFLite performance "
                     "measurement page) or build it with bazel (see this script's docstring), then pass its "
                     "path".format(args.benchmark_binary))
    if args.json:   # checked before the phone runs, so a bad place never costs the measurement
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error("--json {}: not a file in a writable folder".format(args.json))
    return args


def say_if_unchecked(args) -> None:
    """A file copied without the export's manifest is timed unchecked: say so, once the run goes ahead."""
    if not args.no_verify and not os.path.isfile(manifest_beside(args.model)):
        print("note: no {} beside {}, so its sha256 is not checked (a copy cut short would be timed); copy the "
              "export's {} beside it".format(MANIFEST, args.model, MANIFEST), file=sys.stderr)


def bench(args) -> dict:
    """Push, run, parse: the record of one benchmark on the connected phone."""
    adb = find_adb()
    args.serial = check_device(adb, args.serial)
    say_if_unchecked(args)   # the run goes ahead
    commands = benchmark_commands(args, adb)
    for command in commands[:-1]:
        run(command, timeout=300)
    output = run(commands[-1])
    try:
        parsed = parse_benchmark_model(output)
    except ValueError as error:
        raise BenchError(str(error)) from None
    ignored = parsed["unconsumed_flags"]
    if ignored:   # a build without a delegate, or without the memory report: say which
        delegate = DELEGATE_FLAGS[args.delegate].split("=")[0]
        effect = ("the {} delegate was not built in, so it did not run".format(args.delegate)
                  if delegate in ignored else "the figures those flags give (e.g. peak memory) stay null")
        print("warning: this benchmark_model ignored {}: {}".format(ignored, effect), file=sys.stderr)
    return report(args, parsed, device_info(adb, args.serial))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for command in benchmark_commands(args) + list(info_commands("adb", args.serial).values()):
            print(" ".join(shlex.quote(part) for part in command))
        return 0
    try:
        result = bench(args)
    except BenchError as error:
        print("error: android_bench.py: {}".format(error), file=sys.stderr)
        return error.code
    print_summary(result)
    if args.json:
        write_json(args.json, result)
        print("  JSON -> {}".format(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
