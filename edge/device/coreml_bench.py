"""Latency and memory of one Core ML artefact (.mlpackage) on a Mac, through coremltools' MLModel.predict.

    python3 coreml_bench.py MODEL.mlpackage [--runs 50] [--warmup 5] [--compute-units all|cpu|cpu_gpu|cpu_ne]
                            [--json OUT.json]

macOS only: Core ML executes models only on Apple systems, so elsewhere this exits with status 2.
On Linux, check a .mlpackage's accuracy with `python -m edge.run MODEL.mlpackage --inputs images.npy
--out outputs.npz` (densekit's reference executor; its speed says nothing about Core ML). Needs Python
>= 3.7 and `pip install coremltools numpy`; imports nothing from densekit.

Timing builds one random input of the model's declared shape ("image", (1, 3, H, W) float32 RGB in
[0, 1]) and times `model.predict({...})` with `time.perf_counter` after `--warmup` untimed calls. The
first predictions compile the model for the chosen compute units, which is why warm-up matters more
here than on TFLite. Memory: `baseline_rss` is the process's peak resident set before the model loads
(macOS has no /proc), `peak_rss` the peak after the timed runs, `model_rss` their difference. Compute
units: all = CPU + GPU + Neural Engine (Core ML picks), cpu = CPU only, cpu_gpu, cpu_ne = CPU + Neural
Engine. The JSON follows "densekit.bench/1" (README.md next to this file).

Timing on iOS: Python does not run there. Open the .mlpackage in Xcode (14 or newer), go to the
Performance tab and create a report on a connected iPhone or iPad: it gives median prediction latency,
load and compile times per compute unit, and which layers run on the Neural Engine. For numbers from
the app's own code path, time `try model.prediction(from: input)` in a Swift loop with
`CFAbsoluteTimeGetCurrent()` after a few warm-up calls, with `MLModelConfiguration().computeUnits`
set as here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

SCRIPT = "coreml_bench.py"
SCHEMA = "densekit.bench/1"
# Core ML specification version -> (deployment target, the oldest macOS that loads it)
REQUIRED_MACOS = {6: ("iOS15", (12,)), 7: ("iOS16", (13,)), 8: ("iOS17", (14,)), 9: ("iOS18", (15,))}
COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "cpu_gpu": "CPU_AND_GPU", "cpu_ne": "CPU_AND_NE"}
NOT_MACOS = ("coreml_bench.py runs only on macOS: Core ML predicts only on Apple systems, and this is {system}; "
             "copy {model} and this script to a Mac and run `python3 coreml_bench.py {model}` there "
             "(pip install coremltools numpy).\n"
             "On Linux, check the artefact's accuracy with `python -m edge.run {model} --inputs images.npy --out "
             "outputs.npz`, which runs densekit's "
             "reference executor (accuracy only: its speed says nothing about Core ML).")


def fail(message: str):
    """The script's one error line, exit status 2 (bad input or a model this Mac cannot run)."""
    sys.stderr.write("error: coreml_bench.py: {}\n".format(message))
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """densekit's convention on a device too: a bad flag is one `error:` line and exit 2 (argparse
    prints its usage first)."""

    def error(self, message):
        sys.stderr.write("error: {}: {} (see {} --help)\n".format(SCRIPT, message, SCRIPT))
        raise SystemExit(2)


def load_coremltools():
    """Import coremltools with TensorFlow hidden (coremltools imports it when installed, which is slow
    and, next to torch, crashes); exits 2 with the pip command when coremltools is missing."""
    sys.modules.setdefault("tensorflow", None)
    try:
        import coremltools
    except ImportError as error:
        fail("coremltools is not installed ({}); run `pip install coremltools numpy` and try again".format(error))
    return coremltools


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is bytes on macOS, KiB on Linux)."""
    import resource   # here: Windows has none, and the script must reach its one-line refusal there

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def cpu_name() -> str:
    """The chip's name on macOS ("Apple M2"), else platform.processor()."""
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, universal_newlines=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def device_info() -> dict:
    """The "device" block of the schema for this Mac."""
    return {"name": platform.node(), "system": platform.system(),
            "machine": platform.machine(), "processor": cpu_name() or platform.processor(),
            "cores": os.cpu_count() or 1}


def input_spec(model) -> tuple:
    """(name, shape) of the model's first input, which must be a multi-array (densekit's "image")."""
    described = model.get_spec().description.input[0]
    if described.type.WhichOneof("Type") != "multiArrayType":
        fail("input '{}' is a {}, not a multi-array; this script feeds densekit artefacts' (1, 3, H, W) float32 "
             "'image'.".format(described.name, described.type.WhichOneof("Type")))
    return described.name, [int(n) for n in described.type.multiArrayType.shape]


def macos_version() -> tuple:
    """This Mac's version, e.g. (15, 1)."""
    return tuple(int(part) for part in platform.mac_ver()[0].split(".") if part.isdigit())


def load_model(ct, path: str, units: str):
    """The MLModel on `units`, or exit 2 saying why it cannot run here: a package coremltools cannot
    read (a copy cut short), or one for a newer macOS (iOS18 packages need macOS 15), which
    coremltools would load only to fail at the first prediction."""
    try:
        version = ct.utils.load_spec(path).specificationVersion
    except Exception as error:   # coremltools raises several kinds for a damaged package
        fail("cannot read {} as a Core ML model ({}: {}); copy the whole package again from the export".format(
            path, type(error).__name__, error))
    target, needs = REQUIRED_MACOS.get(version, ("specification {}".format(version), ()))
    if macos_version() < needs:
        older = ", or export a precision for iOS16 (fp16, w8, palette4, palette6)" if target == "iOS18" else ""
        fail("{} is an {} package; Core ML loads it from macOS {} on, and this is macOS {}: time it on a newer "
             "Mac{}".format(os.path.basename(os.path.normpath(path)), target, ".".join(map(str, needs)),
                            platform.mac_ver()[0], older))
    return ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, units))


def time_calls(call, runs: int, warmup: int) -> list:
    """`warmup` untimed then `runs` timed calls of `call()`; milliseconds."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_summary(times_ms: list) -> dict:
    """mean, std (population), min, p50, p90, p99, max of the latencies, in ms."""
    import numpy as np

    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {"mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(t.max())}


def bench(args) -> dict:
    """Load the model on the chosen compute units, time predict, return the densekit.bench/1 record."""
    import numpy as np

    ct = load_coremltools()
    baseline = peak_rss_mb()
    units = COMPUTE_UNITS[args.compute_units]
    model = load_model(ct, args.model, units)
    name, shape = input_spec(model)
    feed = {name: np.random.RandomState(0).random_sample(shape).astype(np.float32)}   # numpy < 1.17 too
    try:   # Core ML's own refusal (coremltools only warns when it loads) surfaces at the first call
        model.predict(feed)
    except Exception as error:
        fail("Core ML cannot run {} on compute units {} ({}: {})".format(args.model, units, type(error).__name__, error))
    say_if_unchecked(args)   # the run goes ahead
    times = time_calls(lambda: model.predict(feed), args.runs, args.warmup)
    peak = peak_rss_mb()
    latency = latency_summary(times)
    return {"schema": SCHEMA, "artefact": os.path.basename(os.path.normpath(args.model)), "format": "coreml",
            "runtime": "coremltools " + ct.__version__, "executor": "MLModel.predict (compute units {})".format(units),
            "device": device_info(), "threads": None, "runs": args.runs, "warmup": args.warmup, "input_shape": shape,
            "latency_ms": latency, "throughput_ips": 1e3 / latency["mean"],
            "memory_mb": {"peak_rss": peak, "baseline_rss": baseline, "model_rss": max(peak - baseline, 0.0)},
            "source": "coreml_bench.py", "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def print_summary(result: dict) -> None:
    """A few human lines: what ran, where, how fast, how much memory."""
    lat, mem, dev = result["latency_ms"], result["memory_mb"], result["device"]
    print("{}  on {} ({}, {})".format(result["artefact"], dev["name"], dev["system"], dev["processor"]))
    print("  {}, {}; {} runs after {} warm-up, input {}".format(result["runtime"], result["executor"], result["runs"],
                                                              result["warmup"], result["input_shape"]))
    print("  latency ms: mean {mean:.2f} std {std:.2f} | min {min:.2f} p50 {p50:.2f} p90 {p90:.2f} "
          "p99 {p99:.2f} max {max:.2f}".format(**lat))
    print("  throughput {:.1f} images/s; peak RSS {:.1f} MB (model +{:.1f} MB)".format(
        result["throughput_ips"], mem["peak_rss"], mem["model_rss"]))


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
    if now != recorded[listed] and not (os.path.isdir(path) and tree_sha256_v1(path) == recorded[listed]):
        return ("{} differs from the sha256 recorded in {} ({}, now {}): it changed after export (a copy cut "
                "short?); copy it again".format(name, manifest, recorded[listed][:12], now[:12]))
    return None


def sha256_of(path: str) -> str:
    """A file's plain sha256, or a directory's (an .mlpackage) as densekit's core/io.py records it:
    its files sorted by their relative path's parts, each as that path and its contents, both
    preceded by their length in 8 bytes."""
    if os.path.isfile(path):
        return _digest_file(path, hashlib.sha256()).hexdigest()
    digest = hashlib.sha256(b"densekit tree sha256 v2\0")
    for parts in _tree_files(path):
        name = os.fsencode("/".join(parts))
        full = os.path.join(path, *parts)
        digest.update(len(name).to_bytes(8, "little") + name + os.path.getsize(full).to_bytes(8, "little"))
        _digest_file(full, digest)
    return digest.hexdigest()


def tree_sha256_v1(path: str) -> str:
    """A directory's digest as exports recorded it until 2026-12-04 (each file's relative path, a
    NUL, its contents): a package of such an export still matches its manifest."""
    digest = hashlib.sha256()
    for parts in _tree_files(path):
        digest.update(os.path.join(*parts).encode() + b"\0")
        _digest_file(os.path.join(path, *parts), digest)
    return digest.hexdigest()


def _tree_files(path: str) -> list:
    """Every file under `path` as its relative path's parts, in core/io.py's order."""
    return sorted((os.path.relpath(os.path.join(top, f), path).split(os.sep)
                   for top, _, names in os.walk(path) for f in names), key=tuple)


def _digest_file(path: str, digest):
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def parse_args(argv=None):
    parser = Parser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .mlpackage (or .mlmodel) artefact")
    parser.add_argument("--runs", type=int, default=50, help="timed predictions (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed predictions first (default 5)")
    parser.add_argument("--compute-units", choices=list(COMPUTE_UNITS), default="all",
                        help="all (default), cpu, cpu_gpu, cpu_ne")
    parser.add_argument("--json", help="write the densekit.bench/1 record here")
    parser.add_argument("--no-verify", action="store_true",
                        help="time the model even if it differs from the manifest.json beside it")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    if not os.path.exists(args.model):   # on any system: the advice below names the file
        parser.error("model not found: {}".format(args.model))
    if not args.model.rstrip("/").lower().endswith((".mlpackage", ".mlmodel")):
        parser.error("{} is not a Core ML model (.mlpackage or .mlmodel); TFLite files: linux_bench.py or "
                     "android_bench.py".format(args.model))
    problem = None if args.no_verify else manifest_problem(args.model)
    if problem:
        parser.error(problem + "; or pass --no-verify to time it anyway")
    if args.json:   # checked before the model compiles and runs, so a bad place never costs the measurement
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error("--json {}: not a file in a writable folder".format(args.json))
    return args


def say_if_unchecked(args) -> None:
    """A file copied without the export's manifest is timed unchecked: say so, once the run goes ahead."""
    if not args.no_verify and not os.path.isfile(manifest_beside(args.model)):
        print("note: no {} beside {}, so its sha256 is not checked (a copy cut short would be timed); copy the "
              "export's {} beside it".format(MANIFEST, args.model, MANIFEST), file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if sys.platform != "darwin":
        sys.stderr.write("error: " + NOT_MACOS.format(system=platform.system() or sys.platform, model=args.model)
                         + "\n")
        return 2
    result = bench(args)
    print_summary(result)
    if args.json:
        write_json(args.json, result)
        print("  JSON -> {}".format(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
