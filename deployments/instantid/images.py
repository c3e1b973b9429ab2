"""Decoding uploaded image bytes safely into RGB arrays.

Uploads are untrusted, so the order of checks matters:

1. magic bytes: only PNG, JPEG and WebP reach a decoder at all (no GIF/TIFF/BMP/... parser runs on
   user data), and each reaches only its own Pillow plugin; then the size in bytes;
2. the header's pixel count, read lazily by ``Image.open`` before any pixel is decoded: a tiny file that
   claims 50000x50000 (a decompression bomb) is refused without allocating it;
3. decoding, with truncation and corruption reported as a client error rather than a 500.

Then what users expect from a photo viewer: EXIF orientation applied (phone photos are stored sideways),
the first frame of an animation, transparency composited on white, and every pixel format (palette,
greyscale, 16-bit, CMYK, ...) brought to 8-bit RGB with the full range kept.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageTooLargeError, InvalidImageError, UnsupportedImageTypeError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# Longest side over shortest side. Beyond ~640:1 the face detector's resize yields a zero side and OpenCV
# raises (a 500); no photo is anywhere near this, so such images are refused as unusable before decoding.
MAX_ASPECT_RATIO = 100
ACCEPTED_TYPES = ("PNG", "JPEG", "WebP")
_ACCEPTED_TEXT = ", ".join(ACCEPTED_TYPES)

# Errors Pillow and its codecs raise for broken files; all mean "not a decodable image" (HTTP 400).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of an accepted type from its magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe_unsupported(data: bytes) -> str:
    """A best-effort name for a refused type, so the 415 message tells the user what they sent."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand[:3] in (b"hei", b"hev", b"mif") or brand == b"msf1":
            return "HEIC/HEIF"
        return "an ISO media file"
    if data[:4] == b"%PDF":
        return "PDF"
    if data[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if data.lstrip()[:1] == b"<":
        return "XML/HTML/SVG text"
    return "an unknown type"


def _pixel_limit(max_pixels: int) -> int:
    """Our limit, tightened to Pillow's own bomb threshold (whose warning we treat as a refusal too)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pil_limit is None else min(max_pixels, int(pil_limit))


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an uploaded PNG/JPEG/WebP into a C-contiguous RGB uint8 array of shape (H, W, 3).

    Raises InvalidImageError (empty, truncated, corrupt), UnsupportedImageTypeError (not PNG/JPEG/WebP),
    ImageTooLargeError (more than ``max_bytes`` bytes or ``max_pixels`` pixels, checked before decoding).
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidImageError(f"expected image bytes, got {type(data).__name__}")
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageTypeError(
            f"unsupported image type ({_describe_unsupported(data)}); accepted types: {_ACCEPTED_TEXT}"
        )
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes; the limit is {max_bytes} bytes")
    limit = _pixel_limit(max_pixels)
    try:
        # The "error" filter turns Pillow's DecompressionBombWarning into an exception. catch_warnings is
        # process-global state; should another thread's restore race with it, the explicit pixel check
        # below (which includes Pillow's threshold) still refuses the same images.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # MPO is how Pillow names multi-picture JPEGs (many cameras): still JPEG bytes.
            image = Image.open(io.BytesIO(data), formats=["JPEG", "MPO"] if fmt == "JPEG" else [fmt])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImageError(f"the image header gives an empty size {width}x{height}")
            if width * height > limit:
                raise ImageTooLargeError(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {limit} pixels"
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise InvalidImageError(
                    f"the image is {width}x{height}: one side may be at most {MAX_ASPECT_RATIO} times the other"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: the first frame is the photo
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"the image has too many pixels (decompression-bomb guard): {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLargeError("the image is too large to decode in memory") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImageError(f"the {fmt} image could not be decoded (truncated or corrupt): {exc}") from exc
    image = _apply_exif_orientation(image)
    try:
        return pil_to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise InvalidImageError(f"the {fmt} image could not be converted to RGB: {exc}") from exc


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; a malformed EXIF block is ignored, like viewers do."""
    try:
        transposed = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image
    return image if transposed is None else transposed


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by rounding v/257 (65535 -> 255, 257 -> 1): scaled, not clipped."""
    wide = np.clip(values, 0, 65535).astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel 16/32-bit integer or float pixels -> uint8 keeping the full tonal range.

    I;16 is 16-bit by definition. For "I" (32-bit) and "F" the nominal range is not stored, so it is
    inferred: values within 0..255 are taken as 8-bit, within 0..65535 as 16-bit (I) or, for floats,
    within 0..1 as unit range; anything else is stretched from its minimum to its maximum.
    """
    if mode.startswith("I;16"):
        return _scale_16bit(values)
    data = values.astype(np.float64)
    data = np.where(np.isfinite(data), data, 0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return np.rint(data * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(data).astype(np.uint8)
    if mode == "I" and low >= 0.0 and high <= 65535.0:
        return _scale_16bit(data.astype(np.int64))
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.rint((data - low) * (255.0 / (high - low))).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite an RGBA uint8 array over white with integer rounding (transparent -> white)."""
    colour = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image mode -> C-contiguous RGB uint8 (H, W, 3).

    Alpha (RGBA, LA, PA, premultiplied variants, palette or colour-key transparency) is composited on
    white, since a transparent background would otherwise turn black and change what the models see.
    16-bit and wider greyscale is scaled to 8 bits (see ``_wide_to_uint8``); CMYK, palette, bilevel and
    other colour modes go through Pillow's own conversion.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _wide_to_uint8(np.asarray(image), mode)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return np.ascontiguousarray(_composite_on_white(rgba))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
