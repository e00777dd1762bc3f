"""The on-device scripts in edge/device/: run as a user runs them (a copied file, its own process).

linux_bench.py runs the session's tiny TFLite artefacts for real; android_bench.py (no phone here) through its
parser, its --dry-run, its missing-adb error and a stand-in `adb` that answers like a phone; coreml_bench.py
through its off-macOS exit.
No timing thresholds: only that the numbers exist, are ordered and follow the schema.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.device import android_bench

DEVICE_DIR = Path(__file__).resolve().parents[1] / "edge" / "device"
SCHEMA_KEYS = {"schema", "artefact", "format", "runtime", "executor", "device", "threads", "runs", "warmup",
               "input_shape", "latency_ms", "throughput_ips", "memory_mb", "source", "created"}
LATENCY_KEYS = ["min", "p50", "p90", "p99", "max"]


def clean_env() -> dict:
    """The environment minus anything that would let a script find densekit."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run_script(tmp_path: Path, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Copy edge/device/<name> alone into tmp_path and run it there, as on a device."""
    script = tmp_path / name
    shutil.copy(DEVICE_DIR / name, script)
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True,
                          text=True, env=env or clean_env(), timeout=120)


def imported_modules(name: str) -> set[str]:
    tree = ast.parse((DEVICE_DIR / name).read_text(), feature_version=(3, 7))  # also: Python 3.7 syntax only
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - {"__future__"}


@pytest.mark.parametrize("name, allowed", [("linux_bench.py", {"numpy", "ai_edge_litert", "tflite_runtime"}),
                                           ("android_bench.py", set()),
                                           ("coreml_bench.py", {"numpy", "coremltools"})])
def test_scripts_import_only_stdlib_and_their_runtime(name, allowed):
    outside = imported_modules(name) - set(sys.stdlib_module_names) - allowed
    assert not outside, f"{name} imports {outside}: device scripts must not need densekit"


def check_schema(result: dict, artefact: Path, runs: int) -> None:
    assert set(result) == SCHEMA_KEYS
    assert result["schema"] == "densekit.bench/1" and result["source"] == "linux_bench.py"
    assert result["artefact"] == artefact.name and result["format"] == "tflite"
    assert result["runtime"].startswith(("ai-edge-litert ", "tflite-runtime "))
    assert result["executor"].endswith("(2 threads)") and result["threads"] == 2
    assert set(result["device"]) == {"name", "system", "machine", "processor", "cores", "simd", "int8_dot"}
    assert isinstance(result["device"]["cores"], int)
    assert result["runs"] == runs and result["warmup"] == 1 and result["input_shape"] == [1, 64, 96, 3]
    latency = result["latency_ms"]
    assert set(latency) == {"mean", "std", *LATENCY_KEYS}
    ordered = [latency[k] for k in LATENCY_KEYS]
    assert all(isinstance(v, float) for v in latency.values()) and ordered == sorted(ordered) and ordered[0] > 0
    assert latency["min"] <= latency["mean"] <= latency["max"] and latency["std"] >= 0
    assert result["throughput_ips"] == pytest.approx(1e3 / latency["mean"])
    memory = result["memory_mb"]
    assert memory["peak_rss"] > 0 and memory["baseline_rss"] > 0
    assert memory["model_rss"] == pytest.approx(max(memory["peak_rss"] - memory["baseline_rss"], 0.0))
    assert result["created"].endswith("Z")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_linux_bench_writes_schema_json(tiny_artefacts, tmp_path, precision):
    model = tiny_artefacts[f"tflite_{precision}"]
    proc = run_script(tmp_path, "linux_bench.py", str(model), "--threads", "2", "--runs", "7", "--warmup", "1",
                      "--json", str(tmp_path / "bench.json"))
    assert proc.returncode == 0, proc.stderr
    assert "latency ms" in proc.stdout and model.name in proc.stdout
    check_schema(json.loads((tmp_path / "bench.json").read_text()), model, runs=7)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_linux_bench_saves_device_outputs(tiny_artefacts, tmp_path, precision):
    proc = run_script(tmp_path, "linux_bench.py", str(tiny_artefacts[f"tflite_{precision}"]), "--threads", "2",
                      "--runs", "2", "--warmup", "0", "--inputs", str(tiny_artefacts["inputs"]),
                      "--outputs", str(tmp_path / "out.npz"))
    assert proc.returncode == 0, proc.stderr
    saved = np.load(tmp_path / "out.npz")
    reference = np.load(tiny_artefacts["depth"])
    assert saved["depth"].dtype == np.float32 and saved["depth"].shape == (4, 1, 64, 96) == reference.shape
    assert saved["labels"].dtype == np.uint8 and saved["labels"].shape == (4, 64, 96)
    assert saved["labels"].max() < np.load(tiny_artefacts["seg"]).shape[1]
    if precision == "fp32":
        relative = np.abs(saved["depth"] - reference).max() / np.abs(reference).max()
        assert relative < 1e-4
    else:   # the int8 file on the board, against the float model (as tests/test_edge.py holds the host's)
        assert np.median(np.abs(saved["depth"] - reference) / reference) < 0.02
        assert (saved["labels"] == np.load(tiny_artefacts["seg"]).argmax(1)).mean() > 0.9


def test_linux_bench_rejects_inputs_without_outputs(tiny_artefacts, tmp_path):
    proc = run_script(tmp_path, "linux_bench.py", str(tiny_artefacts["tflite_fp32"]), "--inputs",
                      str(tiny_artefacts["inputs"]))
    assert proc.returncode == 2 and "--inputs and --outputs go together" in proc.stderr


def test_linux_bench_refuses_bad_inputs_before_timing(tiny_artefacts, tmp_path):
    model = str(tiny_artefacts["tflite_fp32"])
    np.save(tmp_path / "uint8.npy", np.zeros((1, 3, 64, 96), np.uint8))
    np.save(tmp_path / "scale255.npy", np.full((1, 3, 64, 96), 255.0, np.float32))
    np.save(tmp_path / "large.npy", np.zeros((1, 3, 128, 160), np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 64, 96), np.float32))
    np.savez(tmp_path / "images.npz", images=np.zeros((1, 3, 64, 96), np.float32))
    last_bad = np.zeros((3, 3, 64, 96), np.float32)
    last_bad[2, 0, 5, 5] = np.nan   # checked image by image: the last one too
    np.save(tmp_path / "last_bad.npy", last_bad)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((1, 3, 64, 96), np.float32)))
    for inputs, message in (("missing.npy", "--inputs file not found: missing.npy"),
                            ("fortran.npy", "in Fortran order; expected one non-empty (N, 3, H, W) float32 .npy of RGB "
                                            "in [0, 1] (save it with np.save(path, np.ascontiguousarray(images)))"),
                            ("large.npy", "the model takes 64x96 images (input [1, 64, 96, 3])"),
                            ("uint8.npy", "is uint8 of shape [1, 3, 64, 96]; expected one non-empty (N, 3, H, W) float32"),
                            ("empty.npy", "is float32 of shape [0, 3, 64, 96]; expected one non-empty"),
                            ("images.npz", "images.npz cannot be read as a .npy array"),
                            ("last_bad.npy", "values outside [0, 1] (or non-finite ones)"),
                            ("scale255.npy", "values outside [0, 1]")):
        proc = run_script(tmp_path, "linux_bench.py", model, "--inputs", inputs, "--outputs", "out.npz")
        assert proc.returncode == 2 and message in proc.stderr and "latency" not in proc.stdout, proc.stderr
    assert not (tmp_path / "out.npz").exists()
    np.save(tmp_path / "good.npy", np.zeros((1, 3, 64, 96), np.float32))   # np.savez would write a zip under .npy
    proc = run_script(tmp_path, "linux_bench.py", model, "--inputs", "good.npy", "--outputs", "out.npy")
    assert proc.returncode == 2 and "--outputs out.npy: the outputs are written as one .npz archive" in proc.stderr


def test_linux_bench_says_how_to_install_an_interpreter(tiny_artefacts, tmp_path):
    """Neither package importable (None in sys.modules blocks an import): exit 2 with both pip commands."""
    shutil.copy(DEVICE_DIR / "linux_bench.py", tmp_path / "linux_bench.py")
    wrapper = ("import runpy, sys; sys.modules['ai_edge_litert'] = None; sys.modules['tflite_runtime'] = None; "
               f"sys.argv = ['linux_bench.py', {str(tiny_artefacts['tflite_fp32'])!r}]; "
               "runpy.run_path('linux_bench.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(), timeout=60)
    assert proc.returncode == 2
    assert "no TFLite interpreter could be imported" in proc.stderr
    assert "pip install ai-edge-litert" in proc.stderr and "tflite-runtime" in proc.stderr


# What benchmark_model prints, rebuilt from its sources: the lines of BenchmarkModel::Run and
# BenchmarkLoggingListener::OnBenchmarkEnd in tensorflow/lite/tools/benchmark/benchmark_model.cc (LiteRT:
# tflite/tools/benchmark/benchmark_model.cc), the stat lines of Stat / StatWithPercentiles::OutputToStream in
# third_party/xla/xla/tsl/util/stats_calculator.h (std::endl after each leaves a blank line). Values: microseconds.
LITERT_ANDROID_LOG = """INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Min num runs: [50]
INFO: Num threads: [4]
INFO: Min warmup runs: [5]
INFO: Report the peak memory footprint: [1]
INFO: Graph: [/data/local/tmp/v3_int8.tflite]
INFO: #threads used for CPU inference: [4]
INFO: Use xnnpack: [1]
INFO: Loaded model /data/local/tmp/v3_int8.tflite
INFO: Initialized TensorFlow Lite runtime.
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: Explicitly applied XNNPACK delegate, and the model graph will be completely executed by the delegate.
INFO: The input model file size (MB): 1.30412
INFO: Initialized session in 41.207ms.
INFO: Running benchmark for at least 5 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=83 first=14210 curr=5874 min=5702 max=14210 avg=6015.34 std=934 p5=5731 median=5893 p95=6381

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=167 first=5921 curr=5880 min=5688 max=7302 avg=5964.81 std=221 p5=5715 median=5902 p95=6412

INFO: Inference timings in us: Init: 41207, First inference: 14210, Warmup (avg): 6015.34, Inference (avg): 5964.81
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the \
actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=6.91797 overall=12.3086
INFO: Overall peak memory footprint (MB) via periodic monitoring: 19.7852
INFO: Memory status at the end of exeution:
INFO: - VmRSS              : 19 MB
INFO: + RssAnnon           : 11 MB
INFO: + RssFile + RssShmem : 8 MB
"""

# An older TF 2.x build: no percentiles, one warm-up run ("all same" form), doubles in std::ostream's default
# 6-digit precision (1.26647e+06), the pre-monitoring memory line, an ignored flag.
TF2_LOG = """STARTING!
Min num runs: [50]
Num threads: [1]
Graph: [/data/local/tmp/big.tflite]
Use gpu: [1]
WARN: Unconsumed cmdline flags: --use_gpu=true
Loaded model /data/local/tmp/big.tflite
The input model file size (MB): 11.983
Initialized session in 20.283ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=1 curr=1523110

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=1266601 curr=1266931 min=1265837 max=1268116 avg=1.26647e+06 std=419

Inference timings in us: Init: 20283, First inference: 1523110, Warmup (avg): 1.52311e+06, Inference (avg): 1.26647e+06
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual \
memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=2.43359 overall=60.6758
"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"])  # adb shell on older Android returns CRLF
def test_parse_benchmark_model_litert_output(newline):
    parsed = android_bench.parse_benchmark_model(LITERT_ANDROID_LOG.replace("\n", newline))
    assert parsed["runs"] == 167 and parsed["warmup"] == 83
    assert parsed["latency_ms"] == pytest.approx({"mean": 5.96481, "std": 0.221, "min": 5.688, "p50": 5.902,
                                                  "p90": None, "p99": None, "max": 7.302})
    assert parsed["memory_mb"] == {"peak_rss": 19.7852, "baseline_rss": None, "model_rss": 12.3086}
    assert parsed["init_ms"] == pytest.approx(41.207) and parsed["first_ms"] == pytest.approx(14.21)
    assert parsed["warmup_avg_ms"] == pytest.approx(6.01534) and parsed["unconsumed_flags"] is None


def test_parse_benchmark_model_older_output():
    parsed = android_bench.parse_benchmark_model(TF2_LOG)
    assert parsed["runs"] == 50 and parsed["warmup"] == 1
    assert parsed["latency_ms"] == pytest.approx({"mean": 1266.47, "std": 0.419, "min": 1265.837, "p50": None,
                                                  "p90": None, "p99": None, "max": 1268.116})
    assert parsed["warmup_avg_ms"] == pytest.approx(1523.11)
    assert parsed["memory_mb"] == {"peak_rss": None, "baseline_rss": None, "model_rss": 60.6758}
    assert parsed["unconsumed_flags"] == "--use_gpu=true"


def test_parse_benchmark_model_failed_run():
    log = "STARTING!\nGraph: [/data/local/tmp/x.tflite]\nERROR: Could not open '/data/local/tmp/x.tflite'.\n"
    with pytest.raises(ValueError, match=r"(?s)did not report 'Inference timings in us'.*Could not open"):
        android_bench.parse_benchmark_model(log)


def test_tflite_input_shape_reads_the_flatbuffer(tiny_artefacts, tmp_path):
    assert android_bench.tflite_input_shape(str(tiny_artefacts["tflite_int8"])) == [1, 64, 96, 3]
    (tmp_path / "not.tflite").write_bytes(b"\x00" * 64)
    assert android_bench.tflite_input_shape(str(tmp_path / "not.tflite")) is None


@pytest.fixture
def fake_binary(tmp_path) -> Path:
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF")
    return binary


def test_android_dry_run_prints_the_adb_commands(tiny_artefacts, tmp_path, fake_binary):
    model = tiny_artefacts["tflite_int8"]
    proc = run_script(tmp_path, "android_bench.py", str(model), "--benchmark-binary", str(fake_binary),
                      "--serial", "R5CX", "--threads", "2", "--runs", "20", "--warmup", "3", "--delegate", "gpu",
                      "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"adb -s R5CX push {model} /data/local/tmp/{model.name}" in lines
    assert f"adb -s R5CX push {fake_binary} /data/local/tmp/benchmark_model" in lines
    assert "adb -s R5CX shell 'chmod +x /data/local/tmp/benchmark_model'" in lines
    run = next(line for line in lines if "--graph=" in line)
    for flag in (f"--graph=/data/local/tmp/{model.name}", "--num_threads=2", "--num_runs=20", "--warmup_runs=3",
                 "--use_gpu=true", "--report_peak_memory_footprint=true"):
        assert flag in run
    assert run.startswith("adb -s R5CX shell '/data/local/tmp/benchmark_model ")
    assert "adb -s R5CX shell 'getprop ro.product.model'" in lines and "adb -s R5CX shell nproc" in lines


@pytest.mark.parametrize("flag, value", [("--runs", "0"), ("--threads", "0"), ("--warmup", "-1")])
def test_android_bench_refuses_counts_that_cannot_run(tiny_artefacts, tmp_path, fake_binary, flag, value):
    proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_int8"]), "--benchmark-binary",
                      str(fake_binary), flag, value, "--dry-run")
    assert proc.returncode == 2 and "--runs and --threads must be >= 1 and --warmup >= 0" in proc.stderr


@pytest.mark.parametrize("delegate, flag", [("xnnpack", "--use_xnnpack=true"), ("nnapi", "--use_nnapi=true"),
                                            ("none", "--use_xnnpack=false")])
def test_android_delegate_flags(tiny_artefacts, tmp_path, fake_binary, delegate, flag):
    proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_fp32"]), "--benchmark-binary",
                      str(fake_binary), "--delegate", delegate, "--dry-run")
    assert proc.returncode == 0 and flag in proc.stdout and "adb push" in proc.stdout


def test_android_without_adb_says_what_to_install(tiny_artefacts, tmp_path, fake_binary):
    empty = tmp_path / "empty_path"
    empty.mkdir()
    proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_fp32"]), "--benchmark-binary",
                      str(fake_binary), env={**clean_env(), "PATH": str(empty)})
    assert proc.returncode == 2
    assert "adb not found on PATH" in proc.stderr and "platform-tools" in proc.stderr
    assert "USB debugging" in proc.stderr


FAKE_ADB = """#!{python}
import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if args[:2] == ["-s", "R5CX"]:
    args = args[2:]
if args == ["devices"]:
    print("* daemon not running; starting now at tcp:5037\\n* daemon started successfully\\nList of devices attached")
    print(os.environ["FAKE_ADB_DEVICES"])
elif args[0] == "shell" and "--graph=" in args[1]:
    sys.stdout.write(open(os.environ["FAKE_ADB_BENCH"]).read())
elif args[0] == "shell":
    print({{"getprop ro.product.model": "Pixel 8", "nproc": "9",
           "getprop ro.product.cpu.abi": "arm64-v8a", "getprop ro.soc.model": "Tensor G3"}}.get(args[1], ""))
"""


@pytest.fixture
def fake_adb(tmp_path) -> dict:
    """A PATH holding a stand-in `adb` that answers like one connected phone and logs its calls."""
    folder = tmp_path / "fake_bin"
    folder.mkdir()
    adb = folder / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(0o755)
    (tmp_path / "bench.log").write_text(LITERT_ANDROID_LOG)
    return {**clean_env(), "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
            "FAKE_ADB_LOG": str(tmp_path / "adb.log"), "FAKE_ADB_BENCH": str(tmp_path / "bench.log"),
            "FAKE_ADB_DEVICES": "R5CX\tdevice"}


def test_android_bench_end_to_end_with_a_stand_in_adb(tiny_artefacts, tmp_path, fake_binary, fake_adb):
    model = tiny_artefacts["tflite_int8"]
    proc = run_script(tmp_path, "android_bench.py", str(model), "--benchmark-binary", str(fake_binary),
                      "--json", str(tmp_path / "phone.json"), env=fake_adb)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "phone.json").read_text())
    assert set(result) == SCHEMA_KEYS and result["runs"] == 167 and result["threads"] == 4
    assert result["device"] == {"name": "Pixel 8", "system": "Android", "machine": "arm64-v8a",
                                "processor": "Tensor G3", "cores": 9}
    calls = (tmp_path / "adb.log").read_text().splitlines()
    assert calls[0] == "devices" and calls[1] == f"-s R5CX push {model} /data/local/tmp/{model.name}"
    assert any("--use_xnnpack=true --report_peak_memory_footprint=true" in call for call in calls)


@pytest.mark.parametrize("devices, message", [("", "no Android device is connected"),
                                              ("R5CX\tunauthorized", "no Android device is connected"),
                                              ("A1\tdevice\nB2\tdevice", "several devices are connected")])
def test_android_bench_without_a_usable_phone(tiny_artefacts, tmp_path, fake_binary, fake_adb, devices, message):
    proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_fp32"]), "--benchmark-binary",
                      str(fake_binary), env={**fake_adb, "FAKE_ADB_DEVICES": devices})
    assert proc.returncode == 2 and message in proc.stderr and "--serial" in proc.stderr


def test_a_hung_or_missing_adb_is_a_one_line_error():
    """A phone unplugged mid-run leaves adb waiting: its timeout is named, not raised as a traceback."""
    with pytest.raises(android_bench.BenchError, match=r"gave no result in 1 s: is the device still connected"):
        android_bench.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=1)
    with pytest.raises(android_bench.BenchError, match=r"cannot run `/nonexistent/adb devices`"):
        android_bench.run(["/nonexistent/adb", "devices"])


def test_android_report_fills_the_schema(tiny_artefacts):
    args = android_bench.parse_args([str(tiny_artefacts["tflite_int8"]), "--benchmark-binary",
                                     str(tiny_artefacts["tflite_int8"]), "--delegate", "xnnpack"])
    device = {"name": "Pixel 8", "system": "Android", "machine": "arm64-v8a", "processor": "Tensor G3", "cores": 9}
    result = android_bench.report(args, android_bench.parse_benchmark_model(LITERT_ANDROID_LOG), device)
    assert set(result) == SCHEMA_KEYS and result["source"] == "android_bench.py"
    assert result["executor"] == "benchmark_model --use_xnnpack=true" and result["runtime"] == "benchmark_model unknown"
    assert result["runs"] == 167 and result["warmup"] == 83 and result["input_shape"] == [1, 64, 96, 3]
    assert result["throughput_ips"] == pytest.approx(1e3 / 5.96481)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS coreml_bench.py really predicts")
def test_coreml_bench_off_macos_exits_2(tmp_path):
    (tmp_path / "model.mlpackage").mkdir()
    proc = run_script(tmp_path, "coreml_bench.py", "model.mlpackage", "--runs", "3")
    assert proc.returncode == 2 and proc.stderr.startswith("error: coreml_bench.py runs only on macOS")
    assert "python -m edge.run model.mlpackage" in proc.stderr
    assert "copy model.mlpackage and this script to a Mac" in proc.stderr.splitlines()[0]   # the fix on the error line
    # Windows has no `resource` module: the same refusal, not an ImportError's traceback
    windows = ("import runpy, sys; sys.modules['resource'] = None; "
               "sys.argv = ['coreml_bench.py', 'model.mlpackage']; runpy.run_path('coreml_bench.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", windows], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: coreml_bench.py runs only on macOS"), proc.stderr


@pytest.mark.parametrize("script, argv, says", [
    ("linux_bench.py", ["{tflite}", "--threads", "0"], "--runs and --threads must be >= 1"),
    ("linux_bench.py", ["{onnx}"], "is not a .tflite file; this script times TFLite artefacts (an ONNX file: "
                                   "python -m edge.bench"),
    ("linux_bench.py", ["{tflite}", "--runs", "x"], "argument --runs: invalid int value: 'x'"),
    ("coreml_bench.py", ["nope.mlpackage"], "model not found: nope.mlpackage"),
    ("coreml_bench.py", ["{tflite}"], "is not a Core ML model (.mlpackage or .mlmodel)"),
    ("android_bench.py", ["{onnx}", "--benchmark-binary", "b"], "is not a .tflite file"),
])
def test_a_device_script_refuses_bad_input_in_one_error_line(tiny_artefacts, tmp_path, script, argv, says):
    """The project's convention on a device too: one `error:` line naming the script, exit 2 (argparse
    used to print its usage first; load failures had no `error:`)."""
    argv = [a.format(tflite=tiny_artefacts["tflite_fp32"], onnx=tiny_artefacts["onnx_fp32"]) for a in argv]
    proc = run_script(tmp_path, script, *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {script}: "), proc.stderr
    assert says in lines[0], lines


def test_device_commands_keep_each_devices_record_and_say_what_a_gpu_profile_times():
    """A board's and a phone's records of one file do not overwrite each other; a GPU profile's kit says
    that edge.bench times the CPU, and what times the GPU."""
    from edge.kit import commands
    from targets.profiles import device

    tflite = commands([{"path": "m_int8.tflite", "format": "tflite"}], None, 4)
    assert "--json m_int8.tflite.linux.bench.json" in tflite and "--json m_int8.tflite.android.bench.json" in tflite
    jetson = commands([{"path": "m_fp16.onnx", "format": "onnx"}], device("jetson-orin"), 4)
    assert "not the GPU" in jetson and "trtexec --onnx=<artefact> --fp16" in jetson
    assert "trtexec" not in commands([{"path": "m_int8.onnx", "format": "onnx"}], device("generic-cpu"), 4)


def test_android_bench_refuses_a_bad_record_place_before_the_phone_runs(tiny_artefacts, tmp_path, fake_binary,
                                                                        fake_adb):
    for bad in (tmp_path / "missing" / "phone.json", tmp_path):   # a folder that is not there; a folder
        proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_int8"]), "--benchmark-binary",
                          str(fake_binary), "--json", str(bad), env=fake_adb)
        assert proc.returncode == 2 and "not a file in a writable folder" in proc.stderr, proc.stderr
    assert not (tmp_path / "adb.log").exists()   # adb was never called


def test_android_bench_says_which_ignored_flag_costs_what(tiny_artefacts, tmp_path, fake_binary, fake_adb):
    """A build without the memory report: the delegate did run, only the memory figures are missing."""
    log = tmp_path / "bench.log"
    log.write_text(log.read_text() + "Unconsumed cmdline flags: --report_peak_memory_footprint=true\n")
    proc = run_script(tmp_path, "android_bench.py", str(tiny_artefacts["tflite_int8"]), "--benchmark-binary",
                      str(fake_binary), env=fake_adb)
    assert proc.returncode == 0, proc.stderr
    assert "ignored --report_peak_memory_footprint=true: the figures those flags give" in proc.stderr
    assert "delegate" not in proc.stderr


def test_each_device_script_checks_the_manifest_beside_its_artefact(tiny_artefacts, tmp_path, fake_binary):
    """A copy cut short or edited on its way to the device is refused before it is timed, as
    edge.run and edge.bench refuse it; the scripts hash as core/io.py records (an .mlpackage too)."""
    from core import io
    from edge.device import coreml_bench, linux_bench

    export = tmp_path / "export"
    export.mkdir()
    model = export / "student_fp32.tflite"
    shutil.copy(tiny_artefacts["tflite_fp32"], model)
    package = export / "student.mlpackage"
    (package / "Data" / "weights").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "weights" / "weight.bin").write_bytes(b"\0" * 100)
    entries = [{"path": p.name, "sha256": io.sha256(p)} for p in (model, package)]
    (export / "manifest.json").write_text(json.dumps({"artefacts": entries}))
    assert all(script.manifest_problem(str(model)) is None for script in (linux_bench, android_bench, coreml_bench))
    assert coreml_bench.manifest_problem(str(package) + "/") is None
    # an export before 2026-12-04 recorded its packages in the first scheme: still its manifest's match
    v1 = [{**e, "sha256": io.tree_sha256_v1(package)} if e["path"] == package.name else e for e in entries]
    (export / "manifest.json").write_text(json.dumps({"artefacts": v1}))
    assert coreml_bench.manifest_problem(str(package)) is None
    (export / "manifest.json").write_text(json.dumps({"artefacts": entries}))
    proc = run_script(tmp_path, "linux_bench.py", str(model), "--threads", "2", "--runs", "2", "--warmup", "0")
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
    alone = tmp_path / "alone"   # copied without its manifest: timed, and said to be unchecked
    alone.mkdir()
    shutil.copy(model, alone / model.name)
    proc = run_script(tmp_path, "linux_bench.py", str(alone / model.name), "--runs", "1", "--warmup", "0")
    assert proc.returncode == 0 and "note: no manifest.json beside" in proc.stderr, proc.stderr

    model.write_bytes(model.read_bytes()[:-100])   # cut short
    (package / "Data" / "weights" / "weight.bin").write_bytes(b"\0" * 99)
    assert "student.mlpackage differs from the sha256" in coreml_bench.manifest_problem(str(package))
    for name, extra in (("linux_bench.py", []), ("android_bench.py", ["--benchmark-binary", str(fake_binary)])):
        proc = run_script(tmp_path, name, str(model), *extra)
        assert proc.returncode == 2 and "student_fp32.tflite differs from the sha256 recorded in" in proc.stderr
        assert "--no-verify" in proc.stderr, proc.stderr
    (export / "stray.tflite").write_bytes(model.read_bytes())
    assert "not listed in" in linux_bench.manifest_problem(str(export / "stray.tflite"))
    proc = run_script(tmp_path, "linux_bench.py", str(model), "--no-verify", "--runs", "1", "--warmup", "0")
    assert proc.returncode == 2 and "cannot be loaded by" in proc.stderr and "Traceback" not in proc.stderr
