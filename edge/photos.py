"""Image files in, depth and label maps out: `python -m edge.run ARTEFACT --inputs photo.jpg --out maps/`.

An image is prepared as the training data was: turned upright by its EXIF orientation, converted to
RGB and resized per axis to the artefact's input (antialiased bilinear, as the NYU loader does), so
a 4:3 photo keeps its whole field of view. 16-bit greys are brought to 8 bits; transparency is
ignored. Metric depth is metric for a lens like the training
camera's (SynthRooms and NYU: the Kinect's 4:3 frame, about 63 x 49 degrees); another field of
view scales the depth by about the ratio of the focal lengths.

For each image `<stem>` the output folder gets (each file written atomically):
- `<stem>_depth.png`: 16-bit, the depth output x 1000 (millimetres for a metric artefact): 0 where
  it is not positive, 65535 at and beyond 65.535 (m);
- `<stem>_labels.png`: 8-bit class ids (the artefact's classes, in its metadata), with a palette
  so that viewers show colours;
- `<stem>_preview.png`: the image, the depth (near dark) and the labels side by side.

numpy and PIL only: this runs in the runtime's process, beside TensorFlow.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core import io as core_io
from core.images import open_image, refuse_float, upright_rgb
from core.figures import SEG_PALETTE, colorize, colorize_seg, compose

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAPS = ("depth", "labels", "preview")   # <stem>_<map>.png per image
NAME_MAX = 255   # bytes of a file name on Linux and macOS (atomic_path's temp name is cut to fit)
MM_PER_UNIT = 1000


class BadPhoto(ValueError):
    """An input that is not a readable image, or a set of inputs that cannot be named apart."""


def image_files(inputs: list[str]) -> list[Path]:
    """The image files that `inputs` name, each once: files as given, a folder's images sorted by name
    (hidden files, such as macOS's ._ sidecars, left out; other files named in a note on stderr).
    Refused: two that would write the same maps."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            visible = sorted(p for p in item.iterdir() if not p.name.startswith(".") and p.is_file())
            found = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise BadPhoto(f"--inputs {item}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            skipped = [p.name for p in visible if p.suffix.lower() not in IMAGE_SUFFIXES]
            if skipped:
                print(f"note: --inputs {item}: {len(skipped)} file{'s' * (len(skipped) > 1)} left out, not images by their suffix ("
                      + ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "") + ")", file=sys.stderr)
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise BadPhoto(f"--inputs {item}: no such file or folder")
    first: dict[Path, Path] = {}
    for f in files:   # a file named twice (a folder and one of its images, or a folder twice) runs once
        first.setdefault(f.resolve(), f)
    files = list(first.values())
    stems: dict[str, Path] = {}
    for f in files:
        other = stems.setdefault(f.stem.casefold(), f)   # casefold: IMG.jpg and img.png clash on macOS and Windows
        if other is not f:
            raise BadPhoto(f"--inputs {other} and {f} would write the same {f.stem}_*.png maps; "
                           f"rename one, or run them apart")
    return files


def check_map_folder(out: Path, inputs: list[str], files: list[Path]) -> None:
    """BadPhoto before anything runs when the maps would land on the inputs: --out is a folder that
    --inputs names (the maps would join the photos, and the next run would read them as photos), a
    map would replace an input file, or a map's name is too long for the file system."""
    if any(Path(item).is_dir() and Path(item).resolve() == out.resolve() for item in inputs):
        raise BadPhoto(f"--out {out} is a folder of the inputs: the maps would join its photos, and the next run would "
                       f"read them as photos; give another --out folder")
    taken = {f.resolve(): f for f in files}
    for f in files:
        for kind in MAPS:
            name = f"{f.stem}_{kind}.png"
            if len(os.fsencode(name)) > NAME_MAX:
                raise BadPhoto(f"--inputs {f}: its {kind} map's name would be {len(os.fsencode(name))} bytes, longer "
                               f"than the file system allows; rename the photo")
            replaced = taken.get((out / name).resolve())
            if replaced is not None:
                raise BadPhoto(f"--out {out}: the map {name} would replace the input {replaced}; "
                               f"give another --out folder")


def check_photos(files: list[Path]) -> None:
    """BadPhoto naming the first file that is not an image PIL reads (its header only: cheap), so
    that a stray file fails before the runtime opens and before any map is written."""
    for path in files:
        with reading(path), open_image(path) as image:
            refuse_float(image)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """PIL's errors while reading `path`, as one BadPhoto that names the file and the fix."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise BadPhoto(f"--inputs {path}: {exc}; downscale the photo first (the model sees it at its "
                       f"input size anyway)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadPhoto(f"--inputs {path}: not a readable image ({type(exc).__name__}: {exc}); "
                       f"give PNG or JPEG files, or an (N, 3, H, W) float32 .npy") from None


def read_photo(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 RGB in [0, 1] of the image file, upright, resized per axis to `size` (H, W).
    16-bit images are brought to 8 bits; transparency is ignored (the colour under it is used)."""
    with reading(path), open_image(path, at_least=size) as image:
        upright = upright_rgb(image, at_least=size)   # as the training folders decode (distill/data/folder.py)
    resized = upright.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized, np.float32).transpose(2, 0, 1) / 255.0


def read_photos(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    return np.stack([read_photo(f, size) for f in files])


def depth_png(depth: np.ndarray) -> bytes:
    """(H, W) depth -> 16-bit PNG of depth x 1000: 0 where depth is not positive (or not finite), at
    least 1 where it is, 65535 at and beyond 65.535."""
    positive = np.isfinite(depth) & (depth > 0)
    scaled = np.clip(np.rint(np.where(positive, depth, 0) * MM_PER_UNIT), 1, 65535)
    return png_bytes(Image.fromarray(np.where(positive, scaled, 0).astype(np.uint16)))


def labels_png(labels: np.ndarray) -> bytes:
    """(H, W) uint8 class ids -> 8-bit palette PNG: the ids are the pixel values, the palette their
    colours (256 entries, so that PIL writes 8 bits whatever the largest id)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(SEG_PALETTE)] = SEG_PALETTE
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    return png_bytes(image)


def preview_png(image: np.ndarray, depth: np.ndarray, labels: np.ndarray) -> bytes:
    valid = depth[np.isfinite(depth) & (depth > 0)]
    lo, hi = np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0)
    rgb = np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8)
    return png_bytes(compose([[rgb, colorize(depth, lo, hi), colorize_seg(labels)]],
                             ["image", f"depth {lo:.2f}-{hi:.2f}", "labels"]))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_maps(out_dir: Path, names: list[str], images: np.ndarray, result: dict) -> list[Path]:
    """The three PNGs of each image under `out_dir` (created), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(names):
        depth, labels = result["depth"][i, 0], result["labels"][i]
        for suffix, data in zip(MAPS, (depth_png(depth), labels_png(labels), preview_png(images[i], depth, labels))):
            core_io.write_bytes(out_dir / f"{name}_{suffix}.png", data)
            written.append(out_dir / f"{name}_{suffix}.png")
    return written
