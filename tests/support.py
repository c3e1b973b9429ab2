"""What several test files need: real photos as upload bytes, fast request bodies, ports and S3 probes.

Photos are real (scikit-image's astronaut, NASA, public domain; insightface's group photo t1.jpg), so the tiny
face detector finds faces in them as it would in uploads.
"""

from __future__ import annotations

import base64
import functools
import io
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Comma-separated names of optional test prerequisites that must be present (CI sets it): a test that would
# skip for lack of one of them fails instead, so CI never passes by skipping.
REQUIRE_ENV = "INSTANTID_TEST_REQUIRE"

# A generation request that takes a fraction of a second on tiny weights (without the images).
FAST_REQUEST: dict[str, Any] = {
    "prompt": "an astronaut",
    "num_inference_steps": 2,
    "width": 256,
    "height": 256,
    "style": "none",
    "output_format": "png",
}


def encode_image(image: Image.Image | np.ndarray, fmt: str = "JPEG", **options: Any) -> bytes:
    """``image`` (Pillow or RGB uint8 array) encoded as ``fmt`` bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if fmt == "JPEG":
        options.setdefault("quality", 92)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def astronaut_rgb() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@functools.cache
def astronaut_jpeg() -> bytes:
    """A real 512x512 portrait as JPEG bytes."""
    return encode_image(astronaut_rgb())


def astronaut_b64() -> str:
    return base64.b64encode(astronaut_jpeg()).decode()


def group_photo_path() -> Path:
    """insightface's sample group photo (1280x886, six faces)."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@functools.cache
def group_photo_jpeg() -> bytes:
    return group_photo_path().read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair(offset: int = 10000) -> int:
    """A free port whose twin (+``offset``, SeaweedFS's gRPC rule) is free too and below 65536."""
    for _ in range(100):
        port = random.randint(20000, 29999)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair found")


def s3_object_exists(client: Any, uri: str) -> bool:
    """Whether ``s3://bucket/key`` exists. Only a 404 means "absent": any other error (403, a timeout) raises,
    so a test proving a deletion cannot pass because S3 refused to answer."""
    from deployments.storage.s3 import is_not_found, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_not_found(exc):
            return False
        raise
    return True


def skip_unless_required(requirement: str, reason: str) -> None:
    """Skip the calling test for ``reason``, or fail it when ``requirement`` is listed in ``INSTANTID_TEST_REQUIRE``."""
    import os

    required = {name.strip() for name in os.environ.get(REQUIRE_ENV, "").split(",") if name.strip()}
    if requirement in required:
        pytest.fail(f"{reason} ({REQUIRE_ENV} requires {requirement!r})")
    pytest.skip(reason)
