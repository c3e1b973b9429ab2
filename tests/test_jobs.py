"""Async jobs through the served graph (real local Ray + SeaweedFS): status, results equal to /v1/generate, the
event stream, cancellation, takeover after the running replica dies, identity scores, the image route."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import FAST_REQUEST, astronaut_b64, s3_object_exists, stored_pixels

pytestmark = pytest.mark.slow

BODY = {**FAST_REQUEST, "face_image_b64": None, "width": 256, "height": 256, "seed": 31, "output_format": "png"}


def body(**fields) -> dict:
    return {**BODY, "face_image_b64": astronaut_b64(), **fields}


def submit(url: str, **fields) -> dict:
    response = httpx.post(f"{url}/v1/jobs", json=body(**fields), timeout=60)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["location"] == accepted["status_url"] == f"/v1/jobs/{accepted['id']}"
    assert accepted["events_url"] == f"/v1/jobs/{accepted['id']}/events" and accepted["status"] == "queued"
    return accepted


def wait_for(url: str, job_id: str, statuses: set[str], timeout_s: float = 240) -> tuple[dict, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in statuses:
            return job, seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {seen}")


def events(url: str, job_id: str, headers: dict | None = None, until: set[str] | None = None, query: str = ""):
    """The stream's events as (id, type, data), up to the terminal event (or the first of ``until``)."""
    stop = until or {"succeeded", "failed", "cancelled"}
    out = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events{query}", headers=headers, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("event: "):
                event["type"] = line[7:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif line == "" and event:
                out.append((event.get("id"), event["type"], event["data"]))
                if event["type"] in stop:
                    return out
                event = {}
    return out


def pixels(stack, uri: str) -> np.ndarray:
    return stored_pixels(stack.s3.client(), uri)


def test_a_job_gives_what_generate_gives_with_status_transitions(serve_stack) -> None:
    accepted = submit(serve_stack.url)
    job, seen = wait_for(serve_stack.url, accepted["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert set(seen) <= {"queued", "running", "succeeded"} and seen[-1] == "succeeded"
    result = job["result"]
    assert result["id"] == accepted["id"] and job["attempts"] == 1 and job["error"] is None
    assert all(s3_object_exists(serve_stack.s3.client(), image["uri"]) for image in result["images"])

    direct = httpx.post(f"{serve_stack.url}/v1/generate", json=body(), timeout=180)
    assert direct.status_code == 200, direct.text
    ours, theirs = (pixels(serve_stack, r["images"][0]["uri"]) for r in (result, direct.json()))
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2
    assert result["seed"] == direct.json()["seed"] == 31
    # Every image is scored against the identity; the score travels in the result and in meta.json.
    score = result["images"][0]["identity_similarity"]
    assert score is None or -1.0 <= score <= 1.0
    meta = httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}", timeout=30).json()
    assert meta["images"][0]["identity_similarity"] == score
    # The image route streams the stored bytes through the service.
    image = httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}/images/0", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.content))), ours)
    assert httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}/images/5", timeout=30).status_code == 404


def test_the_event_stream_delivers_every_step_in_order_then_the_result(serve_stack) -> None:
    accepted = submit(serve_stack.url, num_inference_steps=10)
    stream = events(serve_stack.url, accepted["id"], query="?previews=1")
    kinds = [kind for _, kind, _ in stream]
    assert kinds[0] == "state" and kinds[-1] == "succeeded"
    first_state = stream[0][2]
    steps = [data for _, kind, data in stream if kind == "step"]
    assert steps and all(s["total"] == 10 for s in steps)
    already = first_state["step"] or 0  # a subscriber that connects late gets the steps from where it joined
    assert [s["step"] for s in steps] == list(range(already + 1, 11))
    ids = [event_id for event_id, _, _ in stream if event_id is not None]  # the state's (the last so far) too
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert any(s.get("preview", "").startswith("data:image/webp;base64,") for s in steps)
    stages = [(d["stage"], d["phase"]) for _, kind, d in stream if kind == "stage"]
    assert ("denoise", "end") in stages and ("store", "end") in stages
    assert stream[-1][2]["result"]["id"] == accepted["id"]

    # Resuming with Last-Event-ID gives what came after it; a late subscriber gets the state, then the outcome.
    half = steps[len(steps) // 2]["step"]
    middle = next(event for event in stream if event[1] == "step" and event[2]["step"] == half)
    resumed = events(serve_stack.url, accepted["id"], headers={"Last-Event-ID": str(middle[0])})
    assert resumed[0][1] == "state" and resumed[0][0] is None  # no id: the replay after it has lower ones
    assert resumed[1:] == [event for event in stream if event[0] is not None and event[0] > middle[0]]
    resumed_ids = [event_id for event_id, _, _ in resumed if event_id is not None]
    assert resumed_ids == sorted(set(resumed_ids)) and min(resumed_ids) > middle[0]
    late = events(serve_stack.url, accepted["id"])
    assert [kind for _, kind, _ in late] == ["state", "succeeded"] and late[0][2]["status"] == "succeeded"


def test_cancel_stops_the_denoiser_within_a_step_and_delete_removes_a_finished_job(serve_stack) -> None:
    accepted = submit(serve_stack.url, num_inference_steps=100)
    events(serve_stack.url, accepted["id"], until={"step"})  # the denoiser is running it
    cancelled = httpx.delete(f"{serve_stack.url}/v1/jobs/{accepted['id']}", timeout=30)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    at_cancel = httpx.get(f"{serve_stack.url}/v1/jobs/{accepted['id']}", timeout=30).json()
    time.sleep(3)  # long enough for dozens of tiny steps, had the denoiser gone on
    job = httpx.get(f"{serve_stack.url}/v1/jobs/{accepted['id']}", timeout=30).json()
    assert job["status"] == "cancelled" and job["result"] is None
    reached = job["step"] if job["step"] is not None else 0
    assert reached < 100
    step_at_cancel = at_cancel["step"] or 0
    assert reached - step_at_cancel <= 3, (step_at_cancel, reached)
    gone = httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}", timeout=30)
    assert gone.status_code == 404

    finished = submit(serve_stack.url)
    done, _ = wait_for(serve_stack.url, finished["id"], {"succeeded"})
    uri = done["result"]["images"][0]["uri"]
    assert httpx.delete(f"{serve_stack.url}/v1/jobs/{finished['id']}", timeout=30).status_code == 204
    assert not s3_object_exists(serve_stack.s3.client(), uri)
    assert httpx.get(f"{serve_stack.url}/v1/jobs/{finished['id']}", timeout=30).status_code == 404


def test_a_job_survives_the_ingress_replica_that_ran_it(serve_stack) -> None:
    """The replica running a job dies: another one takes the job over from S3 and runs it again (attempt 2), and
    the first run, still denoising on the Denoiser, stops at its next step instead of running every step again."""
    import ray
    from ray import serve as ray_serve

    steps, size = 60, 512  # long enough that the first run is still denoising when the takeover starts
    denoiser = ray_serve.get_deployment_handle("Denoiser", serve_stack.app_name)
    before = denoiser.batching_stats.remote().result()
    accepted = submit(serve_stack.url, num_inference_steps=steps, width=size, height=size)
    events(serve_stack.url, accepted["id"], until={"step"})
    replicas = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::instantid#Ingress#")
    ]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 300
    job = None
    while time.monotonic() < deadline:  # Serve replaces the replica; its sweep takes the job over
        try:
            job = httpx.get(f"{serve_stack.url}/v1/jobs/{accepted['id']}", timeout=30).json()
        except httpx.HTTPError:
            job = None
        if job is not None and job.get("status") in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert job is not None and job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert all(s3_object_exists(serve_stack.s3.client(), image["uri"]) for image in job["result"]["images"])
    # Every UNet row the Denoiser stepped meanwhile (2 per step with guidance): the second run's whole schedule plus
    # the first run's steps until it learnt of the takeover, far fewer than a second whole schedule.
    after = denoiser.batching_stats.remote().result()
    assert after["replica"] == before["replica"], "the Denoiser replica was replaced: its step counters restarted"
    stepped = after["rows"] - before["rows"]
    assert 2 * steps < stepped < 2 * steps * 1.8, stepped


def test_job_errors_are_json(serve_stack) -> None:
    bad = httpx.post(f"{serve_stack.url}/v1/jobs", json=body(num_inference_steps=0), timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
    hook = httpx.post(f"{serve_stack.url}/v1/jobs", json=body(callback_url="https://example.com/hook"), timeout=30)
    assert hook.status_code == 422 and "callback_url" in hook.json()["error"]["message"]
    sync_hook = httpx.post(f"{serve_stack.url}/v1/generate", json=body(callback_url="https://x.org/h"), timeout=30)
    assert sync_hook.status_code == 422 and "POST /v1/jobs" in sync_hook.json()["error"]["message"]
    for method in ("GET", "DELETE"):
        missing = httpx.request(method, f"{serve_stack.url}/v1/jobs/20260101T000000Z-0123456789abcdef", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    malformed = httpx.get(f"{serve_stack.url}/v1/jobs/..%2Fetc/events", timeout=30)
    assert malformed.status_code == 404
    failing = submit(serve_stack.url, face_image_b64=base64.b64encode(b"not an image").decode())
    job, _ = wait_for(serve_stack.url, failing["id"], {"failed", "succeeded"})
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_media_type"


def test_an_idempotency_key_gives_the_same_job_back(serve_stack) -> None:
    headers = {"Idempotency-Key": f"job-{time.time_ns()}"}
    first = httpx.post(f"{serve_stack.url}/v1/jobs", json=body(seed=77), headers=headers, timeout=60)
    again = httpx.post(f"{serve_stack.url}/v1/jobs", json=body(seed=77), headers=headers, timeout=60)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = httpx.post(f"{serve_stack.url}/v1/jobs", json=body(seed=78), headers=headers, timeout=60)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    job, _ = wait_for(serve_stack.url, first.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded"


def test_the_ingress_reports_generations_not_streams_for_autoscaling(serve_stack) -> None:
    from ray import serve as ray_serve

    from serve.ingress.autoscaling import GENERATIONS_METRIC

    accepted = submit(serve_stack.url, num_inference_steps=40)
    ingress = ray_serve.get_deployment_handle("Ingress", app_name="instantid")
    with httpx.stream("GET", f"{serve_stack.url}/v1/jobs/{accepted['id']}/events", timeout=60) as stream:
        assert stream.status_code == 200
        stats = ingress.record_autoscaling_stats.remote().result()
    assert stats == {GENERATIONS_METRIC: 1.0}  # the running job, not the open stream
    wait_for(serve_stack.url, accepted["id"], {"succeeded"})
    assert ingress.record_autoscaling_stats.remote().result() == {GENERATIONS_METRIC: 0.0}
