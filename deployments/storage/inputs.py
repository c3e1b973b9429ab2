"""Input photos given as ``s3://bucket/key``: read only from allowed buckets, size-limited, errors mapped once.

A request never makes the service fetch a URL or read a bucket nobody allowed (the results bucket included),
so an ``s3://`` input cannot be used to read someone else's objects or to probe the network.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from deployments.instantid.errors import ImageTooLargeError, InvalidParameterError

from .generations import S3_ERRORS, StorageError, describe_error
from .s3 import S3Client, S3Settings, is_access_denied, is_not_found, make_client, parse_s3_uri


class S3InputReader:
    """Reads input objects from ``allowed_buckets`` with the result store's S3 endpoint, timeouts and retries."""

    def __init__(self, settings: S3Settings, allowed_buckets: Iterable[str]) -> None:
        self.settings = settings
        self.allowed_buckets = frozenset(allowed_buckets)
        self._clients: dict[str, S3Client] = {}
        self._lock = threading.Lock()

    def _client(self, bucket: str) -> S3Client:
        with self._lock:
            client = self._clients.get(bucket)
            if client is None:
                settings = self.settings.model_copy(update={"bucket": bucket, "create_bucket": False})
                client = self._clients[bucket] = make_client(settings)
            return client

    def read(self, uri: str, field: str, max_bytes: int) -> bytes:
        """The object's bytes. 422 for a bad, foreign, missing or unreadable object; 413 beyond ``max_bytes``;
        503 (:class:`StorageError`) when S3 itself fails."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise InvalidParameterError(f"{field}: {exc}") from None
        if bucket not in self.allowed_buckets or not key or key.endswith("/"):
            raise InvalidParameterError(f"{field}: s3 inputs are accepted only from the configured input buckets")
        client = self._client(bucket)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength", 0)) > max_bytes:
                raise ImageTooLargeError(f"{field} is larger than {max_bytes} bytes")
            return client.get_object(Bucket=bucket, Key=key)["Body"].read(max_bytes + 1)
        except S3_ERRORS as exc:
            if is_not_found(exc) or is_access_denied(exc):
                raise InvalidParameterError(f"{field}: {uri} cannot be read ({describe_error(exc)})") from None
            raise StorageError(f"{field}: could not read {uri}: {describe_error(exc)}") from exc
