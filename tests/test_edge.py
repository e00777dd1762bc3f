"""edge/: the runners against the PyTorch model, their errors, and the run / bench / peak commands.

Artefacts come from the `tiny_artefacts` fixture (conftest.py: real converter processes, which
themselves run the artefacts through these runners right after conversion).

Bounds against the PyTorch outputs on the same 4 random images:
- fp32 (LiteRT and onnxruntime): 1e-4 relative on depth, 1e-4 of the logits' range on seg
  (float reassociation only; measured 2e-7 for both).
- int8 (PTQ of a randomly initialised model on 8 random images): depth median relative error
  <= 2% and segmentation argmax agreement >= 90%, as tests/test_export.py bounds int8. One int8
  step is 1/255 of an activation's range, and the logits of random weights are nearly tied
  (measured: depth median 0.1%, max 0.5%; agreement 96% for both runtimes).
No timing thresholds: latency on a shared 2-core machine is not a test signal.
"""
from __future__ import annotations

import io
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.bench import SCHEMA, BenchRefused, bench_artefact
from edge.host import describe_cpu, host_cpu
from edge.peak import measure_peak
from edge.run import BadInput, run_artefact
from edge.runners import DEPTH, LiteRTRunner, OrtRunner, UnreadableArtefact, import_litert_interpreter, open_runner

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = ["tflite_fp32", "tflite_int8", "onnx_fp32", "onnx_int8"]
BENCH_KEYS = {"schema", "artefact", "format", "runtime", "executor", "device", "threads", "runs", "warmup",
              "input_shape", "latency_ms", "throughput_ips", "memory_mb", "source", "created"}


def reference(tiny_artefacts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.load(tiny_artefacts[k]) for k in ("inputs", "depth", "seg"))


def edge_cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ARTEFACTS)
def test_runner_matches_torch(tiny_artefacts, name):
    images, ref_depth, ref_seg = reference(tiny_artefacts)
    runner = open_runner(tiny_artefacts[name], threads=2)
    assert isinstance(runner, LiteRTRunner if name.startswith("tflite") else OrtRunner)
    assert runner.format == name.split("_")[0] and runner.executor.startswith(runner.runtime)
    assert "2 threads" in runner.executor
    assert runner.input_shape == ((1, 64, 96, 3) if runner.format == "tflite" else (1, 3, 64, 96))
    depth, seg = runner(images)
    assert depth.shape == ref_depth.shape and seg.shape == ref_seg.shape
    assert depth.dtype == np.float32 and seg.dtype == np.float32
    rel = np.abs(depth - ref_depth) / np.abs(ref_depth)
    if name.endswith("fp32"):
        assert rel.max() <= 1e-4
        assert np.abs(seg - ref_seg).max() <= 1e-4 * np.ptp(ref_seg)
    else:
        assert np.median(rel) <= 0.02
        assert (seg.argmax(1) == ref_seg.argmax(1)).mean() >= 0.9


def test_invoke_fn_runs_one_inference_of_the_prepared_image(tiny_artefacts):
    images, _, _ = reference(tiny_artefacts)
    runner = open_runner(tiny_artefacts["tflite_int8"], threads=1)
    expected, _ = runner(images[1:2])
    run_once = runner.invoke_fn(images[1:2])
    run_once()
    run_once()                         # the closure only invokes: the input invoke_fn set stays
    np.testing.assert_array_equal(runner.output(DEPTH), expected)
    onnx = open_runner(tiny_artefacts["onnx_fp32"], threads=1)   # the session's own outputs of that image
    np.testing.assert_array_equal(onnx.invoke_fn(images[1:2])()[0], onnx(images[1:2])[0])



def test_the_python_api_takes_the_home_folder_as_the_commands_do(tiny_artefacts, tmp_path, monkeypatch):
    """open_runner, run_artefact and the benches said "~/model.onnx: it does not exist"; a file named
    "~draft.onnx" is still itself."""
    from edge.bench import bench_artefact, bench_side_by_side
    from edge.run import run_artefact

    for name in ("model.onnx", "~draft.onnx"):
        shutil.copyfile(tiny_artefacts["onnx_fp32"], tmp_path / name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    image = reference(tiny_artefacts)[0][:1]
    for path in ("~/model.onnx", "~draft.onnx"):
        assert open_runner(path, threads=1)(image)[0].shape[0] == 1
        assert run_artefact(path, image, threads=1)["depth"].shape[0] == 1
    assert bench_artefact("~/model.onnx", threads=1, runs=1, warmup=0)["artefact"] == "model.onnx"
    assert len(bench_side_by_side(["~/model.onnx", "~draft.onnx"], threads=1, runs=1, warmup=0)["artefacts"]) == 2


def test_open_runner_errors_name_the_path_and_the_known_suffixes(tiny_artefacts, tmp_path):
    with pytest.raises(ValueError, match=r"missing\.onnx.*does not exist"):
        open_runner(tmp_path / "missing.onnx")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown artefact suffix '\.pt'.*\.tflite, \.mlpackage, \.onnx"):
        open_runner(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"executor 'predict' applies to Core ML.*--executor auto"):
        open_runner(tiny_artefacts["onnx_fp32"], executor="predict")
    with pytest.raises(ValueError, match=r"takes \(N, 3, 64, 96\)"):
        open_runner(tiny_artefacts["onnx_fp32"])(np.zeros((1, 3, 32, 32), np.float32))


def test_open_runner_checks_an_artefact_against_its_exports_manifest(tiny_artefacts, tmp_path):
    """The Python API's runner opened an export's file unchecked, where edge.run and edge.bench refuse a
    copy that differs from manifest.json."""
    import json

    from core import io
    from core.manifest import IntegrityError
    from edge import open_runner

    copy = tmp_path / "student_fp32.tflite"
    copy.write_bytes(Path(tiny_artefacts["tflite_fp32"]).read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps({"artefacts": [{"path": copy.name, "sha256": io.sha256(copy)}]}))
    assert open_runner(copy, threads=1).format == "tflite"
    copy.write_bytes(copy.read_bytes() + b"\0")   # changed after export
    with pytest.raises(IntegrityError, match="student_fp32.tflite.*pass verify=False to run it anyway"):
        open_runner(copy)
    assert open_runner(copy, verify=False).format == "tflite"   # a caller that checked it, or chose not to


@pytest.mark.parametrize("name", ["tflite_fp32", "onnx_fp32"])
def test_a_truncated_artefact_is_refused_naming_its_size_and_the_check(tiny_artefacts, tmp_path, name):
    """What an interrupted copy leaves: the runtime's terse refusal gains the file's size and the fix."""
    source = Path(tiny_artefacts[name])
    truncated = tmp_path / source.name
    truncated.write_bytes(source.read_bytes()[:200])
    runtime = "onnxruntime" if name.startswith("onnx") else import_litert_interpreter()[1]
    with pytest.raises(UnreadableArtefact, match=rf"{runtime} cannot load .*{truncated.name} \(200 bytes\): .+"
                                                 r"python -m quant.verify <its export directory>"):
        open_runner(truncated)
    result = edge_cli("edge.bench", truncated, "--runs", 1)
    assert result.returncode != 0 and "(200 bytes)" in result.stderr and "Traceback" not in result.stderr


def test_litert_without_either_runtime_names_both_packages(monkeypatch):
    for module in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"ai-edge-litert or tflite-runtime.*pip install ai-edge-litert.*"
                                          r"pip install tflite-runtime"):
        import_litert_interpreter()


def test_run_cli_warns_of_outputs_that_are_not_finite(tiny_artefacts, tmp_path):
    """A broken artefact (here an ONNX file with one weight tensor set to NaN) is run and saved as
    it is, but said: the JSON line counts the values and stderr warns."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_artefacts["onnx_fp32"]))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weight), np.nan), weight.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    sound = edge_cli("edge.run", tiny_artefacts["onnx_fp32"], "--inputs", tiny_artefacts["inputs"],
                     "--out", tmp_path / "sound.npz")
    broken = edge_cli("edge.run", tmp_path / "broken.onnx", "--inputs", tiny_artefacts["inputs"],
                      "--out", tmp_path / "broken.npz")
    assert sound.returncode == broken.returncode == 0, broken.stderr
    assert json.loads(sound.stdout.strip().splitlines()[-1])["non_finite"] == 0 and "warning" not in sound.stderr
    count = json.loads(broken.stdout.strip().splitlines()[-1])["non_finite"]
    with np.load(tmp_path / "broken.npz") as result:
        assert count > 0 and count == (~np.isfinite(result["depth"])).sum() + 4 * 13 * 64 * 96
    assert f"warning: {count} output values of" in broken.stderr


def test_run_cli_writes_outputs_and_rejects_wrong_shapes(tiny_artefacts, tmp_path):
    images, ref_depth, ref_seg = reference(tiny_artefacts)
    out = tmp_path / "out.npz"
    proc = edge_cli("edge.run", tiny_artefacts["tflite_fp32"], "--inputs", tiny_artefacts["inputs"], "--out", out,
                    "--threads", "2", "--logits")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["images"] == 4 and line["executor"].startswith("ai-edge-litert")
    with np.load(out) as result:
        assert result["depth"].shape == (4, 1, 64, 96) and result["depth"].dtype == np.float32
        assert result["labels"].shape == (4, 64, 96) and result["labels"].dtype == np.uint8
        assert result["seg"].shape == ref_seg.shape and str(result["executor"]) == line["executor"]
        assert sorted(result.files) == ["depth", "executor", "labels", "non_finite", "seg"]   # quant/validate.py reads these
        assert int(result["non_finite"]) == line["non_finite"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]   # no temp file left behind

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, images[:, :, :32])
    proc = edge_cli("edge.run", tiny_artefacts["onnx_int8"], "--inputs", wrong, "--out", tmp_path / "bad.npz")
    assert proc.returncode == 2 and "(N, 3, 64, 96)" in proc.stderr
    assert not (tmp_path / "bad.npz").exists()


def write_photo(path: Path, size: tuple[int, int], *, orientation: int | None = None) -> None:
    """An RGB image file of `size` (W, H): its left half red, its right half blue."""
    from PIL import Image

    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    pixels[:, size[0] // 2:, 2] = 255
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation   # EXIF Orientation, as a phone writes a portrait photo
        image.save(path, exif=exif)


def test_a_photo_is_turned_upright_and_resized_per_axis(tmp_path):
    from edge.photos import read_photo

    write_photo(tmp_path / "flat.png", (640, 480))
    image = read_photo(tmp_path / "flat.png", (64, 96))
    assert image.shape == (3, 64, 96) and image.dtype == np.float32
    assert (image[0, :, :47] == 1).all() and (image[2, :, 49:] == 1).all()   # the whole frame, no crop
    # stored on its side with orientation 6 ("rotate 90 degrees clockwise to view"): the left half is the top
    write_photo(tmp_path / "portrait.jpg", (640, 480), orientation=6)
    image = read_photo(tmp_path / "portrait.jpg", (64, 96))
    assert image[0, :30].mean() > 0.95 and image[2, :30].mean() < 0.05
    assert image[2, 34:].mean() > 0.95 and image[0, 34:].mean() < 0.05


def test_greys_16_bit_and_transparent_images_read_as_rgb_and_float_ones_are_refused(tmp_path):
    from PIL import Image

    from edge.photos import BadPhoto, read_photo

    grey16 = np.full((48, 64), 65535 // 2, np.uint16)
    grey16[:, 32:] = 65535
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    image = read_photo(tmp_path / "grey16.png", (12, 16))
    assert np.allclose(image[:, :, :7], 128 / 255, atol=1 / 255) and np.allclose(image[:, :, 9:], 1.0)
    Image.fromarray(np.full((48, 64), 51, np.uint8)).save(tmp_path / "grey8.PNG")
    assert np.allclose(read_photo(tmp_path / "grey8.PNG", (12, 16)), 0.2)
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 255, 0   # fully transparent green: the colour under the transparency is read
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.allclose(read_photo(tmp_path / "rgba.png", (12, 16))[1], 1.0)
    Image.fromarray(np.ones((48, 64), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadPhoto, match="floating-point image .* save it as an 8- or 16-bit image"):
        read_photo(tmp_path / "float.tif", (12, 16))


def test_a_photo_over_pils_pixel_limit_is_read_when_a_jpeg_and_refused_with_the_fix_otherwise(tmp_path, monkeypatch):
    """A 200-megapixel phone photo (16320x12240) is over PIL's limit by its header; as a JPEG it decodes
    at 1/8 scale, so edge.run reads it. Stood in for by a small photo under a lowered limit."""
    from PIL import Image

    from edge.photos import BadPhoto, check_photos, read_photo

    write_photo(tmp_path / "phone.jpg", (640, 480))
    write_photo(tmp_path / "scan.png", (640, 480))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 640 * 480 // 4)
    check_photos([tmp_path / "phone.jpg"])
    image = read_photo(tmp_path / "phone.jpg", (64, 96))
    assert image.shape == (3, 64, 96) and image[0, :, :40].mean() > 0.95 and image[2, :, :40].mean() < 0.05
    with pytest.raises(BadPhoto, match="scan.png: Image size .* exceeds limit .*downscale the photo first"):
        check_photos([tmp_path / "scan.png"])


def test_depth_png_holds_millimetres_and_zero_where_depth_is_not_positive():
    from PIL import Image

    from edge.photos import depth_png

    depth = np.array([[1.2344, 0.0, -1.0], [np.nan, 80.0, 0.0004]], np.float32)
    stored = np.asarray(Image.open(io.BytesIO(depth_png(depth))))
    assert stored.dtype == np.uint16 and stored.tolist() == [[1234, 0, 0], [0, 65535, 1]]


def test_labels_png_keeps_every_class_id():
    from PIL import Image

    from edge.photos import labels_png

    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)   # 13 palette colours, yet ids up to 255 survive
    stored = Image.open(io.BytesIO(labels_png(ids)))
    assert stored.mode == "P" and (np.asarray(stored) == ids).all()
    assert stored.getpalette()[3 * 3: 3 * 4] == [148, 103, 189]   # class 3's colour, as in the run previews


def test_image_files_lists_each_file_once_and_refuses_names_that_clash(tmp_path):
    from edge.photos import BadPhoto, image_files

    for name in ("b.JPG", "a.png", ".a_sidecar.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [f.name for f in image_files([str(tmp_path), str(tmp_path / "b.JPG"), str(tmp_path)])] == ["a.png", "b.JPG"]
    (tmp_path / "A.jpeg").write_bytes(b"")
    with pytest.raises(BadPhoto, match="would write the same"):   # a.png and A.jpeg: one name on macOS
        image_files([str(tmp_path)])


def test_run_cli_writes_depth_label_and_preview_pngs_for_image_files(tiny_artefacts, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "kitchen.JPG", (640, 480))
    write_photo(photos / "hall.png", (300, 200))
    (photos / "notes.txt").write_text("not an image")   # a folder's other files are not inputs, and are named
    proc = edge_cli("edge.run", tiny_artefacts["tflite_int8"], "--inputs", photos, "--out", tmp_path / "maps")
    assert proc.returncode == 0, proc.stderr
    assert "1 file left out, not images by their suffix (notes.txt)" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == 2
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        f"{stem}_{kind}.png" for stem in ("hall", "kitchen") for kind in ("depth", "labels", "preview")]
    proc = edge_cli("edge.run", tiny_artefacts["tflite_int8"], "--inputs", photos / "hall.png", photos / "kitchen.JPG",
                    "--out", tmp_path / "arrays.npz")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "arrays.npz") as arrays:
        assert arrays["names"].tolist() == ["hall", "kitchen"]
        for i, stem in enumerate(arrays["names"]):
            depth = np.asarray(Image.open(tmp_path / "maps" / f"{stem}_depth.png"))
            assert depth.shape == (64, 96) and depth.dtype == np.uint16
            assert np.abs(depth.astype(np.float64) - arrays["depth"][i, 0] * 1000).max() <= 0.5 + 1e-3
            labels = Image.open(tmp_path / "maps" / f"{stem}_labels.png")
            assert labels.mode == "P" and (np.asarray(labels) == arrays["labels"][i]).all()
        preview = Image.open(tmp_path / "maps" / f"{arrays['names'][0]}_preview.png")
        assert preview.width > 3 * 96 and preview.height > 64


def test_run_cli_writes_maps_of_an_npy_in_chunks(tiny_artefacts, tmp_path, monkeypatch, capsys):
    import edge.run
    from PIL import Image

    monkeypatch.setattr(edge.run, "CHUNK", 3)   # 4 images: two chunks
    images, _, _ = reference(tiny_artefacts)
    assert edge.run.main([str(tiny_artefacts["onnx_fp32"]), "--inputs", str(tiny_artefacts["inputs"]),
                          "--out", str(tmp_path / "maps")]) == 0
    assert "3/4 images" in capsys.readouterr().err
    direct = run_artefact(tiny_artefacts["onnx_fp32"], images, logits=True)
    for i in range(4):
        depth = np.asarray(Image.open(tmp_path / "maps" / f"{i:06d}_depth.png")).astype(np.float64)
        assert np.abs(depth - direct["depth"][i, 0] * 1000).max() <= 0.5 + 1e-3
    # an .npz too is run a chunk at a time (a folder of 10,000 photos held every image and logit: 20 GB)
    capsys.readouterr()
    assert edge.run.main([str(tiny_artefacts["onnx_fp32"]), "--inputs", str(tiny_artefacts["inputs"]),
                          "--out", str(tmp_path / "all.npz"), "--logits"]) == 0
    assert "3/4 images" in capsys.readouterr().err
    with np.load(tmp_path / "all.npz") as saved:
        for key in ("depth", "labels", "seg"):
            assert np.allclose(saved[key], direct[key], rtol=1e-5, atol=1e-6), key
        assert int(saved["non_finite"]) == 0 and str(saved["executor"]) == direct["executor"]
    np.save(tmp_path / "big_endian.npy", images.astype(">f4"))   # another machine's float32: the same images
    assert edge.run.main([str(tiny_artefacts["onnx_fp32"]), "--inputs", str(tmp_path / "big_endian.npy"),
                          "--out", str(tmp_path / "big_endian.npz")]) == 0
    with np.load(tmp_path / "big_endian.npz") as saved:
        assert np.allclose(saved["depth"], direct["depth"], rtol=1e-5, atol=1e-6)


def test_run_cli_refuses_bad_image_inputs_before_writing(tiny_artefacts, tmp_path, monkeypatch):
    import edge.run
    from edge.run import main

    artefact = tiny_artefacts["onnx_fp32"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "arrays.npz").mkdir()
    write_photo(tmp_path / "a" / "room.png", (64, 48))
    write_photo(tmp_path / "b" / "room.jpg", (64, 48))
    write_photo(tmp_path / "b" / "room_depth.png", (64, 48))
    (tmp_path / "long").mkdir()
    write_photo(tmp_path / "long" / f"{'x' * 244}.png", (64, 48))   # its map x..x_preview.png: 256 bytes
    (tmp_path / "broken.png").write_text("not an image")
    maps = tmp_path / "maps"
    cases = [
        ([tmp_path / "empty"], maps, "holds no image"),
        ([tmp_path / "missing.jpg"], maps, "no such file or folder"),
        ([tmp_path / "a", tmp_path / "b"], maps, "would write the same room_*.png maps"),
        ([tmp_path / "broken.png"], maps, "broken.png: not a readable image"),
        ([tmp_path / "a", tiny_artefacts["inputs"]], maps, "an .npy comes alone"),
        ([tmp_path / "a"], tmp_path / "maps.png", "give a path ending in .npz"),
        ([tmp_path / "a"], tmp_path / "arrays.npz", "arrays.npz is a directory"),
        ([tmp_path / "a", tiny_artefacts["inputs"].with_suffix(".NPY")], maps, "an .npy comes alone"),
        # the maps never land on the inputs: a folder of them, or a photo named like a map
        ([tmp_path / "a"], tmp_path / "a", "is a folder of the inputs: the maps would join its photos"),
        ([tmp_path / "a" / "room.png", tmp_path / "b" / "room_depth.png"], tmp_path / "b",
         "the map room_depth.png would replace the input"),
        ([tmp_path / "long"], maps, "longer than the file system allows; rename the photo"),
    ]
    with monkeypatch.context() as patched:   # each refused before the runtime opens (seconds for TensorFlow)
        patched.setattr(edge.run, "open_runner", lambda *args, **kwargs: pytest.fail("the runtime was opened"))
        for inputs, out, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                main.__wrapped__([str(artefact), "--inputs", *map(str, inputs), "--out", str(out)])
    assert not (tmp_path / "maps").exists() and not (tmp_path / "maps.png").exists()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["room.png"]

    # a photo that decodes only when its chunk comes: the maps before it stay, and the error says so
    monkeypatch.setattr(edge.run, "CHUNK", 1)
    (tmp_path / "late").mkdir()
    write_photo(tmp_path / "late" / "a_room.png", (64, 48))
    (tmp_path / "late" / "b_room.png").write_bytes((tmp_path / "a" / "room.png").read_bytes()[:100])
    kept = tmp_path / "kept"
    with pytest.raises(ValueError, match=re.escape(f"; the maps of the 1 images before its chunk are in {kept}/")):
        main.__wrapped__([str(artefact), "--inputs", str(tmp_path / "late"), "--out", str(kept)])
    assert sorted(p.name for p in kept.iterdir()) == ["a_room_depth.png", "a_room_labels.png", "a_room_preview.png"]
    # an .npy for a folder of maps is checked whole before the first chunk is written
    monkeypatch.setattr(edge.run, "CHUNK", 2)
    images, _, _ = reference(tiny_artefacts)
    late = images.copy()
    late[-1, 0, 0, 0] = np.nan
    np.save(tmp_path / "late.npy", late)
    np.save(tmp_path / "none.npy", images[:0])
    (tmp_path / "empty.npy").write_bytes(b"")   # numpy raises EOFError on it
    np.savetxt(tmp_path / "text.npy", images[0, 0])   # numpy's refusal of it speaks of pickled data
    for inputs, extra, message in [(tmp_path / "late.npy", [], "inputs hold 1 NaN or infinite values (the first at index (3, 0, 0, 0))"), (tmp_path / "none.npy", [], "N >= 1"),
                                   (tmp_path / "empty.npy", [], "cannot read --inputs"),
                                   (tmp_path / "text.npy", [], "text.npy is not an .npy file (it lacks numpy's header"),
                                   (tmp_path / "a", ["--logits"], "--logits stores the logits in an .npz")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            main.__wrapped__([str(artefact), "--inputs", str(inputs), "--out", str(maps), *extra])
        assert not maps.exists() or not any(maps.iterdir())


def test_run_artefact_rejects_dtype_and_range(tiny_artefacts):
    images, _, _ = reference(tiny_artefacts)
    with pytest.raises(BadInput, match=r"dtype float64; .*\(convert with images.astype\(np.float32\)\)"):
        run_artefact(tiny_artefacts["onnx_fp32"], images.astype(np.float64))
    with pytest.raises(BadInput, match=r"dtype uint8; .*\(convert with images.astype\(np.float32\) / 255\)"):
        run_artefact(tiny_artefacts["onnx_fp32"], (images * 255).astype(np.uint8))
    with pytest.raises(BadInput, match=r"dtype float32 of the other byte order; "):
        run_artefact(tiny_artefacts["onnx_fp32"], images.astype(">f4"))
    with pytest.raises(BadInput, match=r"inputs range over \[0.003457, 255\]; expected RGB in \[0, 1\].* raw / 255"):
        run_artefact(tiny_artefacts["onnx_fp32"], np.clip(images * 1000, 0, 255))
    with pytest.raises(BadInput, match=r"expected RGB in \[0, 1\]"):
        run_artefact(tiny_artefacts["onnx_fp32"], images * 255)
    result = run_artefact(tiny_artefacts["onnx_fp32"], images[:2])
    assert "seg" not in result and result["labels"].shape == (2, 64, 96)


@pytest.mark.parametrize("name", ["tflite_int8", "onnx_fp32"])
def test_bench_schema_and_ordered_percentiles(tiny_artefacts, name):
    result = bench_artefact(tiny_artefacts[name], threads=1, runs=5, warmup=1)
    assert set(result) == BENCH_KEYS and result["schema"] == SCHEMA
    assert result["artefact"] == tiny_artefacts[name].name and result["format"] == name.split("_")[0]
    assert set(result["device"]) == {"name", "system", "machine", "processor", "cores", "simd", "int8_dot"}
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["throughput_ips"] > 0 and result["runs"] == 5 and result["threads"] == 1
    assert result["memory_mb"]["peak_rss"] >= result["memory_mb"]["baseline_rss"] > 0


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML benches for real on macOS")
def test_bench_refuses_coreml_off_macos(tmp_path):
    (tmp_path / "m.mlpackage").mkdir()
    with pytest.raises(BenchRefused, match="reference executor.*coreml_bench.py"):
        bench_artefact(tmp_path / "m.mlpackage")


def test_bench_cli_writes_json(tiny_artefacts, tmp_path):
    out = tmp_path / "bench.json"
    proc = edge_cli("edge.bench", tiny_artefacts["onnx_int8"], "--threads", "1", "--runs", "3", "--warmup", "1",
                    "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == BENCH_KEYS and result["input_shape"] == [1, 3, 64, 96]
    assert "p50" in proc.stdout


def test_measure_peak_is_positive():
    peak = measure_peak(1, size=256, repeats=2)
    assert peak["fp32_gflops"] > 0 and peak["int8_gops"] > 0
    assert peak["size"] == 256 and peak["threads"] == 1 and "MatMulInteger" in peak["method"]
    assert set(peak["cpu"]) == {"model", "simd", "int8_dot"}


# /proc/cpuinfo excerpts: the first processor's entry counts; x86 names its flags "flags", Arm "Features".
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n" \
            "model name\t: other\nflags\t\t: avx512_vnni\n"
VNNI = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd asimddp cpuid\nCPU part\t: 0xd0b\n\nModel\t\t: Raspberry Pi 5 Model B\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\nCPU part\t: 0xd40\n"
NO_NAME = platform.processor() or platform.machine() or "unknown"   # what the reader falls back to


@pytest.mark.parametrize("text, model, simd, dot, line", [
    (AVX2_ONLY, "AMD EPYC", ["avx2"], [], "AMD EPYC (avx2; no int8 dot-product instructions)"),
    (VNNI, "Intel Xeon", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], ["avx512_vnni", "amx_int8"],
     "Intel Xeon (avx2, avx512f, avx512_bf16, amx_bf16; int8 dot products: avx512_vnni, amx_int8)"),
    (PI5, "Raspberry Pi 5 Model B", ["asimd"], ["asimddp"],
     "Raspberry Pi 5 Model B (asimd; int8 dot products: asimddp)"),
    (GRAVITON3, NO_NAME, ["asimd", "sve"], ["asimddp", "i8mm"], None),
    ("processor\t: 0\n", NO_NAME, [], None, None),
])
def test_host_cpu_reads_the_int8_instructions(text, model, simd, dot, line):
    cpu = host_cpu(text)
    assert cpu == {"model": model, "simd": simd, "int8_dot": dot}
    if line:
        assert describe_cpu(cpu) == line
    if dot is None:
        assert describe_cpu(cpu).endswith("no listed SIMD; int8 dot-product instructions unknown)")


def test_compare_interleaves_and_reports_speedups(tiny_artefacts, tmp_path):
    out = tmp_path / "compare.json"
    proc = edge_cli("edge.bench", tiny_artefacts["tflite_fp32"], tiny_artefacts["tflite_int8"], "--threads", "1",
                    "--runs", "4", "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "densekit.bench-compare/1" and result["runs"] == 4 and result["turn"] == 4
    first, second = result["artefacts"]
    assert first["artefact"] == "tiny_fp32.tflite" and first["speedup_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["latency_ms"]["p50"] / second["latency_ms"]["p50"])
    assert first["speedup_by_turn"] == {"p10": 1.0, "p50": 1.0, "p90": 1.0, "turns": 1}
    assert second["speedup_by_turn"]["p50"] == pytest.approx(second["speedup_vs_first"])   # one round: the same ratio
    assert "speed-up" in proc.stdout and "note:" not in proc.stdout   # one size, one runtime
    assert f"cpu: {describe_cpu(host_cpu())}" in proc.stdout and result["device"]["int8_dot"] == host_cpu()["int8_dot"]
    assert [(a["format"], a["input_shape"], a["threads"]) for a in result["artefacts"]] == [("tflite", [1, 64, 96, 3], 1)] * 2


def test_compare_says_when_runtimes_differ_and_takes_the_executor(tiny_artefacts, tmp_path):
    from edge.bench import bench_side_by_side, compare_summary

    result = bench_side_by_side([tiny_artefacts["tflite_fp32"], tiny_artefacts["onnx_fp32"]], threads=1, runs=2, warmup=0)
    assert [a["format"] for a in result["artefacts"]] == ["tflite", "onnx"]
    text = compare_summary(result)   # NHWC beside NCHW: the same 64x96 image
    assert "note: the runtimes differ (onnx, tflite)" in text and "differ in size" not in text
    result["artefacts"][1]["image_shape"] = [3, 128, 160]
    assert "note: the input images differ in size (64x96, 128x160)" in compare_summary(result)
    with pytest.raises(BenchRefused, match="executor 'predict' applies to Core ML artefacts only"):
        bench_side_by_side([tiny_artefacts["tflite_fp32"], tiny_artefacts["tflite_int8"]], executor="predict")
    with pytest.raises(BenchRefused, match=r"runs=0, warmup=5: need runs >= 1 and warmup >= 0"):   # the API's words
        bench_side_by_side([tiny_artefacts["tflite_fp32"], tiny_artefacts["tflite_int8"]], runs=0)


def test_bench_refuses_a_json_directory_before_timing(tiny_artefacts, tmp_path):
    proc = edge_cli("edge.bench", tiny_artefacts["onnx_fp32"], "--runs", "100000", "--json", tmp_path)
    assert proc.returncode == 2 and f"--json {tmp_path} is a directory" in proc.stderr, proc.stderr


def test_an_onnx_batch_dimension_by_name_runs_and_a_dynamic_image_size_is_refused(tiny_artefacts, tmp_path):
    import onnx

    model = onnx.load(str(tiny_artefacts["onnx_fp32"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    onnx.save(model, str(tmp_path / "batch.onnx"))
    images = np.load(tiny_artefacts["inputs"])
    assert run_artefact(tmp_path / "batch.onnx", images[:1])["depth"].shape == (1, 1, 64, 96)
    dims[2].dim_param = "height"
    onnx.save(model, str(tmp_path / "height.onnx"))
    with pytest.raises(ValueError, match="has the dynamic shape .*export one with python -m quant.export"):
        run_artefact(tmp_path / "height.onnx", images[:1])


def test_artefact_suffixes_are_read_without_case(tiny_artefacts, tmp_path):
    upper = tmp_path / "tiny.ONNX"
    shutil.copyfile(tiny_artefacts["onnx_fp32"], upper)
    assert run_artefact(upper, np.load(tiny_artefacts["inputs"])[:1])["labels"].shape == (1, 64, 96)


def test_compare_takes_turns_that_start_with_untimed_calls():
    """Interleaving in turns: a runtime's spinning threads (onnxruntime's) must not land in the
    next artefact's timed calls, and every artefact gets exactly `runs` timed calls."""
    from edge.bench import interleave_turns

    log = []
    calls = [lambda: log.append("a"), lambda: log.append("b")]
    seconds = interleave_turns(calls, runs=5, turn=2, settle=1)
    assert [len(s) for s in seconds] == [5, 5] and all(t >= 0 for s in seconds for t in s)
    assert "".join(log) == "aaa" "bbb" "aaa" "bbb" "aa" "bb"   # each turn: 1 untimed call, then 2 (the last 1) timed


@pytest.mark.parametrize("module", ["edge.bench", "edge.op_profile", "edge.section_profile"])
def test_a_result_file_never_replaces_what_the_command_reads(module, tiny_artefacts, tmp_path, capsys):
    """`--json model.tflite` replaced the model with 1 KB of JSON, and `--json <export>/manifest.json`
    made every later check of that export fail; the command said "wrote" and exited 0."""
    import importlib

    model = tmp_path / "export" / "m_int8.tflite"
    model.parent.mkdir()
    shutil.copyfile(tiny_artefacts["tflite_int8"], model)
    manifest = model.parent / "manifest.json"
    manifest.write_text("{}")
    main = importlib.import_module(module).main
    for target, message in ((model, "the result is JSON; give a file name ending in .json, e.g. "),
                            (manifest, "is a file this command reads; give another file name")):
        before = target.read_bytes()
        assert main([str(model), "--runs", "1", "--no-verify", "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"error: --json {target}" in err and message in err, err
        assert target.read_bytes() == before


def test_the_speed_up_round_by_round_pairs_the_calls_made_together():
    """A host that slows for a while slows both artefacts of a round: the per-round ratio stays,
    where the whole-run medians mix the slow rounds of one with the fast rounds of the other."""
    from edge.bench import turn_speedups

    fp32 = [1.0, 1.0, 3.0, 3.0, 1.0]   # rounds of 2: the host slowed 3x in the second
    int8 = [0.5, 0.5, 1.5, 1.5, 0.25]  # 2x, 2x, then a last round of one call at 4x
    ratios = turn_speedups(fp32, int8, turn=2)
    assert ratios["turns"] == 3 and ratios["p50"] == pytest.approx(2.0)
    assert ratios["p10"] == pytest.approx(2.0) and ratios["p90"] == pytest.approx(3.6)   # 2 + 0.8 x (4 - 2)


def test_op_profile_times_every_op_of_an_int8_file(tiny_artefacts, tmp_path):
    """edge.op_profile cuts each op out as a one-op model and times it in LiteRT."""
    out = tmp_path / "ops.json"
    proc = edge_cli("edge.op_profile", tiny_artefacts["tflite_int8"], "--threads", "1", "--runs", "3", "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    from ai_edge_litert.interpreter import Interpreter
    graph_ops = [op["op_name"] for op in Interpreter(model_path=str(tiny_artefacts["tflite_int8"]))._get_ops_details()]
    assert [op["op"] for op in result["ops"]] == graph_ops            # every op, in order, named as LiteRT names it
    assert all(op["us"] > 0 for op in result["ops"])
    assert sum(e["count"] for e in result["by_type"].values()) == len(graph_ops)
    convs = [op for op in result["ops"] if op["op"] == "CONV_2D"]
    # int8 but the input stem's (--float-stem 2; this stride-4 student: the stem and the first depthwise layer)
    assert [op["dtype"] for op in convs] == ["float32"] + ["int8"] * (len(convs) - 1) and "CONV_2D" in proc.stdout


def test_section_profile_splits_the_whole_graph_time_of_two_files(tiny_artefacts, tmp_path):
    """edge.section_profile times nested sub-graphs of both files interleaved: every op falls in one
    section, each section holds the same layers in both files, and the sections add up to the file."""
    from edge.op_profile import load_model
    from edge.section_profile import weighted_layers

    out = tmp_path / "sections.json"
    fp32, int8 = tiny_artefacts["tflite_fp32"], tiny_artefacts["tflite_int8"]
    proc = edge_cli("edge.section_profile", fp32, int8, "--sections", "4", "--threads", "1", "--runs", "5",
                    "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "densekit.section-profile/1" and result["models"] == [fp32.name, int8.name]
    sections = result["sections"]
    assert 2 <= len(sections) <= 5 and "speed-up" in proc.stdout
    # the last section is the output tails alone (the heads' upsampling, EXP): no weighted op, the same
    # ops in float in both files (the int8 file adds its DEQUANTIZEs)
    *body, tails = sections
    assert tails["output_tails"] and not any(s["output_tails"] for s in body) and "output tails" in proc.stdout
    assert tails["weighted_ops"] == 0 and tails["macs"] == 0 and 0 < tails["ops"][0] < tails["ops"][1]
    for f, path in enumerate((fp32, int8)):
        model = load_model(path)
        layers = weighted_layers(model)
        assert sum(s["ops"][f] for s in sections) == len(model.subgraphs[0].operators)
        assert sum(s["weighted_ops"] for s in sections) == len(layers)
        assert sum(s["macs"] for s in sections) == sum(m for _, _, m in layers)
        assert sum(s["us"][f] for s in sections) == pytest.approx(result["total_us"][f], abs=0.05)
        assert result["total_us"][f] > 0
    for s in sections:
        assert s["speedup"] == pytest.approx(s["us"][0] / s["us"][1], rel=1e-2) if s["us"][1] > 0 else s["speedup"] is None


def test_section_profile_counts_macs_and_refuses_files_of_different_models(tiny_artefacts, tmp_path):
    from edge.section_profile import layer_macs

    assert layer_macs("CONV_2D", (8, 3, 3, 4), (1, 10, 12, 8)) == 10 * 12 * 8 * 3 * 3 * 4
    assert layer_macs("DEPTHWISE_CONV_2D", (1, 3, 3, 8), (1, 10, 12, 8)) == 10 * 12 * 8 * 3 * 3
    assert layer_macs("FULLY_CONNECTED", (5, 7), (1, 5)) == 35
    # the first prefix of a file as a second "model": the same format, other layers
    from edge.op_profile import load_model
    from edge.section_profile import sub_model, weighted_layers

    model = load_model(tiny_artefacts["tflite_fp32"])
    partial = tmp_path / "partial.tflite"
    partial.write_bytes(sub_model(model, weighted_layers(model)[2][0])[0])
    proc = edge_cli("edge.section_profile", tiny_artefacts["tflite_fp32"], partial, "--runs", "2")
    assert proc.returncode == 2 and "do not hold the same layers" in proc.stderr
    proc = edge_cli("edge.section_profile", partial, partial, partial)
    assert proc.returncode == 2 and "one or two .tflite files" in proc.stderr
    proc = edge_cli("edge.section_profile", tiny_artefacts["onnx_fp32"])
    assert proc.returncode == 2 and "takes existing .tflite files" in proc.stderr


def test_op_profile_refuses_a_file_that_is_not_tflite(tiny_artefacts, tmp_path):
    proc = edge_cli("edge.op_profile", tiny_artefacts["onnx_fp32"])
    assert proc.returncode == 2 and "takes an existing .tflite file" in proc.stderr
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\0" * 64)
    proc = edge_cli("edge.op_profile", fake)
    assert proc.returncode == 2 and "fake.tflite (64 bytes) is not a TFLite file (no TFL3 identifier" in proc.stderr
    assert "python -m quant.verify" in proc.stderr   # the fix, as edge.bench names it
    from edge.op_profile import load_model
    cut = tmp_path / "cut.tflite"   # an interrupted copy: the identifier is there, the tables are not
    cut.write_bytes(Path(tiny_artefacts["tflite_int8"]).read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"cut\.tflite \(4000 bytes\) is a truncated or damaged TFLite file"):
        load_model(cut)
