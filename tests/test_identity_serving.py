"""Identity input through the served graph (real local Ray + SeaweedFS): several photos in JSON and multipart, face
choice against ``POST /v1/faces``, face-token noise, what the response and meta.json record, and the 422s."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.support import (
    FAST_REQUEST,
    astronaut_b64,
    astronaut_jpeg,
    encode_image,
    group_photo_jpeg,
    stored_meta,
    stored_pixels,
)

pytestmark = pytest.mark.slow

SIZE = {"width": 256, "height": 256}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_json(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json={**FAST_REQUEST, **SIZE, "seed": 11, **fields}, timeout=180)


def stored_image(stack, uri: str) -> np.ndarray:
    return stored_pixels(stack.s3.client(), uri)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_copies_of_one_photo_in_json_and_multipart_give_the_one_photo_image(serve_stack) -> None:
    single = post_json(serve_stack.url, face_image_b64=astronaut_b64(), output_format="png")
    assert single.status_code == 200, single.text
    photos = [{"b64": astronaut_b64()}, {"b64": astronaut_b64()}, {"b64": astronaut_b64()}]
    listed = post_json(serve_stack.url, face_images=photos, identity_combine="normalized_mean", output_format="png")
    assert listed.status_code == 200, listed.text
    form = {k: str(v) for k, v in {**FAST_REQUEST, **SIZE, "seed": 11, "output_format": "png"}.items()}
    parts = [("face_image", (f"p{i}.jpg", astronaut_jpeg(), "image/jpeg")) for i in range(2)]
    multipart = httpx.post(f"{serve_stack.url}/v1/generate", data=form, files=parts, timeout=180)
    assert multipart.status_code == 200, multipart.text

    one = stored_image(serve_stack, single.json()["images"][0]["uri"])
    for response, count in ((listed, 3), (multipart, 2)):
        body = response.json()
        assert max_difference(stored_image(serve_stack, body["images"][0]["uri"]), one) <= 1
        assert [(f["source"], f["photo_index"], f["face_index"]) for f in body["faces"]] == [
            ("face", i, 0) for i in range(count)
        ]
        assert set(body["replicas"]) >= {f"face_photo_{i}" for i in range(count)}
        meta = stored_meta(serve_stack.s3.client(), body)
        assert [f["photo_index"] for f in meta["faces"]] == list(range(count)) and meta["face_photos"] == count
    (used,) = single.json()["faces"]
    assert isinstance(used.pop("cached"), bool)  # true when an earlier test analysed the same photo on this replica
    assert used == {
        **single.json()["face"],
        "source": "face",
        "identity": None,
        "photo_index": 0,
        "face_index": 0,
        "saved_identity": None,
    }
    assert not any("truncated" in warning for warning in single.json()["warnings"])


def test_face_index_and_pose_face_index_pick_the_faces_listed_by_v1_faces(serve_stack) -> None:
    listing = httpx.post(f"{serve_stack.url}/v1/faces", json={"image_b64": b64(group_photo_jpeg())}, timeout=60)
    assert listing.status_code == 200, listing.text
    faces = listing.json()["faces"]
    assert len(faces) >= 4
    response = post_json(
        serve_stack.url,
        face_image_b64=b64(group_photo_jpeg()),
        face_index=2,
        pose_image_b64=b64(group_photo_jpeg()),
        pose_face_index=3,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["face"]["box"] == pytest.approx(faces[2]["box"])
    identity, pose = body["faces"]
    assert (identity["source"], identity["face_index"], identity["box"]) == ("face", 2, pytest.approx(faces[2]["box"]))
    assert (pose["source"], pose["face_index"], pose["box"]) == ("pose", 3, pytest.approx(faces[3]["box"]))
    assert body["parameters"]["face_index"] == 2 and body["parameters"]["pose_face_index"] == 3

    out_of_range = post_json(serve_stack.url, face_image_b64=b64(group_photo_jpeg()), face_index=len(faces))
    assert out_of_range.status_code == 422, out_of_range.text
    error = out_of_range.json()["error"]
    assert error["code"] == "invalid_parameter"
    assert error["message"] == f"face_index {len(faces)} is out of range: {len(faces)} faces found in the face image"


def test_face_noise_is_seeded_and_recorded(serve_stack) -> None:
    plain = post_json(serve_stack.url, face_image_b64=astronaut_b64(), output_format="png")
    noisy = [post_json(serve_stack.url, face_image_b64=astronaut_b64(), face_noise=0.6, output_format="png")]
    noisy.append(post_json(serve_stack.url, face_image_b64=astronaut_b64(), face_noise=0.6, output_format="png"))
    assert all(r.status_code == 200 for r in (plain, *noisy)), [r.text for r in (plain, *noisy)]
    first, second = (stored_image(serve_stack, r.json()["images"][0]["uri"]) for r in noisy)
    assert np.array_equal(first, second)
    assert max_difference(first, stored_image(serve_stack, plain.json()["images"][0]["uri"])) > 3
    assert noisy[0].json()["parameters"]["face_noise"] == 0.6


def test_identity_input_errors_are_422s_that_say_which_photo(serve_stack) -> None:
    grey = b64(encode_image(np.full((300, 300, 3), 128, dtype=np.uint8), "PNG"))
    cases = [
        ({"face_images": [{"b64": astronaut_b64()}, {"b64": grey}]}, "no_face", "no face detected in face photo 1"),
        (
            {"face_images": [{"b64": astronaut_b64()}], "face_image_b64": astronaut_b64()},
            "invalid_parameter",
            "give exactly one of face_image_b64, face_image_uri, face_images and identity_id",
        ),
        ({"face_images": [{"b64": astronaut_b64()}] * 9}, "invalid_parameter", "face_images"),
        ({"face_images": []}, "invalid_parameter", "face_images"),
        ({"face_images": [{"b64": astronaut_b64(), "uri": "s3://x/y"}]}, "invalid_parameter", "exactly one of b64"),
        (
            {"face_image_b64": astronaut_b64(), "pose_face_index": 1},
            "invalid_parameter",
            "pose_face_index is for the pose photo",
        ),
        ({"face_image_b64": astronaut_b64(), "identity_combine": "median"}, "invalid_parameter", "identity_combine"),
        ({"face_image_b64": astronaut_b64(), "face_noise": 1.5}, "invalid_parameter", "face_noise"),
    ]
    for fields, code, message in cases:
        response = post_json(serve_stack.url, **fields)
        assert response.status_code == 422, (fields.keys(), response.text)
        error = response.json()["error"]
        assert error["code"] == code and message in error["message"], (fields.keys(), error)

    form = {k: str(v) for k, v in {**FAST_REQUEST, **SIZE}.items()}
    grey_png = encode_image(np.full((300, 300, 3), 128, dtype=np.uint8), "PNG")
    parts = [
        ("face_image", ("a.jpg", astronaut_jpeg(), "image/jpeg")),
        ("face_image", ("b.png", grey_png, "image/png")),
    ]
    response = httpx.post(f"{serve_stack.url}/v1/generate", data=form, files=parts, timeout=180)
    assert response.status_code == 422 and response.json()["error"]["message"] == "no face detected in face photo 1"
