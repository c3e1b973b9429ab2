"""Async jobs' durable state in S3, written with conditional PUTs so that any ingress replica can read, cancel and
take over a job.

Per job (the id is also the id of the generation it makes):

- ``{prefix}/jobs/{id}.json``: its state (status, owner, lease, result or error), replaced only with
  ``If-Match: <etag>``, so a lease renewal, a cancellation and a takeover never overwrite each other unseen;
- ``{prefix}/jobs/{id}.request.json``: the request as received (what a replica that takes the job over runs);
- ``{prefix}/jobs-active/{id}``: an empty marker while the job is unfinished, so a sweep for expired leases lists
  only the unfinished jobs.

The job protocol (leases, takeover) lives at the API boundary (``serve/jobs/``); this module only speaks S3.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from .conditional import ConditionalRecord, put_json_if, read_json
from .generations import S3_ERRORS, StorageError, describe_error, validate_generation_id
from .s3 import S3Client, S3Settings, is_not_found


class JobRecords:
    """Create, read, replace, list and delete job records under ``settings.prefix``."""

    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings

    def _key(self, job_id: str, suffix: str = ".json") -> str:
        validate_generation_id(job_id)
        return f"{self.settings.prefix}/jobs/{job_id}{suffix}"

    def _marker(self, job_id: str) -> str:
        validate_generation_id(job_id)
        return f"{self.settings.prefix}/jobs-active/{job_id}"

    def create(self, job_id: str, state: dict[str, Any], request: dict[str, Any]) -> str:
        """Store the request, mark the job active, then create its state (only if none exists): its ETag."""
        try:
            self.client.put_object(
                Bucket=self.settings.bucket,
                Key=self._key(job_id, ".request.json"),
                Body=json.dumps(request).encode(),
                ContentType="application/json",
            )
            self.client.put_object(Bucket=self.settings.bucket, Key=self._marker(job_id), Body=b"")
        except S3_ERRORS as exc:
            raise StorageError(f"could not store job {job_id}: {describe_error(exc)}") from exc
        etag = self._put(job_id, state, IfNoneMatch="*")
        if etag is None:
            raise StorageError(f"job {job_id} exists already")
        return etag

    def read(self, job_id: str) -> ConditionalRecord | None:
        return read_json(self.client, self.settings.bucket, self._key(job_id), f"the record of job {job_id}")

    def read_request(self, job_id: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=self._key(job_id, ".request.json"))
            return json.loads(body["Body"].read())
        except S3_ERRORS as exc:
            if is_not_found(exc):
                return None
            raise StorageError(f"could not read the request of job {job_id}: {describe_error(exc)}") from exc

    def replace(self, job_id: str, state: dict[str, Any], etag: str, *, finished: bool = False) -> str | None:
        """Overwrite the state only if it is still version ``etag``: the new ETag, or None if it changed.
        ``finished``: the new state is terminal, so the job is no longer swept and its request is not kept."""
        etag = self._put(job_id, state, IfMatch=etag)
        if etag is not None and finished:
            self._finished(job_id)
        return etag

    def active(self) -> list[str]:
        """The ids of unfinished jobs (their markers), oldest first."""
        prefix = f"{self.settings.prefix}/jobs-active/"
        ids: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                ids.extend(item["Key"][len(prefix) :] for item in page.get("Contents", []))
        except S3_ERRORS as exc:
            raise StorageError(f"could not list active jobs: {describe_error(exc)}") from exc
        return sorted(ids)

    def delete(self, job_id: str) -> None:
        """Remove the job's state, request and marker (its generation is deleted by the store)."""
        for key in (self._key(job_id), self._key(job_id, ".request.json"), self._marker(job_id)):
            with contextlib.suppress(*S3_ERRORS):
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)

    def _finished(self, job_id: str) -> None:
        """A finished job is no longer swept, and its request (which may hold photos) is not kept."""
        for key in (self._marker(job_id), self._key(job_id, ".request.json")):
            with contextlib.suppress(*S3_ERRORS):
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)

    def _put(self, job_id: str, state: dict[str, Any], **condition: str) -> str | None:
        return put_json_if(self.client, self.settings.bucket, self._key(job_id), state, f"job {job_id}", **condition)
