"""The safety check through the served graph (real local Ray + SeaweedFS): local.yaml's ``flag`` with the shipped
classifier, and ``refuse`` with the classifier's decision forced (a double bound in the SafetyChecker's place) through
HTTP and jobs; the licences in ``GET /v1/models``."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from deployments.generation.safety_stage import SafetyStage
from deployments.instantid.safety import SafetyCheck
from deployments.replica import replica_id
from deployments.safety_checker import SafetyCheckerDeployment
from tests.serve_fixtures import local_app_config
from tests.support import FAST_REQUEST, astronaut_b64, stored_meta

pytestmark = pytest.mark.slow


class OddImagesAndLoneImages:
    """The classifier's double: flags image i of a generation when i is odd, and a generation's only image (so one
    request has some images refused and another all of them)."""

    name = "scripted"

    def scores(self, images: Any) -> list[dict[str, float]]:
        return [{"nsfw": 0.9 if i % 2 == 1 or len(images) == 1 else 0.1} for i in range(len(images))]


class ForcedSafetyChecker(SafetyCheckerDeployment.func_or_class):  # type: ignore[name-defined]
    def __init__(self, *, policy: str, threshold: float, providers: Any, threads: Any) -> None:
        SafetyStage.__init__(self, SafetyCheck(OddImagesAndLoneImages(), policy, threshold), replica=replica_id())


def generate(url: str, **fields: Any) -> httpx.Response:
    body = {**FAST_REQUEST, "seed": 5, "face_image_b64": astronaut_b64(), **fields}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=180)


def test_local_config_flags_with_the_shipped_classifier_and_records_it_everywhere(serve_stack) -> None:
    response = generate(serve_stack.url, num_images=2)
    assert response.status_code == 200, response.text
    body = response.json()
    for index, image in enumerate(body["images"]):
        assert image["index"] == index
        assert set(image["safety"]) == {"flagged", "scores", "blurred"} and 0 <= image["safety"]["scores"]["nsfw"] <= 1
        assert image["safety"]["flagged"] is False  # tiny weights' noise pictures are far from the threshold
    assert "safety" in body["timings"] and "safety" in body["replicas"]
    meta = stored_meta(serve_stack.s3.client(), body)
    assert meta["safety"] == {"policy": "flag", "model": "open_nsfw", "threshold": 0.5, "refused": []}
    assert [record["safety"] for record in meta["images"]] == [image["safety"] for image in body["images"]]
    models = httpx.get(f"{serve_stack.url}/v1/models", timeout=30).json()
    licenses = {(s["kind"], s["name"]): s for s in models["licenses"]}
    assert licenses[("safety", "open_nsfw")]["license"] == "BSD-2-Clause"
    assert licenses[("face", "antelopev2")]["commercial_use"] is True  # local.yaml: tiny weights, this project's own


def test_refused_images_are_left_out_with_a_warning_and_all_refused_is_a_422(serve_stack, tiny_weights) -> None:
    from ray import serve as ray_serve

    from serve.app import build_app

    config = local_app_config(tiny_weights, serve_stack.s3.bucket, safety={"policy": "refuse"})
    forced = ray_serve.deployment(ForcedSafetyChecker, name="SafetyChecker")
    ray_serve.run(build_app(config, safety_checker=forced), name="refusing", route_prefix="/refusing")
    url = f"{serve_stack.url}/refusing"
    client = serve_stack.s3.client()
    try:
        response = generate(url, num_images=3)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [image["index"] for image in body["images"]] == [0, 2]
        assert [w for w in body["warnings"] if "safety" in w] == [
            "image 1 was refused by the safety check and not stored (scores: nsfw 0.900; threshold 0.5)"
        ]
        meta = stored_meta(client, body)
        assert meta["safety"]["refused"] == [{"index": 1, "scores": {"nsfw": 0.9}}]
        prefix = body["images"][0]["uri"].split("/", 3)[3].rsplit("/", 1)[0]
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=serve_stack.s3.bucket, Prefix=prefix)["Contents"]]
        names = sorted(key.rsplit("/", 1)[1] for key in keys)
        assert names == ["image-0.png", "image-1.png", "meta.json", "thumb-0.webp", "thumb-1.webp"]

        refused = generate(url, num_images=1)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "content_refused", refused.text

        # A job carries the same fields in its result (and so in its webhook, which posts the job body).
        job = httpx.post(f"{url}/v1/jobs", json={**FAST_REQUEST, "face_image_b64": astronaut_b64(), "num_images": 2})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 120
        while (state := httpx.get(f"{url}/v1/jobs/{job.json()['id']}", timeout=30).json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["status"] == "succeeded", state
        assert [image["index"] for image in state["result"]["images"]] == [0]
        assert state["result"]["images"][0]["safety"] == {"flagged": False, "scores": {"nsfw": 0.1}, "blurred": False}
        assert any("image 1 was refused" in warning for warning in state["result"]["warnings"])
        lone = httpx.post(f"{url}/v1/jobs", json={**FAST_REQUEST, "face_image_b64": astronaut_b64()}).json()
        while (state := httpx.get(f"{url}/v1/jobs/{lone['id']}", timeout=30).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline + 60, state
            time.sleep(0.5)
        assert state["status"] == "failed" and state["error"]["code"] == "content_refused", state
    finally:
        ray_serve.delete("refusing")
