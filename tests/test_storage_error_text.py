"""Storage errors that reach API error bodies name no endpoint: botocore's connection errors carry the S3 URL
(host, port, bucket, key), which the chaos soak found in 503 ``storage_unavailable`` messages during an S3 outage."""

from __future__ import annotations

from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from deployments.storage.generations import describe_error

URL = "http://127.0.0.1:20280/instantid/generations/jobs/20261207T204227Z-0093e0b18c11c827.request.json"


def test_connection_errors_are_described_without_the_endpoint_url() -> None:
    for exc in (
        EndpointConnectionError(endpoint_url=URL),
        ReadTimeoutError(endpoint_url=URL),
        ConnectTimeoutError(endpoint_url=URL),
    ):
        text = describe_error(exc)
        assert "127.0.0.1" not in text and "20280" not in text and "instantid/generations" not in text, text
        assert text.startswith(type(exc).__name__) and "the storage endpoint" in text
