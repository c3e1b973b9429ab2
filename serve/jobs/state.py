"""A job's durable state: one S3 document per job (``deployments/storage/job_records.py``), replaced only with
``If-Match``, so every ingress replica can read, cancel and take over any job and no write is lost unseen.

:class:`JobState` is the document (validated when read back); :class:`JobStates` reads and writes it from the
ingress's event loop; :func:`public_body` is what a client sees of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.instantid.errors import InstantIDError
from deployments.job_events import JobProgress, JobStatus
from deployments.storage.job_records import JobRecords

from .leases import Lease


class JobsConfig(BaseModel):
    """Async jobs: lease timing, sweeps, and the event streams' own limits (separate from generation's)."""

    model_config = ConfigDict(extra="forbid")

    lease_s: float = Field(
        default=30.0,
        ge=3.0,
        description="A job whose replica stops renewing is taken over after; what a failed submission left in S3 "
        "is removed once its job id is this old.",
    )
    sweep_interval_s: float = Field(default=5.0, gt=0, description="How often each replica looks for expired leases.")
    max_event_streams: int = Field(
        default=256, ge=1, description="Open event streams per ingress replica (beyond: 503); never generation slots."
    )
    heartbeat_s: float = Field(default=15.0, gt=0, description="A comment line this often keeps proxies from closing.")


class JobNotFound(InstantIDError):
    """No such job, or (with API keys on) another owner's."""

    code = "not_found"
    status = 404


class JobError(BaseModel):
    code: str
    message: str


class WebhookOutcome(BaseModel):
    """How the delivery of the final body to ``callback_url`` ended."""

    delivered: bool
    attempts: int = Field(description="Tries started (0: refused before any, e.g. the host left the allow-list).")
    status: int | None = Field(description="The receiver's last HTTP status (None: no answer).")
    error: str | None = Field(
        default=None,
        description="Why it was not delivered (None once delivered): the last try's failure, e.g. 'HTTP 500', "
        "'ConnectError: ...' or 'refused: ...'. It names at most the host, never the URL's path or query (it may "
        "carry a token) nor the signing secret.",
    )


class JobState(BaseModel):
    """The S3 document of one job. ``result`` is the body ``/v1/generate`` would have answered."""

    id: str
    owner: str
    request_id: str
    status: JobStatus
    created_at: str
    updated_at: str
    attempts: int = 1
    service: str = Field(
        default="",
        description="The Serve application that accepted the job: only its replicas take the job over, since its "
        "config (models, safety policy, API keys) defines what the job runs under. Empty: any (older records).",
    )
    lease: Lease | None = None
    callback_url: str | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None
    webhook: WebhookOutcome | None = Field(
        default=None,
        description="Set once the job ended and a callback_url was given: delivered or not, tries, the receiver's "
        "last status, and the error that ended an undelivered one.",
    )

    def finish(self, status: JobStatus, result: dict[str, Any] | None = None, error: JobError | None = None) -> None:
        """Enter a terminal status: nobody holds the job any more."""
        self.status, self.result, self.error, self.lease = status, result, error, None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def public_body(state: JobState, progress: JobProgress | None = None) -> dict[str, Any]:
    """What a client sees of a job: its S3 state, plus the live stage and step from the event channel (for a
    finished job: the last it reached)."""
    body = state.model_dump(mode="json")
    live = progress or JobProgress()
    return {
        "id": body["id"],
        "status": body["status"],
        "stage": live.stage,
        "step": live.step,
        "total_steps": live.total_steps,
        "created_at": body["created_at"],
        "updated_at": body["updated_at"],
        "attempts": body["attempts"],
        "result": body["result"],
        "error": body["error"],
        "webhook": body["webhook"],
    }


class JobStates:
    """Job records read and written by the ingress itself, through the storage layer (boto3 calls in a thread):
    job traffic (event streams opening, status polls, lease renewals) never queues behind result uploads.
    Read-modify-write goes through the conditional replace and is retried when another replica wrote in between."""

    def __init__(self, records: JobRecords) -> None:
        self.records = records

    async def create(self, state: JobState, request: dict[str, Any]) -> None:
        await asyncio.to_thread(self.records.create, state.id, state.model_dump(mode="json"), request)

    async def create_state(self, state: JobState) -> bool:
        """Create the state alone, only if the job has none (the sweep's, for an abandoned submission): written?"""
        return await asyncio.to_thread(self.records.create_state, state.id, state.model_dump(mode="json")) is not None

    async def retire(self, job_id: str) -> bool:
        """Remove a finished job's request and marker (best effort): both gone?"""
        return await asyncio.to_thread(self.records.retire, job_id)

    async def read(self, job_id: str) -> JobState | None:
        record = await asyncio.to_thread(self.records.read, job_id)
        return None if record is None else JobState.model_validate(record.body)

    async def read_request(self, job_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.records.read_request, job_id)

    async def active(self) -> list[str]:
        return await asyncio.to_thread(self.records.active)

    async def delete(self, job_id: str) -> None:
        await asyncio.to_thread(self.records.delete, job_id)

    async def update(self, job_id: str, change: Callable[[JobState], bool]) -> JobState | None:
        """Apply ``change`` (it edits the state and returns False to leave it as it is) until the write wins: the
        final state, or None when the job does not exist."""
        for _ in range(20):
            record = await asyncio.to_thread(self.records.read, job_id)
            if record is None:
                return None
            state = JobState.model_validate(record.body)
            if not change(state):
                return state
            state.updated_at = now_iso()
            body = state.model_dump(mode="json")
            written = await asyncio.to_thread(
                self.records.replace, job_id, body, record.etag, finished=state.status.terminal
            )
            if written is not None:
                return state
        raise RuntimeError(f"job {job_id}: could not write its state (too many concurrent writers)")
