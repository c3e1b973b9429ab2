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
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Comma-separated names of optional test prerequisites that must be present (CI sets it): a test that would
# skip for lack of one of them fails instead, so CI never passes by skipping.
REQUIRE_ENV = "INSTANTID_TEST_REQUIRE"

# Generation options that take a fraction of a second on tiny weights, and a whole request (without images).
FAST_OPTIONS: dict[str, Any] = {
    "num_inference_steps": 2,
    "width": 256,
    "height": 256,
    "style": "none",
    "output_format": "png",
}
FAST_REQUEST: dict[str, Any] = {"prompt": "an astronaut", **FAST_OPTIONS}


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


def astronaut_rgb() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@functools.cache
def astronaut_jpeg() -> bytes:
    """A real 512x512 portrait as JPEG bytes."""
    return encode_image(astronaut_rgb(), quality=92)


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


def published_image_proj_keys(depth: int = 4) -> set[str]:
    """The ``image_proj`` key set of InstantX/InstantID's ip-adapter.bin, written out by hand."""
    keys = {
        "latents",
        "proj_in.weight",
        "proj_in.bias",
        "proj_out.weight",
        "proj_out.bias",
        "norm_out.weight",
        "norm_out.bias",
    }
    for i in range(depth):
        keys |= {
            f"layers.{i}.0.norm1.weight",
            f"layers.{i}.0.norm1.bias",
            f"layers.{i}.0.norm2.weight",
            f"layers.{i}.0.norm2.bias",
            f"layers.{i}.0.to_q.weight",
            f"layers.{i}.0.to_kv.weight",
            f"layers.{i}.0.to_out.weight",
            f"layers.{i}.1.0.weight",
            f"layers.{i}.1.0.bias",
            f"layers.{i}.1.1.weight",
            f"layers.{i}.1.3.weight",
        }
    return keys


def sample_control_maps(size: int) -> dict[str, np.ndarray]:
    """A map of the kind each extra ControlNet reads, size x size: the astronaut's edges, a smooth depth-like ramp,
    a pose-like drawing."""
    from deployments.instantid.control_maps import canny_map, fit_image
    from deployments.instantid.images import decode_image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    depth = np.clip(ramp[None, :] * 0.6 + ramp[:, None] * 0.4, 0, 255).astype(np.uint8)
    pose = np.zeros((size, size, 3), dtype=np.uint8)
    pose[size // 6 : size - size // 6, size // 2 - 2 : size // 2 + 2] = (255, 0, 0)
    pose[size // 3 : size // 3 + 4, size // 5 : size - size // 5] = (0, 255, 0)
    return {
        "canny": canny_map(fit_image(decode_image(astronaut_jpeg()), size, size)),
        "depth": np.repeat(depth[:, :, None], 3, axis=2),
        "pose": pose,
    }


def sample_init_image(size: int) -> np.ndarray:
    """The group photo, covered and centre-cropped to size x size: an image-to-image start."""
    from deployments.instantid.control_maps import fit_image
    from deployments.instantid.images import decode_image

    return fit_image(decode_image(group_photo_jpeg()), size, size)


def stored_pixels(client: Any, uri: str) -> np.ndarray:
    """The pixels of an image stored at ``s3://bucket/key`` (read back with the test's own S3 client)."""
    from PIL import Image

    bucket, key = uri[len("s3://") :].split("/", 1)
    return np.asarray(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))


def stored_meta(client: Any, body: dict) -> dict:
    """The meta.json stored next to a generation response's first image."""
    import json

    bucket, key = body["images"][0]["uri"][len("s3://") :].rsplit("/", 1)[0].split("/", 1)
    return json.loads(client.get_object(Bucket=bucket, Key=f"{key}/meta.json")["Body"].read())


def generate_with_params(
    pipeline: Any,
    photos: np.ndarray | list[np.ndarray],
    prompt: str,
    negative: str | None = None,
    *,
    params: Any,
    style: str = "none",
    pose_rgb: np.ndarray | None = None,
    loras: tuple[tuple[str, float], ...] = (),
    face_index: int = 0,
    pose_face_index: int = 0,
    identity_combine: str = "mean",
    identities: Any = None,
    control_images: dict[str, np.ndarray] | None = None,
    canny_thresholds: tuple[int, int] = (100, 200),
    init_rgb: np.ndarray | None = None,
) -> Any:
    """The in-process pipeline's stages run at the model level with explicit ``GenerationParams`` (any size, so
    model tests can run at 64 px, below the request schema's minimum): the face condition, the prompt, the control
    inputs and the denoiser, as the flow chains them. Request-level tests use ``pipeline(options, inputs)``."""
    import dataclasses
    from types import SimpleNamespace

    from deployments.generation.messages import ControlMapsResult, FaceResult, PromptRequest
    from deployments.instantid.catalogue import ModelChoice
    from deployments.instantid.conditioning import prepare_face_condition
    from deployments.instantid.control_inputs import prepare_control_inputs
    from deployments.instantid.group import prepare_group_condition
    from deployments.instantid.styles import apply_style

    analyzer = pipeline.face.analyzer
    long_side = pipeline.face.long_side
    if identities is not None:
        condition = prepare_group_condition(
            analyzer, identities, pose_rgb, width=params.width, height=params.height, long_side=long_side
        )
        params = dataclasses.replace(params, identities=len(identities))
        first = identities[0].photos[0]
    else:
        condition = prepare_face_condition(
            analyzer,
            photos,
            pose_rgb,
            width=params.width,
            height=params.height,
            long_side=long_side,
            face_index=face_index,
            pose_face_index=pose_face_index,
            identity_combine=identity_combine,
        )
        first = photos if isinstance(photos, np.ndarray) else photos[0]
    styled, styled_negative = apply_style(style, prompt, negative)
    model = ModelChoice(pipeline.catalogue.default_base, tuple(loras))
    encoded = pipeline.prompt.encode(PromptRequest(styled, styled_negative, params.do_classifier_free_guidance, model))
    controls = None
    active = [c.name for c in params.active_controlnets]
    if active or init_rgb is not None:
        uploaded = {name: image for name, image in (control_images or {}).items() if name in active}
        inputs = prepare_control_inputs(
            first if pose_rgb is None else pose_rgb,
            source_name="face_image" if pose_rgb is None else "pose_image",
            width=params.width,
            height=params.height,
            long_side=long_side,
            compute=[name for name in active if name not in uploaded],
            uploaded=uploaded,
            canny_low=canny_thresholds[0],
            canny_high=canny_thresholds[1],
            depth=pipeline.controls.depth,
            init_rgb=init_rgb,
        )
        controls = ControlMapsResult(inputs, {})
    result = pipeline.denoise.generate(params, model, FaceResult(condition, {}), encoded, controls)
    return SimpleNamespace(
        images=result.images,
        condition=condition,
        params=result.params,
        result=result,
        prompt=styled,
        negative_prompt=styled_negative,
        prompt_chunks=encoded.embeddings.chunks,
        controls=None if controls is None else controls.inputs,
    )
