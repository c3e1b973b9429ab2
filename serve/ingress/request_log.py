"""One JSON log line per HTTP request at the ingress, and the request counter beside it.

:class:`RequestLogMiddleware` wraps the ingress's ASGI app: it counts the bytes in and out, sees the status, and
when the response is finished writes one line (through Serve's logger, so it lands in the Ingress replica's log
file, where Serve also stamps the request id on every line, in every deployment) and counts the request in
``instantid_requests_total``. Routes add what only they know with :func:`note` (the owner's key name, the
generation id, stage timings, sizes); the error handler adds the error code.

Prompts and images are never logged: a prompt appears only when the ingress config's ``log_prompts`` is on, and
then only through :func:`note_prompt`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics

logger = logging.getLogger("ray.serve")

EVENT = "instantid_request"  # the line's "event" field: what a log query selects on
_STATE_KEY = "instantid_log"  # where routes leave their fields, in the ASGI scope's request state
REQUEST_ID_HEADER = b"x-request-id"  # set by Serve's proxy on every request (the client's, or a new one)


def note(request: Request, **fields: Any) -> None:
    """Add fields to this request's log line (later calls win)."""
    request.scope.setdefault("state", {}).setdefault(_STATE_KEY, {}).update(fields)


def note_prompt(request: Request, prompt: str, negative_prompt: str | None, enabled: bool) -> None:
    """The prompts, only when the ingress is configured to log them (``ingress.log_prompts``)."""
    if enabled:
        note(request, prompt=prompt, negative_prompt=negative_prompt)


def seconds_by_stage(timings: Mapping[str, Any]) -> dict[str, float]:
    """``{stage: seconds}`` from a response's timings (StageTiming objects or their dicts), rounded to 1 ms."""
    out = {}
    for stage, timing in timings.items():
        seconds = timing["seconds"] if isinstance(timing, Mapping) else timing.seconds
        out[stage] = round(float(seconds), 3)
    return out


def log_line(fields: Mapping[str, Any]) -> str:
    """The line itself: compact JSON, keys in a stable order."""
    return json.dumps({"event": EVENT, **fields}, separators=(",", ":"), sort_keys=False, default=str)


class RequestLogMiddleware:
    """ASGI middleware: one log line and one counted request per HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        sizes = {"request_bytes": 0, "response_bytes": 0}
        status = 500

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["request_bytes"] += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sizes["response_bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        except BaseException:
            status = 500
            state.setdefault(_STATE_KEY, {}).setdefault("code", "internal_error")
            raise
        finally:
            self._finish(scope, state, status, sizes, time.perf_counter() - started)

    @staticmethod
    def _finish(scope: Scope, state: dict[str, Any], status: int, sizes: dict[str, int], seconds: float) -> None:
        noted = dict(state.get(_STATE_KEY, {}))
        code = noted.pop("code", None) or ("ok" if status < 400 else f"http_{status}")
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        headers = dict(scope.get("headers") or [])
        fields = {
            "request_id": state.get("request_id") or headers.get(REQUEST_ID_HEADER, b"").decode("latin-1") or None,
            "method": scope.get("method"),
            "route": route,
            "path": scope.get("path"),
            "status": status,
            "code": code,
            "seconds": round(seconds, 3),
            **sizes,
            **noted,
        }
        try:
            metrics.record_request(route, status, code)
            logger.info(log_line(fields))
        except Exception:  # logging must never break a response that was already sent
            logger.warning("request log failed", exc_info=True)
