"""Image files to 8-bit RGB, one way for every reader: training folders (distill/data/folder.py)
and photos given to an artefact (edge/photos.py) must see the same pixels.

- upright: turned by the file's EXIF orientation, as a phone's photo is shown (and as OpenCV and
  browsers decode it); a portrait photo stored sideways would otherwise train and run sideways;
  an orientation outside 1-8 counts as 1;
- 16-bit greys scaled to 8 bits (PIL's RGB conversion would clip them at 255); a 32-bit integer
  grey (mode I, which older Pillows give 16-bit PNGs) counts as 16-bit when a value exceeds 255,
  else as 8-bit;
- floating-point images refused: they have no defined brightness range;
- transparency ignored (the colour under it is used);
- PIL's guard against decompression bombs judged on the pixels decoded (`open_image`): a
  200-megapixel phone JPEG decodes at 1/8 scale and opens, though PIL refuses it by its header.
numpy and PIL only, so any stage can read images without pulling torch.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # "I": 32-bit integers, 16-bit data in older Pillows
EXIF_ORIENTATION = 0x0112


def refuse_float(image: Image.Image) -> None:
    """ValueError for a floating-point image (mode F), naming the fix."""
    if image.mode == "F":
        raise ValueError("a floating-point image (mode F) has no defined brightness range; "
                         "save it as an 8- or 16-bit image")


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 (as stored) when it has none or an invalid one.
    From the header: a PNG's getexif() would decode the whole image to look for an eXIf chunk after
    the pixels, so a PNG counts only one before them (where writers put it)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    turn = image.getexif().get(EXIF_ORIENTATION, 1)
    return turn if turn in _TURNS else 1


def open_image(path: str | Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Image.open, with PIL's guard against decompression bombs judged on the pixels that will be
    decoded rather than on the header's size. A JPEG (an MPO too: a phone's photo with a second
    picture) is decoded at down to 1/8 scale (`shrink`): a 200-megapixel phone photo, which PIL
    refuses by its header, opens and decodes at a few megapixels. With `at_least` (upright height,
    width) the JPEG is shrunk here and judged at that scale; without, at the 1/8 it can reach (a
    header read). Other formats decode whole, and PIL's own guard stands for them. Raises
    Image.DecompressionBombError over twice Image.MAX_IMAGE_PIXELS decoded, as PIL does."""
    image = _open_jpeg(path) or Image.open(path)
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return image
    stored = image.size
    if at_least is not None:
        shrink(image, at_least)
        decoded = image.size[0] * image.size[1]   # the draft's size: what load() decodes
    else:
        decoded = math.ceil(stored[0] / 8) * math.ceil(stored[1] / 8)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and decoded > 2 * limit:
        image.close()
        raise Image.DecompressionBombError(f"{stored[0]}x{stored[1]} decodes to {decoded} pixels at the least, "
                                           f"more than PIL's limit of {2 * limit} (Image.MAX_IMAGE_PIXELS x 2)")
    return image


def _open_jpeg(path: str | Path) -> Image.Image | None:
    """A JPEG file opened by PIL's JPEG plugin itself, which leaves the size check to `open_image`
    (Image.open would refuse it by its header, or warn); None for any other file."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    try:
        return JpegImagePlugin.jpeg_factory(str(path))
    except SyntaxError:   # broken past its first bytes: Image.open gives PIL's usual error
        return None


def shrink(image: Image.Image, at_least: tuple[int, int]) -> None:
    """Let an opened JPEG decode at 1/2, 1/4 or 1/8 scale, as long as the upright image stays at least
    twice `at_least` (height, width); other formats, and a JPEG already shrunk, are left alone."""
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        h, w = at_least
        image.draft("RGB", (2 * h, 2 * w) if _TURNS[orientation(image)][0] else (2 * w, 2 * h))   # stored axes


def upright_rgb(image: Image.Image, at_least: tuple[int, int] | None = None) -> Image.Image:
    """An opened image file as upright 8-bit RGB (the module docstring). `at_least` (height, width)
    of the upright image: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as it stays at
    least twice that size."""
    refuse_float(image)
    turn = orientation(image)
    if at_least is not None:
        shrink(image, at_least)
    if turn != 1:
        image = image.transpose(_TRANSPOSE[turn])
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


# Where EXIF orientation o sends a stored pixel (x, y) of a width x height image, in the upright one:
# (swap x and y first?, mirror the new x?, mirror the new y?), and PIL's transposition that does it
# (as ImageOps.exif_transpose; both checked against it in tests/test_images.py).
_TURNS = {1: (False, False, False), 2: (False, True, False), 3: (False, True, True), 4: (False, False, True),
          5: (True, False, False), 6: (True, True, False), 7: (True, True, True), 8: (True, False, True)}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def upright_intrinsics(fx: float, fy: float, cx: float, cy: float, width: float, height: float,
                       turn: int) -> tuple[float, float, float, float, float, float]:
    """Pinhole intrinsics of a stored width x height image -> those of the image turned upright by
    EXIF orientation `turn` (focal lengths swap with the axes; a mirrored axis mirrors its centre)."""
    swap, mirror_x, mirror_y = _TURNS.get(turn, _TURNS[1])
    if swap:
        fx, fy, cx, cy, width, height = fy, fx, cy, cx, height, width
    return fx, fy, width - cx if mirror_x else cx, height - cy if mirror_y else cy, width, height


def decoded_content_hash(file_sha256: str, image: Image.Image) -> str:
    """What a decoded sample is made of: the file's sha256, and for a photo that is turned upright
    also its orientation (the same bytes made another image before files were turned upright, so a
    pseudo-label cache from then must not match)."""
    turn = orientation(image)
    return file_sha256 if turn == 1 else hashlib.sha256(f"{file_sha256}:exif-orientation={turn}".encode()).hexdigest()
