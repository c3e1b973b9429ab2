"""Idempotency across replicas: conditional S3 records (real SeaweedFS) and the claim/wait/replay protocol.

Each "replica" below is an IdempotencyGuard with its own S3 client and no shared memory, so whatever keeps
them from generating twice can only be S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import pytest

from deployments.storage.conditional import ConditionalRecord
from deployments.storage.idempotency_records import IdempotencyRecords
from serve.ingress.idempotency import DONE, PENDING, IdempotencyGuard, IdempotencyInProgress, IdempotencyKeyReused
from serve.tools.seaweed import EmbeddedS3

pytestmark = pytest.mark.slow  # real SeaweedFS


def new_digest() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


@pytest.fixture()
def records(embedded_s3: EmbeddedS3) -> IdempotencyRecords:
    settings = embedded_s3.settings(prefix=f"idem-{uuid.uuid4().hex[:8]}")
    records = IdempotencyRecords(embedded_s3.client(settings), settings)
    records.client.head_bucket(Bucket=settings.bucket)  # the session store has created the bucket
    return records


class Replica:
    """An ingress replica's view: its own S3 client, the blocking calls off the event loop."""

    def __init__(self, embedded_s3: EmbeddedS3, records: IdempotencyRecords) -> None:
        self.records = IdempotencyRecords(embedded_s3.client(records.settings), records.settings)

    async def read(self, digest: str) -> ConditionalRecord | None:
        return await asyncio.to_thread(self.records.read, digest)

    async def claim(self, digest: str, body: dict[str, Any]) -> str | None:
        return await asyncio.to_thread(self.records.claim, digest, body)

    async def replace(self, digest: str, body: dict[str, Any], etag: str) -> str | None:
        return await asyncio.to_thread(self.records.replace, digest, body, etag)

    async def release(self, digest: str) -> None:
        await asyncio.to_thread(self.records.release, digest)


class Generator:
    """A produce() that counts its runs and can be held open or made to fail."""

    def __init__(self, seconds: float = 0.3, fail: bool = False) -> None:
        self.runs = 0
        self.seconds = seconds
        self.fail = fail

    async def __call__(self) -> dict[str, Any]:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the denoiser failed")
        return {"id": f"generation-{self.runs}", "images": [{"uri": "s3://bucket/x.png"}]}


def guards(embedded_s3: EmbeddedS3, records: IdempotencyRecords, n: int, **kwargs: Any) -> list[IdempotencyGuard]:
    return [
        IdempotencyGuard(Replica(embedded_s3, records), poll_s=0.05, **{"lease_s": 600, **kwargs}) for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------- S3 operations


def test_claim_is_exclusive_and_replace_needs_the_current_etag(records: IdempotencyRecords) -> None:
    digest = new_digest()
    first = records.claim(digest, {"state": PENDING, "fingerprint": "a"})
    assert first is not None
    assert records.claim(digest, {"state": PENDING, "fingerprint": "b"}) is None  # S3 refused the second create
    stored = records.read(digest)
    assert stored is not None and stored.body["fingerprint"] == "a" and stored.etag == first

    assert records.replace(digest, {"state": DONE, "fingerprint": "b"}, '"0123456789abcdef"') is None
    second = records.replace(digest, {"state": DONE, "fingerprint": "a"}, first)
    assert second is not None and second != first
    assert records.replace(digest, {"state": DONE, "fingerprint": "a"}, first) is None  # that version is gone
    assert records.read(digest).body == {"state": DONE, "fingerprint": "a"}

    records.release(digest)
    assert records.read(digest) is None
    assert records.replace(digest, {"state": DONE}, second) is None  # deleted: nothing to replace
    records.release(digest)  # releasing twice is harmless
    with pytest.raises(ValueError):
        records.key("../../etc/passwd")


# ---------------------------------------------------------------------------------------- protocol


def test_replicas_racing_on_one_key_generate_once_and_all_get_that_result(
    embedded_s3: EmbeddedS3, records: IdempotencyRecords
) -> None:
    digest, produce = new_digest(), Generator(seconds=0.5)
    replicas = guards(embedded_s3, records, 3)

    async def race() -> list[tuple[dict[str, Any], bool]]:
        calls = [g.run(digest, "same-request", produce, wait_s=30) for g in replicas for _ in range(2)]
        return await asyncio.gather(*calls)

    results = asyncio.run(race())
    assert produce.runs == 1
    assert {r[0]["id"] for r in results} == {"generation-1"}
    assert sorted(replayed for _, replayed in results) == [False, True, True, True, True, True]
    record = records.read(digest)
    assert record.body["state"] == DONE and record.body["response"]["id"] == "generation-1"
    # A later retry replays from S3 without running anything.
    again = asyncio.run(replicas[0].run(digest, "same-request", produce, wait_s=1))
    assert again == ({"id": "generation-1", "images": [{"uri": "s3://bucket/x.png"}]}, True) and produce.runs == 1


class CountingStore(Replica):
    """A replica whose S3 calls are counted."""

    def __init__(self, embedded_s3: EmbeddedS3, records: IdempotencyRecords) -> None:
        super().__init__(embedded_s3, records)
        self.calls = 0

    async def read(self, digest: str) -> ConditionalRecord | None:
        self.calls += 1
        return await super().read(digest)

    async def claim(self, digest: str, body: dict[str, Any]) -> str | None:
        self.calls += 1
        return await super().claim(digest, body)


def test_duplicates_on_one_replica_wait_in_memory_not_on_s3(
    embedded_s3: EmbeddedS3, records: IdempotencyRecords
) -> None:
    digest, produce = new_digest(), Generator(seconds=0.5)
    store = CountingStore(embedded_s3, records)
    guard = IdempotencyGuard(store, lease_s=600, poll_s=0.01)

    async def burst() -> list[tuple[dict[str, Any], bool]]:
        return await asyncio.gather(*(guard.run(digest, "request", produce, wait_s=30) for _ in range(20)))

    results = asyncio.run(burst())
    assert produce.runs == 1 and sum(not replayed for _, replayed in results) == 1
    assert store.calls == 2  # the first caller's read and claim; 19 duplicates polled nothing
    assert guard._running == {}


def test_same_key_with_another_request_is_refused_while_running_and_after(
    embedded_s3: EmbeddedS3, records: IdempotencyRecords
) -> None:
    digest, produce = new_digest(), Generator(seconds=0.5)
    first, second = guards(embedded_s3, records, 2)

    async def scenario() -> None:
        running = asyncio.create_task(first.run(digest, "request-a", produce, wait_s=30))
        while records.read(digest) is None:
            await asyncio.sleep(0.02)
        with pytest.raises(IdempotencyKeyReused):  # pending: refused at once, not after waiting
            await second.run(digest, "request-b", produce, wait_s=30)
        assert (await running)[1] is False
        with pytest.raises(IdempotencyKeyReused):  # done: still refused
            await second.run(digest, "request-b", produce, wait_s=30)

    asyncio.run(scenario())
    assert produce.runs == 1


def test_a_failed_first_request_frees_the_key_for_a_retry(embedded_s3: EmbeddedS3, records: IdempotencyRecords) -> None:
    digest = new_digest()
    (guard,) = guards(embedded_s3, records, 1)
    failing = Generator(seconds=0.05, fail=True)
    with pytest.raises(RuntimeError, match="denoiser failed"):
        asyncio.run(guard.run(digest, "request", failing, wait_s=5))
    assert records.read(digest) is None
    working = Generator(seconds=0.05)
    response, replayed = asyncio.run(guard.run(digest, "request", working, wait_s=5))
    assert (response["id"], replayed, working.runs) == ("generation-1", False, 1)


def test_a_cancelled_first_request_frees_the_key(embedded_s3: EmbeddedS3, records: IdempotencyRecords) -> None:
    digest = new_digest()
    (guard,) = guards(embedded_s3, records, 1)

    retry = Generator(seconds=0.05)

    async def cancel_midway() -> tuple[dict[str, Any], bool]:
        task = asyncio.create_task(guard.run(digest, "request", Generator(seconds=5), wait_s=5))
        while records.read(digest) is None:
            await asyncio.sleep(0.02)
        waiter = asyncio.create_task(guard.run(digest, "request", retry, wait_s=5))  # waits on the first
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await waiter  # the waiter is not cancelled with it: it runs the request itself

    response, replayed = asyncio.run(cancel_midway())
    assert (response["id"], replayed, retry.runs) == ("generation-1", False, 1)
    assert records.read(digest).body["state"] == DONE


def test_a_claim_older_than_the_lease_is_taken_over_by_exactly_one_caller(
    embedded_s3: EmbeddedS3, records: IdempotencyRecords
) -> None:
    digest, produce = new_digest(), Generator(seconds=0.3)
    # A claimant that died 20 minutes ago (its clock said so when it claimed).
    records.claim(digest, {"state": PENDING, "fingerprint": "request", "claimed_at": 1_000.0})
    replicas = guards(embedded_s3, records, 3, lease_s=600, clock=lambda: 2_200.0)

    async def race() -> list[tuple[dict[str, Any], bool]]:
        return await asyncio.gather(*(g.run(digest, "request", produce, wait_s=30) for g in replicas))

    results = asyncio.run(race())
    assert produce.runs == 1
    assert sorted(replayed for _, replayed in results) == [False, True, True]
    assert records.read(digest).body["state"] == DONE


def test_a_live_claim_is_waited_for_then_answered_409(embedded_s3: EmbeddedS3, records: IdempotencyRecords) -> None:
    digest, produce = new_digest(), Generator()
    records.claim(digest, {"state": PENDING, "fingerprint": "request", "claimed_at": 2_000.0})
    (guard,) = guards(embedded_s3, records, 1, lease_s=600, clock=lambda: 2_100.0)  # 100 s old: alive
    with pytest.raises(IdempotencyInProgress):
        asyncio.run(guard.run(digest, "request", produce, wait_s=0.3))
    assert produce.runs == 0
    assert records.read(digest).body["state"] == PENDING  # the live claim is untouched
