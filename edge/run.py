"""Run one artefact on a batch of images in its own runtime: `python -m edge.run`.

    python -m edge.run ARTEFACT --inputs IMAGES.npy --out OUT.npz [--threads N]
                       [--executor auto|predict|reference] [--logits]
    python -m edge.run ARTEFACT --inputs photo.jpg [more.png ...] [folder/] --out maps/

IMAGES.npy: (N, 3, H, W) float32 RGB in [0, 1] with the artefact's H and W. Image files (PNG,
JPEG, ...; a folder: its images, sorted by name) are turned upright and resized to the artefact's
input, as the training data was (edge/photos.py). OUT.npz (written atomically): `depth` (N, 1, H,
W) float32 metres, `labels` (N, H, W) uint8 (argmax of the logits), `seg` (N, C, H, W) float32
logits with --logits only, `executor` (0-d str array), `non_finite` (0-d int: NaN or infinite
values among depth and the logits), and `names` (the image files' stems) for image inputs. An
--out without the .npz suffix is a folder that gets, per image, a 16-bit depth PNG in
millimetres, a label PNG and a preview (edge/photos.py); an .npy's images are named 000000,
000001, ... Images are decoded and run 64 at a time (an .npz keeps every image's depth and labels,
about 5 bytes a pixel; a folder of maps keeps nothing). The
maps never land on the inputs: an --out that is a folder of the inputs, or where a map would
replace an input, is refused.
The last stdout line is JSON: {"artefact", "executor", "images", "seconds", "non_finite"} (NaN or
infinite output values, also warned of on stderr: the outputs are saved as they came).
Exit status: 0 done, 2 bad arguments or inputs, 1 the runtime failed.

One process per artefact is the point: each runtime imports only its own toolchain (TensorFlow
and torch must not share a process, docs/TOOLCHAIN.md), so quant/validate.py calls this as a child.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core import io as core_io
from core.cli import ArgumentParser, command, threads_option, user_path
from core.formats import SUFFIXES
from core.manifest import verify_artefact, verify_command_arguments
from edge.photos import IMAGE_SUFFIXES, check_map_folder, check_photos, image_files, read_photos, write_maps
from edge.runners import EXECUTORS, artefact_format, image_shape, open_runner


class BadInput(ValueError):
    """Inputs that do not fit the artefact (exit status 2)."""


def write_json(dest: str | Path, data: dict) -> None:
    """`data` as indented JSON at `dest`, atomically, and say so."""
    core_io.write_json(dest, data)
    print(f"wrote {dest}")


def validate_images(images: np.ndarray, runner) -> None:
    """Raise BadInput unless images are (N, 3, H, W) float32 in [0, 1] with the artefact's H, W."""
    expected = "(N, " + ", ".join(map(str, image_shape(runner))) + ")"
    if images.ndim != 4 or tuple(images.shape[1:]) != image_shape(runner) or len(images) == 0:
        raise BadInput(f"inputs have shape {tuple(images.shape)}; {runner.format} artefact expects {expected} "
                       f"float32 RGB in [0, 1], NCHW (N >= 1)")
    if images.dtype != np.float32:
        how = ("images.astype(np.float32) / 255" if images.dtype.kind in "ui" else "images.astype(np.float32)")
        shown = images.dtype.name if images.dtype.isnative else f"{images.dtype.name} of the other byte order"
        raise BadInput(f"inputs have dtype {shown}; expected float32 {expected} in [0, 1] "
                       f"(convert with {how})")
    finite = np.isfinite(images)
    if not finite.all():   # their range may look right: name the values and where, not a scale
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise BadInput(f"inputs hold {int((~finite).sum())} NaN or infinite values (the first at index {first}); "
                       f"expected finite RGB in [0, 1]: fix the decoding or preprocessing that produced them")
    if images.min() < 0 or images.max() > 1:
        raise BadInput(f"inputs range over [{images.min():.4g}, {images.max():.4g}]; expected RGB in [0, 1]: "
                       f"normalisation is inside the artefact, so feed raw / 255")


def check_artefact(path: str | Path, executor: str = "auto", verify: bool = True) -> None:
    """BadInput unless `path` is an existing artefact that `executor` applies to (and, with
    `verify`, matches its export's manifest). Opens no runtime."""
    try:
        artefact_format(path, executor)   # "predict" passes for Core ML files only
        if executor == "predict" and sys.platform != "darwin":
            raise ValueError(f"--executor predict (MLModel.predict) needs macOS; this is {sys.platform}: use "
                             f"--executor reference, the MIL reference executor of edge/mil.py")
        if executor == "predict":   # a Mac older than the package needs: a bad argument, said before loading
            from edge.coreml import resolve_executor
            try:
                resolve_executor(executor, Path(path))
            except RuntimeError as exc:
                raise ValueError(str(exc)) from exc
        if verify:
            verify_artefact(path)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def run_artefact(path: str | Path, images: np.ndarray, *, threads: int | None = None, executor: str = "auto",
                 logits: bool = False, verify: bool = True) -> dict:
    """Run artefact `path` on images (N, 3, H, W) float32 in [0, 1].

    Returns {"depth": (N, 1, H, W) float32 metres, "labels": (N, H, W) uint8, "seg": (N, C, H, W)
    float32 logits (only with logits=True), "executor": str, "seconds": float (the runs only),
    "non_finite": int (NaN or infinite values among the outputs; 0 for a sound artefact)}.
    verify: an artefact in an export directory must match its manifest's sha256 (core/manifest.py).
    Raises BadInput (a ValueError) when the path, the executor, the file's hash or the images are
    wrong; whatever the runtime raises while loading or running the artefact passes through.
    """
    path = core_io.home_path(path)   # "~" from Python too, as the flags take it
    check_artefact(path, executor, verify)
    return run_images(open_runner(path, threads=threads, executor=executor, verify=False), images, logits=logits)


def run_images(runner, images: np.ndarray, *, logits: bool = False) -> dict:
    """`run_artefact` on an open runner."""
    validate_images(images, runner)
    start = time.perf_counter()
    depth, seg = runner(images)
    seconds = time.perf_counter() - start
    if seg.shape[1] > 256:
        raise ValueError(f"{runner.path.name} has {seg.shape[1]} classes; labels are uint8 (at most 256)")
    non_finite = int(depth.size - np.isfinite(depth).sum() + seg.size - np.isfinite(seg).sum())
    out = {"depth": depth.astype(np.float32), "labels": seg.argmax(1).astype(np.uint8),
           "executor": runner.executor, "seconds": seconds, "non_finite": non_finite}
    if logits:
        out["seg"] = seg.astype(np.float32)
    return out


def save_outputs(dest: str | Path, result: dict) -> None:
    """OUT.npz from `run_artefact`'s result (atomically)."""
    arrays = {k: np.asarray(result[k]) for k in ("depth", "labels", "seg", "names") if k in result}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, executor=np.array(result["executor"]), non_finite=np.array(result["non_finite"]))
    core_io.write_bytes(dest, buffer.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m edge.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("artefact", nargs="?", help=".tflite, .onnx or .mlpackage (required; before --inputs)")
    parser.add_argument("--inputs", required=True, nargs="+", type=user_path,
                        help="an (N, 3, H, W) float32 .npy in [0, 1], or image files and folders of them")
    parser.add_argument("--out", required=True, type=user_path,
                        help="an .npz of the outputs, or a folder for depth, label and preview PNGs per image")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    parser.add_argument("--executor", default="auto", choices=EXECUTORS, help="Core ML only")
    parser.add_argument("--logits", action="store_true", help="also store the segmentation logits")
    parser.add_argument("--no-verify", action="store_true",
                        help="run an artefact even if it differs from its export's manifest.json")
    args = parser.parse_args(argv)
    if args.artefact is None:   # --inputs takes every word after it: an artefact named last went there
        taken = [item for item in args.inputs if Path(item).suffix.lower() in SUFFIXES]
        parser.error(f"the artefact comes first: python -m edge.run {taken[-1]} --inputs ... (--inputs took it)"
                     if taken else "the following arguments are required: artefact")
    return args


CHUNK = 64   # images read and run at a time: the images and logits of one chunk in memory, whatever the folder


@command("python -m edge.run")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = output_path(args.out)   # before the model runs
    to_npz = out.suffix.lower() == ".npz"   # else a folder of maps
    threads_option("--threads", args.threads)
    if args.logits and not to_npz:
        raise BadInput(f"--logits stores the logits in an .npz, but --out {args.out} is a folder of PNG maps; "
                       f"give an --out ending in .npz, or drop --logits")
    check_artefact(args.artefact, args.executor, verify=False)
    if not args.no_verify:
        verify_command_arguments([args.artefact])
    files = input_files(args.inputs)   # none: one .npy, read before the runtime opens so that a bad one fails at once
    arrays = None if files else read_inputs(args.inputs[0])
    if not to_npz:   # before the runtime opens
        check_map_folder(out, args.inputs, files)
    runner = open_runner(args.artefact, threads=args.threads, executor=args.executor, verify=False)   # checked above
    if arrays is not None:   # all of them before the first chunk's maps are written
        validate_images(arrays, runner)
    if to_npz:
        count, seconds, non_finite = write_npz(out, runner, files, arrays, logits=args.logits)
    else:
        count, seconds, non_finite = write_map_folder(out, runner, files, arrays)
    if non_finite:   # saved as they came, but never silently: a broken file (an fp16 overflow) looks like this
        print(f"warning: {non_finite} output values of {args.artefact} are NaN or infinite; their depth maps "
              f"read 0 and their labels mean nothing", file=sys.stderr)
    print(json.dumps({"artefact": str(args.artefact), "executor": runner.executor, "images": count,
                      "seconds": round(seconds, 4), "non_finite": non_finite}))
    return 0


def run_chunks(runner, files: list[Path], arrays: np.ndarray | None,
               logits: bool = False) -> Iterator[tuple[list[str], np.ndarray, dict]]:
    """(names, images, `run_images` result) for CHUNK images at a time: photos are decoded as they
    are run, so that memory holds one chunk of images and logits, whatever the folder's size."""
    total = len(files) if files else len(arrays)
    size = image_shape(runner)[1:]
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        if files:
            names, images = [f.stem for f in files[start:stop]], read_photos(files[start:stop], size)
        else:
            names, images = [f"{i:06d}" for i in range(start, stop)], arrays[start:stop]
        yield names, images, run_images(runner, images, logits=logits)
        if total > CHUNK:
            print(f"{stop}/{total} images", file=sys.stderr)


def write_npz(out: Path, runner, files: list[Path], arrays: np.ndarray | None,
              logits: bool = False) -> tuple[int, float, int]:
    """OUT.npz of every image, run CHUNK at a time (the logits kept only with `logits`).
    Returns (images, seconds spent running the artefact, non-finite output values)."""
    parts: dict[str, list[np.ndarray]] = {"depth": [], "labels": [], **({"seg": []} if logits else {})}
    seconds, non_finite = 0.0, 0
    for _, _, result in run_chunks(runner, files, arrays, logits):
        for key, kept in parts.items():
            kept.append(result[key])
        seconds, non_finite = seconds + result["seconds"], non_finite + result["non_finite"]
    merged = {key: np.concatenate(kept) for key, kept in parts.items()}
    names = {"names": [f.stem for f in files]} if files else {}
    save_outputs(out, {**merged, **names, "executor": runner.executor, "non_finite": non_finite})
    return len(merged["depth"]), seconds, non_finite


def write_map_folder(out: Path, runner, files: list[Path], arrays: np.ndarray | None) -> tuple[int, float, int]:
    """Depth, label and preview PNGs per image into `out`, CHUNK images at a time (each file written
    atomically; a photo that fails to decode stops the run with the maps before it kept).
    Returns (images, seconds spent running the artefact, non-finite output values)."""
    total, seconds, non_finite = 0, 0.0, 0
    try:
        for names, images, result in run_chunks(runner, files, arrays):
            write_maps(out, names, images, result)
            total, seconds, non_finite = total + len(names), seconds + result["seconds"], non_finite + result["non_finite"]
    except ValueError as exc:   # a photo of a later chunk that does not decode: say what is there
        if not total:
            raise
        raise type(exc)(f"{exc}; the maps of the {total} images before its chunk are in {out}/ (3 PNGs each), "
                        f"complete") from exc
    print(f"wrote {3 * total} PNGs to {out}/ (<name>_depth.png: the depth x 1000 as uint16, "
          f"<name>_labels.png: class ids, <name>_preview.png)")
    return total, seconds, non_finite


def output_path(out: str) -> Path:
    """--out checked: an .npz whose folder can be written, or a folder for the PNG maps."""
    path = Path(out)
    to_npz = path.suffix.lower() == ".npz"
    if not to_npz and (path.is_file() or path.suffix.lower() in (*IMAGE_SUFFIXES, ".npy", ".json")):
        raise BadInput(f"--out {out}: give a path ending in .npz for the arrays, or a folder for the PNG maps")
    if to_npz and path.is_dir():
        raise BadInput(f"--out {out} is a directory; give a file name ending in .npz for the arrays, or a folder "
                       "name without .npz for the PNG maps")
    core_io.check_writable(path.parent if to_npz else path, "--out")
    return path


def input_files(inputs: list[str]) -> list[Path]:
    """The image files --inputs names, each header checked; empty for one .npy."""
    if len(inputs) == 1 and inputs[0].lower().endswith(".npy"):
        return []
    if any(item.lower().endswith(".npy") for item in inputs):
        raise BadInput(f"--inputs {' '.join(inputs)}: an .npy comes alone, not beside image files")
    files = image_files(inputs)
    check_photos(files)
    return files


NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"   # numpy.save's header; numpy.savez's (a zip)


def read_inputs(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        npy = not head or head.startswith((NPY_MAGIC, ZIP_MAGIC))   # empty: numpy names it
        images = np.load(path) if npy else None
    except (ValueError, OSError, EOFError) as exc:   # EOFError: an empty file
        raise BadInput(f"cannot read --inputs {path}: {exc} (expected an (N, 3, H, W) float32 .npy)") from None
    if images is None:   # numpy would say "pickled data"
        raise BadInput(f"--inputs {path} is not an .npy file (it lacks numpy's header: text, or an image renamed?); "
                       f"write the (N, 3, H, W) float32 images with numpy.save, or give image files")
    if not isinstance(images, np.ndarray):   # an .npz archive, not one array
        raise BadInput(f"--inputs {path} holds several arrays; expected one (N, 3, H, W) float32 .npy")
    if images.dtype.kind == "f" and images.dtype.itemsize == 4:   # float32 of either byte order
        return images.astype(np.float32, copy=False)
    return images


if __name__ == "__main__":
    sys.exit(main())
