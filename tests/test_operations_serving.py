"""Operations on a real local Ray cluster: our metrics on Ray's Prometheus endpoint, the request log line, and a
denoiser scaled to zero that comes back for a request."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments import metrics
from tests.serve_fixtures import NO_SAFETY_CHECK, local_app_config
from tests.support import FAST_REQUEST, astronaut_b64

pytestmark = pytest.mark.slow

APP = "ops"
PROMPT = "an astronaut with a violet-zebra-7731 scarf"  # a marker no log line may contain


Sample = tuple[str, dict[str, str], float]


def scrape(url: str) -> list[Sample]:
    """Every sample on Ray's Prometheus endpoint as (series name, labels, value)."""
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (replicas report separately)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def wait_for(url: str, done: Callable[[list[Sample]], bool], timeout_s: float = 90) -> list[Sample]:
    """Scrape until ``done`` holds (Ray exports every few seconds); the last scrape either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(2)


@dataclass
class Outcomes:
    ok: list[httpx.Response]
    invalid: httpx.Response
    overloaded: list[httpx.Response]


@pytest.fixture(scope="module")
def ops_app(serve_stack, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An app admitting one generation at a time (so a burst is refused with our 503), with a spool."""
    from ray import serve as ray_serve

    from serve.app import build_app

    config = local_app_config(tiny_weights, serve_stack.s3.bucket, api={"max_in_flight": 1}, safety=NO_SAFETY_CHECK)
    spool = tmp_path_factory.mktemp("ops-spool")
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"spool_dir": str(spool)})})
    ray_serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_stack.url}/{APP}"
    ray_serve.delete(APP)


@pytest.fixture(scope="module")
def outcomes(ops_app: str) -> Outcomes:
    """One good request, one 422, then a burst at max_in_flight 1: some succeed, the rest get our 503."""
    body = {**FAST_REQUEST, "prompt": PROMPT, "face_image_b64": astronaut_b64()}
    first = httpx.post(f"{ops_app}/v1/generate", json=body, timeout=120)
    assert first.status_code == 200, first.text
    invalid = httpx.post(f"{ops_app}/v1/generate", json={**body, "num_inference_steps": 0}, timeout=60)
    assert invalid.status_code == 422, invalid.text
    slow = {**body, "num_inference_steps": 8}
    with ThreadPoolExecutor(4) as pool:
        burst = list(
            pool.map(lambda i: httpx.post(f"{ops_app}/v1/generate", json={**slow, "seed": i}, timeout=120), range(4))
        )
    assert {r.status_code for r in burst} <= {200, 503}, [r.text for r in burst]
    overloaded = [r for r in burst if r.status_code == 503]
    assert overloaded, "a burst of 4 at max_in_flight 1 refused nothing"
    assert {r.json()["error"]["code"] for r in overloaded} == {"overloaded"}
    return Outcomes([first, *[r for r in burst if r.status_code == 200]], invalid, overloaded)


def test_application_metrics_reach_rays_prometheus_endpoint(serve_stack, outcomes: Outcomes) -> None:
    ok, refused = len(outcomes.ok), len(outcomes.overloaded)
    route = "/v1/generate"
    name = metrics.exported_name
    requests = name(metrics.REQUESTS)

    def expected(samples: list[Sample]) -> bool:
        return (
            total(samples, requests, application=APP, route=route, status="200", code="ok") == ok
            and total(samples, requests, application=APP, status="503", code="overloaded") == refused
            and total(samples, name(metrics.QUEUE_WAIT) + "_count", application=APP) == ok
            and total(samples, name(metrics.MODEL_LOADS), application=APP, deployment="PromptEncoder") >= 1
            # Serve's proxy exports on its own schedule.
            and total(samples, "ray_serve_num_http_requests_total", application=APP, status_code="200") == ok
            and total(samples, "ray_serve_num_http_requests_total", application=APP, status_code="503") == refused
        )

    samples = wait_for(serve_stack.metrics_url, expected)
    # Requests by route, status and error code, and our admission's refusals.
    assert total(samples, requests, application=APP, route=route, status="200", code="ok") == ok
    assert total(samples, requests, application=APP, route=route, status="422", code="invalid_parameter") == 1
    assert total(samples, requests, application=APP, route=route, status="503", code="overloaded") == refused
    assert total(samples, requests, application=APP) == ok + 1 + refused
    rejections = name(metrics.ADMISSION_REJECTIONS)
    assert total(samples, rejections, application=APP, reason="overloaded") == refused
    # Stage latencies and identity scores of every successful generation (one image each).
    for stage in ("face", "prompt", "denoise", "store", "total"):
        assert total(samples, name(metrics.STAGE_SECONDS) + "_count", application=APP, stage=stage) == ok, stage
    assert total(samples, name(metrics.STAGE_SECONDS) + "_count", application=APP, stage="control_maps") == 0
    scored = total(samples, name(metrics.IDENTITY_SIMILARITY) + "_count", application=APP, model="sdxl")
    assert scored + total(samples, name(metrics.IDENTITY_NO_FACE), application=APP, model="sdxl") == ok
    # The denoiser: queue wait per job; under continuous batching (local.yaml) one batch-shape observation per
    # forward: jobs share forwards, so between one job's steps and every job's steps alone.
    assert total(samples, name(metrics.QUEUE_WAIT) + "_count", application=APP, model="sdxl") == ok
    batches = total(samples, name(metrics.JOBS_PER_BATCH) + "_count", application=APP)
    forwards = [r.json()["batch"]["forwards"] for r in outcomes.ok]  # each job's own forwards
    assert max(forwards) <= batches <= sum(forwards)
    assert total(samples, name(metrics.ROWS_PER_FORWARD) + "_count", application=APP) == batches
    assert total(samples, name(metrics.STEPS_PER_SECOND) + "_count", application=APP) == batches
    # A row is an image with classifier-free guidance (FAST_REQUEST's default guidance): never 1 for a batch.
    assert total(samples, name(metrics.ROWS_PER_FORWARD) + "_bucket", application=APP, le="1.0") == 0
    # The default base, loaded once by each model replica at start.
    loads = name(metrics.MODEL_LOADS)
    for deployment in ("Denoiser", "PromptEncoder"):
        assert total(samples, loads, application=APP, deployment=deployment, kind="base", model="sdxl") == 1
        seconds = name(metrics.MODEL_LOAD_SECONDS) + "_count"
        assert total(samples, seconds, application=APP, deployment=deployment, kind="base", model="sdxl") == 1
    # The spool exists and is empty; S3 never needed a retry.
    assert [v for n, lab, v in samples if n == name(metrics.SPOOL_DEPTH) and lab["application"] == APP] == [0.0]
    assert total(samples, name(metrics.S3_RETRIES), application=APP) == 0
    # No tag carries a request id or a prompt.
    request_ids = {r.json()["request_id"] for r in outcomes.ok}
    ours = [lab for n, lab, _ in samples if n.startswith("ray_instantid_") and lab.get("application") == APP]
    assert ours and not any(set(lab.values()) & request_ids or PROMPT in str(lab) for lab in ours)
    # Serve's own request counter saw the same answers, our 503s included.
    serve_requests = "ray_serve_num_http_requests_total"
    seen = [(lab, v) for n, lab, v in samples if n == serve_requests and lab.get("application") == APP]
    assert total(samples, serve_requests, application=APP, status_code="503") == refused, seen
    assert total(samples, serve_requests, application=APP, status_code="200") == ok, seen
    exported = {n for n, _, _ in samples}
    assert exported >= metrics.SERVE_SERIES, metrics.SERVE_SERIES - exported


def _ingress_log_lines(app: str) -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{app}_Ingress_*.log") for line in path.read_text().splitlines()]


def _request_line(lines: list[str], request_id: str) -> dict:
    found = [json.loads(line[line.index("{") :]) for line in lines if '"event":"instantid_request"' in line]
    mine = [fields for fields in found if fields["request_id"] == request_id]
    assert len(mine) == 1, (request_id, found)
    return mine[0]


def test_each_request_has_one_json_log_line_with_timings_and_no_prompt(outcomes: Outcomes) -> None:
    lines = _ingress_log_lines(APP)
    good = outcomes.ok[0].json()
    line = _request_line(lines, good["request_id"])
    assert line["status"] == 200 and line["code"] == "ok" and line["route"] == "/v1/generate"
    assert line["owner"] == "anonymous" and line["generation_id"] == good["id"]
    assert line["images"] == 1 and line["image_bytes"] == good["images"][0]["bytes"]
    assert (line["width"], line["height"], line["steps"], line["model"]) == (256, 256, 2, "sdxl")
    assert set(line["timings"]) == set(good["timings"])
    assert line["timings"]["denoise"] == round(good["timings"]["denoise"]["seconds"], 3)
    assert line["request_bytes"] > len(astronaut_b64()) and line["response_bytes"] == len(outcomes.ok[0].content)
    invalid = _request_line(lines, outcomes.invalid.json()["error"]["request_id"])
    assert (invalid["status"], invalid["code"]) == (422, "invalid_parameter")
    refused = _request_line(lines, outcomes.overloaded[0].json()["error"]["request_id"])
    assert (refused["status"], refused["code"]) == (503, "overloaded")
    assert "prompt" not in line and not any("violet-zebra-7731" in text for text in lines)


def test_denoiser_scaled_to_zero_comes_back_for_a_request(serve_stack, tiny_weights: Path) -> None:
    """min_replicas 0: after the idle delay the denoiser has no replica; a request brings one up and succeeds."""
    from ray import serve as ray_serve

    from serve.app import build_app

    app = "coldstart"
    autoscaling = {
        "min_replicas": 0,
        "max_replicas": 1,
        "initial_replicas": 1,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 2,
        "downscale_to_zero_delay_s": 2,
    }
    denoiser = {"deployment": {"autoscaling_config": autoscaling, "ray_actor_options": {"num_cpus": 0.5}}}
    config = local_app_config(tiny_weights, serve_stack.s3.bucket, denoiser=denoiser, safety=NO_SAFETY_CHECK)
    ray_serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    url = f"{serve_stack.url}/{app}/v1/generate"
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64()}
    try:
        assert httpx.post(url, json=body, timeout=120).status_code == 200  # the replica it started with
        started = time.monotonic()
        assert httpx.post(url, json={**body, "seed": 8}, timeout=120).status_code == 200
        warm_s = time.monotonic() - started

        def denoiser_replicas() -> int:
            status = ray_serve.status().applications[app].deployments["Denoiser"]
            return sum(status.replica_states.values())

        deadline = time.monotonic() + 90
        while denoiser_replicas() > 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert denoiser_replicas() == 0, "the idle denoiser was not scaled to zero"
        started = time.monotonic()
        response = httpx.post(url, json={**body, "seed": 9}, timeout=300)
        cold_start_s = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert denoiser_replicas() == 1
        print(f"\nrequest after scale-to-zero: {cold_start_s:.1f} s; warm: {warm_s:.1f} s (tiny weights, CPU)")
    finally:
        ray_serve.delete(app)
