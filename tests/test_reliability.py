"""Faults, overload, access control and privacy on the real local stack (Ray + SeaweedFS + tiny weights)."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.serve_fixtures import API_KEYS
from tests.support import FAST_REQUEST, astronaut_b64, s3_object_exists

pytestmark = pytest.mark.slow


def _generate(url: str, key: str | None = None, timeout: float = 120, headers: dict | None = None, **fields):
    all_headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), **fields}
    return httpx.post(f"{url}/v1/generate", json=body, headers=all_headers, timeout=timeout)


def _exists(s3, uri: str) -> bool:
    return s3_object_exists(s3.client(), uri)


# ------------------------------------------------------------------------------------------ access control


def test_no_wrong_or_revoked_key_is_refused_and_a_right_key_passes(secure_stack):
    url = secure_stack.url
    for key in (None, "not-a-key-but-long-enough", API_KEYS["alice"] + "x", "Basic " + API_KEYS["alice"]):
        response = _generate(url, key)
        assert response.status_code == 401, key
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.json()["error"]["message"] == "missing or invalid API key"  # never which part failed
        assert response.headers["www-authenticate"] == "Bearer"
    assert _generate(url, API_KEYS["alice"]).status_code == 200
    assert _generate(url, API_KEYS["bob"]).status_code == 200

    try:
        secure_stack.keys_file.write_text(f"alice:{API_KEYS['alice']}\n")  # revoke bob: no restart
        time.sleep(1.5)
        assert _generate(url, API_KEYS["bob"]).status_code == 401
        assert _generate(url, API_KEYS["alice"]).status_code == 200
    finally:  # the other tests of the session use bob's key
        secure_stack.keys_file.write_text("".join(f"{n}:{t}\n" for n, t in API_KEYS.items()))
        time.sleep(1.5)


def test_only_the_owner_reads_and_deletes_and_delete_removes_everything(secure_stack):
    url, alice, bob = secure_stack.url, API_KEYS["alice"], API_KEYS["bob"]
    body = _generate(url, alice, store_inputs=True).json()
    generation = body["id"]
    as_alice = {"Authorization": f"Bearer {alice}"}
    as_bob = {"Authorization": f"Bearer {bob}"}
    meta = httpx.get(f"{url}/v1/generations/{generation}", headers=as_alice, timeout=30).json()
    assert meta["owner"] == "alice" and meta["inputs_stored"] is True
    prefix = body["images"][0]["uri"].rsplit("/", 1)[0]
    assert _exists(secure_stack.s3, f"{prefix}/input-face.jpg")  # kept only because it was asked

    assert httpx.get(f"{url}/v1/generations/{generation}", headers=as_bob, timeout=30).status_code == 404
    assert httpx.delete(f"{url}/v1/generations/{generation}", headers=as_bob, timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/generations/{generation}", timeout=30).status_code == 401
    assert _exists(secure_stack.s3, body["images"][0]["uri"])

    assert httpx.delete(f"{url}/v1/generations/{generation}", headers=as_alice, timeout=30).status_code == 204
    assert not _exists(secure_stack.s3, body["images"][0]["uri"])
    assert not _exists(secure_stack.s3, f"{prefix}/meta.json")
    assert not _exists(secure_stack.s3, f"{prefix}/input-face.jpg")
    assert httpx.get(f"{url}/v1/generations/{generation}", headers=as_alice, timeout=30).status_code == 404


def test_input_photos_are_not_stored_unless_asked(serve_stack):
    body = _generate(serve_stack.url).json()
    prefix = body["images"][0]["uri"].rsplit("/", 1)[0]
    bucket, key_prefix = prefix[len("s3://") :].split("/", 1)
    listed = serve_stack.s3.client().list_objects_v2(Bucket=bucket, Prefix=key_prefix + "/")
    names = sorted(item["Key"].rsplit("/", 1)[1] for item in listed["Contents"])
    assert names == ["image-0.png", "meta.json", "thumb-0.webp"]  # the image, its record, its history thumbnail


# -------------------------------------------------------------------------------------------- idempotency


def test_idempotency_key_returns_the_same_result_without_a_second_generation(serve_stack):
    headers = {"Idempotency-Key": f"test-{time.time_ns()}"}
    first = _generate(serve_stack.url, headers=headers)
    assert first.status_code == 200
    again = _generate(serve_stack.url, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["images"][0]["uri"] == first.json()["images"][0]["uri"]
    different = _generate(serve_stack.url, headers=headers, seed=99)
    assert different.status_code == 422 and different.json()["error"]["code"] == "idempotency_key_reused"
    concurrent_key = {"Idempotency-Key": f"concurrent-{time.time_ns()}"}
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: _generate(serve_stack.url, headers=concurrent_key), range(3)))
    assert {r.status_code for r in results} == {200}
    assert len({r.json()["id"] for r in results}) == 1


# --------------------------------------------------------------------------------------------- overload


def _ray_rss_bytes() -> tuple[int, int]:
    """Resident memory of every Ray process on this machine, and how many were measured."""
    total = measured = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ray::" in cmdline or "ray/_private" in cmdline or "raylet" in cmdline:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
                measured += 1
    return total, measured


def test_four_times_the_capacity_gets_json_503s_and_memory_stays_bounded(secure_stack):
    capacity = secure_stack.max_in_flight
    key = API_KEYS["alice"]
    _generate(secure_stack.url, key)  # warm
    before, measured = _ray_rss_bytes()
    assert measured >= 5 and before > 100 * 1024**2, (measured, before)  # the raylet, GCS and replicas were found
    with ThreadPoolExecutor(4 * capacity) as pool:
        responses = list(
            pool.map(lambda i: _generate(secure_stack.url, key, seed=i, num_inference_steps=6), range(4 * capacity))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= capacity
    overflow = [r for r in responses if r.status_code == 503]
    assert overflow, "nothing was refused at 4x capacity"
    for response in overflow:
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["retry-after"]) > 0
    after, _ = _ray_rss_bytes()
    assert after - before < 1.5 * 1024**3
    assert _generate(secure_stack.url, key).status_code == 200  # and it answers right after


# ----------------------------------------------------------------------------------------------- faults


def test_s3_outage_mid_stream_loses_nothing(fault_stack):
    """Stop SeaweedFS in the middle of a stream of requests, restart it: every 200 has its objects, every
    error names a generation that is found later (spool) or was clearly refused."""
    url, flaky = fault_stack.url, fault_stack.s3
    outcomes = []
    for index in range(6):
        if index == 2:
            flaky.stop()
        if index == 4:
            flaky.start(timeout_s=60)
        response = _generate(url, seed=index, timeout=120)
        outcomes.append(response)
    assert [r.status_code for r in outcomes[:2]] == [200, 200]
    assert all(r.status_code == 503 for r in outcomes[2:4])
    for response in outcomes[2:4]:
        error = response.json()["error"]
        assert error["code"] == "storage_unavailable" and error["generation_id"]
        assert int(response.headers["retry-after"]) > 0

    deadline = time.time() + 60
    spooled = [r.json()["error"]["generation_id"] for r in outcomes[2:4]]
    while time.time() < deadline:
        metas = [httpx.get(f"{url}/v1/generations/{g}", timeout=30).json() for g in spooled]
        if all(m.get("status") == "stored" for m in metas):
            break
        time.sleep(1)
    for meta in metas:
        assert meta["status"] == "stored", meta
        assert meta["images"] and all(_exists(flaky, image["uri"]) for image in meta["images"])
    for response in outcomes:
        if response.status_code == 200:
            images = response.json()["images"]
            assert images and all(_exists(flaky, image["uri"]) for image in images)
    assert not any(fault_stack.spool_dir.iterdir())


def test_a_killed_denoiser_replica_is_replaced_and_requests_succeed(serve_stack):
    """A Denoiser replica dies under requests and a job: Serve replaces it and each of them is retried once,
    transparently (generation is deterministic for the seed): every one succeeds, the job at its first attempt."""
    import ray
    from ray import serve as ray_serve

    def denoiser_replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "instantid#Denoiser#" in a["name"] or a["name"].startswith("SERVE_REPLICA::instantid#Denoiser")
        ]

    replicas = denoiser_replicas()
    assert replicas, "no Denoiser replica found"
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), "num_inference_steps": 8, "seed": 77}
    job = httpx.post(f"{serve_stack.url}/v1/jobs", json=body, timeout=60).json()
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(_generate, serve_stack.url, None, 180, None, seed=i, num_inference_steps=8) for i in range(3)
        ]
        time.sleep(1.0)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]
    for response in results:
        assert response.status_code == 200, response.text
        assert _exists(serve_stack.s3, response.json()["images"][0]["uri"])
    deadline = time.time() + 180
    while time.time() < deadline:
        state = httpx.get(f"{serve_stack.url}/v1/jobs/{job['id']}", timeout=30).json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert (state["status"], state["attempts"]) == ("succeeded", 1), state
    deadline = time.time() + 120
    while time.time() < deadline:
        status = ray_serve.status().applications["instantid"]
        if status.status == "RUNNING" and denoiser_replicas() and denoiser_replicas() != replicas:
            break
        time.sleep(1)
    for seed in range(2):
        assert _generate(serve_stack.url, seed=seed).status_code == 200
