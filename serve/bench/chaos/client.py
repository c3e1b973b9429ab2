"""The soak's HTTP client side: one exchange at a time, recorded whatever happens (an answer, an error body that
is not ours, a refused connection, a timeout), so the checker sees every request the service was sent."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx

from .hostile import Case, Target
from .records import Exchange, ExchangeKind, ImageRef

EXCERPT = 300  # characters of a body kept when it is not our JSON error


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _fill(exchange: Exchange, response: httpx.Response) -> None:
    """Status, error body or the generation a 2xx reported, from an answer whose body has been read."""
    exchange.status = response.status_code
    exchange.content_type = response.headers.get("content-type")
    exchange.retry_after = response.headers.get("retry-after")
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if 200 <= response.status_code < 300:
        if isinstance(body, dict) and exchange.kind in ("generate_json", "generate_multipart"):
            exchange.generation_id = body.get("id")
            exchange.images = [ImageRef(uri=i["uri"], bytes=i.get("bytes")) for i in body.get("images") or []]
        return
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        exchange.error = body["error"]
    else:
        exchange.body_excerpt = response.text[:EXCERPT]


class Recorder:
    """Numbers and records every exchange; ``exchanges`` is the client log."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        return next(self._seq)

    def new(self, kind: ExchangeKind, variant: str, scheduled_at: float, request_id: str | None) -> Exchange:
        now = time.time()
        exchange = Exchange(
            seq=self.next_seq(),
            kind=kind,
            variant=variant,
            request_id=request_id,
            scheduled_at=scheduled_at,
            sent_at=now,
            finished_at=now,
        )
        self.exchanges.append(exchange)
        return exchange

    async def send(
        self,
        client: httpx.AsyncClient,
        kind: ExchangeKind,
        variant: str,
        method: str,
        url: str,
        *,
        scheduled_at: float | None = None,
        request_id: str | None = None,
        timeout_s: float,
        **request: Any,
    ) -> tuple[Exchange, Any]:
        """One request with its own timeout; the exchange and the parsed JSON body (None unless a JSON answer)."""
        exchange = self.new(kind, variant, scheduled_at or time.time(), request_id)
        headers = dict(request.pop("headers", {}) or {})
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        body: Any = None
        try:
            response = await asyncio.wait_for(
                client.request(method, url, headers=headers, timeout=timeout_s, **request), timeout_s + 5
            )
            _fill(exchange, response)
            try:
                body = response.json()
            except ValueError:
                body = None
        except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
            exchange.transport_error = describe(exc)
        exchange.finished_at = time.time()
        return exchange, body

    async def hostile(self, case: Case, target: Target, scheduled_at: float) -> Exchange:
        """One corpus case (its own synchronous httpx call, with its own timeout) in a worker thread."""
        exchange = self.new("hostile", case.id, scheduled_at, None)
        statuses = case.status if isinstance(case.status, tuple) else ((case.status,) if case.status else None)
        codes = case.code if isinstance(case.code, tuple) else ((case.code,) if case.code else None)
        exchange.expected_status = list(statuses) if statuses else None
        exchange.expected_code = list(codes) if codes else None
        try:
            response = await asyncio.to_thread(case.send, target)
            _fill(exchange, response)
        except (httpx.HTTPError, OSError) as exc:
            exchange.transport_error = describe(exc)
        exchange.finished_at = time.time()
        return exchange
