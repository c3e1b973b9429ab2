"""Saved identities through the served graph (real local Ray + SeaweedFS): enrol once, generate by id on every path
with the image the photos give, the stored faces on ``/v1/faces``, deletion that leaves no object, owners kept
apart, hostile ids, and a thousand identities paged with none missing or repeated."""

from __future__ import annotations

import base64
import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve_fixtures import API_KEYS
from tests.support import FAST_REQUEST, astronaut_jpeg, group_photo_jpeg, stored_meta, stored_pixels

pytestmark = pytest.mark.slow

SIZE = {"width": 256, "height": 256}
ID_PATTERN = re.compile(r"^idt-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def enrol(url: str, headers: dict | None = None, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/identities", json=fields, headers=headers or {}, timeout=120)


def generate(url: str, headers: dict | None = None, **fields) -> httpx.Response:
    body = {**FAST_REQUEST, **SIZE, "seed": 21, "output_format": "png", **fields}
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers or {}, timeout=240)


def pixels(stack, body: dict) -> np.ndarray:
    return stored_pixels(stack.s3.client(), body["images"][0]["uri"])


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def identity_keys(stack, prefix: str = "identities/") -> list[str]:
    client = stack.s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.s3.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def keys_of(stack, identity_id: str) -> list[str]:
    return [key for key in identity_keys(stack) if f"/{identity_id}/" in key]


@pytest.fixture(scope="module")
def astronaut(serve_stack) -> dict:
    """The astronaut enrolled from one photo (the anonymous owner)."""
    response = enrol(serve_stack.url, face_image_b64=b64(astronaut_jpeg()), name="astronaut")
    assert response.status_code == 201, response.text
    return response.json()


def test_enrolment_stores_the_analysis_and_a_thumbnail_not_the_photo(serve_stack, astronaut) -> None:
    assert ID_PATTERN.fullmatch(astronaut["id"])
    assert astronaut["name"] == "astronaut" and astronaut["identity_combine"] == "mean"
    assert astronaut["photos_kept"] is False and astronaut["embedding"] is None  # embeddings only on request
    [photo] = astronaut["photos"]
    assert photo["sha256"] == __import__("hashlib").sha256(astronaut_jpeg()).hexdigest()
    assert len(photo["box"]) == 4 and len(photo["keypoints"]) == 5 and photo["stored"] is False
    names = sorted(key.rsplit("/", 1)[1] for key in keys_of(serve_stack, astronaut["id"]))
    assert names == ["identity.json", "thumbnail.webp"]  # no photo without keep_photos
    thumbnail = httpx.get(astronaut["thumbnail_url"], timeout=30)
    assert thumbnail.status_code == 200
    image = Image.open(io.BytesIO(thumbnail.content))
    assert image.format == "WEBP" and max(image.size) == 128
    exported = httpx.get(f"{serve_stack.url}/v1/identities/{astronaut['id']}?include=embeddings", timeout=30).json()
    assert len(exported["embedding"]) == 512 and len(exported["photo_embeddings"]) == 1
    # The faces /v1/faces finds in the photo are the stored ones.
    faces = httpx.post(f"{serve_stack.url}/v1/faces", json={"image_b64": b64(astronaut_jpeg())}, timeout=60).json()
    assert np.allclose(faces["faces"][0]["box"], photo["box"]) and np.allclose(
        faces["faces"][0]["keypoints"], photo["keypoints"]
    )


def test_a_generation_by_id_equals_the_one_from_the_photo(serve_stack, astronaut) -> None:
    from_photo = generate(serve_stack.url, face_image_b64=b64(astronaut_jpeg()))
    assert from_photo.status_code == 200, from_photo.text
    by_id = generate(serve_stack.url, identity_id=astronaut["id"])
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert max_difference(pixels(serve_stack, body), pixels(serve_stack, from_photo.json())) <= 1
    assert body["faces"][0]["saved_identity"] == astronaut["id"] and body["faces"][0]["source"] == "face"
    # No photo analysed: the face stage only read the record (face_identity) and drew the condition (face).
    assert not [stage for stage in body["timings"] if "photo" in stage]
    assert "face_identity" in body["timings"]
    assert body["parameters"]["identity_id"] == astronaut["id"] and "face_index" not in body["parameters"]
    meta = stored_meta(serve_stack.s3.client(), body)
    assert meta["identity_ids"] == [astronaut["id"]]
    # Multipart: the id as a form field, no photo part.
    form = {k: str(v) for k, v in {**FAST_REQUEST, **SIZE, "seed": 21, "output_format": "png"}.items()}
    fields = {**form, "identity_id": astronaut["id"]}  # form fields only: sent as multipart/form-data parts
    multipart = httpx.post(
        f"{serve_stack.url}/v1/generate", files=[(k, (None, v)) for k, v in fields.items()], timeout=240
    )
    assert multipart.status_code == 200, multipart.text
    assert max_difference(pixels(serve_stack, multipart.json()), pixels(serve_stack, body)) <= 1
    # The handle API.
    from ray import serve as ray_serve

    from serve.schemas import GenerateRequest

    handle = ray_serve.get_app_handle(serve_stack.app_name)
    request = GenerateRequest(
        **{**FAST_REQUEST, **SIZE, "seed": 21, "output_format": "png", "identity_id": astronaut["id"]}
    )
    response = handle.generate.remote(request).result(timeout_s=240)
    assert (
        max_difference(stored_pixels(serve_stack.s3.client(), response.images[0].uri), pixels(serve_stack, body)) <= 1
    )


def test_a_photo_sent_again_is_served_from_the_cache(serve_stack) -> None:
    photo = group_photo_jpeg()
    first = generate(serve_stack.url, face_image_b64=b64(photo), face_index=2, seed=3)
    second = generate(serve_stack.url, face_image_b64=b64(photo), face_index=2, seed=3)
    assert first.status_code == second.status_code == 200, second.text
    # One face-analyzer replica in the local config: the second request's photo is a hit there.
    assert second.json()["faces"][0]["cached"] is True
    assert max_difference(pixels(serve_stack, first.json()), pixels(serve_stack, second.json())) <= 1


def test_several_photos_enrolled_give_what_the_photos_give(serve_stack) -> None:
    photos = [{"b64": b64(astronaut_jpeg())}, {"b64": b64(group_photo_jpeg())}]
    enrolled = enrol(serve_stack.url, face_images=photos, identity_combine="normalized_mean")
    assert enrolled.status_code == 201, enrolled.text
    from_photos = generate(serve_stack.url, face_images=photos, identity_combine="normalized_mean")
    by_id = generate(serve_stack.url, identity_id=enrolled.json()["id"])
    assert from_photos.status_code == by_id.status_code == 200, by_id.text
    assert max_difference(pixels(serve_stack, by_id.json()), pixels(serve_stack, from_photos.json())) <= 1
    assert by_id.json()["parameters"]["identity_combine"] == "normalized_mean"  # the record's, not the default


def test_two_people_mixing_a_saved_identity_and_photos(serve_stack, astronaut) -> None:
    other = {"images": [{"b64": b64(group_photo_jpeg())}], "face_index": 4}
    common = {"width": 512, "height": 256, "seed": 5}
    from_photos = generate(serve_stack.url, identities=[{"images": [{"b64": b64(astronaut_jpeg())}]}, other], **common)
    mixed = generate(serve_stack.url, identities=[{"identity_id": astronaut["id"]}, other], **common)
    assert from_photos.status_code == mixed.status_code == 200, mixed.text
    assert max_difference(pixels(serve_stack, mixed.json()), pixels(serve_stack, from_photos.json())) <= 1
    body = mixed.json()
    assert [f.get("saved_identity") for f in body["faces"] if f["source"] == "face"] == [astronaut["id"], None]
    assert body["parameters"]["identities"][0]["identity_id"] == astronaut["id"]
    assert stored_meta(serve_stack.s3.client(), body)["identity_ids"] == [astronaut["id"]]
    # The layout /v1/faces shows for them is the generation's.
    layout = httpx.post(
        f"{serve_stack.url}/v1/faces",
        json={"identities": [{"identity_id": astronaut["id"]}, other], "width": 512, "height": 256},
        timeout=60,
    )
    assert layout.status_code == 200, layout.text
    assert layout.json()["layout"] == body["layout"]


def test_faces_and_jobs_take_an_identity_id(serve_stack, astronaut) -> None:
    faces = httpx.post(
        f"{serve_stack.url}/v1/faces",
        json={"identity_id": astronaut["id"], "include_keypoint_image": True, **SIZE},
        timeout=60,
    )
    assert faces.status_code == 200, faces.text
    body = faces.json()
    assert body["faces"][0]["box"] == astronaut["photos"][0]["box"] and body["chosen"] == 0
    from_photo = httpx.post(
        f"{serve_stack.url}/v1/faces",
        json={"image_b64": b64(astronaut_jpeg()), "include_keypoint_image": True, **SIZE},
        timeout=60,
    ).json()
    assert body["keypoint_image_png_b64"] == from_photo["keypoint_image_png_b64"]

    job = httpx.post(
        f"{serve_stack.url}/v1/jobs", json={**FAST_REQUEST, **SIZE, "identity_id": astronaut["id"]}, timeout=60
    )
    assert job.status_code == 202, job.text
    deadline = time.time() + 240
    while time.time() < deadline:
        state = httpx.get(f"{serve_stack.url}/v1/jobs/{job.json()['id']}", timeout=30).json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    unknown = httpx.post(
        f"{serve_stack.url}/v1/jobs",
        json={**FAST_REQUEST, **SIZE, "identity_id": "idt-20200101T000000Z-0000000000000000"},
        timeout=60,
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_delete_leaves_no_object_and_every_route_answers_404(serve_stack) -> None:
    kept = enrol(
        serve_stack.url,
        face_images=[{"b64": b64(astronaut_jpeg())}, {"b64": b64(group_photo_jpeg())}],
        keep_photos=True,
    )
    assert kept.status_code == 201, kept.text
    identity_id = kept.json()["id"]
    names = sorted(key.rsplit("/", 1)[1] for key in keys_of(serve_stack, identity_id))
    assert names == ["identity.json", "photo-0.jpg", "photo-1.jpg", "thumbnail.webp"]
    assert all(p["stored"] for p in kept.json()["photos"])

    deleted = httpx.delete(f"{serve_stack.url}/v1/identities/{identity_id}", timeout=60)
    assert deleted.status_code == 204
    assert keys_of(serve_stack, identity_id) == []
    url = serve_stack.url
    answers = {
        "get": httpx.get(f"{url}/v1/identities/{identity_id}", timeout=30),
        "delete": httpx.delete(f"{url}/v1/identities/{identity_id}", timeout=30),
        "generate": generate(url, identity_id=identity_id),
        "identities[]": generate(
            url,
            identities=[{"identity_id": identity_id}, {"images": [{"b64": b64(astronaut_jpeg())}]}],
            width=512,
        ),
        "faces": httpx.post(f"{url}/v1/faces", json={"identity_id": identity_id}, timeout=30),
        "jobs": httpx.post(f"{url}/v1/jobs", json={**FAST_REQUEST, "identity_id": identity_id}, timeout=30),
    }
    for route, response in answers.items():
        assert response.status_code == 404, (route, response.text)
        assert response.json()["error"]["code"] == "not_found", route
    listed = httpx.get(f"{url}/v1/identities?limit=100", timeout=30).json()
    assert identity_id not in [item["id"] for item in listed["identities"]]


@pytest.mark.parametrize(
    "identity_id",
    [
        "../generations",
        "idt-20261207T120000Z-0123456789abcdef/../../x",
        "idt-20261207T120000Z-0123456789ABCDEF",
        "%2e%2e%2fidentities",
        "idt-" + "a" * 60,
        "idt-20261207T120000Z-0123456789abcdeg",
        "idt-20261207T120000Z-0123456789abcdef",  # well formed, never enrolled
    ],
)
def test_hostile_and_unknown_ids_are_404_and_touch_nothing(serve_stack, identity_id: str) -> None:
    before = identity_keys(serve_stack)
    url = serve_stack.url
    quoted = httpx.URL(f"{url}/v1/identities/").join(identity_id.replace("/", "%2F"))
    for response in (
        httpx.get(quoted, timeout=30),
        httpx.delete(quoted, timeout=30),
        generate(url, identity_id=identity_id),
        httpx.post(f"{url}/v1/faces", json={"identity_id": identity_id}, timeout=30),
    ):
        assert response.status_code == 404, (identity_id, response.status_code, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert identity_keys(serve_stack) == before


def test_requests_that_mix_an_id_with_photos_or_face_choices_are_422(serve_stack, astronaut) -> None:
    url = serve_stack.url
    for fields in (
        {"identity_id": astronaut["id"], "face_image_b64": b64(astronaut_jpeg())},
        {"identity_id": astronaut["id"], "face_index": 1},
        {"identity_id": astronaut["id"], "identity_combine": "concat"},
        {"identities": [{"identity_id": astronaut["id"], "images": [{"b64": b64(astronaut_jpeg())}]}] * 2},
        {"identity_id": astronaut["id"], "controlnets": [{"name": "canny"}]},
    ):
        response = generate(url, **fields)
        assert response.status_code == 422, (fields.keys(), response.text)
    bad_cursor = httpx.get(f"{url}/v1/identities?cursor=not-a-cursor", timeout=30)
    assert bad_cursor.status_code == 422


def test_owners_are_kept_apart(secure_stack) -> None:
    alice = {"Authorization": f"Bearer {API_KEYS['alice']}"}
    bob = {"Authorization": f"Bearer {API_KEYS['bob']}"}
    url = secure_stack.url
    assert enrol(url, face_image_b64=b64(astronaut_jpeg())).status_code == 401
    enrolled = enrol(url, alice, face_image_b64=b64(astronaut_jpeg()))
    assert enrolled.status_code == 201, enrolled.text
    identity_id = enrolled.json()["id"]
    for response in (
        httpx.get(f"{url}/v1/identities/{identity_id}", headers=bob, timeout=30),
        httpx.delete(f"{url}/v1/identities/{identity_id}", headers=bob, timeout=30),
        generate(url, bob, identity_id=identity_id),
        httpx.post(f"{url}/v1/faces", json={"identity_id": identity_id}, headers=bob, timeout=30),
    ):
        assert response.status_code == 404, response.text
    assert identity_id not in [
        i["id"] for i in httpx.get(f"{url}/v1/identities", headers=bob, timeout=30).json()["identities"]
    ]
    assert httpx.get(f"{url}/v1/identities/{identity_id}", headers=alice, timeout=30).status_code == 200
    keys = keys_of(secure_stack, identity_id)
    assert keys and not any("alice" in key for key in keys)  # the owner's name is in no key
    assert httpx.delete(f"{url}/v1/identities/{identity_id}", headers=alice, timeout=30).status_code == 204


def test_a_thousand_identities_page_by_page_none_missing_or_repeated(secure_stack) -> None:
    """Records written straight to the store (enrolment's analysis is the test above), listed over HTTP."""
    from deployments.storage.identities import IdentityStore, SavedIdentity, SavedPhoto, new_identity_id, now_iso
    from deployments.storage.s3 import S3Settings

    store = IdentityStore(secure_stack.s3.client(), S3Settings(bucket=secure_stack.s3.bucket))
    photo = SavedPhoto(
        sha256="0" * 64,
        width=64,
        height=64,
        face_index=0,
        box=[0, 0, 8, 8],
        keypoints=[[1, 1]] * 5,
        score=0.9,
        embedding=[0.0] * 512,
    )
    made = set()
    for _ in range(1000):
        record = SavedIdentity(
            id=new_identity_id(),
            owner="bob",
            created_at=now_iso(),
            identity_combine="mean",
            embedding=[0.0] * 512,
            photos=[photo],
        )
        store.save(record, b"RIFF")
        made.add(record.id)
    assert len(made) == 1000
    bob = {"Authorization": f"Bearer {API_KEYS['bob']}"}
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 97, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{secure_stack.url}/v1/identities", params=params, headers=bob, timeout=60)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["identities"]) <= 97
        seen += [item["id"] for item in body["identities"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 1000 and set(seen) == made
    assert seen == sorted(seen)  # oldest first
    assert pages == 11
