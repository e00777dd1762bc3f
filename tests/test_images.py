"""core/images.py: the one way image files become 8-bit RGB (training folders and edge.run)."""
import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from core.images import decoded_content_hash, open_image, orientation, upright_intrinsics, upright_rgb


def save_with_orientation(path, pixels: np.ndarray, turn: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = turn
    Image.fromarray(pixels).save(path, exif=exif)


@pytest.mark.parametrize("turn", range(1, 9))
def test_intrinsics_turn_with_the_pixels_as_pil_turns_them(tmp_path, turn):
    w, h, x, y = 6, 4, 1, 0   # one bright pixel, off every axis of symmetry
    stored = np.zeros((h, w, 3), np.uint8)
    stored[y, x] = 255
    save_with_orientation(tmp_path / "p.png", stored, turn)
    with Image.open(tmp_path / "p.png") as image:
        assert orientation(image) == turn
        upright = np.asarray(upright_rgb(image))
    ys, xs = np.nonzero(upright[..., 0])
    # the principal point placed on the bright pixel's centre must land on its new centre
    fx, fy, cx, cy, uw, uh = upright_intrinsics(10.0, 20.0, x + 0.5, y + 0.5, w, h, turn)
    assert (uh, uw) == upright.shape[:2]
    assert (cx, cy) == (xs[0] + 0.5, ys[0] + 0.5)
    assert (fx, fy) == ((20.0, 10.0) if turn >= 5 else (10.0, 20.0))   # 5-8 swap the axes
    with Image.open(tmp_path / "p.png") as image:
        assert np.array_equal(upright, np.asarray(ImageOps.exif_transpose(image).convert("RGB")))   # as PIL turns it


def test_a_turned_jpeg_is_decoded_reduced_but_covers_twice_the_output(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6   # stored 800x600 on its side: upright 600x800 (width x height)
    Image.new("RGB", (800, 600), (90, 120, 150)).save(tmp_path / "portrait.jpg", quality=90, exif=exif)
    with Image.open(tmp_path / "portrait.jpg") as image:
        upright = upright_rgb(image, (96, 64))                 # twice: 192 x 128 (height x width)
    assert upright.size == (150, 200)                          # 1/4 scale, upright; 1/8 (75 x 100) would not cover it
    with Image.open(tmp_path / "portrait.jpg") as image:
        assert upright_rgb(image, (160, 120)).size == (300, 400)   # 1/2


def test_orientation_is_read_from_the_header_and_invalid_ones_count_as_none(tmp_path):
    Image.new("RGB", (6, 4)).save(tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as image:
        image.load = lambda: pytest.fail("orientation() decoded the pixels")   # PNG's getexif() would
        assert orientation(image) == 1
    save_with_orientation(tmp_path / "odd.png", np.zeros((4, 6, 3), np.uint8), 9)
    with Image.open(tmp_path / "odd.png") as image:
        assert orientation(image) == 1 and upright_rgb(image).size == (6, 4)


def test_sixteen_and_thirty_two_bit_greys_keep_their_range_and_float_is_refused(tmp_path):
    ramp = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)   # 0 .. 61400
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
        rgb = np.asarray(upright_rgb(image))
    assert np.abs(rgb[..., 1].astype(int) - np.rint(ramp / 257).astype(int)).max() <= 1
    small = Image.fromarray(np.full((4, 4), 200, np.int32), mode="I")   # 32-bit, but 8-bit data
    assert np.asarray(upright_rgb(small))[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match="floating-point image .* save it as an 8- or 16-bit image"):
        upright_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))


def test_a_turned_photo_gets_another_content_hash(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    save_with_orientation(tmp_path / "turned.png", pixels, 6)
    for name, same in (("plain.png", True), ("turned.png", False)):
        file_hash = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        with Image.open(tmp_path / name) as image:
            assert (decoded_content_hash(file_hash, image) == file_hash) is same


def test_pils_pixel_limit_is_judged_on_what_is_decoded(tmp_path, monkeypatch):
    """A 200-megapixel phone JPEG is over PIL's limit by its header, yet decodes at 1/8 scale: it opens,
    silently, and gives the pixels PIL gives without the limit. A PNG decodes whole and stays refused,
    as does a JPEG that the wanted size keeps from shrinking enough."""
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    for name in ("big.jpg", "big.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    # a multi-picture JPEG, as phones write photos with a second image (PIL calls it MPO)
    Image.fromarray(pixels).save(tmp_path / "two.jpg", format="MPO", save_all=True,
                                 append_images=[Image.fromarray(pixels[::2, ::2])])
    limit = 640 * 480 // 4   # PIL refuses over twice this: both files, by their header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no DecompressionBombWarning either
        with open_image(tmp_path / "big.jpg", at_least=(60, 80)) as image:
            assert image.size == (160, 120)   # 1/4 scale: still twice 80x60
            got = np.asarray(upright_rgb(image, (60, 80)))
        with open_image(tmp_path / "big.jpg") as image:   # a header read: judged at the 1/8 a JPEG can reach
            assert image.size == (640, 480)
        with open_image(tmp_path / "two.jpg", at_least=(60, 80)) as image:
            assert image.format == "MPO" and image.size == (160, 120)
    assert Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 153600 pixels"):   # PIL's own guard
        open_image(tmp_path / "big.png", at_least=(60, 80))
    with pytest.raises(Image.DecompressionBombError, match="640x480 decodes to 307200 pixels at the least, more than "
                                                           "PIL's limit of 153600"):
        open_image(tmp_path / "big.jpg", at_least=(240, 320))   # twice 320x240 is the whole image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(tmp_path / "big.jpg") as image:
        assert np.array_equal(got, np.asarray(upright_rgb(image, (60, 80))))
