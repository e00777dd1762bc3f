"""Image files in, depth and label maps out: `python -m edge.run ARTEFACT --inputs photo.jpg --out maps/`.

An image is prepared as the training data was: turned upright by its EXIF orientation, converted to
RGB and resized per axis to the artefact's input (antialiased bilinear, as the NYU loader does), so
a 4:3 photo keeps its whole field of view. Metric depth is metric for a lens like the training
camera's (SynthRooms and NYU: the Kinect's 4:3 frame, about 63 x 49 degrees); another field of
view scales the depth by about the ratio of the focal lengths.

For each image `<stem>` the output folder gets (each file written atomically):
- `<stem>_depth.png`: 16-bit, the depth output x 1000 (millimetres for a metric artefact), 0 where
  it is not positive, 65535 at and beyond 65.535;
- `<stem>_labels.png`: 8-bit class ids (the artefact's classes, in its metadata), with a palette
  so that viewers show colours;
- `<stem>_preview.png`: the image, the depth (near dark) and the labels side by side.

numpy and PIL only: this runs in the runtime's process, beside TensorFlow.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core import io as core_io
from core.figures import SEG_PALETTE, colorize, colorize_seg, compose

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MM_PER_UNIT = 1000


class BadPhoto(ValueError):
    """An input that is not a readable image, or a set of inputs that cannot be named apart."""


def image_files(inputs: list[str]) -> list[Path]:
    """The image files that `inputs` name: files as given, folders' images sorted by name."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise BadPhoto(f"--inputs {item}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise BadPhoto(f"--inputs {item}: no such file or folder")
    stems = {}
    for f in files:
        if f.stem in stems:
            raise BadPhoto(f"--inputs {stems[f.stem]} and {f} would write the same {f.stem}_*.png maps; "
                           f"rename one, or run them apart")
        stems[f.stem] = f
    return files


def read_photo(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 RGB in [0, 1] of the image file, upright, resized per axis to `size` (H, W)."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadPhoto(f"--inputs {path}: not a readable image ({type(exc).__name__}: {exc}); "
                       f"give PNG or JPEG files, or an (N, 3, H, W) float32 .npy") from None
    resized = upright.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized, np.float32).transpose(2, 0, 1) / 255.0


def read_photos(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    return np.stack([read_photo(f, size) for f in files])


def depth_png(depth: np.ndarray) -> bytes:
    """(H, W) depth -> 16-bit PNG of depth x 1000, 0 where depth is not positive (or not finite)."""
    scaled = np.where(np.isfinite(depth) & (depth > 0), depth * MM_PER_UNIT, 0)
    return png_bytes(Image.fromarray(np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)))


def labels_png(labels: np.ndarray) -> bytes:
    """(H, W) uint8 class ids -> 8-bit palette PNG: the ids are the pixel values, the palette their colours."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(SEG_PALETTE.reshape(-1).tolist())
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
        for suffix, data in (("depth", depth_png(depth)), ("labels", labels_png(labels)),
                             ("preview", preview_png(images[i], depth, labels))):
            core_io.write_bytes(out_dir / f"{name}_{suffix}.png", data)
            written.append(out_dir / f"{name}_{suffix}.png")
    return written
