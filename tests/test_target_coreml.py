"""targets.coreml end to end: a tiny student exported with torch.export, converted in a child process
(`python -m targets.coreml JOB.json`, as quant.export runs it) to all five precisions.

The converter runs as a subprocess because it blocks TensorFlow and imports coremltools for the
whole process (docs/TOOLCHAIN.md). This test process reads the packages back with coremltools
(`skip_model_load=True`, so no CoreML runtime is needed), blocking TensorFlow only while
coremltools is first imported.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.classes import NYU13_NAMES
from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distill.students import build_student
from targets.job import RESULT_FILE, Job

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [1, 3, 64, 96]
PRECISIONS = ["w8", "palette4", "fp16", "palette6", "fp32"]  # fp16 after w8: compression must not alter it
# a relative student's: the package must not describe its depth as metres
METADATA = {"recipe": "test", "depth_space": "relative", "depth_units": "affine-invariant, unitless",
            "classes": list(NYU13_NAMES)}
NOT_ON_MAC = sys.platform != "darwin"


class Image01Student(torch.nn.Module):
    """image (1, 3, H, W) RGB in [0, 1] -> (depth, seg): the artefact contract."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        out = self.student((image - self.mean) / self.std)
        return out["depth"], out["seg"]


def run_converter(job: Job, job_path: Path, **env) -> subprocess.CompletedProcess:
    job.save(job_path)
    return subprocess.run([sys.executable, "-m", "targets.coreml", str(job_path)], cwd=ROOT, check=False,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


@contextlib.contextmanager
def tensorflow_blocked():
    """coremltools imports TensorFlow when it can; TF + torch in one process segfault. Block it for
    the import only (when nothing imported it yet), so that no later test finds it poisoned."""
    blocked = "tensorflow" not in sys.modules
    if blocked:
        sys.modules["tensorflow"] = None
    try:
        yield
    finally:
        if blocked and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


@pytest.fixture(scope="module")
def ct():
    with tensorflow_blocked():
        import coremltools
    return coremltools


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coreml")
    torch.manual_seed(0)
    model = Image01Student(build_student("mobilenetv3_small_050", decoder_channels=16)).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.rand(*SHAPE),))
        inputs = torch.rand(2, *SHAPE[1:])
        depth, seg = model(inputs)
    torch.export.save(program, tmp / "float.pt2")
    check = {"inputs": tmp / "inputs.npy", "float_depth": tmp / "float_depth.npy", "float_seg": tmp / "float_seg.npy"}
    for key, array in zip(check, (inputs, depth, seg)):
        np.save(check[key], array.numpy().astype(np.float32))
    np.save(tmp / "calibration.npy", torch.rand(3, *SHAPE[1:]).numpy())   # the palettes' bias correction
    (tmp / "work").mkdir()
    job = Job(format="coreml", precisions=PRECISIONS, sources={"float": str(tmp / "float.pt2")},
              out_dir=str(tmp / "out"), work_dir=str(tmp / "work"), stem="tiny", input_shape=SHAPE,
              metadata=METADATA, check={k: str(v) for k, v in check.items()},
              calibration={"nchw": str(tmp / "calibration.npy")})
    # the tiny model's tensors are all small: threshold 0 makes every weight tensor compressible
    proc = run_converter(job, tmp / "job.json", DENSEKIT_COREML_WEIGHT_THRESHOLD="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp / "work" / RESULT_FILE).read_text())
    return job, result, proc


def artefact(result: dict, precision: str) -> dict:
    (found,) = [a for a in result["artefacts"] if a["precision"] == precision]
    return found


def package(job: Job, precision: str) -> Path:
    return Path(job.out_dir) / f"{job.stem}_{precision}.mlpackage"


def weight_bin_bytes(path: Path) -> int:
    return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def program_ops(spec) -> Counter:
    counts = Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


def blob_conv_weights(spec) -> int:
    """conv ops whose weight sits in weight.bin: coremltools compresses only those (tensors under
    10 elements are stored inline in the program, and are never compressed)."""
    main = spec.mlProgram.functions["main"]
    (block,) = main.block_specializations.values()
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    count = 0
    for op in block.operations:
        if op.type == "conv":
            weight = consts[op.inputs["weight"].arguments[0].name]
            count += weight.attributes["val"].WhichOneof("value") == "blobFileValue"
    return count


def lut_sizes(spec) -> set[int]:
    main = spec.mlProgram.functions["main"]
    return {op.attributes["lut"].type.tensorType.dimensions[0].constant.size
            for block in main.block_specializations.values() for op in block.operations
            if op.type == "constexpr_lut_to_dense"}


def test_result_lists_every_precision(converted):
    job, result, proc = converted
    assert [a["precision"] for a in result["artefacts"]] == PRECISIONS
    for a in result["artefacts"]:
        assert a["path"] == f"tiny_{a['precision']}.mlpackage" and package(job, a["precision"]).is_dir()
        assert a["format"] == "coreml" and a["source"] == "float"
    assert set(result["tools"]) >= {"python", "coremltools", "torch", "numpy", "scikit-learn"}
    # no staging leftovers next to the packages; one progress line per precision
    assert sorted(p.name for p in Path(job.out_dir).iterdir()) == sorted(f"tiny_{p}.mlpackage" for p in PRECISIONS)
    for p in PRECISIONS:
        assert f"coreml {p}: tiny_{p}.mlpackage" in proc.stdout


def test_packages_load_with_io_and_metadata(converted, ct):
    job, _, _ = converted
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    for precision in PRECISIONS:
        model = ct.models.MLModel(str(package(job, precision)), skip_model_load=True)
        spec = model.get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        (image,) = spec.description.input
        assert image.name == "image" and list(image.type.multiArrayType.shape) == SHAPE
        assert image.type.multiArrayType.dataType == float32
        outputs = {o.name: o.type.multiArrayType for o in spec.description.output}
        assert list(outputs) == ["depth", "seg"]
        assert list(outputs["depth"].shape) == [1, 1, 64, 96] and list(outputs["seg"].shape) == [1, 13, 64, 96]
        assert all(o.dataType == float32 for o in outputs.values())

        meta = model.user_defined_metadata
        assert json.loads(meta["densekit"]) == {**METADATA, "precision": precision,   # as TFLite and ONNX embed it
                                                "int8_method": "ptq" if precision == "w8a8" else ""}
        assert meta["classes"] == ",".join(NYU13_NAMES) and meta["depth_space"] == "relative"
        assert meta["recipe"] == "test" and meta["precision"] == precision
        assert "relative depth (affine-invariant, unitless) and 13-class" in model.short_description
        assert model.version == "tiny" and "metres" not in model.short_description
        assert "[0, 1]" in model.input_description["image"]
        assert model.output_description["depth"] == "relative depth (affine-invariant, unitless)"
        assert "logits" in model.output_description["seg"]


def test_compression_ops_per_precision(converted, ct):
    job, result, _ = converted
    specs = {p: ct.models.MLModel(str(package(job, p)), skip_model_load=True).get_spec() for p in PRECISIONS}
    convs = blob_conv_weights(specs["fp16"])
    assert convs >= program_ops(specs["fp16"])["conv"] - 1 > 20  # the 1x8 depth output conv is inline
    compressed = {p: {t: n for t, n in program_ops(s).items() if t.startswith("constexpr_")} for p, s in specs.items()}
    assert compressed["fp32"] == {} and compressed["fp16"] == {}
    # with threshold 0 every conv weight is compressed
    assert compressed["w8"] == {"constexpr_affine_dequantize": convs}
    assert compressed["palette4"] == {"constexpr_lut_to_dense": convs}
    assert compressed["palette6"] == {"constexpr_lut_to_dense": convs}
    assert lut_sizes(specs["palette4"]) == {16} and lut_sizes(specs["palette6"]) == {64}
    # what the converter reports is what the package holds
    for p in PRECISIONS:
        assert artefact(result, p)["weight_ops"] == compressed[p]
        assert artefact(result, p)["weight_threshold"] == 0
    assert artefact(result, "palette4")["palette_bits"] == [4]
    assert artefact(result, "palette6")["palette_bits"] == [6]


def test_weights_shrink_with_precision(converted):
    job, _, _ = converted
    size = {p: weight_bin_bytes(package(job, p)) for p in PRECISIONS}
    assert size["palette4"] < size["palette6"] < size["w8"] < size["fp16"] < size["fp32"]
    assert size["fp32"] > 1.8 * size["fp16"]
    assert size["palette4"] < 0.6 * size["fp16"]


@pytest.mark.skipif(not NOT_ON_MAC, reason="on macOS Core ML itself executes the packages")
def test_check_executed_by_reference_off_macos(converted):
    """Off macOS the converter runs each package with the MIL reference executor (edge/mil.py);
    tests/test_mil.py holds the precision bounds, this checks the converter records the run."""
    _, result, _ = converted
    for a in result["artefacts"]:
        check = a["check"]
        assert check["executed"] is True and check["images"] == 2 and check["finite"]
        assert check["reference"] == "float" and "reference_parity" not in check
        assert check["executor"].startswith("coreml-reference")
        assert ("fp32 per op" if a["precision"] == "fp32" else "fp16 per op") in check["executor"]
    assert artefact(result, "fp32")["check"]["depth_rel_max"] < 1e-4
    assert artefact(result, "fp16")["check"]["depth_rel_max"] < 2e-2


@pytest.mark.skipif(NOT_ON_MAC, reason="CoreML predicts only on macOS")
def test_check_executed_on_macos(converted):
    _, result, _ = converted
    for a in result["artefacts"]:
        check = a["check"]
        assert check["executed"] is True and check["images"] == 2 and check["finite"]
        assert check["reference"] == "float" and check["executor"].startswith("MLModel.predict")
        parity = check["reference_parity"]   # predict against the MIL reference executor
        assert parity["images"] == 2 and parity["finite"]
    assert artefact(result, "fp32")["check"]["depth_rel_max"] < 1e-3


def test_a_package_whose_check_fails_is_not_left_behind(converted, tmp_path):
    job, _, _ = converted
    wrong = tmp_path / "depth.npy"
    np.save(wrong, np.zeros((2, 1, 8, 8), np.float32))   # not the model's output shape: compare refuses
    (tmp_path / "work").mkdir()
    failing = Job(format="coreml", precisions=["fp32"], sources=job.sources, out_dir=str(tmp_path / "out"),
                  work_dir=str(tmp_path / "work"), stem="tiny", input_shape=SHAPE, metadata=METADATA,
                  check={**job.check, "float_depth": str(wrong)})
    proc = run_converter(failing, tmp_path / "job.json")
    assert proc.returncode != 0 and "differ from the" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())   # checked before published


def conv_weights(program) -> dict[str, tuple[np.ndarray, str]]:
    """{conv op name: (its decoded weight as float64, the type of the op that makes the weight)}."""
    made_by = {name: op.type for op in program.ops for name, _ in op.outputs}
    return {op.name: (program.constant(op.inputs["weight"][0]).astype(np.float64), made_by[op.inputs["weight"][0]])
            for op in program.ops if op.type == "conv"}


def conv_biases(program) -> dict[str, np.ndarray]:
    return {op.name: program.constant(op.inputs["bias"][0]).astype(np.float64) if "bias" in op.inputs else 0.0
            for op in program.ops if op.type == "conv"}


@pytest.mark.parametrize("precision", ["palette4", "palette6"])
def test_palettes_keep_each_weights_norm(converted, ct, precision):
    """A k-means palette entry is the mean of its weights, so coremltools' palettes shrink a tensor
    (here by more than the tolerance at 4 bits); densekit's are scaled back to the tensor's norm."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight
    from edge.mil import MILProgram

    job, _, _ = converted
    dense = conv_weights(MILProgram(package(job, "fp16")))
    palettised = {name: w for name, (w, maker) in conv_weights(MILProgram(package(job, precision))).items()
                  if maker == "constexpr_lut_to_dense"}
    assert len(palettised) >= 10
    for name, q in palettised.items():
        assert np.linalg.norm(q) == pytest.approx(np.linalg.norm(dense[name][0]), rel=1e-3), name
    if precision == "palette4":
        w = max((dense[name][0] for name in palettised), key=np.size)
        lut, indices = _get_kmeans_lookup_table_and_weight(4, w.astype(np.float16))
        assert np.linalg.norm(lut[np.asarray(indices)].astype(np.float64)) < (1 - 2e-3) * np.linalg.norm(w)


@pytest.mark.parametrize("precision", ["palette4", "palette6"])
def test_palette_biases_absorb_the_expected_error(converted, precision):
    """Each palettised convolution's bias moves by the mean change of its output, the mean of
    conv(x, W - Q) over the job's calibration images and every output position (x from the float16
    program, the zero padding included), up to float16 rounding of the bias; grouped and depthwise
    convolutions included. The shift computed as if every tap read the channel's mean (the
    correction before 2026-12-06's evening) misses that tolerance by 3x on convolutions that read
    padding, so the test tells the two apart."""
    import torch.nn.functional as F

    from edge.mil import MILProgram, spatial_pads

    job, result, _ = converted
    dense_program, palettised_program = MILProgram(package(job, "fp16")), MILProgram(package(job, precision))
    dense, palettised = conv_weights(dense_program), conv_weights(palettised_program)
    corrected = {name: q for name, (q, maker) in palettised.items() if maker == "constexpr_lut_to_dense"}
    convs = {op.name: op for op in dense_program.ops if op.name in corrected}
    readers: dict[str, list[str]] = {}   # value name -> the corrected convolutions that read it
    for op in convs.values():
        readers.setdefault(op.inputs["x"][0], []).append(op.name)
    changes: dict[str, np.ndarray] = {}   # the output's mean change per channel, summed over images
    channel_means: dict[str, np.ndarray] = {}
    padded: set[str] = set()   # the convolutions that read padding

    def setting(op, key, default):
        return np.asarray(dense_program.constant(op.inputs[key][0])) if key in op.inputs else default

    def observe(_op, name, value):
        for conv in readers.get(name, []):
            op, x = convs[conv], torch.from_numpy(value.astype(np.float64))
            error = torch.from_numpy(dense[conv][0].astype(np.float64) - corrected[conv].astype(np.float64))
            strides = [int(v) for v in setting(op, "strides", [1, 1])]
            dilations = [int(v) for v in setting(op, "dilations", [1, 1])]
            pads = spatial_pads(str(setting(op, "pad_type", "valid")), [int(v) for v in setting(op, "pad", [0] * 4)],
                                list(x.shape[2:]), list(error.shape[2:]), strides, dilations)
            if any(p for pair in pads for p in pair):
                padded.add(conv)
            out = F.conv2d(F.pad(x, [p for pair in reversed(pads) for p in pair]), error, stride=strides,
                           dilation=dilations, groups=int(setting(op, "groups", 1)))
            changes[conv] = changes.get(conv, 0) + out.mean(dim=(0, 2, 3)).numpy()
            channel_means[conv] = channel_means.get(conv, 0) + x.mean(dim=(0, 2, 3)).numpy()

    images = np.load(job.calibration["nchw"])
    for image in images:
        dense_program({"image": image[None]}, observe=observe)
    before, after = conv_biases(dense_program), conv_biases(palettised_program)
    largest_shift, depthwise, padded_differs = 0.0, 0, 0
    for name, q in corrected.items():
        expected, moved = changes[name] / len(images), after[name] - before[name]
        tolerance = 1e-3 * np.abs(after[name]).max() + 1e-6
        assert np.abs(moved - expected).max() <= tolerance, name
        largest_shift = max(largest_shift, np.abs(expected).max() / (np.abs(after[name]).max() + 1e-6))
        groups = channel_means[name].size // q.shape[1]
        depthwise += groups > 1
        error = dense[name][0] - q   # the shift as if every tap read the channel's mean
        mean = channel_means[name] / len(images)
        per_channel = np.array([(error[o].sum(axis=(1, 2)) * mean[(o // (q.shape[0] // groups)) * q.shape[1]:]
                                 [:q.shape[1]]).sum() for o in range(q.shape[0])])
        padded_differs += name in padded and np.abs(per_channel - expected).max() > 3 * tolerance
    assert len(corrected) >= 10 and depthwise >= 3 and padded_differs >= 3
    assert largest_shift > 1e-2   # the tolerance above could not hide a missing correction
    assert artefact(result, precision)["correction"]["bias_correction"] == {
        "convolutions": len(corrected), "images": len(images),
        "statistic": "mean input per channel and kernel tap over the output positions, padding as zeros; "
                     "float16 program, reference executor"}


def test_palettes_need_calibration_images(tmp_path):
    (tmp_path / "work").mkdir()
    job = Job(format="coreml", precisions=["fp16", "palette4"], sources={"float": str(tmp_path / "float.pt2")},
              out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), stem="tiny", input_shape=SHAPE)
    proc = run_converter(job, tmp_path / "job.json")
    assert proc.returncode != 0
    assert "calibration images are needed for palette4" in proc.stderr and 'calibration["nchw"]' in proc.stderr


def test_failing_job_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "work").mkdir()
    job = Job(format="coreml", precisions=["fp16", "w8"], sources={"float": str(tmp_path / "missing.pt2")},
              out_dir=str(out), work_dir=str(tmp_path / "work"), stem="broken", input_shape=SHAPE)
    proc = run_converter(job, tmp_path / "job.json")
    assert proc.returncode != 0
    assert "coreml conversion failed" in proc.stderr and "missing.pt2" in proc.stderr
    assert not out.exists() or not any(out.iterdir())  # no package, no staging directory
    assert not (tmp_path / "work" / RESULT_FILE).exists()
