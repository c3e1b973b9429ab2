"""Extra ControlNets and image-to-image through the served graph (real local Ray + SeaweedFS, local.yaml): maps made
by the ControlMaps deployment, images in S3 equal to the in-process pipeline's, what is recorded, and the 422s."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.generation.local import InstantIDPipeline
from deployments.generation.plan import GenerationInputs
from deployments.instantid.control_maps import canny_map, load_depth_estimator
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import CropTransform
from deployments.instantid.options import CONTROLNET_NAMES
from deployments.instantid.weights import WeightsLayout
from serve.schemas import GenerationOptions
from tests.support import (
    FAST_REQUEST,
    astronaut_b64,
    astronaut_jpeg,
    encode_image,
    group_photo_jpeg,
    s3_object_exists,
    sample_control_maps,
    stored_meta,
    stored_pixels,
)

pytestmark = pytest.mark.slow

SIZE = 64
GROUP_PHOTO = "group photo"  # stands for the group photo's base64 in parameter lists


def post(url: str, **fields) -> httpx.Response:
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), "width": 256, "height": 256, **fields}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=180)


def stored_image(stack, uri: str) -> np.ndarray:
    return stored_pixels(stack.s3.client(), uri)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def local_pipeline(tiny_weights: Path) -> InstantIDPipeline:
    """The in-process pipeline with the same ControlNets and depth model as local.yaml's deployments."""
    return InstantIDPipeline.from_layout(
        WeightsLayout.from_root(tiny_weights),
        device="cpu",
        dtype="float32",
        long_side=512,
        controlnets={name: tiny_weights / "controlnets" / name for name in CONTROLNET_NAMES},
        depth_model=tiny_weights / "depth",
    )


def test_canny_depth_and_img2img_in_one_request_equal_the_in_process_pipeline(serve_stack, local_pipeline) -> None:
    fields = {
        "seed": 21,
        "controlnets": [{"name": "canny", "strength": 0.6}, {"name": "depth", "strength": 0.5, "end": 0.8}],
        "canny_low": 80,
        "canny_high": 160,
        "init_image_b64": b64(group_photo_jpeg()),
        "strength": 0.7,
    }
    response = post(serve_stack.url, **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert all(s3_object_exists(serve_stack.s3.client(), image["uri"]) for image in body["images"])
    served = stored_image(serve_stack, body["images"][0]["uri"])

    options = GenerationOptions(**{k: v for k, v in {**FAST_REQUEST, **fields}.items() if not k.endswith("_b64")})
    local = local_pipeline(options, GenerationInputs(faces=(astronaut_jpeg(),), init=group_photo_jpeg()))
    assert np.abs(served.astype(int) - local.images[0].astype(int)).max() <= 2  # PNG; float noise across processes

    recorded = body["parameters"]
    assert recorded["controlnets"] == [
        {"name": "canny", "strength": 0.6, "start": 0.0, "end": 1.0, "map": "computed from face_image"},
        {"name": "depth", "strength": 0.5, "start": 0.0, "end": 0.8, "map": "computed from face_image"},
    ]
    assert recorded["strength"] == 0.7 and recorded["denoising_steps"] == int(FAST_REQUEST["num_inference_steps"] * 0.7)
    assert (recorded["canny_low"], recorded["canny_high"]) == (80, 160)
    assert "control_maps" in body["timings"] and "control_maps" in body["replicas"]
    meta = stored_meta(serve_stack.s3.client(), body)
    assert meta["parameters"]["controlnets"] == recorded["controlnets"] and meta["init_image_given"] is True
    assert "init_image_b64" not in json.dumps(meta)  # no input bytes in the metadata


def test_multipart_maps_and_init_image_are_uploaded_parts(serve_stack, local_pipeline) -> None:
    maps = sample_control_maps(SIZE)  # a different size from the output: covered and centre-cropped
    fields = {
        **{k: str(v) for k, v in FAST_REQUEST.items()},
        "seed": "5",
        "width": "256",
        "height": "256",
        "controlnets": json.dumps([{"name": "pose", "strength": 0.8}, {"name": "canny", "strength": 0.4}]),
        "strength": "0.9",
    }
    files = {
        "face_image": ("face.jpg", astronaut_jpeg(), "image/jpeg"),
        "init_image": ("init.jpg", group_photo_jpeg(), "image/jpeg"),
        "control_image_pose": ("pose.png", encode_image(maps["pose"], "PNG"), "image/png"),
        "control_image_canny": ("canny.png", encode_image(maps["canny"], "PNG"), "image/png"),
    }
    response = httpx.post(f"{serve_stack.url}/v1/generate", data=fields, files=files, timeout=180)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["map"] for c in body["parameters"]["controlnets"]] == ["uploaded", "uploaded"]

    options = GenerationOptions(
        **{**FAST_REQUEST, "controlnets": [{"name": "pose", "strength": 0.8}, {"name": "canny", "strength": 0.4}]},
        seed=5,
        strength=0.9,
    )
    inputs = GenerationInputs(
        faces=(astronaut_jpeg(),),
        init=group_photo_jpeg(),
        maps={name: files[f"control_image_{name}"][1] for name in ("pose", "canny")},  # the uploaded PNG bytes
    )
    local = local_pipeline(options, inputs)
    served = stored_image(serve_stack, body["images"][0]["uri"])
    assert np.abs(served.astype(int) - local.images[0].astype(int)).max() <= 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"controlnets": [{"name": "openpose"}]}, "'pose', 'canny' or 'depth'"),
        ({"controlnets": [{"name": "pose"}]}, "needs a ready-made map (control_image_pose"),
        ({"controlnets": [{"name": "canny"}, {"name": "canny"}]}, "each controlnet may be listed once"),
        ({"strength": 0.5}, "strength is for image-to-image"),
        ({"init_image_b64": GROUP_PHOTO, "strength": 0.1, "num_inference_steps": 5}, "leaves no denoising step"),
        ({"controlnets": [{"name": "canny", "start": 0.8}], "control_guidance_end": 0.5}, "need 0 <= start < end"),
        ({"canny_low": 250, "canny_high": 100}, "canny_low must be at most canny_high"),
    ],
    ids=["unknown-name", "pose-without-map", "twice", "strength-alone", "no-step-left", "empty-window", "canny"],
)
def test_bad_control_fields_are_422_and_nothing_is_stored(serve_stack, fields, message) -> None:
    if fields.get("init_image_b64") == GROUP_PHOTO:
        fields = {**fields, "init_image_b64": b64(group_photo_jpeg())}
    before = serve_stack.s3.client().list_objects_v2(Bucket=serve_stack.s3.bucket).get("KeyCount", 0)
    response = post(serve_stack.url, **fields)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    assert serve_stack.s3.client().list_objects_v2(Bucket=serve_stack.s3.bucket).get("KeyCount", 0) == before


def test_faces_returns_the_maps_a_generation_would_use(serve_stack, tiny_weights) -> None:
    request = {"image_b64": astronaut_b64(), "include_control_maps": True, "width": 320, "height": 256}
    response = httpx.post(f"{serve_stack.url}/v1/faces", json=request, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    maps = {
        name: np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
        for name, png in body["control_maps_png_b64"].items()
    }
    assert sorted(maps) == ["canny", "depth"] and all(m.shape == (256, 320, 3) for m in maps.values())
    photo = decode_image(astronaut_jpeg())
    fitted = CropTransform.cover(photo.shape[1], photo.shape[0], 320, 256).apply_image(photo)
    assert np.array_equal(maps["canny"], canny_map(fitted))
    assert np.array_equal(maps["depth"], load_depth_estimator(tiny_weights / "depth")([fitted])[0])


def test_models_lists_the_extra_controlnets(serve_stack) -> None:
    body = httpx.get(f"{serve_stack.url}/v1/models", timeout=30).json()
    assert body["controlnets"] == ["pose", "canny", "depth"]
    assert body["denoiser"]["controlnets"] == ["canny", "depth", "pose"]


def test_a_controlnet_the_deployment_lacks_is_a_422_naming_the_available_ones() -> None:
    """The plan's check against the deployment's ControlNets (a narrow unit test: the shared app loads all three)."""
    from deployments.generation.plan import InputsGiven, plan_generation
    from deployments.instantid.catalogue import ModelCatalogue
    from deployments.instantid.errors import InvalidParameterError

    catalogue = ModelCatalogue().with_layout("sdxl", None)
    options = GenerationOptions(prompt="x", controlnets=[{"name": "depth"}])
    with pytest.raises(InvalidParameterError, match="no depth ControlNet; available: canny"):
        plan_generation(options, InputsGiven(face_photos=1), catalogue, ["canny"])
