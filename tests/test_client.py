"""``serve.client`` and ``instantid generate --url``.

Fast: the retry rules against a scripted HTTP server on 127.0.0.1 (503 with Retry-After, bounds, connection errors,
error bodies, the API key), photo forms and a job's event stream. Slow: the real local stack, where the client stores
what a direct HTTP request stores, a response lost twice on the way back still makes one generation, and
``instantid generate --url`` gives the in-process command's image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.client import (
    API_KEY_ENV,
    APIError,
    AsyncInstantIDClient,
    InstantIDClient,
    RetryPolicy,
    ServiceUnreachable,
)
from serve.client._core import photo_bytes
from serve.tools.cli import main
from tests.support import FAST_OPTIONS, astronaut_jpeg, astronaut_rgb, free_port

# A /v1/generate body as the service answers it, as small as its schema allows.
GENERATED = {
    "id": "20261207T120000Z-0123456789abcdef",
    "request_id": "r-1",
    "images": [],
    "seed": 1,
    "face": {"box": [0, 0, 1, 1], "keypoints": [], "score": 1.0},
    "faces": [],
    "model": {"base": "sdxl", "loras": [], "mode": None},
    "timings": {},
    "parameters": {},
}
OVERLOADED = {"error": {"code": "overloaded", "message": "too many requests in flight", "request_id": "r-0"}}
FAST_RETRY = RetryPolicy(max_retries=3, max_wait_s=30, backoff_s=0.01, max_backoff_s=0.02)


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering each request with the next scripted answer (the last one repeats)."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers, self.seen = list(answers), []  # type: list[Answer], list[Seen]
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                script.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                answer = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
                data = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in {"Content-Type": "application/json", **answer.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list[Answer]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(answers: list[Answer]) -> ScriptedServer:
        servers.append(ScriptedServer(answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def generate_with(kind: str, url: str, **options: Any) -> Any:
    """One ``generate`` call through the sync or the async client."""
    if kind == "sync":
        with InstantIDClient(url, retry=options.pop("retry", FAST_RETRY)) as client:
            return client.generate(face=astronaut_jpeg(), prompt="x", **options)

    async def run() -> Any:
        async with AsyncInstantIDClient(url, retry=options.pop("retry", FAST_RETRY)) as client:
            return await client.generate(face=astronaut_jpeg(), prompt="x", **options)

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_503_with_retry_after_is_retried_with_one_idempotency_key(
    kind: str, scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 503s with ``Retry-After: 1`` then 200: three attempts, a second apart, all with the same
    Idempotency-Key (the service then runs the generation once) and the API key from the environment."""
    monkeypatch.setenv(API_KEY_ENV, "alice-token-0123456789abcdef")
    busy = Answer(503, OVERLOADED, {"Retry-After": "1"})
    server = scripted([busy, busy, Answer(200, GENERATED)])
    started = time.monotonic()
    result = generate_with(kind, server.url, seed=3)
    elapsed = time.monotonic() - started
    assert result.id == GENERATED["id"]
    assert [(s.method, s.path) for s in server.seen] == [("POST", "/v1/generate")] * 3
    keys = {s.headers.get("idempotency-key") for s in server.seen}
    assert len(keys) == 1 and None not in keys, keys
    assert {s.headers["authorization"] for s in server.seen} == {"Bearer alice-token-0123456789abcdef"}
    assert len({s.body for s in server.seen}) == 1  # the very same request each time
    assert json.loads(server.seen[0].body)["seed"] == 3
    assert 2.0 <= elapsed < 10, elapsed  # Retry-After was honoured, twice


def test_retries_are_bounded_in_count_and_in_time(scripted) -> None:
    server = scripted([Answer(503, OVERLOADED, {"Retry-After": "0"})])
    with pytest.raises(APIError) as caught:
        generate_with("sync", server.url)
    assert (caught.value.status, caught.value.code, caught.value.request_id) == (503, "overloaded", "r-0")
    assert len(server.seen) == FAST_RETRY.max_retries + 1

    # A Retry-After past the time budget ends the retries at once: no sleeping toward a known refusal.
    later = scripted([Answer(503, OVERLOADED, {"Retry-After": "120"})])
    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        generate_with("sync", later.url)
    assert caught.value.retry_after == 120 and len(later.seen) == 1
    assert time.monotonic() - started < 5


def test_a_plain_text_500_from_the_proxy_is_retried_with_the_same_key_and_ours_is_not(scripted) -> None:
    """Ray Serve's proxy answers a request whose ingress replica died with a plain-text 500: sent again with the
    same Idempotency-Key. The service's own JSON 500 (internal_error) is final, and an enrolment (no key) is never
    sent twice."""
    lost = Answer(500, b"Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
    server = scripted([lost, Answer(200, GENERATED)])
    assert generate_with("sync", server.url).id == GENERATED["id"]
    assert len(server.seen) == 2 and len({s.headers.get("idempotency-key") for s in server.seen}) == 1

    ours = {"error": {"code": "internal_error", "message": "internal error", "request_id": "r-1"}}
    final = scripted([Answer(500, ours), Answer(200, GENERATED)])
    with pytest.raises(APIError) as caught:
        generate_with("sync", final.url)
    assert caught.value.code == "internal_error" and len(final.seen) == 1

    enrol = scripted([lost, Answer(201, {})])
    with InstantIDClient(enrol.url, retry=FAST_RETRY) as client, pytest.raises(APIError):
        client.enrol_identity(astronaut_jpeg())
    assert len(enrol.seen) == 1


def test_errors_carry_the_service_code_and_are_not_retried(scripted) -> None:
    body = {"error": {"code": "no_face", "message": "no face detected in face photo 0", "request_id": "r-9"}}
    server = scripted([Answer(422, body)])
    with pytest.raises(APIError) as caught:
        generate_with("async", server.url)
    error = caught.value
    assert (error.status, error.code, error.message, error.request_id) == (
        422,
        "no_face",
        body["error"]["message"],
        "r-9",
    )
    assert str(error) == "HTTP 422 no_face: no face detected in face photo 0"
    assert len(server.seen) == 1


def test_connection_errors_are_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with InstantIDClient(url, retry=FAST_RETRY) as client, pytest.raises(ServiceUnreachable) as caught:
        client.models()
    assert caught.value.attempts == FAST_RETRY.max_retries + 1
    assert "ConnectError" in str(caught.value)


def test_photos_as_path_bytes_array_or_pil_reach_the_service_as_the_same_pixels(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    Image.fromarray(astronaut_rgb()).save(path)
    forms = [path, str(path), path.read_bytes(), astronaut_rgb(), Image.fromarray(astronaut_rgb())]
    for form in forms:
        with Image.open(io.BytesIO(photo_bytes(form))) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), astronaut_rgb()), type(form)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        photo_bytes(astronaut_rgb().astype(np.float32))


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def test_wait_follows_the_job_events_to_its_result(scripted, capsys: pytest.CaptureFixture[str]) -> None:
    job = {"id": GENERATED["id"], "status": "queued"}
    stream = b"".join(
        [
            sse("state", {**job, "stage": None}),
            b": keep-alive\n\n",
            sse("stage", {"stage": "denoise", "phase": "start"}, 2),
            *(sse("step", {"step": n, "total": 3}, 2 + n) for n in (1, 2, 3)),
            sse("succeeded", {**job, "status": "succeeded", "result": GENERATED}),
        ]
    )
    accepted = {**job, "status_url": "/v1/jobs/x", "events_url": "/v1/jobs/x/events"}
    server = scripted([Answer(202, accepted), Answer(200, stream, {"Content-Type": "text/event-stream"})])
    with InstantIDClient(server.url, retry=FAST_RETRY) as client:
        submitted = client.submit(face=astronaut_jpeg(), prompt="x")
        assert submitted.id == job["id"]
        events = [e.type for e in client.events(submitted.id)]
        assert events == ["state", "stage", "step", "step", "step", "succeeded"]
        server.answers = [Answer(200, stream, {"Content-Type": "text/event-stream"})]
        result = client.wait(submitted.id, progress=True)
    assert result.id == GENERATED["id"]
    assert "3/3" in capsys.readouterr().err  # the bar reached the last step
    assert server.seen[0].headers.get("idempotency-key")


# ------------------------------------------------------------------------------------------- the real stack


def stored_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.slow
def test_the_client_stores_what_a_direct_request_stores(serve_stack, tmp_path: Path) -> None:
    face = tmp_path / "face.jpg"
    face.write_bytes(astronaut_jpeg())
    options = {**FAST_OPTIONS, "prompt": "an astronaut", "seed": 11}
    direct = httpx.post(
        f"{serve_stack.url}/v1/generate",
        json={**options, "face_image_b64": base64.b64encode(astronaut_jpeg()).decode()},
        timeout=300,
    )
    assert direct.status_code == 200, direct.text
    expected = httpx.get(f"{serve_stack.url}/v1/generations/{direct.json()['id']}/images/0", timeout=60).content
    with InstantIDClient(serve_stack.url) as client:
        result = client.generate(face=face, **options)
        assert result.parameters == direct.json()["parameters"]
        assert np.abs(stored_pixels(client.image(result.id)) - stored_pixels(expected)).max() <= 2
        stored = client.generation(result.id)
        assert stored.status == "stored" and stored.images[0].width == 256
        # Saved identities: enrol, find it on a page, generate from it, delete it.
        enrolled = client.enrol_identity(astronaut_rgb(), name="client-test")
        assert enrolled.id in {info.id for info in client.iter_identities(limit=1)}
        assert client.identity(enrolled.id, include_embeddings=True).embedding is not None
        from_saved = client.generate(identity_id=enrolled.id, **options)
        assert from_saved.faces[0].saved_identity == enrolled.id
        client.delete_identity(enrolled.id)
        with pytest.raises(APIError) as gone:
            client.identity(enrolled.id)
        assert (gone.value.status, gone.value.code) == (404, "not_found")
        # The history: both generations, newest first (to the second), page by page; a deleted one leaves it.
        listed = [entry.id for entry in client.iter_generations(limit=50)]
        assert from_saved.id in listed and result.id in listed
        if from_saved.id[:16] != result.id[:16]:  # ids hold their second: within one, the order is arbitrary
            assert listed.index(from_saved.id) < listed.index(result.id)
        first = client.list_generations(limit=1)
        assert first.next_cursor is not None and first.generations[0].images[0].thumbnail_url
        second = client.list_generations(cursor=first.next_cursor, limit=1).generations[0]
        assert second.id != first.generations[0].id and second.id in listed
        client.delete_generation(result.id)
        with pytest.raises(APIError) as gone:
            client.generation(result.id)
        assert gone.value.status == 404
        assert result.id not in {entry.id for entry in client.iter_generations(limit=50)}


def count_generations(stack: Any) -> int:
    client = stack.s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.s3.bucket, Prefix="generations/")
    return sum(obj["Key"].endswith("/meta.json") for page in pages for obj in page.get("Contents", []))


class LosingProxy:
    """A loopback proxy in front of the ingress that lets the first ``lose`` generation requests through but
    answers each of them 503 with Retry-After, as a gateway whose upstream answer was lost would: the worst case
    for a retrying client, since the service did generate."""

    def __init__(self, upstream: str, lose: int) -> None:
        self.upstream, self.lose, self.keys = upstream, lose, []  # type: str, int, list[str | None]
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(
                    self.command, proxy.upstream + self.path, content=body, headers=headers, timeout=300
                )
                status, data, extra = answer.status_code, answer.content, {}
                if self.command == "POST" and self.path == "/v1/generate":
                    proxy.keys.append(self.headers.get("idempotency-key"))
                    if len(proxy.keys) <= proxy.lose:
                        status, data, extra = 503, json.dumps(OVERLOADED).encode(), {"Retry-After": "1"}
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **extra}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_503_twice_then_200_makes_exactly_one_generation(serve_stack) -> None:
    """The issue's check: the ingress's answer comes back 503 twice, then 200, and exactly one generation exists
    (each 503 came after the ingress had generated: without one Idempotency-Key over the retries there would be
    three)."""
    proxy = LosingProxy(serve_stack.url, lose=2)
    try:
        before = count_generations(serve_stack)
        with InstantIDClient(proxy.url) as client:
            result = client.generate(face=astronaut_jpeg(), prompt="an astronaut", seed=21, **FAST_OPTIONS)
        assert count_generations(serve_stack) == before + 1
        assert len(proxy.keys) == 3 and len(set(proxy.keys)) == 1 and proxy.keys[0]
        with InstantIDClient(serve_stack.url) as client:
            assert client.generation(result.id).status == "stored"
    finally:
        proxy.close()


@pytest.mark.slow
def test_generate_url_matches_in_process_generate(
    serve_stack, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    face = tmp_path / "face.jpg"
    face.write_bytes(astronaut_jpeg())
    common = ["generate", "--face", face, "--prompt", "an astronaut", "--style", "none", "--seed", "7"]
    common += ["--steps", "3", "--width", "256", "--height", "256"]
    served, local = tmp_path / "served.png", tmp_path / "local.png"
    assert main([str(a) for a in [*common, "--url", serve_stack.url, "--out", served]]) == 0, capsys.readouterr()
    out = capsys.readouterr()
    assert f"wrote {served} (256x256, seed 7, generation " in out.out
    assert "3/3" in out.err  # the progress bar, from the job's step events
    assert main([str(a) for a in [*common, "--weights", tiny_weights, "--out", local]]) == 0, capsys.readouterr()
    assert np.abs(stored_pixels(served.read_bytes()) - stored_pixels(local.read_bytes())).max() <= 2

    # On a service, --weights and --identity-file have no meaning; --identity-id needs a service.
    code = main([str(a) for a in [*common, "--url", serve_stack.url, "--weights", tiny_weights, "--out", served]])
    assert code == 2 and "--weights is for a generation in this process" in capsys.readouterr().err
    code = main([str(a) for a in ["generate", "--identity-id", "x", "--prompt", "x", "--out", served]])
    assert code == 2 and "give --weights" in capsys.readouterr().err
