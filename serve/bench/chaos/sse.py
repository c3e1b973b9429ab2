"""A job's event stream followed the way a browser's EventSource does: to the terminal event, reconnecting with
``Last-Event-ID`` after a dropped connection (a killed ingress, a restarted service), a bounded number of times
and never past the job's deadline."""

from __future__ import annotations

import asyncio
import time

import httpx

from deployments.job_events import is_terminal_event

from .client import Recorder, describe
from .records import StreamLog

MAX_CONNECTS = 200
RECONNECT_S = (1.0, 10.0)  # first delay (EventSource's usual), doubling to the cap while connections fail
READ_TIMEOUT_S = 30.0  # heartbeats come every api.jobs.heartbeat_s (a few seconds in the bench's config)


async def follow(
    client: httpx.AsyncClient, url: str, deadline: float, recorder: Recorder, job_seq: int, log: StreamLog
) -> StreamLog:
    """Read ``url``'s events until the terminal one, recording what was seen in ``log`` as it comes (so a stream cut
    short still shows how far it got). Refused connections are recorded as exchanges too."""
    delay = RECONNECT_S[0]
    while log.terminal is None and log.connects < MAX_CONNECTS and time.time() < deadline:
        headers = {"Accept": "text/event-stream"}
        if log.last_event_id is not None:
            headers["Last-Event-ID"] = str(log.last_event_id)
        log.connects += 1
        events = log.events
        try:
            await asyncio.wait_for(_read(client, url, headers, log, recorder, job_seq), deadline - time.time())
        except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
            log.errors.append(describe(exc))
        del log.errors[:-20]  # the last ones say enough
        if log.terminal is None:
            delay = RECONNECT_S[0] if log.events > events else min(delay * 2, RECONNECT_S[1])
            await asyncio.sleep(min(delay, max(0.0, deadline - time.time())))
    return log


async def _read(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], log: StreamLog, recorder: Recorder, job_seq: int
) -> None:
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=10.0)
    started = time.time()
    async with client.stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            await response.aread()
            exchange = recorder.new("job_events", f"job #{job_seq}", started, None)
            exchange.status = response.status_code
            exchange.content_type = response.headers.get("content-type")
            try:
                body = response.json()
                exchange.error = body.get("error") if isinstance(body, dict) else None
            except ValueError:
                exchange.body_excerpt = response.text[:300]
            exchange.finished_at = time.time()
            log.errors.append(f"HTTP {response.status_code}")
            return
        kind, event_id, has_data = "message", None, False
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                has_data = True
            elif not line and has_data:
                log.events += 1
                if event_id and event_id.isdigit():
                    log.last_event_id = int(event_id)
                if is_terminal_event(kind):
                    log.terminal, log.terminal_at = kind, time.time()
                    return
                kind, event_id, has_data = "message", None, False
        log.errors.append("the stream ended before a terminal event")
