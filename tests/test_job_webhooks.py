"""Job callbacks and owner scoping with API keys on (the secure app): a signed webhook delivered to a local
receiver, retried when the receiver fails, refused for hosts off the allow-list; another owner's job is not found."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from serve.jobs.webhooks import verify_signature
from tests.serve_fixtures import API_KEYS
from tests.support import FAST_REQUEST, astronaut_b64

pytestmark = pytest.mark.slow


class Receiver:
    """A local HTTP endpoint that fails the first ``failures`` POSTs with a 500, then records and accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.failures:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?job=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(failures=1)
    yield server
    server.server.shutdown()


def headers(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[name]}"}


def test_a_finished_job_is_posted_signed_to_its_callback_and_retried(secure_stack, receiver) -> None:
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), "width": 256, "height": 256, "seed": 4}
    accepted = httpx.post(
        f"{secure_stack.url}/v1/jobs", json={**body, "callback_url": receiver.url}, headers=headers("alice"), timeout=60
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert accepted.json()["status_url"] == f"/secure/v1/jobs/{job_id}"
    # Owner scoping: bob does not see alice's job, nor can he cancel it.
    for method in ("GET", "DELETE"):
        other = httpx.request(method, f"{secure_stack.url}/v1/jobs/{job_id}", headers=headers("bob"), timeout=30)
        assert other.status_code == 404
    assert httpx.get(f"{secure_stack.url}/v1/jobs/{job_id}", timeout=30).status_code == 401

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not receiver.received:
        time.sleep(0.2)
    assert receiver.attempts == 2 and len(receiver.received) == 1  # one 500, then delivered
    sent_headers, sent = receiver.received[0]
    secret = hashlib.sha256(API_KEYS["alice"].encode()).hexdigest()  # the key's own webhook secret
    assert verify_signature(sent, sent_headers["x-instantid-signature"], secret)
    assert not verify_signature(sent, sent_headers["x-instantid-signature"], "another secret")
    delivered = json.loads(sent)
    assert delivered["id"] == job_id and delivered["status"] == "succeeded"
    assert delivered["result"]["images"][0]["uri"].startswith("s3://")
    job = httpx.get(f"{secure_stack.url}/v1/jobs/{job_id}", headers=headers("alice"), timeout=30).json()
    while job.get("webhook") is None and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{secure_stack.url}/v1/jobs/{job_id}", headers=headers("alice"), timeout=30).json()
    assert job["webhook"] == {"delivered": True, "attempts": 2, "status": 204, "error": None}


@pytest.mark.parametrize(
    ("callback", "reason"),
    [
        ("http://localhost:9/hook", "localhost"),  # a name off the allow-list (only 127.0.0.1 is on it)
        ("http://10.0.0.5/hook", "10.0.0.5"),
        ("ftp://127.0.0.1/hook", "scheme"),
    ],
)
def test_a_callback_off_the_allow_list_is_refused_before_the_job_starts(secure_stack, callback, reason) -> None:
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), "callback_url": callback}
    refused = httpx.post(f"{secure_stack.url}/v1/jobs", json=body, headers=headers("alice"), timeout=60)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["message"].startswith("callback_url:")
