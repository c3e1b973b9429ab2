"""At most one generation per (owner, Idempotency-Key), across every ingress replica.

Replicas share nothing but S3, so the S3 record is the lock: the first replica to *claim* the key (a
conditional create) runs the request; every other caller with the same key and the same request waits for
the record to turn ``done`` and replays its response. Same key, different request: refused. The claimant's
failure deletes the claim, so a retry runs afresh; a claimant that died without a word is presumed dead
once its claim is older than the lease, and the next caller takes the claim over (a conditional replace,
so two waiters cannot both take it).

The record store is any object with the four async operations of :class:`RecordStore`; the ingress adapts
the ResultStore deployment's handle to it, tests may adapt a plain ``IdempotencyRecords``. :func:`run_once` is what
the routes call: the key checked, scoped to its owner and route, and the guard's refusals turned into API errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pydantic import BaseModel
from ray.serve.handle import DeploymentHandle

from deployments.storage.conditional import ConditionalRecord

from .errors import ApiError

PENDING = "pending"
DONE = "done"


class RecordStore(Protocol):
    async def read(self, digest: str) -> ConditionalRecord | None: ...
    async def claim(self, digest: str, body: dict[str, Any]) -> str | None: ...
    async def replace(self, digest: str, body: dict[str, Any], etag: str) -> str | None: ...
    async def release(self, digest: str) -> None: ...


class IdempotencyKeyReused(Exception):
    """The key was first used with a different request (HTTP 422)."""


class IdempotencyInProgress(Exception):
    """The request holding the key did not finish while this caller waited (HTTP 409; retry later)."""


class IdempotencyGuard:
    """Runs ``produce`` at most once per digest among all guards sharing the record store.

    ``lease_s``: how long a ``pending`` claim is trusted; longer than any request can run (the ingress
    passes its request timeout plus a margin), since a live claimant's request must never be taken over.
    ``poll_s``: how often a waiting caller rereads the record. ``clock``: wall-clock seconds (claims are
    compared across machines, so this is time.time, not a monotonic clock).
    """

    def __init__(
        self,
        records: RecordStore,
        *,
        lease_s: float,
        poll_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.records = records
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.clock = clock
        # Callers of this replica already running a digest: a duplicate here awaits that call instead of
        # polling S3 (a burst of retries then costs S3 nothing).
        self._running: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}

    async def run(
        self,
        digest: str,
        fingerprint: str,
        produce: Callable[[], Awaitable[dict[str, Any]]],
        *,
        wait_s: float,
    ) -> tuple[dict[str, Any], bool]:
        """``(response, replayed)``: ``produce()``'s JSON response, or the first caller's (replayed=True).

        Raises :class:`IdempotencyKeyReused` for a different request under the same digest and
        :class:`IdempotencyInProgress` when the claimant is still running after ``wait_s``.
        """
        running = self._running.get(digest)
        if running is not None:
            try:
                first_fingerprint, response = await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this caller was cancelled, not the first one
                # the first caller was cancelled (its claim released): run on our own
            except IdempotencyKeyReused:
                pass  # the first caller's request was the odd one out; ours may match the record
            else:
                if first_fingerprint != fingerprint:
                    raise IdempotencyKeyReused(digest)
                return response, True
            return await self._run(digest, fingerprint, produce, wait_s)
        future: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._running[digest] = future
        try:
            response, replayed = await self._run(digest, fingerprint, produce, wait_s)
            future.set_result((fingerprint, response))
            return response, replayed
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()  # waiters see a cancellation, as a failed first call
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._running.pop(digest, None)

    async def _run(
        self, digest: str, fingerprint: str, produce: Callable[[], Awaitable[dict[str, Any]]], wait_s: float
    ) -> tuple[dict[str, Any], bool]:
        deadline = time.monotonic() + wait_s
        poll_s = self.poll_s
        while True:
            record = await self.records.read(digest)
            if record is None:
                etag = await self.records.claim(digest, self._pending(fingerprint))
                if etag is not None:
                    return await self._produce(digest, fingerprint, etag, produce), False
                continue  # another caller claimed it between our read and our claim: read theirs
            body = record.body
            if body.get("fingerprint") != fingerprint:
                raise IdempotencyKeyReused(digest)
            if body.get("state") == DONE:
                return body["response"], True
            if self.clock() - float(body.get("claimed_at", 0.0)) > self.lease_s:
                etag = await self.records.replace(digest, self._pending(fingerprint), record.etag)
                if etag is not None:  # the claimant is presumed dead: its request is ours now
                    return await self._produce(digest, fingerprint, etag, produce), False
                continue
            if time.monotonic() >= deadline:
                raise IdempotencyInProgress(digest)
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            poll_s = min(poll_s * 1.5, 2.0)  # a long generation is polled ever less often, at most every 2 s

    def _pending(self, fingerprint: str) -> dict[str, Any]:
        return {"state": PENDING, "fingerprint": fingerprint, "claimed_at": self.clock()}

    async def _produce(
        self, digest: str, fingerprint: str, etag: str, produce: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        try:
            response = await produce()
        except BaseException:
            # Free the key for a retry. Shielded: a cancelled request must still release its claim.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.records.release(digest))
            raise
        done = {"state": DONE, "fingerprint": fingerprint, "claimed_at": self.clock(), "response": response}
        try:
            # None: the claim was taken over after our lease ran out; our caller's result stands regardless.
            await self.records.replace(digest, done, etag)
        except Exception:
            # The result is stored, only its record is not: answer it, and free the key rather than leave a
            # claim that would hold retries off until the lease ends (a retry then generates again).
            with contextlib.suppress(Exception):
                await self.records.release(digest)
        return response


class StoreRecords:
    """The ResultStore deployment's idempotency-record methods, as a :class:`RecordStore`."""

    def __init__(self, store: DeploymentHandle) -> None:
        self.store = store

    async def read(self, digest: str) -> ConditionalRecord | None:
        return await self.store.read_idempotency.remote(digest)

    async def claim(self, digest: str, body: dict[str, Any]) -> str | None:
        return await self.store.claim_idempotency.remote(digest, body)

    async def replace(self, digest: str, body: dict[str, Any], etag: str) -> str | None:
        return await self.store.replace_idempotency.remote(digest, body, etag)

    async def release(self, digest: str) -> None:
        await self.store.release_idempotency.remote(digest)


_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def run_once(
    guard: IdempotencyGuard,
    scope: str,
    owner: str,
    key: str,
    request: BaseModel,
    produce: Callable[[], Awaitable[dict[str, Any]]],
    *,
    wait_s: float,
    retry_after_s: int,
) -> tuple[dict[str, Any], bool]:
    """``produce()`` at most once per (``scope``, ``owner``, ``key``) among all replicas: ``(response, replayed)``.
    ``scope`` keeps routes apart (``jobs``; generations use none).

    The same key with a different request is a 422; a repeat that outwaits the first call (``wait_s``) is a 409
    with ``Retry-After: retry_after_s``."""
    if not _KEY.match(key):
        raise ApiError(422, "invalid_parameter", "Idempotency-Key must be 1-128 characters [A-Za-z0-9._:-]")
    scoped = f"{scope}\0{owner}\0{key}" if scope else f"{owner}\0{key}"  # generations: no scope (records predate it)
    digest = hashlib.sha256(scoped.encode()).hexdigest()
    fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
    try:
        return await guard.run(digest, fingerprint, produce, wait_s=wait_s)
    except IdempotencyKeyReused:
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different request"
        ) from None
    except IdempotencyInProgress:
        raise ApiError(
            409,
            "idempotency_key_in_progress",
            "the request that first used this Idempotency-Key is still running; retry later",
            {"Retry-After": str(retry_after_s)},
        ) from None
