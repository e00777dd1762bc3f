"""quant.validate: drift of real artefacts, executed by their runtimes, against the float model;
targets.profiles: device profiles and gates; quant.drift_report: drift.json and the figures."""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import build_datasets
from distill.recipes.base import DataConfig
from quant.drift_report import write_drift
from quant.validate import ValidationData, precision_from_name, validate_artefact
from targets import profiles


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        _, val = build_datasets(DataConfig(height=64, width=96, num_train=4, num_val=6), progress=False)
    return ValidationData.from_dataset(val)


def test_fp32_tflite_matches_float_and_passes(tiny_artefacts, val_data, tmp_path, monkeypatch):
    from quant import artefacts

    ran, run_module = [], artefacts.run_module
    monkeypatch.setattr(artefacts, "run_module", lambda *args, **kw: (ran.append(args), run_module(*args, **kw))[1])
    report = validate_artefact(tiny_artefacts["tflite_fp32"], reference=tiny_artefacts["student"], data=val_data,
                               scratch=tmp_path)
    # the inputs and outputs went to `scratch` (an export's work directory, cleared after a kill), and went
    (inputs,) = [Path(args[args.index("--inputs") + 1]) for args in ran]
    assert inputs.parent.parent == tmp_path and list(tmp_path.iterdir()) == []
    assert report.precision == "fp32" and report.format == "tflite" and "litert" in report.executor.lower()
    assert report.passed and set(report.gates) == {"finite", *profiles.GATE_KEYS}   # float: per-pixel gates too
    assert report.per_pixel["depth_rel_p99"] < 1e-4 and report.per_pixel["seg_agreement"] > 0.999
    assert abs(report.delta["abs_rel"]) < 1e-5 * report.float["abs_rel"] + 1e-9
    assert {"abs_rel", "rmse", "d1", "silog", "miou", "pixel_acc"} <= set(report.float)  # summary.json keys
    assert report.images == 6


def test_a_count_that_selects_nothing_or_would_be_ignored_is_refused(tiny_artefacts, val_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKIT_CACHE", str(tmp_path))
    _, val = build_datasets(DataConfig(height=64, width=96, num_train=4, num_val=2), progress=False)
    assert ValidationData.from_dataset(val, 1).inputs.shape[0] == 1
    for count in (0, -1, 1.5):   # 0 said "the dataset is empty"; -1 ended in torch.stack's error
        with pytest.raises(ValueError, match=rf"count={count}: validate on at least one image"):
            ValidationData.from_dataset(val, count)
    with pytest.raises(ValueError, match="count applies to a dataset; ValidationData holds its images already"):
        validate_artefact(tiny_artefacts["tflite_fp32"], reference=tiny_artefacts["student"], data=val_data, count=3)


def test_gate_failure_names_artefact_metric_value_and_tolerance(tiny_artefacts, val_data):
    strict = {"abs_rel_change": 0.0, "miou_drop_pt": 0.0}
    report = validate_artefact(tiny_artefacts["onnx_int8"], reference=tiny_artefacts["student"], data=val_data, gate=strict)
    assert "onnxruntime" in report.executor
    changed = report.gates["abs_rel_change"]
    assert not report.passed and not changed["pass"] and changed["value"] > 0 and changed["tolerance"] == 0
    message = next(f for f in report.failures() if "abs_rel" in f)
    assert message.startswith("tiny_int8.onnx: abs_rel changed by ")
    assert f"{100 * changed['value']:.2f}% relative (float {report.float['abs_rel']:.4f} -> artefact " in message
    assert message.endswith("; tolerance 0.00%")


def test_non_finite_output_never_passes(tiny_artefacts, val_data, tmp_path):
    """An artefact whose weights hold a NaN fails the `finite` gate, whatever the tolerances."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_artefacts["onnx_fp32"]))
    conv = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weights = numpy_helper.to_array(conv).copy()
    weights.flat[0] = np.nan
    conv.CopyFrom(numpy_helper.from_array(weights, conv.name))
    broken = tmp_path / "broken_fp32.onnx"
    onnx.save(model, str(broken))
    report = validate_artefact(broken, reference=tiny_artefacts["student"], data=val_data, gate={"abs_rel_change": 1e9, "miou_drop_pt": 1e9})
    assert not report.passed and report.gates["finite"] == {"value": False, "tolerance": True, "pass": False}
    assert report.per_pixel["depth_non_finite"] > 0
    # its drift.json is strict JSON (no Infinity or NaN token), and its report section says what failed
    section = write_drift(tmp_path, [report], val_data, tiny_artefacts["student"])
    json.loads((tmp_path / "drift.json").read_text(), parse_constant=lambda token: pytest.fail(f"{token} in drift.json"))
    assert "| broken_fp32.onnx |" in section and "**FAIL**" in section


def test_non_finite_segmentation_alone_never_passes(tiny_artefacts, val_data, tmp_path):
    """NaN logits argmax to some class, so labels alone look sound: the gate counts the logits too."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_artefacts["onnx_fp32"]))
    bias = next(t for t in model.graph.initializer if list(t.dims) == [13])   # the segmentation head's last bias
    bias.CopyFrom(numpy_helper.from_array(np.full(13, np.nan, np.float32), bias.name))
    broken = tmp_path / "broken_fp32.onnx"
    onnx.save(model, str(broken))
    report = validate_artefact(broken, reference=tiny_artefacts["student"], data=val_data,
                               gate={"abs_rel_change": 1e9, "miou_drop_pt": 1e9})
    assert report.per_pixel["depth_non_finite"] == 0 and report.gates["abs_rel_change"]["value"] < 1e-5
    assert not report.passed and report.gates["finite"] == {"value": False, "tolerance": True, "pass": False}


def test_drift_files(tiny_artefacts, val_data, tmp_path):
    reports = [validate_artefact(tiny_artefacts[k], reference=tiny_artefacts["student"], data=val_data) for k in ("tflite_fp32", "tflite_int8")]
    section = write_drift(tmp_path, reports, val_data, tiny_artefacts["student"])
    drift = json.loads((tmp_path / "drift.json").read_text())
    entry = drift["artefacts"][1]
    assert {"path", "format", "precision", "executor", "float", "artefact", "delta", "gates", "pass"} <= set(entry)
    assert entry["path"] == "tiny_int8.tflite" and entry["precision"] == "int8"
    assert entry["delta"]["abs_rel"] == pytest.approx(entry["artefact"]["abs_rel"] - entry["float"]["abs_rel"])
    for name in ("drift_histogram.png", "errors_fp32.png", "errors_int8.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 100 and image.size[1] > 50
    assert "tiny_int8.tflite" in section and "drift_histogram.png" in section


def test_precision_from_name():
    assert precision_from_name(Path("a/v3-x_palette4.mlpackage")) == "palette4"
    with pytest.raises(ValueError, match="cannot tell the precision"):
        precision_from_name(Path("model.tflite"))


def test_device_profiles():
    pixel8 = profiles.device("pixel8")
    assert (pixel8.format, pixel8.precision, pixel8.threads) == ("tflite", "int8", 4)
    assert pixel8.input_size == (256, 320) and pixel8.latency_budget_ms > 0
    assert {"pixel8", "iphone15", "rpi5", "jetson-orin", "generic-cpu"} <= set(profiles.device_names())
    for name in profiles.device_names():   # every profile resolves to a gate
        p = profiles.device(name)
        assert {"abs_rel_change", "miou_drop_pt"} <= set(profiles.gate_for(p.precision, p))
    with pytest.raises(ValueError) as e:
        profiles.device("pixel9")
    assert 'Did you mean "pixel8"' in str(e.value) and "jetson-orin" in str(e.value) and "tflite" in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(precison="int8"), "devices.rpi5: unknown keys ['precison']"),
    (lambda d: d.pop("bench"), "devices.rpi5: missing ['bench']"),
    (lambda d: d.update(precision="fp16x"), "devices.rpi5: precision 'fp16x' is not one of tflite's"),
    (lambda d: d.update(threads=0), "devices.rpi5: threads 0 must be a positive integer or null"),
    (lambda d: d.update(input_size=[120, 160]), "devices.rpi5: input_size [120, 160] must be [H, W], each a positive "
                                                "multiple of 32"),
    (lambda d: d.update(gates={"int8": 1}), "devices.rpi5.gates: unknown gate keys ['int8']"),
    (lambda d: d.update(gates=None), "devices.rpi5.gates must be an object of tolerances"),
    # JSON's true is an int to Python: a tolerance of 1 (100%) that would switch the gate off
    (lambda d: d.update(gates={"abs_rel_change": True}), "devices.rpi5.gates: gate tolerances must be finite non-negative numbers"),
    (lambda d: d.update(threads=True), "devices.rpi5: threads True must be a positive integer or null"),
    (lambda d: d.update(latency_budget_ms="fast"), "devices.rpi5: latency_budget_ms 'fast' must be a positive number"),
    (lambda d: d.update(bench=None), "devices.rpi5: bench must be text, got {'bench': None}"),
])
def test_a_hand_edited_profile_is_refused_by_file_and_field(tmp_path, edit, message):
    data = json.loads(profiles.PROFILES_FILE.read_text())
    edit(data["devices"]["rpi5"])
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        profiles.device("pixel8", path)   # any device: the file is read whole
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"devices.json cannot be read as JSON \(JSONDecodeError.*git checkout targets/devices.json"):
        profiles.device_names(path)


def test_gate_precedence_and_tolerance_parsing():
    overrides = profiles.parse_tolerances(["int8.abs_rel_change=0.05"])
    assert overrides == {"int8": {"abs_rel_change": 0.05}}
    gate = profiles.gate_for("int8", profiles.device("pixel8"), overrides)
    assert gate == {"abs_rel_change": 0.05, "miou_drop_pt": 1.0}   # int8: not gated per pixel
    assert profiles.gate_for("fp16") == {"abs_rel_change": 0.002, "miou_drop_pt": 0.2,   # the fp16 bar
                                         "depth_rel_p99": 0.01, "seg_agreement_min": 0.99}
    for bad in ("int8.rmse=0.1", "int8=0.1", "int8.abs_rel_change=lots"):
        with pytest.raises(ValueError, match="--tolerance"):
            profiles.parse_tolerances([bad])


@pytest.fixture(scope="module")
def tiny_coreml(tiny_artefacts, tmp_path_factory):
    """The tiny student as a CoreML fp16 package, made by the real converter process."""
    from quant import artefacts
    from targets import deploy
    from targets.job import Job

    root = tmp_path_factory.mktemp("coreml")
    program = deploy.export_program(tiny_artefacts["student"], root / "float.pt2", 64, 96)
    job = Job(format="coreml", precisions=["fp16"], sources={"float": str(program)}, out_dir=str(root),
              work_dir=str(root), stem="tiny", input_shape=[1, 3, 64, 96])
    artefacts.run_converter(job, root, log=lambda line: None)
    return root / "tiny_fp16.mlpackage"


def test_coreml_fp16_validates_on_linux_and_a_corrupted_package_fails(tiny_coreml, tiny_artefacts, val_data,
                                                                       tmp_path):
    """The MIL reference executor runs the package off macOS; altering its weight file is caught."""
    import shutil

    student = tiny_artefacts["student"]
    intact = validate_artefact(tiny_coreml, reference=student, data=val_data)
    assert intact.passed and intact.format == "coreml"
    assert ("reference" in intact.executor) != (sys.platform == "darwin")
    assert intact.per_pixel["depth_rel_p99"] < 2e-2   # fp16 bound of tests/test_mil.py (40 units of 2**-11)

    corrupted = tmp_path / tiny_coreml.name
    shutil.copytree(tiny_coreml, corrupted)
    weights = next(corrupted.rglob("weight.bin"))
    data = bytearray(weights.read_bytes())
    # The stem conv's weights (the first blob) negated in place; records and headers untouched.
    sentinel, _, size, start = struct.unpack_from("<IIQQ", data, 64)
    assert sentinel == 0xDEADBEEF
    data[start:start + size] = (-np.frombuffer(bytes(data[start:start + size]), np.float16)).tobytes()
    weights.write_bytes(bytes(data))
    report = validate_artefact(corrupted, reference=student, data=val_data)
    # This random student's metrics barely move (abs_rel within the 0.2% gate): the per-pixel gate catches it.
    assert not report.passed and not report.gates["depth_rel_p99"]["pass"]
    assert report.per_pixel["depth_rel_p50"] > 10 * intact.per_pixel["depth_rel_p50"]


def test_a_damaged_coreml_package_is_refused_naming_its_size_and_the_check(tiny_coreml, tmp_path):
    """As a truncated .tflite or .onnx (tests/test_edge.py): the runtime's parse error gains the
    package's size and the fix, and the command exits 2 without a traceback."""
    import shutil
    import subprocess

    from edge.runners import UnreadableArtefact, open_runner

    cut, garbled = (tmp_path / name / tiny_coreml.name for name in ("cut", "garbled"))
    for damaged in (cut, garbled):
        shutil.copytree(tiny_coreml, damaged)
    spec = next(cut.rglob("model.mlmodel"))
    spec.write_bytes(spec.read_bytes()[:700])        # an interrupted copy
    (garbled / "Manifest.json").write_text("garbage")
    for damaged in (cut, garbled):
        with pytest.raises(UnreadableArtefact, match=r"cannot load .*\.mlpackage \(\d+ bytes\): .+quant\.verify"):
            open_runner(damaged)
    np.save(tmp_path / "images.npy", np.zeros((1, 3, 64, 96), np.float32))
    proc = subprocess.run([sys.executable, "-m", "edge.run", str(cut), "--inputs", str(tmp_path / "images.npy"),
                           "--out", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_converter_that_crashes_is_named_by_its_signal(tmp_path, monkeypatch):
    """A toolchain that aborts in native code (LiteRT's double free, 2026-12-03) ends its process by
    a signal: the error names it, and the log's lines (TensorFlow prints 10,000-character ones)
    come shortened."""
    from types import SimpleNamespace

    from quant import artefacts
    from targets.job import Job

    (tmp_path / "aborting_converter.py").write_text('import os\nprint("TensorSpec" * 2000, flush=True)\nos.abort()\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    converter = SimpleNamespace(module="aborting_converter")
    monkeypatch.setattr(artefacts, "FORMATS", {"tflite": SimpleNamespace(converter=lambda name: converter)})
    job = Job(format="tflite", precisions=["int8"], sources={}, out_dir=str(tmp_path), work_dir=str(tmp_path),
              stem="tiny", input_shape=[1, 3, 64, 96])
    with pytest.raises(artefacts.ConversionError, match="was killed by SIGABRT") as failure:
        artefacts.run_converter(job, tmp_path, log=lambda line: None)
    assert max(len(line) for line in str(failure.value).splitlines()) < 400


def test_a_converter_that_exits_0_without_its_result_is_our_failure(tmp_path, monkeypatch):
    """Not a missing path of the user's (exit 2, "check the path"): a ConversionError (exit 1) with its log."""
    from types import SimpleNamespace

    from quant import artefacts
    from targets.job import Job

    (tmp_path / "silent_converter.py").write_text('print("converted nothing")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    converter = SimpleNamespace(module="silent_converter")
    monkeypatch.setattr(artefacts, "FORMATS", {"tflite": SimpleNamespace(converter=lambda name: converter)})
    job = Job(format="tflite", precisions=["int8"], sources={}, out_dir=str(tmp_path), work_dir=str(tmp_path / "work"),
              stem="tiny", input_shape=[1, 3, 64, 96])
    with pytest.raises(artefacts.ConversionError, match=r"exited 0 without writing .*result\.json; last lines of "
                                                        r".*tflite\.log:\nconverted nothing$"):
        artefacts.run_converter(job, tmp_path, log=lambda line: None)


def test_a_converter_that_hangs_is_stopped_after_its_silence_limit(tmp_path, monkeypatch):
    """A deadlocked toolchain would hold the export and its lock for ever: a converter that prints
    nothing for $DENSEKIT_CONVERTER_SILENCE_S seconds is killed, and the error names the limit."""
    import time
    from types import SimpleNamespace

    from quant import artefacts
    from targets.job import Job

    (tmp_path / "hanging_converter.py").write_text('import time\nprint("tflite loading", flush=True)\ntime.sleep(600)\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("DENSEKIT_CONVERTER_SILENCE_S", "2")
    converter = SimpleNamespace(module="hanging_converter")
    monkeypatch.setattr(artefacts, "FORMATS", {"tflite": SimpleNamespace(converter=lambda name: converter)})
    job = Job(format="tflite", precisions=["int8"], sources={}, out_dir=str(tmp_path), work_dir=str(tmp_path),
              stem="tiny", input_shape=[1, 3, 64, 96])
    start = time.monotonic()
    with pytest.raises(artefacts.ConversionError, match=r"printed nothing for 2 s and was stopped as hung "
                                                        r"\(DENSEKIT_CONVERTER_SILENCE_S=2; .*\ntflite loading$"):
        artefacts.run_converter(job, tmp_path, log=lambda line: None)
    assert time.monotonic() - start < 30
    with pytest.raises(RuntimeError, match=r"python -m hanging_converter x ran for 2 s and was stopped as hung"):
        artefacts.run_module("hanging_converter", "x")   # the edge.run and edge.bench children's bound
    monkeypatch.setenv("DENSEKIT_CONVERTER_SILENCE_S", "soon")
    with pytest.raises(ValueError, match="DENSEKIT_CONVERTER_SILENCE_S='soon': give the seconds"):
        artefacts.run_converter(job, tmp_path, log=lambda line: None)


def test_one_non_finite_pixel_leaves_the_parity_figures_of_the_rest_readable_as_strict_json():
    """core.contract.compare: the converters' check against the float model, written into
    manifest.json. A NaN pixel used to make every depth figure NaN (a bare NaN token in the file)."""
    from core.contract import compare

    ref = np.full((1, 1, 4, 4), 2.0)
    depth = ref.copy()
    depth[0, 0, 0, 0], depth[0, 0, 0, 1] = np.nan, 2.2   # one NaN, one pixel 10% off
    seg = np.zeros((1, 3, 4, 4))
    report = compare(depth.astype(np.float32), seg, ref, seg)
    assert report["depth_rel_max"] == pytest.approx(0.1) and report["depth_max_abs"] == pytest.approx(0.2)
    assert report["depth_rel_median"] == 0.0 and report["depth_non_finite"] == pytest.approx(1 / 16)
    assert report["finite"] is False and report["seg_non_finite"] == 0.0
    json.dumps(report, allow_nan=False)   # strict parsers (jq, JavaScript) read it
    nothing = compare(np.full_like(ref, np.nan), seg, ref, seg)
    assert nothing["depth_rel_median"] is None and nothing["depth_non_finite"] == 1.0


def test_a_nan_option_is_not_at_least_anything():
    from core.cli import at_least

    with pytest.raises(ValueError, match="--x nan: must be at least 1"):
        at_least("--x", float("nan"), 1)
    at_least("--x", None, 1)


def test_a_converter_is_stopped_when_the_export_gives_up_on_it(tmp_path, monkeypatch):
    """An interrupt in a notebook, a full disk or a `log` that raises leaves run_converter while the
    parent lives on: no parent-death signal stops the converter, so it is killed there and then
    (it went on writing into the export's work directory, which the next export reuses)."""
    import time
    from types import SimpleNamespace

    from quant import artefacts
    from targets.job import Job

    late = tmp_path / "late.txt"
    (tmp_path / "slow_converter.py").write_text(
        f'import time\nprint("tflite step", flush=True)\ntime.sleep(0.5)\nopen({str(late)!r}, "w").write("late")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    converter = SimpleNamespace(module="slow_converter")
    monkeypatch.setattr(artefacts, "FORMATS", {"tflite": SimpleNamespace(converter=lambda name: converter)})
    job = Job(format="tflite", precisions=["int8"], sources={}, out_dir=str(tmp_path), work_dir=str(tmp_path),
              stem="tiny", input_shape=[1, 3, 64, 96])

    def interrupted(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artefacts.run_converter(job, tmp_path, log=interrupted)
    time.sleep(1.5)
    assert not late.exists()


def test_the_reference_model_is_left_in_the_mode_it_came_in():
    """validate_artefact's float reference went through DeployModel(student).eval(), which switched
    the caller's own model to eval mode."""
    import torch

    from distill.students import build_student
    from targets.deploy import reference_outputs

    student = build_student("mobilenetv3_small_050", decoder_channels=16).train()
    frozen = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)][:3]
    for norm in frozen:   # a caller fine-tuning with some norms frozen
        norm.eval()
    reference_outputs(student, torch.rand(1, 3, 64, 96))
    assert student.training and not any(norm.training for norm in frozen)
