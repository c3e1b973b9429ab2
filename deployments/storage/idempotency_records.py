"""Idempotency records in S3, written with conditional PUTs so that replicas coordinate through S3 alone.

One object per (owner, key) digest: ``{prefix}/idempotency/{sha256}.json``. It is *claimed* with
``If-None-Match: *`` (exactly one writer can create it), moved from ``pending`` to ``done`` with
``If-Match: <etag of the claim>`` (nobody else's claim is overwritten), and deleted when the claimed request
fails so that a retry can run. AWS S3 (since 2024) and SeaweedFS both honour these headers; a store that
ignored them would make every claim succeed, which is the old, race-prone behaviour, never a lost result.

The protocol that uses these operations lives at the API boundary (``serve/ingress/idempotency.py``); this module
only speaks S3.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from .conditional import ConditionalRecord, put_json_if, read_json
from .generations import S3_ERRORS
from .s3 import S3Client, S3Settings


class IdempotencyRecords:
    """Read, claim, replace and release idempotency records under ``settings.prefix``."""

    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings

    def key(self, digest: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("idempotency digests are sha256 hex strings")
        return f"{self.settings.prefix}/idempotency/{digest}.json"

    def read(self, digest: str) -> ConditionalRecord | None:
        """The record under ``digest`` with its ETag, or None when there is none."""
        return read_json(
            self.client, self.settings.bucket, self.key(digest), f"the idempotency record {digest[:12]}..."
        )

    def claim(self, digest: str, body: dict[str, Any]) -> str | None:
        """Create the record only if none exists: its ETag, or None when another writer got there first."""
        return self._put(digest, body, IfNoneMatch="*")

    def replace(self, digest: str, body: dict[str, Any], etag: str) -> str | None:
        """Overwrite the record only if it is still the version ``etag``: the new ETag, or None if it changed
        or was deleted meanwhile."""
        return self._put(digest, body, IfMatch=etag)

    def release(self, digest: str) -> None:
        """Delete the record (best effort: a record left behind only delays a retry until its lease ends)."""
        with contextlib.suppress(*S3_ERRORS):
            self.client.delete_object(Bucket=self.settings.bucket, Key=self.key(digest))

    def _put(self, digest: str, body: dict[str, Any], **condition: str) -> str | None:
        return put_json_if(
            self.client, self.settings.bucket, self.key(digest), body, "an idempotency record", **condition
        )
