"""Shared pytest fixtures.

Keep each fixture small and documented; fixtures used by a single module belong in that module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serve.tools.seaweed import EmbeddedS3

pytest_plugins = ["tests.weights_fixtures", "tests.serve_fixtures"]

# Fixtures that start real services (SeaweedFS, a local Ray cluster): a test using any of them, directly or
# through another fixture, is an integration test and must be marked ``slow``.
SERVICE_FIXTURES = frozenset({"embedded_s3", "serve_stack", "secure_stack", "fault_stack"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that start SeaweedFS or Ray must be marked slow: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def embedded_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """One real SeaweedFS S3 (``weed mini`` on 127.0.0.1, generated credentials) for the whole session.

    Real rather than moto because moto's server does not check SigV4 signatures. Tests share it, so each
    test writes under its own prefix/ids instead of assuming an empty bucket. Stopped at session end
    (and by ``atexit`` should the session die first).
    """
    store = EmbeddedS3(tmp_path_factory.mktemp("embedded-s3"))
    store.start(timeout_s=60)
    try:
        yield store
    finally:
        store.stop()
