"""Async jobs' durable state in S3, written with conditional PUTs so that any ingress replica can read, cancel and
take over a job.

Per job (the id is also the id of the generation it makes):

- ``{prefix}/jobs/{id}.json``: its state (status, owner, lease, result or error), replaced only with
  ``If-Match: <etag>``, so a lease renewal, a cancellation and a takeover never overwrite each other unseen;
- ``{prefix}/jobs/{id}.request.json``: the request as received (what a replica that takes the job over runs); it
  may hold face photos, so it is kept only while the job is unfinished;
- ``{prefix}/jobs-active/{id}``: an empty marker while the job is unfinished, so a sweep for expired leases lists
  only the unfinished jobs.

The marker is written first and removed last, and a removal stops at the first failure, so a stored request always
has a marker: whatever a failed write or removal leaves behind, the sweep (which lists markers) finds it, also a
request no state points to.

The job protocol (leases, takeover) lives at the API boundary (``serve/jobs/``); this module only speaks S3.
"""

from __future__ import annotations

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
        """Mark the job active, store its request, then create its state (only if none exists): its ETag.

        Should any write fail (the caller answers 503: the job does not exist), what this call stored is removed
        again, best effort: S3 may still be failing, and then the sweep removes it (see :meth:`create_state`).
        """
        try:
            self.client.put_object(Bucket=self.settings.bucket, Key=self._marker(job_id), Body=b"")
            self.client.put_object(
                Bucket=self.settings.bucket,
                Key=self._key(job_id, ".request.json"),
                Body=json.dumps(request).encode(),
                ContentType="application/json",
            )
        except S3_ERRORS as exc:
            self._undo_create(job_id, state)
            raise StorageError(f"could not store job {job_id}: {describe_error(exc)}") from exc
        try:
            etag = self._put(job_id, state, IfNoneMatch="*")
        except StorageError:
            self._undo_create(job_id, state)
            raise
        if etag is None:
            self._undo_create(job_id, state)
            raise StorageError(f"job {job_id} exists already")
        return etag

    def create_state(self, job_id: str, state: dict[str, Any]) -> str | None:
        """Create the state alone, only if none exists: its ETag, or None when one does.

        For the sweep, which puts a failed state in the place of a submission that was never completed before it
        removes the request: a create of that id still under way then fails at its own state write (If-None-Match)
        instead of completing a job whose request and marker are gone.
        """
        return self._put(job_id, state, IfNoneMatch="*")

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
            self.retire(job_id)
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
        """Remove the job's request, marker and state, in that order (its generation is deleted by the store).

        Stops at the first failure (StorageError): what is left stays reachable, by a DELETE again (the state) and
        by the sweep (the marker), instead of a request that nothing points to.
        """
        for key in (self._key(job_id, ".request.json"), self._marker(job_id), self._key(job_id)):
            try:
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)
            except S3_ERRORS as exc:
                raise StorageError(f"could not delete job {job_id}: {describe_error(exc)}") from exc

    def retire(self, job_id: str) -> bool:
        """A finished job is no longer swept, and its request (which may hold photos) is not kept: remove the
        request, then the marker. Best effort, and the marker stays when the request could not be removed, so a
        later sweep tries again. True when both are gone."""
        for key in (self._key(job_id, ".request.json"), self._marker(job_id)):
            try:
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)
            except S3_ERRORS:
                return False
        return True

    def _undo_create(self, job_id: str, state: dict[str, Any]) -> None:
        """Remove what a failed :meth:`create` stored: the state if it is the one this create wrote (a write whose
        answer was lost may have landed, and its retry is then refused as if the job existed), then the request and
        the marker. The id is fresh (random), so those two are this create's; a state another writer made (the
        sweep's, put there while this create stalled) stays. The first failure ends it, so a client's 503 waits for
        at most one more slow S3 call; the marker then stays, and the sweep removes what is left."""
        try:
            current = self.read(job_id)
            if current is not None and current.body == state:
                self.client.delete_object(Bucket=self.settings.bucket, Key=self._key(job_id))
        except (StorageError, *S3_ERRORS):
            return
        self.retire(job_id)

    def _put(self, job_id: str, state: dict[str, Any], **condition: str) -> str | None:
        return put_json_if(self.client, self.settings.bucket, self._key(job_id), state, f"job {job_id}", **condition)
