"""Decoding uploads: accepted types, pixel formats, EXIF orientation, animations and the safety guards.

Every input is real encoded bytes (Pillow's encoders or hand-written PNG chunks), decoded by the code
under test; expected pixels are worked out by hand.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.instantid.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageTypeError
from deployments.instantid.images import decode_image, pil_to_rgb
from tests.support import encode_image, png_claiming


def pattern(width: int = 48, height: int = 32) -> np.ndarray:
    """An asymmetric RGB test picture: left half red, right half blue, a green bar along the top."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2] = (220, 30, 30)
    rgb[:, width // 2 :] = (30, 30, 220)
    rgb[:6, :] = (30, 220, 30)
    return rgb


def assert_rgb_array(out: np.ndarray, height: int, width: int) -> None:
    assert out.shape == (height, width, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


# --- accepted types -------------------------------------------------------------------------------------


def test_png_roundtrip_is_exact() -> None:
    rgb = pattern()
    out = decode_image(encode_image(Image.fromarray(rgb), "PNG"))
    assert_rgb_array(out, 32, 48)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_source() -> None:
    rgb = pattern()
    out = decode_image(encode_image(Image.fromarray(rgb), "JPEG", quality=95))
    assert_rgb_array(out, 32, 48)
    assert np.abs(out.astype(int) - rgb).mean() < 6
    assert out[20, 5, 0] > 180 and out[20, 40, 2] > 180  # red stays on the left, blue on the right


def test_webp_lossless_roundtrip_is_exact() -> None:
    rgb = pattern()
    out = decode_image(encode_image(Image.fromarray(rgb), "WEBP", lossless=True))
    np.testing.assert_array_equal(out, rgb)


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = encode_image(Image.fromarray(pattern()), "PNG")
    np.testing.assert_array_equal(decode_image(bytearray(data)), decode_image(memoryview(data)))


# --- EXIF orientation -----------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    upright = Image.fromarray(pattern(48, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone held sideways stores: 32 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode_image(stored, "JPEG", quality=95, exif=exif)

    out = decode_image(data)
    assert_rgb_array(out, 32, 48)  # displayed upright, not as stored
    assert np.abs(out.astype(int) - pattern(48, 32)).mean() < 6
    assert out[2, 24, 1] > 180  # the green bar is at the top again

    without_tag = decode_image(encode_image(stored, "JPEG", quality=95))
    assert without_tag.shape == (48, 32, 3)


def test_malformed_exif_does_not_reject_the_photo() -> None:
    # Orientation 9 does not exist: ignore it rather than refuse the picture.
    exif = Image.Exif()
    exif[0x0112] = 9
    out = decode_image(encode_image(Image.fromarray(pattern()), "JPEG", quality=95, exif=exif))
    assert out.shape == (32, 48, 3)


# --- pixel formats --------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    out = decode_image(encode_image(cmyk, "JPEG", quality=95))
    assert_rgb_array(out, 16, 16)
    r, g, b = (int(v) for v in out[8, 8])
    assert r > 230 and g < 30 and b < 30


def test_greyscale_png() -> None:
    out = decode_image(encode_image(Image.new("L", (5, 4), 77), "PNG"))
    assert_rgb_array(out, 4, 5)
    assert (out == 77).all()


def test_bilevel_png() -> None:
    image = Image.new("1", (8, 2), 0)
    image.putpixel((3, 1), 1)
    out = decode_image(encode_image(image, "PNG"))
    assert tuple(out[1, 3]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_la_png_is_composited_on_white() -> None:
    la = np.zeros((1, 3, 2), dtype=np.uint8)
    la[0, 0] = (0, 0)  # black, fully transparent -> white
    la[0, 1] = (100, 255)  # opaque grey stays 100
    la[0, 2] = (0, 128)  # half-transparent black: (0*128 + 255*127 + 127) // 255 = 127
    out = decode_image(encode_image(Image.fromarray(la, "LA"), "PNG"))
    assert [tuple(int(c) for c in px) for px in out[0]] == [(255, 255, 255), (100, 100, 100), (127, 127, 127)]


def test_rgba_png_is_composited_on_white() -> None:
    rgba = np.array([[[255, 0, 0, 128], [0, 0, 255, 255], [9, 9, 9, 0]]], dtype=np.uint8)
    out = decode_image(encode_image(Image.fromarray(rgba, "RGBA"), "PNG"))
    # red at alpha 128: (255*128 + 255*127 + 127)//255 = 255; (0 + 255*127 + 127)//255 = 127
    assert [tuple(int(c) for c in px) for px in out[0]] == [(255, 127, 127), (0, 0, 255), (255, 255, 255)]


def test_palette_png_with_transparency() -> None:
    image = Image.new("P", (4, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    data = encode_image(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    assert tuple(out[0, 0]) == (255, 255, 255)  # the transparent index becomes white, not (10, 20, 30)
    assert tuple(out[0, 1]) == (200, 100, 50)


def test_palette_png_without_transparency() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out = decode_image(encode_image(image, "PNG"))
    assert [tuple(int(c) for c in px) for px in out[0]] == [(10, 20, 30), (200, 100, 50)]


def test_16bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257, 1000, 32896, 65535]], dtype=np.uint16)
    data = encode_image(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data)
    assert_rgb_array(out, 1, 7)
    # round(v / 257): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 1000 -> 3.89 -> 4, 32896 -> 128 (clipping would give 255)
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 4, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_modes() -> None:
    wide = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32), "I")
    assert pil_to_rgb(wide)[0, :, 0].tolist() == [0, 1, 255]
    narrow = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I")
    assert pil_to_rgb(narrow)[0, :, 0].tolist() == [0, 100, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert pil_to_rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    other = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32), "F")
    assert pil_to_rgb(other)[0, :, 0].tolist() == [0, 64, 255]  # min-max stretched


# --- animations -----------------------------------------------------------------------------------------


def _two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))]


def test_animated_webp_uses_first_frame() -> None:
    first, second = _two_frames()
    data = encode_image(first, "WEBP", save_all=True, append_images=[second], lossless=True, duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode_image(data)
    assert tuple(out[4, 4]) == (250, 0, 0)


def test_animated_png_uses_first_frame() -> None:
    first, second = _two_frames()
    data = encode_image(first, "PNG", save_all=True, append_images=[second], duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert tuple(decode_image(data)[4, 4]) == (250, 0, 0)


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (None, "GIF"),  # filled in below: a real (animated) GIF
        (b"BM" + b"\x00" * 60, "BMP"),
        (b"hello, this is not an image", "unknown"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    ],
)
def test_other_types_are_refused_with_415(data: bytes | None, named: str) -> None:
    if data is None:
        first, second = _two_frames()
        data = encode_image(first, "GIF", save_all=True, append_images=[second])
    with pytest.raises(UnsupportedImageTypeError) as info:
        decode_image(data)
    assert info.value.status == 415
    assert named in info.value.message
    assert "PNG, JPEG, WebP" in info.value.message


def test_empty_is_invalid() -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(b"")
    assert info.value.status == 400


def test_too_many_bytes() -> None:
    data = encode_image(Image.fromarray(pattern()), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, max_bytes=len(data) - 1)
    assert info.value.status == 413
    assert decode_image(data, max_bytes=len(data)).shape == (32, 48, 3)


def test_type_is_checked_before_size() -> None:
    # An oversized GIF is refused for its type (415): the magic bytes are looked at first.
    with pytest.raises(UnsupportedImageTypeError):
        decode_image(b"GIF89a" + b"\x00" * 100, max_bytes=10)


def test_bomb_header_refused_before_decoding() -> None:
    # 50000 x 50000 claimed by a 100-byte file: refused from the header (Pillow's own bomb error included).
    data = png_claiming(50_000, 50_000)
    assert len(data) < 200
    # The file holds no pixel data: a decode attempt would fail as truncated, not as too large.
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_pixel_limit_checked_on_header_not_data() -> None:
    # 8000 x 6000 = 48 M pixels > 40 M, below Pillow's own threshold. The pixel data is missing, so decoding
    # would fail as truncated (InvalidImageError): ImageTooLargeError proves nothing was decoded.
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(png_claiming(8000, 6000))
    assert "48000000" in info.value.message
    with pytest.raises(InvalidImageError):
        decode_image(png_claiming(100, 100))  # same file shape under the limit: decoded, found truncated


def test_pillow_bomb_warning_range_is_refused_too() -> None:
    # 10000 x 10000 = 100 M: above Pillow's warning threshold (~89 M), below its error (~179 M). Even with our
    # own limit raised, Pillow's warning counts as a refusal.
    with pytest.raises(ImageTooLargeError):
        decode_image(png_claiming(10_000, 10_000), max_pixels=10**12)


def test_max_pixels_parameter() -> None:
    data = encode_image(Image.fromarray(pattern(48, 32)), "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=48 * 32 - 1)
    assert decode_image(data, max_pixels=48 * 32).shape == (32, 48, 3)


def test_truncated_jpeg_is_invalid() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    data = encode_image(noisy, "JPEG", quality=90)
    with pytest.raises(InvalidImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.status == 400


def test_corrupt_png_is_invalid() -> None:
    data = bytearray(encode_image(Image.fromarray(pattern()), "PNG"))
    data[40:60] = b"\xff" * 20  # smash the compressed data (and its CRC check)
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data))


def test_magic_only_is_invalid() -> None:
    for data in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 "):
        with pytest.raises(InvalidImageError):
            decode_image(data)
