"""HEAD on the web page and on the health route answers as GET does, without a body: monitoring probes, load
balancers and browser prefetches send HEAD, and a 405 there reads as "down".

The routes run in FastAPI's TestClient, without Ray: the Ingress's methods get ``self`` from Serve's replica context,
which the fixture stands in for (neither route uses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from ray import serve as ray_serve

from serve.ingress.routes import app


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setattr(ray_serve, "get_replica_context", lambda: SimpleNamespace(servable_object=object()))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_head_answers_like_get_without_a_body(client: TestClient, path: str) -> None:
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200, head.text
    assert get.content and head.content == b""
    for header in ("content-type", "content-length", "cache-control"):
        assert head.headers.get(header) == get.headers.get(header), header


def test_other_methods_on_the_probes_are_still_refused(client: TestClient) -> None:
    for path in ("/", "/healthz"):
        response = client.request("PATCH", path)
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
