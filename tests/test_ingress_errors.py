"""Errors Ray Serve would answer itself in plain text reach clients in our JSON shape.

When Serve starts an ingress replica it adds its own handlers for BackPressureError and DeploymentUnavailableError
to the app; they replaced ours, and a downstream deployment's full queue reached clients as a plain-text 503 (seen
in the chaos soak). The app keeps ours.
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError
from starlette.responses import Response

from serve.ingress.errors import install_error_handlers
from serve.ingress.http_app import IngressApp, app


def test_a_downstream_full_queue_is_our_json_overloaded_even_after_serve_adds_its_handler() -> None:
    probe = IngressApp()
    install_error_handlers(probe)

    @probe.get("/busy")
    async def busy() -> None:
        raise BackPressureError(num_queued_requests=34, max_queued_requests=32)

    # What Ray Serve does to the app when a replica starts.
    probe.add_exception_handler(BackPressureError, lambda request, exc: Response("Request dropped", status_code=503))
    answer = TestClient(probe).get("/busy")
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "overloaded" and answer.headers["retry-after"] == "5"
    assert isinstance(app, IngressApp)
