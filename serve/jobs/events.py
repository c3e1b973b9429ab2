"""The Server-Sent Events a client follows a job with.

A stream starts with the job's current state (so a late subscriber starts from the present), then relays the live
events of the event channel (``deployments/job_events.py``) after ``Last-Event-ID``, a heartbeat comment while
nothing happens, and ends with the job's outcome. The durable state in S3 decides whenever the channel is silent,
should it have lost events (it keeps a bounded window in memory).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from deployments.job_events import JobEvent, is_terminal_event

from .state import JobState, public_body


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One Server-Sent Event: ``id``, ``event`` and one ``data`` line of compact JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class SharedFeeds:
    """One long poll of the event channel per job per ingress replica, shared by all of its subscribers here.

    Fifty browsers following one job cost one channel call per batch of events, not fifty: the first subscriber
    starts a feed that polls the channel and keeps what arrived; the others wait on it. A feed stops at the job's
    terminal event or when its last subscriber leaves.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._feeds: dict[str, _Feed] = {}

    async def wait(self, job_id: str, after: int, timeout_s: float) -> list[JobEvent]:
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
        self.events: list[JobEvent] = []
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
                    self.done = any(is_terminal_event(event.type) for event in fresh)
                    async with self._changed:
                        self._changed.notify_all()
                elif self.waiters == 0:
                    break
        finally:
            self.done = True
            self.feeds._closed(self.job_id, self)
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, after: int, timeout_s: float) -> list[JobEvent]:
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
    state: JobState,
    read_state: Callable[[], Awaitable[JobState | None]],
    last_event_id: int,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """A job's event stream: its current ``state`` first (the whole job body), then live events from the channel
    after ``last_event_id``, a heartbeat comment while nothing happens, and the terminal event last.

    Ids only go up within a stream, and a resumed one never repeats an id up to ``last_event_id`` (a client keeps
    the last id it saw and sends it back when it reconnects). A new stream's ``state`` carries the channel's last
    id, since it stands for every event so far; a resumed stream's ``state`` carries none, since the replay of
    what the client missed comes after it with lower ids. Events without an id (the state a durable read
    decided) leave the client's last id as it was.
    """
    progress = await channel.progress.remote(job_id)
    resumed = last_event_id > 0
    yield sse("state", public_body(state, progress), None if resumed else (progress.last_event_id or None))
    after = last_event_id if resumed else progress.last_event_id
    if state.status.terminal:
        # A resumed stream gets what it missed (as far as the channel's window reaches), the outcome last.
        missed = await channel.wait.remote(job_id, after, 0.0) if resumed else []
        for event in missed:
            if event.seq <= after:
                continue
            after = event.seq
            yield sse(event.type, event.data, event.seq)
            if is_terminal_event(event.type):
                return
        yield sse(state.status.value, public_body(state))
        return
    while True:
        events = await feeds.wait(job_id, after, heartbeat_s)
        if not events:
            state = await read_state()  # the durable state decides, should the channel have lost events
            if state is None or state.status.terminal:
                if state is not None:
                    yield sse(state.status.value, public_body(state))
                return
            yield b": keep-alive\n\n"
            continue
        for event in events:
            if event.seq <= after:  # the promise is this function's, whatever a feed answers
                continue
            after = event.seq
            yield sse(event.type, event.data, event.seq)
            if is_terminal_event(event.type):
                return


async def prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first``, then ``rest``: a stream whose first chunk was read before its response started (so that the
    errors it may raise are answered as JSON, not inside an open event stream)."""
    yield first
    async for chunk in rest:
        yield chunk
