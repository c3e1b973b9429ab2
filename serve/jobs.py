"""Async jobs at the ingress: admission in order, leases in S3, takeover of jobs whose replica died, and the
Server-Sent Events a client follows a job with.

A job's durable state is one S3 document (``deployments/storage/job_records.py``), replaced only conditionally.
The replica running a job holds a lease in it and renews it every third of ``lease_s``; a replica that dies stops
renewing, and every ingress replica's sweep takes over jobs whose lease expired and runs them again from the start
(the job id is the generation id and generation is deterministic for the seed, so a rerun rewrites the same
result). A cancellation is a state change (status ``cancelled``) plus a flag in the event channel
(``deployments/job_events.py``) that the denoiser reads at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.instantid.errors import InstantIDError
from deployments.storage.job_records import JobRecords

logger = logging.getLogger("ray.serve")

TERMINAL = ("succeeded", "failed", "cancelled")
PUBLIC_FIELDS = (
    "id",
    "status",
    "stage",
    "step",
    "total_steps",
    "created_at",
    "updated_at",
    "attempts",
    "result",
    "error",
    "webhook",
)


class JobsConfig(BaseModel):
    """Async jobs: lease timing, sweeps, and the event streams' own limits (separate from generation's)."""

    model_config = ConfigDict(extra="forbid")

    lease_s: float = Field(default=30.0, ge=3.0, description="A job whose replica stops renewing is taken over after.")
    sweep_interval_s: float = Field(default=5.0, gt=0, description="How often each replica looks for expired leases.")
    max_event_streams: int = Field(
        default=256, ge=1, description="Open event streams per ingress replica (beyond: 503); never generation slots."
    )
    heartbeat_s: float = Field(default=15.0, gt=0, description="A comment line this often keeps proxies from closing.")


class JobNotFound(InstantIDError):
    """No such job, or (with API keys on) another owner's."""

    code = "not_found"
    status = 404


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def public_body(state: dict[str, Any], progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a client sees of a job: its S3 state, plus the live stage and step from the event channel (for a
    finished job: the last it reached)."""
    body = {name: state.get(name) for name in PUBLIC_FIELDS}
    if progress is not None:
        body |= {key: progress[key] for key in ("stage", "step", "total_steps") if progress.get(key) is not None}
    return body


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One Server-Sent Event: ``id``, ``event`` and one ``data`` line of compact JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Admission:
    """The ingress's generation slots: a request either gets one now or a 503 (``try_enter``), a job waits for
    one in arrival order (``wait_turn``), oldest first, reporting its queue position."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._queue: collections.deque[str] = collections.deque()
        self._changed = asyncio.Condition()

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit or self._queue:  # waiting jobs keep their turn
            return False
        self.in_flight += 1
        return True

    async def wait_turn(self, job_id: str, on_position: Callable[[int], None]) -> None:
        self._queue.append(job_id)
        try:
            async with self._changed:
                last = None
                while self._queue[0] != job_id or self.in_flight >= self.limit:
                    position = self._queue.index(job_id)
                    if position != last:
                        on_position(position)
                        last = position
                    await self._changed.wait()
                self._queue.popleft()
                self.in_flight += 1
        except BaseException:
            if job_id in self._queue:
                self._queue.remove(job_id)
            async with self._changed:
                self._changed.notify_all()
            raise
        async with self._changed:
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def leave(self) -> None:
        self.in_flight -= 1
        async with self._changed:
            self._changed.notify_all()


class JobStates:
    """Job records read and written by the ingress itself, through the storage layer (boto3 calls in a thread):
    job traffic (event streams opening, status polls, lease renewals) never queues behind result uploads.
    Read-modify-write goes through the conditional replace and is retried when another replica wrote in between."""

    def __init__(self, records: JobRecords) -> None:
        self.records = records

    async def create(self, job_id: str, state: dict[str, Any], request: dict[str, Any]) -> None:
        await asyncio.to_thread(self.records.create, job_id, state, request)

    async def read(self, job_id: str) -> dict[str, Any] | None:
        record = await asyncio.to_thread(self.records.read, job_id)
        return None if record is None else record.body

    async def read_request(self, job_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.records.read_request, job_id)

    async def active(self) -> list[str]:
        return await asyncio.to_thread(self.records.active)

    async def delete(self, job_id: str) -> None:
        await asyncio.to_thread(self.records.delete, job_id)

    async def update(self, job_id: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """Apply ``change`` (returns False to leave the state as it is) until the write wins; the final state."""
        for _ in range(20):
            record = await asyncio.to_thread(self.records.read, job_id)
            if record is None:
                return None
            state = dict(record.body)
            if not change(state):
                return state
            state["updated_at"] = now_iso()
            if await asyncio.to_thread(self.records.replace, job_id, state, record.etag) is not None:
                return state
        raise RuntimeError(f"job {job_id}: could not write its state (too many concurrent writers)")


class SharedFeeds:
    """One long poll of the event channel per job per ingress replica, shared by all of its subscribers here.

    Fifty browsers following one job cost one channel call per batch of events, not fifty: the first subscriber
    starts a feed that polls the channel and keeps what arrived; the others wait on it. A feed stops at the job's
    terminal event or when its last subscriber leaves.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._feeds: dict[str, _Feed] = {}

    async def wait(self, job_id: str, after: int, timeout_s: float) -> list[Any]:
        feed = self._feeds.get(job_id)
        if feed is None or after < feed.start:  # a replay from before the feed began: ask the channel itself
            if feed is None:
                feed = self._feeds[job_id] = _Feed(self, job_id, after)
            else:
                return await self.channel.wait.remote(job_id, after, timeout_s)
        return await feed.wait(after, timeout_s)

    def _closed(self, job_id: str, feed: _Feed) -> None:
        if self._feeds.get(job_id) is feed:
            del self._feeds[job_id]


class _Feed:
    def __init__(self, feeds: SharedFeeds, job_id: str, start: int) -> None:
        self.feeds, self.job_id, self.start = feeds, job_id, start
        self.events: list[Any] = []
        self.waiters = 0
        self.done = False
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        last = self.start
        try:
            while not self.done:
                fresh = await self.feeds.channel.wait.remote(self.job_id, last, 5.0)
                if fresh:
                    last = fresh[-1].seq
                    self.events.extend(fresh)
                    del self.events[: max(0, len(self.events) - 1024)]
                    self.done = any(event.type in TERMINAL for event in fresh)
                    async with self._changed:
                        self._changed.notify_all()
                elif self.waiters == 0:
                    break
        finally:
            self.done = True
            self.feeds._closed(self.job_id, self)
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, after: int, timeout_s: float) -> list[Any]:
        self.waiters += 1
        try:
            async with self._changed:
                deadline = time.monotonic() + timeout_s
                while True:
                    fresh = [event for event in self.events if event.seq > after]
                    remaining = deadline - time.monotonic()
                    if fresh or self.done or remaining <= 0:
                        return fresh
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except asyncio.TimeoutError:
                        return []
        finally:
            self.waiters -= 1


async def follow_events(
    job_id: str,
    channel: Any,
    feeds: SharedFeeds,
    state: dict[str, Any],
    read_state: Callable[[], Awaitable[dict[str, Any] | None]],
    last_event_id: int,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """A job's event stream: its current ``state`` first (the whole job body), then live events from the channel
    after ``last_event_id``, a heartbeat comment while nothing happens, and the terminal event last."""
    progress = await channel.progress.remote(job_id)
    yield sse("state", public_body(state, progress), progress["last_event_id"] or None)
    after = last_event_id if last_event_id > 0 else progress["last_event_id"]
    if state["status"] in TERMINAL:
        # A resumed stream gets what it missed (as far as the channel's window reaches), the outcome last.
        missed = await channel.wait.remote(job_id, after, 0.0) if last_event_id > 0 else []
        for event in missed:
            yield sse(event.type, event.data, event.seq)
            if event.type in TERMINAL:
                return
        yield sse(state["status"], public_body(state))
        return
    while True:
        events = await feeds.wait(job_id, after, heartbeat_s)
        if not events:
            state = await read_state()  # the durable state decides, should the channel have lost events
            if state is None or state["status"] in TERMINAL:
                if state is not None:
                    yield sse(state["status"], public_body(state))
                return
            yield b": keep-alive\n\n"
            continue
        for event in events:
            after = event.seq
            yield sse(event.type, event.data, event.seq)
            if event.type in TERMINAL:
                return


def lease(holder: str, lease_s: float) -> dict[str, Any]:
    return {"holder": holder, "expires_at": time.time() + lease_s}


def lease_expired(state: dict[str, Any]) -> bool:
    held = state.get("lease") or {}
    return float(held.get("expires_at", 0)) < time.time()
