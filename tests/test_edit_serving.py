"""Editing a photo through the served graph (real local Ray + SeaweedFS, local.yaml): the astronaut photo edited
with its own identity comes back at the target's size with only the face region changed, and the multipart and JSON
bodies give the same image."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from deployments.instantid.editing import face_mask
from tests.support import astronaut_jpeg, astronaut_rgb, encode_image, stored_pixels

pytestmark = pytest.mark.slow

FIELDS = {"prompt": "an astronaut", "num_inference_steps": 2, "style": "none", "output_format": "png", "seed": 9}
EDIT = {"edit_resolution": 256, "edit_strength": 0.8, "mask_blur": 8}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_an_edit_over_http_keeps_the_target_outside_the_face_and_both_bodies_agree(serve_stack) -> None:
    target_png = encode_image(astronaut_rgb(), "PNG")  # lossless, so the kept pixels can be compared exactly
    url = f"{serve_stack.url}/v1/generate"
    body = {**FIELDS, **EDIT, "face_image_b64": b64(astronaut_jpeg()), "target_image_b64": b64(target_png)}
    as_json = httpx.post(url, json=body, timeout=300)
    assert as_json.status_code == 200, as_json.text
    files = {
        "face_image": ("face.jpg", astronaut_jpeg(), "image/jpeg"),
        "target_image": ("target.png", target_png, "image/png"),
    }
    as_form = httpx.post(url, data={k: str(v) for k, v in {**FIELDS, **EDIT}.items()}, files=files, timeout=300)
    assert as_form.status_code == 200, as_form.text

    target = astronaut_rgb()
    images = [stored_pixels(serve_stack.s3.client(), r.json()["images"][0]["uri"]) for r in (as_json, as_form)]
    assert images[0].shape == target.shape
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 2
    assert (as_json.json()["parameters"]["width"], as_json.json()["parameters"]["height"]) == (512, 512)
    face = as_json.json()["faces"][-1]
    assert face["source"] == "target"
    mask = face_mask(np.array(face["box"]), 512, 512, 0.35)
    assert np.array_equal(images[0][~mask], target[~mask])
    assert np.abs(images[0][mask].astype(int) - target[mask].astype(int)).mean() > 2

    blank = encode_image(np.full((300, 300, 3), 128, np.uint8), "PNG")
    refused = httpx.post(url, json={**body, "target_image_b64": b64(blank)}, timeout=300)
    assert refused.status_code == 422 and "target image" in refused.json()["error"]["message"]


def test_an_edit_on_the_inpainting_base_is_served_and_it_refuses_a_plain_generation(serve_stack) -> None:
    """local.yaml's tiny-inpaint (a 9-channel UNet): the edit runs on it (the target kept outside the face, bit for
    bit), a generation without a target is a 422 naming the base, and /v1/models says which bases only edit."""
    models = httpx.get(f"{serve_stack.url}/v1/models", timeout=30).json()
    assert models["base_models"]["tiny-inpaint"]["inpainting"] is True
    assert models["base_models"]["sdxl"]["inpainting"] is False
    target_png = encode_image(astronaut_rgb(), "PNG")
    url = f"{serve_stack.url}/v1/generate"
    body = {**FIELDS, **EDIT, "face_image_b64": b64(astronaut_jpeg()), "base_model": "tiny-inpaint"}
    edited = httpx.post(url, json={**body, "target_image_b64": b64(target_png)}, timeout=300)
    assert edited.status_code == 200, edited.text
    assert edited.json()["model"]["base"] == "tiny-inpaint"
    image = stored_pixels(serve_stack.s3.client(), edited.json()["images"][0]["uri"])
    target = astronaut_rgb()
    mask = face_mask(np.array(edited.json()["faces"][-1]["box"]), 512, 512, 0.35)
    assert np.array_equal(image[~mask], target[~mask])
    assert np.abs(image[mask].astype(int) - target[mask].astype(int)).mean() > 2
    plain = httpx.post(
        url, json={**FIELDS, "face_image_b64": b64(astronaut_jpeg()), "base_model": "tiny-inpaint"}, timeout=30
    )
    assert plain.status_code == 422, plain.text
    assert "'tiny-inpaint' is an inpainting model" in plain.json()["error"]["message"]
