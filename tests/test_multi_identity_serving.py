"""Several people through the served graph (real local Ray + SeaweedFS, the local config): two identities in JSON
and multipart, images in S3, each identity's face and score in the response and meta.json, the layout shown by
``POST /v1/faces``, and the 422s."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import FAST_REQUEST, astronaut_jpeg, astronaut_rgb, encode_image, group_photo_jpeg, stored_meta

pytestmark = pytest.mark.slow

SIZE = {"width": 512, "height": 256}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def two_people(**extra) -> dict:
    """The astronaut and the group photo's face 4 (a different person)."""
    return {
        **FAST_REQUEST,
        **SIZE,
        "seed": 5,
        "identities": [
            {"images": [{"b64": b64(astronaut_jpeg())}]},
            {"images": [{"b64": b64(group_photo_jpeg())}], "face_index": 4},
        ],
        **extra,
    }


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, timeout=240)


def test_two_identities_with_a_pose_photo_end_to_end(serve_stack) -> None:
    response = post(serve_stack.url, two_people(pose_image_b64=b64(group_photo_jpeg()), num_images=2))
    assert response.status_code == 200, response.text
    body = response.json()
    client = serve_stack.s3.client()
    assert len(body["images"]) == 2
    layout = body["layout"]
    assert layout["layout"] == "pose" and (layout["width"], layout["height"]) == (512, 256)
    regions = [identity["region"] for identity in layout["identities"]]
    assert [identity["index"] for identity in layout["identities"]] == [0, 1]
    assert regions[0][0] == 0 and regions[0][2] == regions[1][0] and regions[1][2] == 512  # columns between faces
    for image in body["images"]:
        bucket, key = image["uri"][len("s3://") :].split("/", 1)
        pixels = np.asarray(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))
        assert pixels.shape == (256, 512, 3)
        scores = image["identities"]
        assert [score["index"] for score in scores] == [0, 1]
        for score, region in zip(scores, regions, strict=True):
            assert set(score) == {"index", "box", "similarity"}
            if score["box"] is not None:  # the face found in the region lies in it
                cx = (score["box"][0] + score["box"][2]) / 2
                assert region[0] <= cx < region[2]
                assert -1.0 <= score["similarity"] <= 1.0
        similarities = [score["similarity"] for score in scores]
        expected = None if None in similarities else min(similarities)
        assert image["identity_similarity"] == expected
    # Every face used: identity 0's photo, identity 1's photo, then the pose faces matched left to right.
    used = [(f["source"], f["identity"], f["photo_index"], f["face_index"]) for f in body["faces"]]
    assert used[:2] == [("face", 0, 0, 0), ("face", 1, 0, 4)]
    assert [u[:2] for u in used[2:]] == [("pose", 0), ("pose", 1)]
    assert {u[3] for u in used[2:]} == {0, 1}  # the two largest faces of the pose photo
    assert {"face_0_photo_0", "face_1_photo_0"} <= set(body["replicas"])
    assert [i["face_index"] for i in body["parameters"]["identities"]] == [0, 4]
    assert not {"face_index", "identity_combine", "pose_face_index"} & set(body["parameters"])  # per identity now
    meta = stored_meta(client, body)
    assert meta["layout"] == layout
    assert [record["identities"] for record in meta["images"]] == [image["identities"] for image in body["images"]]
    assert [f.get("identity") for f in meta["faces"]] == [0, 1, 0, 1]


def test_two_identities_multipart_with_regions_and_the_faces_layout(serve_stack) -> None:
    regions = [[0, 0, 256, 256], [256, 0, 512, 256]]
    form = {
        **{k: str(v) for k, v in {**FAST_REQUEST, **SIZE, "seed": 6}.items()},
        "identities": '[{"region": [0, 0, 256, 256]}, {"region": [256, 0, 512, 256], "face_index": 4}]',
    }
    parts = [
        ("identity_0", ("a.jpg", astronaut_jpeg(), "image/jpeg")),
        ("identity_0", ("a2.jpg", encode_image(astronaut_rgb()[:, ::-1].copy()), "image/jpeg")),
        ("identity_1", ("g.jpg", group_photo_jpeg(), "image/jpeg")),
    ]
    response = httpx.post(f"{serve_stack.url}/v1/generate", data=form, files=parts, timeout=240)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["layout"]["layout"] == "regions"
    assert [identity["region"] for identity in body["layout"]["identities"]] == regions
    assert [(f["identity"], f["photo_index"]) for f in body["faces"]] == [(0, 0), (0, 1), (1, 0)]
    assert len(body["images"][0]["identities"]) == 2
    # POST /v1/faces shows the very layout (same identities and regions, no generation).
    listing = httpx.post(
        f"{serve_stack.url}/v1/faces",
        json={
            "width": 512,
            "height": 256,
            "include_keypoint_image": True,
            "identities": [
                {"images": [{"b64": b64(astronaut_jpeg())}, {"b64": b64(parts[1][1][1])}], "region": regions[0]},
                {"images": [{"b64": b64(group_photo_jpeg())}], "face_index": 4, "region": regions[1]},
            ],
        },
        timeout=60,
    )
    assert listing.status_code == 200, listing.text
    shown = listing.json()
    assert shown["layout"] == body["layout"]
    keypoints = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown["keypoint_image_png_b64"]))))
    assert keypoints.shape == (256, 512, 3) and keypoints[:, :256].any() and keypoints[:, 256:].any()


def test_faces_layout_with_a_pose_photo_lists_its_faces(serve_stack) -> None:
    identities = two_people()["identities"]
    listing = httpx.post(
        f"{serve_stack.url}/v1/faces",
        json={"image_b64": b64(group_photo_jpeg()), "identities": identities, **SIZE},
        timeout=60,
    )
    assert listing.status_code == 200, listing.text
    shown = listing.json()
    assert shown["layout"]["layout"] == "pose" and len(shown["faces"]) >= 6
    assert [i["index"] for i in shown["layout"]["identities"]] == [0, 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"identities": [{"images": [{"b64": b64(astronaut_jpeg())}]}] * 5},
            "identities holds 2 to 4 people, got 5",
        ),
        ({"face_image_b64": b64(astronaut_jpeg())}, "either identities or the single-person face fields"),
        (
            {
                "identities": [
                    {"images": [{"b64": b64(astronaut_jpeg())}], "region": [0, 0, 300, 256]},
                    {"images": [{"b64": b64(astronaut_jpeg())}], "region": [256, 0, 512, 256]},
                ]
            },
            "overlap",
        ),
        (
            {
                "width": None,
                "height": None,
                "identities": [
                    {"images": [{"b64": b64(astronaut_jpeg())}], "region": [0, 0, 256, 512]},
                    {"images": [{"b64": b64(astronaut_jpeg())}], "region": [256, 0, 2000, 512]},
                ],
            },
            "lies outside the 512x512 output image",  # local.yaml: long side 512
        ),
        (
            {"pose_image_b64": b64(encode_image(astronaut_rgb()[:256].copy()))},
            "the pose image holds 1 face but the request has 2 identities",
        ),
        ({"controlnets": [{"name": "canny"}]}, "computed control maps need a pose_image"),
    ],
)
def test_bad_multi_identity_requests_are_422s(serve_stack, change: dict, message: str) -> None:
    body = {k: v for k, v in two_people(**change).items() if v is not None}
    response = post(serve_stack.url, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter" and message in error["message"], error


def test_handle_call_matches_the_in_process_pipeline(serve_stack, tiny_weights) -> None:
    """The handle API takes the same request model, and the served image is the in-process pipeline's (the CLI's
    code path) for the same people, pose photo and seed."""
    from ray import serve as ray_serve

    from deployments.generation.local import InstantIDPipeline
    from deployments.generation.plan import GenerationInputs, PersonInput
    from deployments.instantid.weights import WeightsLayout
    from serve.schemas import GenerateRequest, GenerateResponse

    handle = ray_serve.get_app_handle(serve_stack.app_name)
    request = GenerateRequest(
        **{k: v for k, v in two_people(pose_image_b64=b64(group_photo_jpeg())).items() if k != "identities"},
        identities=[
            {"images": [{"b64": b64(astronaut_jpeg())}]},
            {"images": [{"b64": b64(group_photo_jpeg())}], "face_index": 4},
        ],
    )
    result = handle.generate.remote(request).result(timeout_s=240)
    assert isinstance(result, GenerateResponse) and result.layout is not None and result.layout.layout == "pose"
    client = serve_stack.s3.client()
    bucket, key = result.images[0].uri[len("s3://") :].split("/", 1)
    served = np.asarray(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))

    pipeline = InstantIDPipeline.from_layout(WeightsLayout.from_root(tiny_weights), device="cpu", dtype="float32")
    people = (PersonInput((astronaut_jpeg(),)), PersonInput((group_photo_jpeg(),), face_index=4))
    local = pipeline(request.options(), GenerationInputs(people=people, pose=group_photo_jpeg()))
    assert local.params.identities == 2
    assert served.shape == local.images[0].shape == (256, 512, 3)
    assert np.abs(served.astype(int) - local.images[0].astype(int)).max() <= 2
