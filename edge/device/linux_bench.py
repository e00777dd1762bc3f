"""Latency and memory of one TFLite artefact on a Linux board (Raspberry Pi 5) or any Linux host.

Copy this one file and the .tflite next to each other on the device, then:

    python3 linux_bench.py MODEL.tflite [--threads 4] [--runs 50] [--warmup 5] [--json OUT.json]
                           [--inputs IMAGES.npy --outputs OUT.npz]

Needs Python >= 3.7, numpy and a TFLite interpreter: `ai-edge-litert` (maintained, works with numpy 2)
or, on boards where it has no wheel, `tflite-runtime` (its last release needs numpy < 2). It imports
nothing from densekit, so it runs where densekit is not installed.

Timing sets the input once and times `interpreter.invoke()` alone with `time.perf_counter`, after
`--warmup` untimed calls. Memory: `baseline_rss` is the resident set (from /proc/self/statm) after
the imports and before the model loads, `peak_rss` is the process's peak (VmHWM, else getrusage) after the
timed runs, and `model_rss` is their difference: what loading and running the model added.

With `--inputs` ((N, 3, H, W) float32 RGB in [0, 1], as `np.save` writes it) every image is run
too and `--outputs` receives an npz with `depth` float32 (N, 1, H, W) in metres and `labels` uint8
(N, H, W) (argmax of the segmentation logits), so drift can later be measured on the device's own
outputs. The JSON follows the schema "densekit.bench/1" (see README.md next to this file).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

SCRIPT = "linux_bench.py"
SCHEMA = "densekit.bench/1"
INSTALL_HELP = (
    "no TFLite interpreter could be imported ({reasons}).\n"
    "Install one of them for this Python ({python}):\n"
    "  pip install ai-edge-litert                   # maintained, works with numpy 2 (Linux x86_64 / aarch64)\n"
    "  pip install 'numpy<2' tflite-runtime         # older boards; its last release (2.14) needs numpy < 2\n"
    "then run this script again.")


def fail(message: str):
    """One error line and exit status 2: bad input, refused before anything is timed."""
    sys.stderr.write("error: {}\n".format(message))
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """densekit's convention on a device too: a bad flag is one `error:` line and exit 2 (argparse
    prints its usage first)."""

    def error(self, message):
        sys.stderr.write("error: {}: {} (see {} --help)\n".format(SCRIPT, message, SCRIPT))
        raise SystemExit(2)


def load_interpreter():
    """Return (Interpreter class, "<package> <version>", executor prefix), preferring ai-edge-litert.

    Exits with status 2 and the pip commands when neither package imports."""
    reasons = []
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert " + package_version(ai_edge_litert, "ai-edge-litert"), "LiteRT interpreter"
    except Exception as error:  # ImportError, or a wheel built against another numpy
        reasons.append("ai_edge_litert: {}".format(error))
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
        return (Interpreter, "tflite-runtime " + package_version(tflite_runtime, "tflite-runtime"),
                "tflite_runtime interpreter")
    except Exception as error:
        reasons.append("tflite_runtime: {}".format(error))
    sys.stderr.write("error: linux_bench.py: " + INSTALL_HELP.format(reasons="; ".join(reasons),
                                                             python=platform.python_version()) + "\n")
    raise SystemExit(2)


def package_version(module, dist_name: str) -> str:
    """The module's __version__, else the installed distribution's version, else "unknown"."""
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version  # Python >= 3.8
        return dist_version(dist_name)
    except Exception:
        return "unknown"


def current_rss_mb():
    """Resident set size now, in MB, from /proc/self/statm (Linux); None where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB: VmHWM from /proc/self/status on Linux
    (ru_maxrss there keeps the parent's peak across fork + exec, so a bench started by a large
    process would report the parent's size), else ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


# Instructions that multiply-accumulate 8-bit values in one step (x86: AVX-512 VNNI, AVX-VNNI, AMX;
# Arm: dotprod, i8mm). Without one, int8 kernels widen to 16 bits first and gain less over fp32:
# an AVX2-only host's int8 matrix-product peak was 3.95x its fp32 one, VNNI and AMX hosts' 7.6-10x
# (densekit docs/EXPORT.md). Every record names them beside its latency.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "sve2")


def cpu_info(cpuinfo=None) -> dict:
    """{"model", "simd": [...], "int8_dot": [...] or None}: the CPU's name and the instruction sets
    that decide int8's speed-up, from /proc/cpuinfo (`cpuinfo`: its text, for tests). `int8_dot` is
    None where the flags cannot be read (not Linux), [] where the CPU has none of INT8_DOT_FLAGS."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() and key.strip() not in fields:   # the first processor's entry speaks for all
            fields[key.strip()] = value.strip()
    model = (fields.get("model name") or fields.get("Model") or fields.get("Hardware")   # x86 | Raspberry Pi
             or platform.processor() or platform.machine() or "unknown")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())   # x86 | Arm
    if not flags:
        return {"model": model, "simd": [], "int8_dot": None}
    return {"model": model, "simd": [f for f in SIMD_FLAGS if f in flags],
            "int8_dot": [f for f in INT8_DOT_FLAGS if f in flags]}


def device_info() -> dict:
    """The "device" block of the schema for the machine this runs on."""
    cpu = cpu_info()
    return {"name": platform.node(), "system": platform.system(), "machine": platform.machine(),
            "processor": cpu["model"], "cores": os.cpu_count() or 1, "simd": cpu["simd"], "int8_dot": cpu["int8_dot"]}


def is_nhwc(detail: dict) -> bool:
    """NHWC as onnx2tf writes it, or NCHW (litert-torch's --layout NCHW): the side with 3 channels."""
    return int(detail["shape"][1]) != 3


def image_size(detail: dict) -> list:
    """[H, W] of the model's input, in either layout."""
    shape = [int(s) for s in detail["shape"]]
    return shape[1:3] if is_nhwc(detail) else shape[2:4]


def check_size(shape: tuple, detail: dict) -> None:
    """`shape`: the images' (N, 3, H, W)."""
    if list(shape[2:]) != image_size(detail):
        fail("linux_bench.py: the images have shape {} but the model takes {}x{} images (input {}); "
             "export the images at the model's input size.".format(
                 list(shape), *image_size(detail), [int(s) for s in detail["shape"]]))


def to_input_tensor(images: np.ndarray, detail: dict) -> np.ndarray:
    """(N, 3, H, W) float RGB in [0, 1] -> the model's layout (NHWC or NCHW) and dtype.

    Quantised (int8/uint8) inputs are quantised with the tensor's own scale and zero point."""
    check_size(images.shape, detail)
    if is_nhwc(detail):
        images = images.transpose(0, 2, 3, 1)
    dtype = detail["dtype"]
    if dtype in (np.int8, np.uint8):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        images = np.clip(np.round(images / scale + zero_point), info.min, info.max)
    return np.ascontiguousarray(images, dtype=dtype)


def read_output(interpreter, detail: dict) -> np.ndarray:
    """An output tensor as float32, dequantised when the tensor is int8/uint8."""
    value = interpreter.get_tensor(detail["index"])
    if detail["dtype"] in (np.int8, np.uint8):
        scale, zero_point = detail["quantization"]
        return (value.astype(np.float32) - zero_point) * scale
    return value.astype(np.float32)


def time_invokes(interpreter, runs: int, warmup: int) -> list:
    """`warmup` untimed then `runs` timed `invoke()` calls on the input already set; milliseconds."""
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_summary(times_ms: list) -> dict:
    """mean, std (population), min, p50, p90, p99, max of the latencies, in ms."""
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {"mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(t.max())}


def find_output(details: list, word: str) -> dict:
    """The output whose tensor name contains `word` ("depth" or "seg")."""
    for detail in details:
        if word in detail["name"].lower():
            return detail
    names = [d["name"] for d in details]
    fail("linux_bench.py: no output tensor named like '{}' among {}; --inputs needs the artefact's "
         "'depth' and 'seg' outputs (export it with densekit's quant.export).".format(word, names))


def check_images(images_path: str) -> tuple:
    """The --inputs npy's (N, 3, H, W) shape, after checking it and every image's range one image at a
    time (plain reads of a few hundred KB: the memory measured next holds no pixel of it); refused
    before any timing otherwise."""
    prefix = "linux_bench.py: --inputs {} ".format(images_path)
    try:
        with open(images_path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            if len(shape) != 4 or shape[1] != 3 or dtype.kind != "f" or shape[0] == 0 or fortran_order:
                fix = " (save it with np.save(path, np.ascontiguousarray(images)))" if fortran_order else ""
                fail(prefix + "is {} of shape {}{}; expected one non-empty (N, 3, H, W) float32 .npy of "
                     "RGB in [0, 1]{}.".format(dtype, list(shape), " in Fortran order" if fortran_order else "", fix))
            size = int(np.prod(shape[1:])) * dtype.itemsize
            for _ in range(shape[0]):
                image = np.frombuffer(f.read(size), dtype)
                if image.nbytes != size:
                    fail(prefix + "is truncated: its header promises {} images".format(shape[0]))
                if not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
                    fail(prefix + "holds values outside [0, 1] (or non-finite ones); the artefacts take "
                         "RGB scaled to [0, 1] (divide 8-bit images by 255).")
    except (OSError, ValueError) as e:
        fail(prefix + "cannot be read as a .npy array ({}); save the (N, 3, H, W) images as one array with "
             "numpy.save.".format(e))
    return tuple(shape)


def load_images(images_path: str) -> np.ndarray:
    """The --inputs npy, checked by `check_images`, as float32."""
    return np.load(images_path).astype(np.float32)


def run_images(interpreter, images: np.ndarray) -> dict:
    """Run every (3, H, W) image; {"depth": (N, 1, H, W) float32, "labels": (N, H, W) uint8}."""
    detail_in = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()
    depth_out, seg_out = find_output(outputs, "depth"), find_output(outputs, "seg")

    def nchw(value):   # the outputs follow the input's layout
        return value.transpose(0, 3, 1, 2) if is_nhwc(detail_in) else value

    depths, labels = [], []
    for image in images:
        interpreter.set_tensor(detail_in["index"], to_input_tensor(image[None], detail_in))
        interpreter.invoke()
        depths.append(nchw(read_output(interpreter, depth_out))[0])   # (1, H, W)
        labels.append(nchw(read_output(interpreter, seg_out))[0].argmax(axis=0).astype(np.uint8))   # (C, H, W) -> (H, W)
    return {"depth": np.stack(depths).astype(np.float32), "labels": np.stack(labels)}


def write_atomic(path: str, write) -> None:
    """Write through `write(file)` into a temp file beside `path`, fsync, then rename into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600: files others can read, as a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def report(args, runtime: str, executor: str, input_shape: list, times: list, memory: dict) -> dict:
    """The "densekit.bench/1" record of this run."""
    latency = latency_summary(times)
    return {"schema": SCHEMA, "artefact": os.path.basename(args.model), "format": "tflite",
            "runtime": runtime, "executor": executor, "device": device_info(), "threads": args.threads,
            "runs": args.runs, "warmup": args.warmup, "input_shape": [int(n) for n in input_shape],
            "latency_ms": latency, "throughput_ips": 1e3 / latency["mean"], "memory_mb": memory,
            "source": "linux_bench.py", "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def print_summary(result: dict) -> None:
    """A few human lines: what ran, where, how fast, how much memory."""
    lat, mem = result["latency_ms"], result["memory_mb"]
    dev = result["device"]
    dot = "unknown" if dev["int8_dot"] is None else ", ".join(dev["int8_dot"]) or "none"
    print("{}  on {} ({}, {} cores; {}, int8 dot products: {})".format(
        result["artefact"], dev["name"], dev["machine"], dev["cores"], dev["processor"], dot))
    print("  {}, {}; {} runs after {} warm-up, input {}".format(result["runtime"], result["executor"],
                                                              result["runs"], result["warmup"], result["input_shape"]))
    print("  latency ms: mean {mean:.2f} std {std:.2f} | min {min:.2f} p50 {p50:.2f} p90 {p90:.2f} "
          "p99 {p99:.2f} max {max:.2f}".format(**lat))
    extra = "" if mem["model_rss"] is None else " (model +{:.1f} MB over {:.1f} MB)".format(mem["model_rss"],
                                                                                         mem["baseline_rss"])
    print("  throughput {:.1f} images/s; peak RSS {:.1f} MB{}".format(result["throughput_ips"], mem["peak_rss"], extra))


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


def parse_args(argv=None):
    parser = Parser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .tflite artefact")
    parser.add_argument("--threads", type=int, default=4, help="interpreter threads (default 4)")
    parser.add_argument("--runs", type=int, default=50, help="timed invokes (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed invokes first (default 5)")
    parser.add_argument("--json", help="write the densekit.bench/1 record here")
    parser.add_argument("--inputs", help="(N, 3, H, W) float32 .npy of RGB images in [0, 1] to run too")
    parser.add_argument("--outputs", help="npz for --inputs' outputs: depth (N,1,H,W), labels (N,H,W)")
    parser.add_argument("--no-verify", action="store_true",
                        help="time the model even if it differs from the manifest.json beside it")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1 and --warmup >= 0")
    if bool(args.inputs) != bool(args.outputs):
        parser.error("--inputs and --outputs go together: give both (images in, npz out) or neither")
    if not os.path.isfile(args.model):
        parser.error("model file not found: {}".format(args.model))
    if not args.model.lower().endswith(".tflite"):
        parser.error("{} is not a .tflite file; this script times TFLite artefacts (an ONNX file: python -m "
                     "edge.bench on a host with densekit; Core ML: coreml_bench.py on a Mac)".format(args.model))
    problem = None if args.no_verify else manifest_problem(args.model)
    if problem:
        parser.error(problem + "; or pass --no-verify to time it anyway")
    if args.inputs and not os.path.isfile(args.inputs):
        parser.error("--inputs file not found: {}".format(args.inputs))
    if args.outputs and not args.outputs.lower().endswith(".npz"):   # np.savez writes a zip archive
        parser.error("--outputs {}: the outputs are written as one .npz archive; name it <something>.npz".format(
            args.outputs))
    for flag, path in (("--outputs", args.outputs), ("--json", args.json)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error("{} {}: {} is not a writable folder".format(flag, path, folder))
        if path and os.path.isdir(path):
            parser.error("{} {} is a folder; name a file in it".format(flag, path))
    return args


def say_if_unchecked(args) -> None:
    """A file copied without the export's manifest is timed unchecked: say so, once the run goes ahead."""
    if not args.no_verify and not os.path.isfile(manifest_beside(args.model)):
        print("note: no {} beside {}, so its sha256 is not checked (a copy cut short would be timed); copy the "
              "export's {} beside it".format(MANIFEST, args.model, MANIFEST), file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = check_images(args.inputs) if args.inputs else None   # refused before the timed runs
    Interpreter, runtime, executor = load_interpreter()
    say_if_unchecked(args)
    baseline = current_rss_mb()
    baseline_peak = peak_rss_mb()
    try:
        interpreter = Interpreter(model_path=args.model, num_threads=args.threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:   # not a TFLite flatbuffer, or ops this interpreter lacks
        fail("linux_bench.py: {} cannot be loaded by {} ({}); copy it again from its export, or update the "
             "interpreter".format(args.model, runtime, (str(error).strip().splitlines() or [type(error).__name__])[0]))
    detail = interpreter.get_input_details()[0]
    if shape is not None:
        check_size(shape, detail)   # before the timed runs, which a wrong size would waste
    # RandomState, not default_rng: boards' system numpy can predate 1.17
    image = np.random.RandomState(0).random_sample([1, 3] + image_size(detail)).astype(np.float32)
    interpreter.set_tensor(detail["index"], to_input_tensor(image, detail))
    times = time_invokes(interpreter, args.runs, args.warmup)
    peak = peak_rss_mb()
    base = baseline if baseline is not None else baseline_peak  # no /proc: the peak before loading
    memory = {"peak_rss": peak, "baseline_rss": base, "model_rss": max(peak - base, 0.0)}
    result = report(args, runtime, "{} ({} threads)".format(executor, args.threads), detail["shape"], times, memory)
    print_summary(result)
    if args.json:   # the record first: the images, loaded only now, are not in its memory figures
        write_atomic(args.json, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
        print("  JSON -> {}".format(args.json))
    if shape is not None:
        arrays = run_images(interpreter, load_images(args.inputs))
        write_atomic(args.outputs, lambda f: np.savez(f, **arrays))
        print("  outputs of {} images -> {}".format(len(arrays["depth"]), args.outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
