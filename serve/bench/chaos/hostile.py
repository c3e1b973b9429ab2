"""The hostile request corpus: malformed, oversized and malicious requests that must each get a 4xx JSON error.

Data, not tests: tests/test_hostile.py sends every case to a local stack and asserts the exact status, code and that
nothing is left in S3; ``instantid bench chaos`` sends a share of its traffic from here while faults happen, and
requires a 4xx of each. A case's ``send(target)`` needs only the target's URL, its API limits
(``target.config.api``) and its results bucket (``target.s3.bucket``); every request has its own timeout.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
from PIL import Image
from skimage import data

from serve.ingress.inputs import GENERATE_FILES, GENERATE_REPEATED, most_file_parts

TIMEOUT = 60  # per request: a hang fails instead of stalling the run
FAST = {
    "prompt": "an astronaut",
    "num_inference_steps": 1,
    "width": 256,
    "height": 256,
    "style": "none",
    "output_format": "png",
    "seed": 7,
}


class Target(Protocol):
    """What a case needs of the service it is sent to (tests' ServeStack and the chaos bench's target both fit)."""

    url: str
    config: Any  # an AppConfig: the cases read config.api.max_upload_bytes / max_request_bytes
    s3: Any  # anything with the results bucket's name as .bucket


def encode_image(image: Image.Image | np.ndarray, fmt: str = "JPEG", **options: Any) -> bytes:
    """``image`` (Pillow or RGB uint8 array) encoded as ``fmt`` bytes (Pillow's options, e.g. ``quality``)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims ``width`` x ``height`` RGB pixels (the shape of a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------- images


ASTRONAUT = Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)
FACE_JPEG = encode_image(ASTRONAUT, "JPEG", quality=90)
FACE_B64 = base64.b64encode(FACE_JPEG).decode()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose SOF0 header is patched to claim ``width`` x ``height``."""
    raw = bytearray(encode_image(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    sof = raw.find(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, height, width)
    return bytes(raw)


def _riff_webp(chunks: bytes) -> bytes:
    body = b"WEBP" + chunks
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _webp_vp8x_claiming(width: int, height: int) -> bytes:
    """An extended WebP whose VP8X canvas claims ``width`` x ``height``; the bitstream is 16x16."""
    small = encode_image(Image.new("RGB", (16, 16)), "WEBP", lossless=True)
    canvas = bytes([0x10, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return _riff_webp(b"VP8X" + struct.pack("<I", len(canvas)) + canvas + small[12:])


def _webp_vp8l_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims ``width`` x ``height`` (14 bits each) over 16 zero bytes."""
    payload = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)) + b"\0" * 16
    return _riff_webp(b"VP8L" + struct.pack("<I", len(payload)) + payload)


def _face_on_canvas(side: int) -> bytes:
    """The astronaut's face shrunk to ``side`` px on a plain 256x256 canvas."""
    canvas = Image.new("RGB", (256, 256), (128, 128, 128))
    face = Image.fromarray(data.astronaut()[30:230, 140:340]).resize((side, side), Image.LANCZOS)
    canvas.paste(face, (116, 100))
    return encode_image(canvas, "PNG")


NOT_IMAGES = {
    "text": b"hello, this is not an image at all\n",
    "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
    "gif": encode_image(ASTRONAUT, "GIF"),
    "bmp": encode_image(ASTRONAUT, "BMP"),
    "tiff": encode_image(ASTRONAUT, "TIFF"),
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
}


# ------------------------------------------------------------------------------------------------ requests


def post_json(stack, body: Any, path: str = "/v1/generate", headers: dict | None = None) -> httpx.Response:
    """JSON as Python writes it: NaN/Infinity tokens and escaped lone surrogates go through unchanged."""
    content = json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{stack.url}{path}", content=content, headers=all_headers, timeout=TIMEOUT)


def post_raw(stack, content: bytes, content_type: str | None, path: str = "/v1/generate") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{stack.url}{path}", content=content, headers=headers, timeout=TIMEOUT)


def post_form(
    stack,
    fields: dict | None = None,
    image: bytes | None = FACE_JPEG,
    image_type: str = "image/jpeg",
    extra_files: list[tuple[str, str, bytes, str]] | None = None,
    path: str = "/v1/generate",
) -> httpx.Response:
    """A multipart request (always multipart, even without a file); a list value repeats a field."""
    items = FAST if fields is None else fields
    pairs = [(k, str(x)) for k, v in items.items() for x in (v if isinstance(v, list) else [v])]
    files = [("face_image", "face", image, image_type)] if image is not None else []
    body = multipart_bytes("hostile-boundary-7f3a", pairs, files + (extra_files or []))
    return post_raw(stack, body, "multipart/form-data; boundary=hostile-boundary-7f3a", path)


def pose_part(image: bytes, kind: str = "image/png") -> tuple[str, str, bytes, str]:
    return ("pose_image", "pose", image, kind)


def json_with(**changes: Any) -> dict:
    """A valid JSON generation body with some fields changed (``None`` removes one)."""
    body = {**FAST, "face_image_b64": FACE_B64, **changes}
    return {k: v for k, v in body.items() if v is not None}


def raw_http(
    stack, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"", timeout: float = TIMEOUT
) -> httpx.Response:
    """One request written byte for byte on a socket (for headers httpx refuses to send)."""
    url = httpx.URL(stack.url)
    lines = [f"{method} {url.path.rstrip('/')}{path} HTTP/1.1", f"Host: {url.host}:{url.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((url.host, url.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        content = reply.read()
        return httpx.Response(reply.status, headers=reply.getheaders(), content=content)


def raw_json(stack, body: Any, headers: list[tuple[str, str]], path: str = "/v1/generate") -> httpx.Response:
    content = json.dumps(body).encode()
    fixed = [("Content-Type", "application/json"), ("Content-Length", str(len(content)))]
    return raw_http(stack, "POST", path, fixed + headers, content)


def _chunked(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"A" * piece


def _max_body(stack) -> int:
    return stack.config.api.max_request_bytes  # the ingress's bound on a whole request body


def multipart_bytes(boundary: str, fields: list[tuple[str, str]], files: list[tuple[str, str, bytes, str]]) -> bytes:
    out = []
    for name, value in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, payload, kind in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        out.append(f"{head}Content-Type: {kind}\r\n\r\n".encode() + payload + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


# ------------------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[Any], httpx.Response]
    status: int | tuple[int, ...] | None = None  # None: any 4xx
    code: str | tuple[str, ...] | None = None
    generation: bool = True  # a generation request: nothing may appear in S3


def _size_cases() -> list[Case]:
    def form(image: bytes) -> Callable[[Any], httpx.Response]:
        return lambda s: post_form(s, image=image, image_type="image/png")

    def over_upload_limit(s):
        limit = s.config.api.max_upload_bytes
        return post_form(s, image=b"\x89PNG\r\n\x1a\n" + b"\0" * limit, image_type="image/png")

    def b64_over_limit(s):
        limit = s.config.api.max_upload_bytes
        return post_json(s, json_with(face_image_b64="A" * (limit * 4 // 3 + 64)))

    def huge_content_length(s):
        body = json.dumps(json_with()).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(10**15))]
        return raw_http(s, "POST", "/v1/generate", headers, body)

    def chunked_over_limit(s):
        total = _max_body(s) + (2 << 20)
        headers = {"content-type": "application/json"}
        return httpx.post(f"{s.url}/v1/generate", content=_chunked(total), headers=headers, timeout=TIMEOUT)

    too_large = (413, "image_too_large")
    return [
        Case("png-bomb-50000x50000", form(png_claiming(50_000, 50_000)), *too_large),
        Case("png-8000x8000-over-pixel-limit", form(png_claiming(8000, 8000)), *too_large),
        Case("jpeg-bomb-65000x65000", form(_jpeg_claiming(65_000, 65_000)), *too_large),
        Case("webp-vp8x-bomb-16000x16000", form(_webp_vp8x_claiming(16_000, 16_000)), *too_large),
        Case("webp-vp8l-bomb-16384x16384", form(_webp_vp8l_claiming(16_384, 16_384)), *too_large),
        Case(
            "pose-image-bomb", lambda s: post_form(s, extra_files=[pose_part(png_claiming(90_000, 90_000))]), *too_large
        ),
        Case("upload-over-byte-limit", over_upload_limit, *too_large),
        Case("base64-over-byte-limit", b64_over_limit, *too_large),
        Case("content-length-1e15-small-body", huge_content_length, *too_large),
        Case("chunked-body-over-limit", chunked_over_limit, *too_large),
        Case("aspect-ratio-4000x1", form(encode_image(Image.new("RGB", (4000, 1)), "PNG")), 400, "invalid_image"),
        Case("aspect-ratio-1x4000", form(encode_image(Image.new("RGB", (1, 4000)), "PNG")), 400, "invalid_image"),
    ]


def _type_cases() -> list[Case]:
    def form(image: bytes, kind: str = "image/png") -> Callable[[Any], httpx.Response]:
        return lambda s: post_form(s, image=image, image_type=kind)

    unsupported = (415, "unsupported_media_type")
    cases = [Case(f"{name}-bytes-as-face-image", form(payload), *unsupported) for name, payload in NOT_IMAGES.items()]
    webp_garbage = _riff_webp(b"VP8 " + struct.pack("<I", 64) + bytes(range(64)))
    return [
        *cases,
        Case("png-magic-then-garbage", form(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), 400, "invalid_image"),
        Case("jpeg-truncated", form(FACE_JPEG[:1500], "image/jpeg"), 400, "invalid_image"),
        Case("webp-magic-then-garbage", form(webp_garbage, "image/webp"), 400, "invalid_image"),
        Case("jpeg-sent-as-text-plain-part", form(FACE_JPEG, "text/plain"), *unsupported),
        Case("jpeg-sent-as-image-gif-part", form(FACE_JPEG, "image/gif"), *unsupported),
        Case("pdf-as-pose-image", lambda s: post_form(s, extra_files=[pose_part(NOT_IMAGES["pdf"])]), *unsupported),
        Case("html-in-base64", lambda s: post_json(s, json_with(face_image_b64=base64_text(NOT_IMAGES["html"]))), 415),
        Case("body-text-plain", lambda s: post_raw(s, b"prompt=x", "text/plain"), *unsupported),
        Case("body-without-content-type", lambda s: post_raw(s, json.dumps(json_with()).encode(), None), 415),
        Case("body-urlencoded", lambda s: post_raw(s, b"prompt=x&seed=1", "application/x-www-form-urlencoded"), 415),
        Case("body-xml", lambda s: post_raw(s, b"<generate><prompt>x</prompt></generate>", "application/xml"), 415),
    ]


def base64_text(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prompt_cases() -> list[Case]:
    invalid = (422, "invalid_parameter")
    return [
        Case("prompt-2001-chars", lambda s: post_json(s, json_with(prompt="x" * 2001)), *invalid),
        Case("prompt-2001-emoji", lambda s: post_json(s, json_with(prompt="🚀" * 2001)), *invalid),
        Case("prompt-2001-chars-multipart", lambda s: post_form(s, {**FAST, "prompt": "y" * 2001}), *invalid),
        Case("negative-prompt-2001-chars", lambda s: post_json(s, json_with(negative_prompt="n" * 2001)), *invalid),
        Case("prompt-empty", lambda s: post_json(s, json_with(prompt="")), *invalid),
        Case("prompt-missing", lambda s: post_json(s, json_with(prompt=None)), *invalid),
        Case("prompt-null", lambda s: post_raw(s, b'{"prompt": null, "face_image_b64": "x"}', "application/json"), 422),
        Case("prompt-object", lambda s: post_json(s, json_with(prompt={"$ne": ""})), *invalid),
        Case("prompt-array", lambda s: post_json(s, json_with(prompt=["a", "b"])), *invalid),
        Case("prompt-lone-surrogate", lambda s: post_json(s, json_with(prompt="a \ud800 b")), *invalid),
    ]


def _parameter_cases() -> list[Case]:
    outside = {
        "num_inference_steps": (0, 101),
        "guidance_scale": (-0.001, 20.001),
        "identitynet_strength": (-0.01, 1.501),
        "adapter_strength": (-0.01, 1.501),
        "control_guidance_start": (-0.001, 1.001),
        "control_guidance_end": (-0.001, 1.001),
        "seed": (-1, 2**63),
        "num_images": (0, 9),
        "output_quality": (0, 101),
    }
    cases = [
        Case(f"{name}-{value}", (lambda n, v: lambda s: post_json(s, json_with(**{n: v})))(name, value), 422)
        for name, values in outside.items()
        for value in values
    ]
    odd = {
        "guidance_scale-nan": {"guidance_scale": math.nan},
        "identitynet_strength-infinity": {"identitynet_strength": math.inf},
        "adapter_strength-minus-infinity": {"adapter_strength": -math.inf},
        "seed-nan": {"seed": math.nan},
        "num_images-infinity": {"num_images": math.inf},
        "steps-as-word": {"num_inference_steps": "many"},
        "steps-fractional": {"num_inference_steps": 1.5},
        "steps-as-array": {"num_inference_steps": [1]},
        "seed-as-word": {"seed": "abc"},
        "seed-huge-int": {"seed": 10**40},
        "num_images-as-object": {"num_images": {"n": 1}},
        "enhance_face_region-as-word": {"enhance_face_region": "definitely"},
        "store_inputs-as-word": {"store_inputs": "maybe"},
        "enhance_face_region-as-array": {"enhance_face_region": [True]},
        "style-as-number": {"style": 5},
        "style-unknown": {"style": "../../etc/passwd"},
        "scheduler-unknown": {"scheduler": "nope"},
        "output_format-gif": {"output_format": "gif"},
        "control-start-equals-end": {"control_guidance_start": 0.5, "control_guidance_end": 0.5},
        "unknown-field": {"unknown_field": 1},
        "face_image_b64-as-number": {"face_image_b64": 123},
        "face_image_b64-as-array": {"face_image_b64": [FACE_B64]},
        "nested-object-for-scalar": {"guidance_scale": {"value": {"value": 5}}},
    }
    cases += [
        Case(name, (lambda c: lambda s: post_json(s, json_with(**c)))(changes), 422) for name, changes in odd.items()
    ]
    json_text = {
        "json-top-level-array": (b"[1, 2, 3]", 422),
        "json-top-level-string": (b'"prompt"', 422),
        "json-top-level-null": (b"null", 422),
        "json-empty-body": (b"", 400),
        "json-truncated": (json.dumps(json_with()).encode()[:-10], 400),
        "json-trailing-garbage": (json.dumps(json_with()).encode() + b"}}", 400),
        "json-invalid-utf8": (b'{"prompt": "\xff\xfe", "face_image_b64": "x"}', 400),
        "json-nested-100000-deep": (b"[" * 100_000 + b"]" * 100_000, 400),
        "json-5000-digit-number": (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400),
        "json-single-quotes": (b"{'prompt': 'x'}", 400),
    }
    cases += [
        Case(name, (lambda b: lambda s: post_raw(s, b, "application/json"))(body), status)
        for name, (body, status) in json_text.items()
    ]
    sizes = {
        "width-250": {"width": 250},
        "height-252": {"height": 252},
        "width-only": {"height": None},
        "height-only": {"width": None},
        "width-4096": {"width": 4096},
        "height-2056": {"width": 2048, "height": 2056},
        "size-128": {"width": 128, "height": 128},
        "size-0": {"width": 0, "height": 0},
        "width-negative": {"width": -256},
        "width-as-text": {"width": "256px"},
    }
    cases += [
        Case(name, (lambda c: lambda s: post_json(s, json_with(**c)))(changes), 422, "invalid_parameter")
        for name, changes in sizes.items()
    ]
    cases.append(Case("width-250-multipart", lambda s: post_form(s, {**FAST, "width": 250}), 422, "invalid_parameter"))
    return cases


def _face_cases() -> list[Case]:
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    no_face = (422, "no_face")
    return [
        Case(
            "no-face-uniform",
            lambda s: post_form(s, image=encode_image(Image.new("RGB", (256, 256), (128,) * 3), "PNG")),
            *no_face,
        ),
        Case("no-face-noise", lambda s: post_form(s, image=encode_image(Image.fromarray(noise), "PNG")), *no_face),
        Case("tiny-face-24px", lambda s: post_form(s, image=_face_on_canvas(24)), 422, ("face_too_small", "no_face")),
        Case(
            "pose-without-face",
            lambda s: post_form(s, extra_files=[pose_part(encode_image(Image.new("RGB", (256, 256)), "PNG"))]),
            *no_face,
        ),
    ]


def _s3_cases() -> list[Case]:
    def uri(value: Any, field: str = "face_image_uri") -> Callable[[Any], httpx.Response]:
        def send(s):
            given = value(s) if callable(value) else value
            body = json_with(face_image_b64=None) if field == "face_image_uri" else json_with()
            return post_json(s, {**body, field: given})

        return send

    invalid = (422, "invalid_parameter")
    return [
        Case("s3-results-bucket", uri(lambda s: f"s3://{s.s3.bucket}/generations/x/image-0.png"), *invalid),
        Case("s3-results-bucket-root", uri(lambda s: f"s3://{s.s3.bucket}/"), *invalid),
        Case("s3-other-bucket", uri("s3://someone-elses-bucket/face.jpg"), *invalid),
        Case("s3-no-bucket", uri("s3:///face.jpg"), *invalid),
        Case("s3-empty", uri("s3://"), *invalid),
        Case("s3-invalid-bucket-name", uri("s3://Bad_Bucket!/face.jpg"), *invalid),
        Case("s3-dot-dot-key", uri("s3://bucket/../x"), *invalid),
        Case("s3-nul-in-key", uri("s3://bucket/a\x00b"), *invalid),
        Case("http-url", uri("http://169.254.169.254/latest/meta-data/"), *invalid),
        Case("https-url", uri("https://example.com/face.jpg"), *invalid),
        Case("file-url", uri("file:///etc/passwd"), *invalid),
        Case("plain-path", uri("/etc/passwd"), *invalid),
        Case("uri-as-number", uri(42), *invalid),
        Case("pose-uri-other-bucket", uri("s3://elsewhere/pose.jpg", "pose_image_uri"), *invalid),
        Case("both-b64-and-uri", lambda s: post_json(s, json_with(face_image_uri="s3://x/y")), *invalid),
        Case("no-image-at-all", lambda s: post_json(s, json_with(face_image_b64=None)), *invalid),
    ]


def _base64_cases() -> list[Case]:
    def b64(value: str) -> Callable[[Any], httpx.Response]:
        return lambda s: post_json(s, json_with(face_image_b64=value))

    invalid = (400, "invalid_image")
    return [
        Case("base64-garbage", b64("@@@not base64@@@"), *invalid),
        Case("base64-bad-padding", b64("abc"), *invalid),
        Case("base64-with-newlines", b64(FACE_B64[:76] + "\n" + FACE_B64[76:]), *invalid),
        Case("base64-non-ascii", b64("ñandú" * 8), *invalid),
        Case("base64-empty", b64(""), *invalid),
        Case("data-uri-without-comma", b64("data:image/png;base64"), *invalid),
        Case("data-uri-empty", b64("data:,"), *invalid),
        Case("data-uri-garbage", b64("data:image/jpeg;base64,%%%%"), *invalid),
        Case("data-uri-of-svg", b64("data:image/svg+xml;base64," + base64_text(NOT_IMAGES["svg"])), 415),
    ]


def _multipart_cases() -> list[Case]:
    def raw(body: bytes, content_type: str) -> Callable[[Any], httpx.Response]:
        return lambda s: post_raw(s, body, content_type)

    valid = multipart_bytes("b0undary", [("prompt", "x")], [("face_image", "f.jpg", FACE_JPEG, "image/jpeg")])
    many_fields = {"prompt": "x", **{f"field{i}": "v" for i in range(100)}}
    invalid = (422, "invalid_parameter")
    return [
        Case("multipart-empty-body", raw(b"", "multipart/form-data; boundary=xyz"), (400, 422)),
        Case("multipart-without-boundary", raw(valid, "multipart/form-data"), 400, "invalid_request"),
        Case("multipart-wrong-boundary", raw(valid, "multipart/form-data; boundary=other"), (400, 422)),
        Case(
            "multipart-json-body", raw(json.dumps(json_with()).encode(), "multipart/form-data; boundary=b"), (400, 422)
        ),
        Case("multipart-no-file-part", lambda s: post_form(s, image=None), *invalid),
        Case("multipart-too-many-parts", lambda s: post_form(s, many_fields), 400, "invalid_request"),
        Case("multipart-field-over-64k", lambda s: post_form(s, {**FAST, "negative_prompt": "n" * 70_000}), 400),
        Case("multipart-duplicate-field", lambda s: post_form(s, {**FAST, "seed": ["1", "2"]}), *invalid),
        Case(
            "multipart-duplicate-file",
            lambda s: post_form(s, extra_files=[("init_image", "i", FACE_JPEG, "image/jpeg")] * 2),
            *invalid,
        ),
        Case(  # face_image may repeat (photos of one person), up to 8 times
            "multipart-nine-face-images",
            lambda s: post_form(s, extra_files=[("face_image", "f", FACE_JPEG, "image/jpeg")] * 8),
            *invalid,
        ),
        Case(  # more file parts than any valid request has (each kind once, face_image and identity_0..4 up to
            # 8 times each) are not even parsed
            "multipart-more-files-than-any-request",
            lambda s: post_form(
                s, extra_files=[pose_part(FACE_JPEG)] * most_file_parts(GENERATE_FILES, GENERATE_REPEATED)
            ),
            400,
            "invalid_request",
        ),
        Case(
            "multipart-pose-twice",
            lambda s: post_form(s, extra_files=[pose_part(FACE_JPEG), pose_part(FACE_JPEG)]),
            *invalid,
        ),
        Case(
            "multipart-file-for-prompt",
            lambda s: post_form(s, {"seed": 1}, extra_files=[("prompt", "p.txt", b"x", "text/plain")]),
            *invalid,
        ),
        Case(
            "multipart-text-for-face-image",
            lambda s: post_form(s, {**FAST, "face_image": FACE_B64}, image=None),
            *invalid,
        ),
        Case(
            "multipart-unexpected-file",
            lambda s: post_form(s, extra_files=[("avatar", "a.jpg", FACE_JPEG, "image/jpeg")]),
            *invalid,
        ),
        Case("multipart-empty-file", lambda s: post_form(s, image=b""), 400, "invalid_image"),
    ]


def _http_cases() -> list[Case]:
    def method(verb: str, path: str) -> Callable[[Any], httpx.Response]:
        return lambda s: httpx.request(verb, f"{s.url}{path}", timeout=TIMEOUT)

    def raw_get(path: str, verb: str = "GET") -> Callable[[Any], httpx.Response]:
        return lambda s: raw_http(s, verb, path, [])

    gen_id = "20200101T000000Z-0000000000000000"
    not_found = (404, "not_found")
    not_allowed = (405, "method_not_allowed")
    bad_param = json_with(num_images=0)
    return [
        Case("get-generate", method("GET", "/v1/generate"), *not_allowed, generation=False),
        Case("put-generation", method("PUT", f"/v1/generations/{gen_id}"), *not_allowed, generation=False),
        Case("post-models", method("POST", "/v1/models"), *not_allowed, generation=False),
        Case("patch-healthz", method("PATCH", "/healthz"), *not_allowed, generation=False),
        Case("get-faces", method("GET", "/v1/faces"), *not_allowed, generation=False),
        Case("unknown-route", method("GET", "/v1/nope"), *not_found, generation=False),
        Case("unknown-version", method("POST", "/v2/generate"), *not_found, generation=False),
        Case(
            "traversal-encoded-dots",
            raw_get("/v1/generations/%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
            *not_found,
            generation=False,
        ),
        Case("traversal-encoded-slashes", raw_get("/v1/generations/..%2F..%2Fmeta.json"), *not_found, generation=False),
        Case("traversal-plain", raw_get("/v1/generations/../../etc/passwd"), *not_found, generation=False),
        Case("traversal-dot-dot-id", raw_get("/v1/generations/%2e%2e"), *not_found, generation=False),
        Case("traversal-delete", raw_get("/v1/generations/%2e%2e%2f%2e%2e", "DELETE"), *not_found, generation=False),
        Case("generation-id-nul", raw_get(f"/v1/generations/{gen_id}%00"), *not_found, generation=False),
        Case("generation-id-5000-chars", method("GET", "/v1/generations/" + "a" * 5000), *not_found, generation=False),
        Case("generation-id-unicode", method("GET", "/v1/generations/%E2%80%AEgnp.exe"), *not_found, generation=False),
        Case("x-request-id-4000-chars", lambda s: post_json(s, bad_param, headers={"X-Request-ID": "r" * 4000}), 422),
        Case("x-request-id-markup", lambda s: post_json(s, bad_param, headers={"X-Request-ID": '"><script>'}), 422),
        Case(
            "idempotency-key-bad-chars",
            lambda s: post_json(s, json_with(), headers={"Idempotency-Key": "a b/c?d"}),
            *(422, "invalid_parameter"),
        ),
        Case(
            "idempotency-key-129-chars",
            lambda s: post_json(s, json_with(), headers={"Idempotency-Key": "k" * 129}),
            *(422, "invalid_parameter"),
        ),
        Case(
            "idempotency-key-latin1",
            lambda s: raw_json(s, json_with(), [("Idempotency-Key", "clé")]),
            *(422, "invalid_parameter"),
        ),
    ]


def _faces_endpoint_cases() -> list[Case]:
    def form(image: bytes, fields: dict | None = None) -> Callable[[Any], httpx.Response]:
        files = {"image": ("i", image, "image/png")}
        return lambda s: httpx.post(f"{s.url}/v1/faces", data=fields or {}, files=files, timeout=TIMEOUT)

    return [
        Case("faces-png-bomb", form(png_claiming(60_000, 60_000)), 413, "image_too_large", generation=False),
        Case("faces-pdf", form(NOT_IMAGES["pdf"]), 415, "unsupported_media_type", generation=False),
        Case("faces-aspect-ratio", form(encode_image(Image.new("RGB", (5000, 2)), "PNG")), 400, generation=False),
        Case("faces-bool-as-word", form(FACE_JPEG, {"include_keypoint_image": "maybe"}), 422, generation=False),
        Case("faces-empty-json", lambda s: post_json(s, {}, "/v1/faces"), 422, "invalid_parameter", generation=False),
        Case(
            "faces-bad-base64",
            lambda s: post_json(s, {"image_b64": "!!!"}, "/v1/faces"),
            *(400, "invalid_image"),
            generation=False,
        ),
        Case(
            "faces-file-url",
            lambda s: post_json(s, {"image_uri": "file:///etc/passwd"}, "/v1/faces"),
            *(422, "invalid_parameter"),
            generation=False,
        ),
        Case(
            "faces-no-file-part", lambda s: post_form(s, {"x": 1}, image=None, path="/v1/faces"), 422, generation=False
        ),
    ]


CORPUS = [
    *_size_cases(),
    *_type_cases(),
    *_prompt_cases(),
    *_parameter_cases(),
    *_face_cases(),
    *_s3_cases(),
    *_base64_cases(),
    *_multipart_cases(),
    *_http_cases(),
    *_faces_endpoint_cases(),
]
