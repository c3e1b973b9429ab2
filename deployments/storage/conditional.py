"""Conditional JSON writes to S3 (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace): how replicas
coordinate through S3 alone (idempotency records, job records). AWS S3 (since 2024) and SeaweedFS honour both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from .generations import S3_ERRORS, StorageError, describe_error, encode_meta
from .s3 import S3Client, is_not_found


@dataclass(frozen=True)
class ConditionalRecord:
    """A JSON document read from S3 and the ETag to replace it against (``If-Match``)."""

    body: dict[str, Any]
    etag: str


# 412: the precondition failed (the object exists / changed). 409: AWS's answer to two conditional writes
# racing on one key. Either way somebody else's write won.
_LOST_RACE_STATUS = {409, 412}


def lost_race(exc: BaseException) -> bool:
    """True when a conditional write failed because another writer got there first."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return status in _LOST_RACE_STATUS or code in {"PreconditionFailed", "ConditionalRequestConflict"}


def put_json_if(
    client: S3Client, bucket: str, key: str, body: dict[str, Any], what: str, **condition: str
) -> str | None:
    """Write ``body`` under ``key`` if ``condition`` (``IfNoneMatch="*"`` or ``IfMatch=etag``) holds: the new ETag,
    or None when another writer won (or, for a replace, the object is gone). Other failures: StorageError."""
    try:
        response = client.put_object(
            Bucket=bucket, Key=key, Body=encode_meta(body), ContentType="application/json", **condition
        )
    except S3_ERRORS as exc:
        if lost_race(exc) or ("IfMatch" in condition and is_not_found(exc)):
            return None
        raise StorageError(f"could not write {what}: {describe_error(exc)}") from exc
    return response["ETag"]


def read_json(client: S3Client, bucket: str, key: str, what: str) -> ConditionalRecord | None:
    """The JSON document under ``key`` with its ETag, or None when there is none. Other failures: StorageError."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"].read()
    except S3_ERRORS as exc:
        if is_not_found(exc):
            return None
        raise StorageError(f"could not read {what}: {describe_error(exc)}") from exc
    try:
        return ConditionalRecord(json.loads(body), response["ETag"])
    except ValueError as exc:
        raise StorageError(f"{what} is not JSON") from exc
