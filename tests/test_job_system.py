"""The job system without Ray or SeaweedFS, fast: conditional job records, leases on a fake clock, the sweep's
takeover and its removal of what failed submissions left, the run's outcome and its webhook's, the event stream's
ids, admission order and base-slot eviction.

The narrow fakes sit at the outer boundaries only: an in-memory S3 client that honours ``If-Match`` /
``If-None-Match`` as S3 does (412 when the condition fails), the event channel (an object with the actor's methods),
and Serve's multiplexed LRU. Everything between them (``JobRecords``, ``JobStates``, ``Leases``, ``JobRunner``,
``Admission``, ``BaseSlots``) is the real code.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from deployments.generation.messages import JobTicket
from deployments.job_events import JobEvent, JobProgress, JobStatus
from deployments.storage.generations import StorageError, generation_time
from deployments.storage.job_records import JobRecords
from deployments.storage.s3 import S3Settings
from serve.jobs.admission import Admission, SlotsStalled
from serve.jobs.events import SharedFeeds, follow_events
from serve.jobs.leases import Leases
from serve.jobs.runner import JobRunner
from serve.jobs.state import JobsConfig, JobState, JobStates, now_iso
from serve.jobs.webhooks import WebhookSettings
from serve.schemas import GenerateRequest, GenerateResponse

SETTINGS = S3Settings(bucket="jobs-test", prefix="generations")
REPLICA, OTHER = "replica-a", "replica-b"


class ConditionalS3:
    """An in-memory S3 client with S3's conditional writes: ``IfNoneMatch="*"`` creates only, ``IfMatch=etag``
    replaces only that version; otherwise a 412 ``PreconditionFailed``. ``failing(operation, key)`` says when S3 is
    unreachable for a call (``put``, ``get``, ``delete``, ``list``): it raises botocore's connection error."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.puts: list[dict[str, Any]] = []
        self.failing: Callable[[str, str], bool] = lambda operation, key: False

    def _reach(self, operation: str, key: str) -> None:
        if self.failing(operation, key):
            raise EndpointConnectionError(endpoint_url="http://s3.test")

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **kwargs: Any) -> dict[str, Any]:
        self.puts.append({"Key": Key, **kwargs})
        self._reach("put", Key)
        current = self.objects.get(Key)
        if kwargs.get("IfNoneMatch") == "*" and current is not None:
            raise _error(412, "PreconditionFailed")
        if "IfMatch" in kwargs and (current is None or current[1] != kwargs["IfMatch"]):
            raise _error(412 if current is not None else 404, "PreconditionFailed" if current else "NoSuchKey")
        etag = '"' + hashlib.md5(Body + Key.encode()).hexdigest() + f'-{len(self.puts)}"'
        self.objects[Key] = (bytes(Body), etag)
        return {"ETag": etag}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._reach("get", Key)
        if Key not in self.objects:
            raise _error(404, "NoSuchKey")
        body, etag = self.objects[Key]
        return {"Body": io.BytesIO(body), "ETag": etag}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._reach("delete", Key)
        self.objects.pop(Key, None)
        return {}

    def get_paginator(self, name: str) -> Any:
        objects, reach = self.objects, self._reach

        class Pages:
            def paginate(self, *, Bucket: str, Prefix: str) -> list[dict[str, Any]]:
                reach("list", Prefix)
                return [{"Contents": [{"Key": key} for key in sorted(objects) if key.startswith(Prefix)]}]

        return Pages()


def _error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def is_state(key: str) -> bool:
    """``jobs/<id>.json``, a job's state (not its request)."""
    return key.startswith(f"{SETTINGS.prefix}/jobs/") and key.endswith(".json") and not is_request(key)


def is_request(key: str) -> bool:
    return key.endswith(".request.json")


def stored_request_id(s3: ConditionalS3) -> str:
    """The id of the one job whose request was written (a failed submission never answers it)."""
    (key,) = {put["Key"] for put in s3.puts if is_request(put["Key"])}
    return key.rsplit("/", 1)[1].removesuffix(".request.json")


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Remote:
    def __init__(self, function: Any) -> None:
        self.function = function

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.function(*args, **kwargs))
        return future


class Channel:
    """The event channel's methods as a runner calls them (``.remote`` returns an awaitable); it keeps the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.cancelled: set[str] = set()
        self.publish = _Remote(
            lambda job_id, kind, data=None, attempt=None: self.events.append((job_id, kind, data or {}))
        )
        self.cancel = _Remote(self.cancelled.add)
        self.progress = _Remote(lambda job_id: JobProgress())
        self.want_previews = _Remote(lambda job_id: None)

    def kinds(self, job_id: str) -> list[str]:
        return [kind for job, kind, _ in self.events if job == job_id]


def request(**fields: Any) -> GenerateRequest:
    return GenerateRequest(prompt="a portrait", face_image_b64="aGVsbG8=", **fields)


class Harness:
    """One replica's JobRunner over the shared fake S3, on a fake clock; ``generate`` is scripted."""

    def __init__(
        self,
        s3: ConditionalS3,
        clock: FakeClock,
        replica: str = REPLICA,
        lease_s: float = 30.0,
        webhooks: WebhookSettings | None = None,
        webhook_secret: str | None = None,
        service: str = "instantid",
    ) -> None:
        self.channel = Channel()
        self.calls: list[tuple[str, str]] = []  # (job id, request prompt)
        self.attempts: list[int] = []  # the attempt each generation was told it is
        self.release = asyncio.Event()  # set to let a scripted generation finish
        self.release.set()
        self.runner = JobRunner(
            states=JobStates(JobRecords(s3, SETTINGS)),
            channel=self.channel,
            admission=Admission(4),
            leases=Leases(lease_s, clock),
            replica=replica,
            service=service,
            config=JobsConfig(lease_s=lease_s, sweep_interval_s=3600),
            request_timeout_s=60,
            generate=self.generate,
            delete_generation=self.delete,
            webhook_secret=lambda owner: webhook_secret,
            webhooks=webhooks or WebhookSettings(),
            owner_scoped=False,
        )
        self.deleted: list[str] = []

    async def generate(self, req: GenerateRequest, request_id: str, owner: str, job: JobTicket) -> GenerateResponse:
        self.calls.append((job.id, req.prompt))
        self.attempts.append(job.attempt)
        await self.release.wait()
        return GenerateResponse.model_validate(_response(job.id, request_id))

    async def delete(self, job_id: str) -> int:
        self.deleted.append(job_id)
        return 1

    async def finished(self, job_id: str) -> None:
        for _ in range(200):
            if job_id not in self.runner._runs:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"job {job_id} still running")


def _response(job_id: str, request_id: str) -> dict[str, Any]:
    timing = {"start": 0.0, "end": 1.0, "seconds": 1.0}
    return {
        "id": job_id,
        "request_id": request_id,
        "images": [],
        "seed": 1,
        "face": {"box": [0, 0, 1, 1], "keypoints": [[0, 0]] * 5, "score": 1.0},
        "faces": [],
        "model": {"base": "sdxl", "loras": [], "mode": None},
        "timings": {"total": timing},
        "parameters": {},
    }


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ----------------------------------------------------------------------------------------------- leases


def test_a_lease_is_held_until_its_end_and_expired_after() -> None:
    clock = FakeClock()
    leases = Leases(30.0, clock)
    lease = leases.grant(REPLICA)
    assert lease.holder == REPLICA and lease.expires_at == clock.now + 30.0
    assert not leases.expired(lease)
    clock.now += 29.9
    assert not leases.expired(lease)
    clock.now += 0.2
    assert leases.expired(lease)
    assert leases.expired(None)  # nobody holds it


# ------------------------------------------------------------------------------------------ job records


def test_a_replace_against_a_stale_version_loses() -> None:
    """Two replicas read the same version of a job; the first write wins and the second, made against the version
    it read, is refused (If-Match), so no update is lost unseen."""
    s3 = ConditionalS3()
    records = JobRecords(s3, SETTINGS)
    job_id = "20261207T120000Z-0123456789abcdef"
    records.create(job_id, {"status": "queued"}, {"prompt": "x"})
    first, second = records.read(job_id), records.read(job_id)
    assert first is not None and second is not None and first.etag == second.etag
    assert records.replace(job_id, {"status": "running"}, first.etag) is not None
    assert records.replace(job_id, {"status": "cancelled"}, second.etag, finished=True) is None
    assert records.read(job_id).body == {"status": "running"}
    assert records.active() == [job_id]  # the losing terminal write did not retire the job
    assert all(("IfMatch" in put) or ("IfNoneMatch" in put) for put in s3.puts if put["Key"].endswith(f"{job_id}.json"))


def test_a_finished_job_is_no_longer_swept_and_its_request_is_gone() -> None:
    s3 = ConditionalS3()
    records = JobRecords(s3, SETTINGS)
    job_id = "20261207T120000Z-00000000000000aa"
    records.create(job_id, {"status": "queued"}, {"prompt": "with a photo"})
    etag = records.read(job_id).etag
    assert records.replace(job_id, {"status": "succeeded"}, etag, finished=True) is not None
    assert records.active() == [] and records.read_request(job_id) is None
    with pytest.raises(Exception, match="exists already"):
        records.create(job_id, {"status": "queued"}, {})


def test_a_create_whose_state_write_fails_removes_what_it_wrote() -> None:
    """S3 fails the state write (the client gets a 503): the request, which may hold a face photo, and the marker
    are removed again, so nothing is left that no job points to."""
    s3 = ConditionalS3()
    s3.failing = lambda operation, key: operation == "put" and is_state(key)
    records = JobRecords(s3, SETTINGS)
    job_id = "20261207T120000Z-00000000000000bb"
    with pytest.raises(StorageError, match="could not"):
        records.create(job_id, {"status": "queued"}, {"prompt": "with a photo", "face_image_b64": "aGVsbG8="})
    assert any(is_request(put["Key"]) for put in s3.puts)  # it was written...
    assert s3.objects == {}  # ...and is gone, with the marker


def test_a_create_whose_state_landed_unanswered_removes_it_too() -> None:
    """A write may land although its answer is lost: the state this create wrote goes as well (the client was told
    the job does not exist), while a state another writer made (here a finished job's) is left as it was."""

    class LostAnswer(ConditionalS3):
        def put_object(self, **kwargs: Any) -> dict[str, Any]:
            answer = super().put_object(**kwargs)
            if is_state(kwargs["Key"]):
                raise EndpointConnectionError(endpoint_url="http://s3.test")
            return answer

    s3 = LostAnswer()
    records = JobRecords(s3, SETTINGS)
    with pytest.raises(StorageError):
        records.create("20261207T120000Z-00000000000000cc", {"status": "queued"}, {"prompt": "x"})
    assert s3.objects == {}

    plain = ConditionalS3()
    records = JobRecords(plain, SETTINGS)
    job_id = "20261207T120000Z-00000000000000dd"
    records.create(job_id, {"status": "queued"}, {"prompt": "first"})
    records.replace(job_id, {"status": "failed", "by": "the first"}, records.read(job_id).etag, finished=True)
    with pytest.raises(StorageError, match="exists already"):
        records.create(job_id, {"status": "queued", "by": "the second"}, {"prompt": "second"})
    assert records.read(job_id).body == {"status": "failed", "by": "the first"}
    assert records.active() == [] and records.read_request(job_id) is None


# --------------------------------------------------------------------------------------------- the runner


def test_a_job_runs_to_its_outcome_once_and_publishes_it() -> None:
    async def scenario() -> None:
        harness = Harness(ConditionalS3(), FakeClock())
        accepted = await harness.runner.submit(request(), "rid", "alice", "")
        await harness.finished(accepted.id)
        state = await harness.runner.states.read(accepted.id)
        assert state.status is JobStatus.SUCCEEDED and state.lease is None and state.attempts == 1
        assert state.result["id"] == accepted.id
        assert harness.calls == [(accepted.id, "a portrait")]
        kinds = harness.channel.kinds(accepted.id)
        assert kinds[-1] == "succeeded" and kinds.count("succeeded") == 1
        assert await harness.runner.states.active() == []

    run(scenario())


def test_the_sweep_takes_over_only_jobs_whose_lease_expired() -> None:
    """A job held by a replica that stopped renewing is taken over once its lease has ended, not before."""

    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        dead = Harness(s3, clock, replica=OTHER)
        dead.release.clear()  # its generation never finishes: the replica "died" mid-run
        accepted = await dead.runner.submit(request(), "rid", "alice", "")
        await asyncio.sleep(0.05)
        for task in list(dead.runner._runs.values()):
            task.cancel()  # the process is gone: no renewal, no outcome
        await asyncio.sleep(0.01)
        alive = Harness(s3, clock)
        clock.now += 29.0  # within the 30 s lease: still the dead replica's
        assert await alive.runner.sweep() == []
        state = await alive.runner.states.read(accepted.id)
        assert state.lease.holder == OTHER and state.attempts == 1
        clock.now += 2.0  # past its end
        assert await alive.runner.sweep() == [accepted.id]
        await alive.finished(accepted.id)
        state = await alive.runner.states.read(accepted.id)
        assert state.status is JobStatus.SUCCEEDED and state.attempts == 2
        assert alive.calls == [(accepted.id, "a portrait")]  # the stored request, run again
        assert alive.attempts == [2]  # as the second attempt: the first one's run, wherever it is, stops
        assert await alive.runner.sweep() == []  # finished: nothing left to take

    run(scenario())


def test_the_sweep_never_takes_over_another_applications_job() -> None:
    """Two Serve applications storing jobs under one bucket and prefix: an expired job of one is taken over by that
    application's replicas only, never run under the other's config (its models, safety policy and API keys)."""

    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        dead = Harness(s3, clock, replica=OTHER, service="public")
        dead.release.clear()
        accepted = await dead.runner.submit(request(), "rid", "alice", "")
        await asyncio.sleep(0.05)
        for task in list(dead.runner._runs.values()):
            task.cancel()
        await asyncio.sleep(0.01)
        assert (await dead.runner.states.read(accepted.id)).service == "public"
        clock.now += 31.0  # its lease has ended
        stranger = Harness(s3, clock, replica="stranger", service="internal")
        assert await stranger.runner.sweep() == []
        state = await stranger.runner.states.read(accepted.id)
        assert state.lease.holder == OTHER and state.attempts == 1 and stranger.calls == []
        sibling = Harness(s3, clock, service="public")
        assert await sibling.runner.sweep() == [accepted.id]
        await sibling.finished(accepted.id)
        state = await sibling.runner.states.read(accepted.id)
        assert state.status is JobStatus.SUCCEEDED and state.attempts == 2 and state.service == "public"

    run(scenario())


def test_a_run_that_lost_its_lease_stops_and_writes_nothing() -> None:
    """When another replica took the job over, the orphaned run is cancelled at its next renewal and never writes
    an outcome over the new holder's."""

    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        orphan = Harness(s3, clock, lease_s=3.0)  # renews every second
        orphan.release.clear()
        accepted = await orphan.runner.submit(request(), "rid", "alice", "")
        await asyncio.sleep(0.05)
        # Another replica takes the job over (as its sweep would after the orphan missed its renewals).
        taker = Harness(s3, clock, replica=OTHER, lease_s=3.0)
        taker.release.clear()

        def take(current: Any) -> bool:
            current.lease = taker.runner.leases.grant(OTHER)
            current.attempts += 1
            return True

        await taker.runner.states.update(accepted.id, take)
        await orphan.finished(accepted.id)  # stopped by its lease keeper within ~1 s
        state = await orphan.runner.states.read(accepted.id)
        assert state.status is not JobStatus.SUCCEEDED and state.lease.holder == OTHER and state.attempts == 2
        assert "succeeded" not in orphan.channel.kinds(accepted.id)

    run(scenario())


def test_cancelling_a_running_job_ends_it_cancelled_once() -> None:
    async def scenario() -> None:
        harness = Harness(ConditionalS3(), FakeClock())
        harness.release.clear()
        accepted = await harness.runner.submit(request(), "rid", "alice", "")
        await asyncio.sleep(0.05)
        body = await harness.runner.cancel(accepted.id, "alice")
        assert body["status"] == "cancelled"
        await harness.finished(accepted.id)
        state = await harness.runner.states.read(accepted.id)
        assert state.status is JobStatus.CANCELLED and state.result is None
        assert harness.channel.kinds(accepted.id).count("cancelled") == 1
        assert accepted.id in harness.channel.cancelled  # the denoiser's flag
        assert await harness.runner.cancel(accepted.id, "alice") is None  # finished: deleted instead
        assert await harness.runner.states.read(accepted.id) is None

    run(scenario())


def test_an_unreadable_stored_request_fails_the_job_instead_of_looping() -> None:
    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        harness = Harness(s3, clock)
        harness.release.clear()
        accepted = await harness.runner.submit(request(), "rid", "alice", "")
        await asyncio.sleep(0.05)
        for task in list(harness.runner._runs.values()):
            task.cancel()
        await asyncio.sleep(0.01)
        key = f"{SETTINGS.prefix}/jobs/{accepted.id}.request.json"
        s3.objects[key] = (b'{"prompt": ""}', s3.objects[key][1])  # no longer a valid request
        clock.now += 31
        other = Harness(s3, clock, replica=OTHER)
        assert await other.runner.sweep() == []
        state = await other.runner.states.read(accepted.id)
        assert state.status is JobStatus.FAILED and state.error.code == "internal_error"
        assert other.calls == []

    run(scenario())


def test_the_sweep_removes_a_failed_submissions_leftovers_once_older_than_a_lease() -> None:
    """S3 stalls during a submission and during its clean-up: the request (with the face photo) stays, pointed to by
    no state. Once S3 is back, a sweep leaves it alone while it could still be a create in progress on another
    replica (its id is younger than a lease), then removes it; the job never runs."""

    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        harness = Harness(s3, clock)
        s3.failing = lambda operation, key: operation == "delete" or (operation == "put" and is_state(key))
        with pytest.raises(StorageError):
            await harness.runner.submit(request(), "rid", "alice", "")
        job_id = stored_request_id(s3)
        s3.failing = lambda operation, key: False  # S3 is back
        assert await harness.runner.states.read_request(job_id) is not None
        made = generation_time(job_id).timestamp()  # the wall-clock second the id was made
        other = Harness(s3, clock, replica=OTHER)
        clock.now = made + 29.0
        assert await other.runner.sweep() == []
        assert await other.runner.states.read_request(job_id) is not None  # younger than a lease: left alone
        clock.now = made + 31.0
        assert await other.runner.sweep() == []
        assert await other.runner.states.read_request(job_id) is None
        assert await other.runner.states.active() == []
        state = await other.runner.states.read(job_id)  # the failed job that took the state's place
        assert state.status is JobStatus.FAILED and state.error.code == "storage_unavailable"
        assert not any(is_request(key) for key in s3.objects)
        assert other.calls == [] and harness.calls == []

    run(scenario())


def test_a_create_still_under_way_after_the_grace_cannot_complete() -> None:
    """A replica whose state write stalls past the grace: the sweep on another replica removes the request, and the
    stalled write, once it arrives, loses to the failed state the sweep put first (If-None-Match), so no job is left
    running without its request or its marker."""

    async def scenario() -> None:
        s3, clock = ConditionalS3(), FakeClock()
        harness = Harness(s3, clock)
        gate, stalled = threading.Event(), threading.Event()

        def stall_first_state_write(operation: str, key: str) -> bool:
            if operation == "put" and is_state(key) and not stalled.is_set():
                stalled.set()
                gate.wait(5)
            return False

        s3.failing = stall_first_state_write
        submission = asyncio.create_task(harness.runner.submit(request(), "rid", "alice", ""))
        for _ in range(200):
            if stalled.is_set():
                break
            await asyncio.sleep(0.01)
        job_id = stored_request_id(s3)
        clock.now = generation_time(job_id).timestamp() + 31.0
        other = Harness(s3, clock, replica=OTHER)
        await other.runner.sweep()
        assert await other.runner.states.read_request(job_id) is None
        gate.set()
        with pytest.raises(StorageError):
            await submission
        state = await other.runner.states.read(job_id)
        assert state.status is JobStatus.FAILED and state.error.code == "storage_unavailable"
        assert not any(is_request(key) for key in s3.objects) and await other.runner.states.active() == []
        assert harness.calls == [] and harness.runner._runs == {}

    run(scenario())


def test_a_finished_jobs_request_whose_removal_failed_is_removed_by_the_sweep() -> None:
    """The request goes before the marker: when its removal fails, the job stays listed and a sweep finishes it."""

    async def scenario() -> None:
        s3 = ConditionalS3()
        harness = Harness(s3, FakeClock())
        s3.failing = lambda operation, key: operation == "delete" and is_request(key)
        accepted = await harness.runner.submit(request(), "rid", "alice", "")
        await harness.finished(accepted.id)
        assert (await harness.runner.states.read(accepted.id)).status is JobStatus.SUCCEEDED
        assert await harness.runner.states.read_request(accepted.id) is not None
        assert await harness.runner.states.active() == [accepted.id]
        s3.failing = lambda operation, key: False
        assert await harness.runner.sweep() == []
        assert await harness.runner.states.read_request(accepted.id) is None
        assert await harness.runner.states.active() == []
        assert (await harness.runner.states.read(accepted.id)).status is JobStatus.SUCCEEDED

    run(scenario())


def test_deleting_a_finished_job_while_s3_fails_answers_an_error_and_keeps_it_findable() -> None:
    """A DELETE that could not remove the request says so (503) and leaves the state and marker, so the job can be
    deleted again and is swept meanwhile, instead of leaving the request behind unreachable."""

    async def scenario() -> None:
        s3 = ConditionalS3()
        harness = Harness(s3, FakeClock())
        accepted = await harness.runner.submit(request(), "rid", "alice", "")
        await harness.finished(accepted.id)
        s3.failing = lambda operation, key: operation == "delete" and is_request(key)
        with pytest.raises(StorageError):
            await harness.runner.cancel(accepted.id, "alice")
        assert (await harness.runner.states.read(accepted.id)).status is JobStatus.SUCCEEDED
        s3.failing = lambda operation, key: False
        assert await harness.runner.cancel(accepted.id, "alice") is None
        assert s3.objects == {}

    run(scenario())


# --------------------------------------------------------------------------------------------- webhooks


def _closed_port() -> int:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


WEBHOOK_SECRET = "whsec-0123456789abcdef"


@pytest.mark.parametrize(
    ("allowed", "host", "secret", "reason"),
    [
        (["127.0.0.1"], "127.0.0.1:{port}", WEBHOOK_SECRET, "ConnectError"),  # tried, nobody listening
        (["hooks.example.com"], "other.example.org:8443", WEBHOOK_SECRET, "other.example.org"),  # the list changed
        (["127.0.0.1"], "127.0.0.1:{port}", None, "no signing secret"),  # the owner's key was revoked since
    ],
    ids=["unreachable", "refused", "no-secret"],
)
def test_an_undelivered_webhook_says_why_in_the_job_body(
    allowed: list[str], host: str, secret: str | None, reason: str
) -> None:
    """The reason names at most the host: never the URL's path or query (a token?) nor the signing secret."""
    settings = WebhookSettings(
        allowed_hosts=allowed, allow_private_addresses=True, allow_http=True, max_attempts=1, timeout_s=2
    )
    url = f"http://{host.format(port=_closed_port())}/private/hook?token=query-secret"

    async def scenario() -> None:
        harness = Harness(ConditionalS3(), FakeClock(), webhooks=settings, webhook_secret=secret)
        accepted = await harness.runner.submit(request(callback_url=url), "rid", "alice", "")
        await harness.finished(accepted.id)
        webhook = (await harness.runner.get(accepted.id, "alice"))["webhook"]
        assert webhook["delivered"] is False and webhook["status"] is None
        assert reason in webhook["error"]
        for private in ("query-secret", "/private/hook", secret or url, url):
            assert private not in webhook["error"]
        state = await harness.runner.states.read(accepted.id)
        assert state.webhook is not None and state.webhook.error == webhook["error"]  # stored with the outcome

    run(scenario())


# ------------------------------------------------------------------------------------------- event ids


class EventChannel:
    """The event side of the channel: the job's numbered events (all published already), ``progress`` with the last
    id, and ``wait`` answering those after an id (a short sleep first when there are none, as a long poll would)."""

    def __init__(self, kinds: list[str]) -> None:
        self.events = [JobEvent(seq, kind, {"n": seq}, 0.0) for seq, kind in enumerate(kinds, start=1)]
        self.progress = _Remote(lambda job_id: JobProgress(stage="denoise", last_event_id=len(self.events)))
        self.wait = self

    async def remote(self, job_id: str, after: int, timeout_s: float) -> list[JobEvent]:
        fresh = [event for event in self.events if event.seq > after]
        if not fresh:
            await asyncio.sleep(min(timeout_s, 0.01))
        return fresh


def _ids(chunks: list[bytes]) -> list[tuple[str, int | None]]:
    """(event type, id) of each event of a stream, heartbeats left out."""
    events = []
    for chunk in chunks:
        if chunk.startswith(b":"):
            continue
        fields = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
        events.append((fields["event"], int(fields["id"]) if "id" in fields else None))
    return events


@pytest.mark.parametrize("status", [JobStatus.RUNNING, JobStatus.SUCCEEDED])
@pytest.mark.parametrize("last_event_id", [0, 2, 5])
def test_event_ids_never_go_back_and_a_resumed_stream_repeats_none(status: JobStatus, last_event_id: int) -> None:
    """Whether the job is still running or finished (the terminal path), a stream's ids only go up, and a stream
    resumed with Last-Event-ID gets exactly the events after it (the state first, with no id of its own)."""
    kinds = ["queued", "stage", "step", "step", "step", "succeeded"]
    channel = EventChannel(kinds)
    stamp = now_iso()
    job = "20261207T120000Z-00000000000000ee"
    state = JobState(id=job, owner="alice", request_id="r", status=status, created_at=stamp, updated_at=stamp)
    final = state.model_copy(update={"status": JobStatus.SUCCEEDED})

    async def read_state() -> JobState:
        return final

    async def scenario() -> list[bytes]:
        stream = follow_events(job, channel, SharedFeeds(channel), state, read_state, last_event_id, 0.05)
        return [chunk async for chunk in stream]

    events = _ids(run(scenario()))
    assert events[0][0] == "state" and events[-1][0] == "succeeded"
    ids = [event_id for _, event_id in events if event_id is not None]
    assert ids == sorted(set(ids))  # strictly increasing
    if last_event_id:
        assert events[0][1] is None  # the state stands for the present, the replay for what came before it
        assert all(event_id > last_event_id for event_id in ids)
        assert events[1:] == [(kind, seq) for seq, kind in enumerate(kinds, start=1) if seq > last_event_id]
    else:
        assert events[0][1] == len(kinds)  # a new stream: the state covers every event so far


# ------------------------------------------------------------------------------------------- admission


def test_admission_serves_jobs_in_arrival_order_and_reports_positions() -> None:
    async def scenario() -> None:
        admission = Admission(1)
        assert admission.try_enter()  # a request holds the only slot
        positions: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        order: list[str] = []

        async def job(name: str) -> None:
            await admission.wait_turn(name, positions[name].append)
            order.append(name)
            await asyncio.sleep(0.01)
            await admission.leave()

        tasks = []
        for name in ("a", "b", "c"):
            tasks.append(asyncio.create_task(job(name)))
            await asyncio.sleep(0.005)
        assert not admission.try_enter()  # waiting jobs keep their turn
        assert admission.waiting == 3
        await admission.leave()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
        assert positions == {"a": [0], "b": [1, 0], "c": [2, 1, 0]}
        assert admission.in_flight == 0 and admission.waiting == 0

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> None:
        admission = Admission(1)
        assert admission.try_enter()
        waiter = asyncio.create_task(admission.wait_turn("a", lambda _: None))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.waiting == 0
        await admission.leave()
        assert admission.try_enter()

    run(scenario())


@pytest.mark.parametrize("steps", range(4))
def test_a_job_cancelled_at_any_point_of_its_turn_never_keeps_a_slot(steps: int) -> None:
    """Jobs lose their lease and are cancelled in bulk when a node dies, some just as their turn comes: whatever
    step of the hand-over a cancellation lands on, the slot goes back (a leaked slot is never freed again, and
    once all of them are leaked every request is refused as overloaded)."""

    async def scenario() -> None:
        admission = Admission(1)
        assert admission.try_enter()
        turns: list[str] = []

        async def job(name: str) -> None:
            await admission.wait_turn(name, lambda _: None)
            turns.append(name)
            try:
                await asyncio.sleep(0.001)
            finally:
                await admission.leave()

        a, b, c = (asyncio.create_task(job(name)) for name in "abc")
        await asyncio.sleep(0.001)
        await admission.leave()  # the request ends: "a" is next
        for _ in range(steps):
            await asyncio.sleep(0)
        a.cancel()
        await asyncio.wait_for(asyncio.gather(a, b, c, return_exceptions=True), 10)  # a leaked slot: b, c wait forever
        assert turns[-2:] == ["b", "c"]
        assert admission.in_flight == 0 and admission.waiting == 0
        assert admission.try_enter()

    run(scenario())


def test_full_slots_that_stop_moving_fail_the_health_check_and_moving_ones_never_do() -> None:
    """Full slots are normal under load as long as generations end; held for longer than any generation may take
    with none given back, the replica's health check fails (Serve then replaces it)."""

    async def scenario() -> None:
        now = [100.0]
        admission = Admission(2, clock=lambda: now[0])
        now[0] += 3600  # idle for an hour, then two long generations take both slots
        assert admission.try_enter() and admission.try_enter()
        now[0] += 300
        admission.check_moving(400.0)
        assert admission.full_for() == 300.0
        await admission.leave()  # one generation ends: the slots moved
        assert admission.full_for() == 0.0 and admission.try_enter()
        for _ in range(3):  # saturated but moving: each generation ends within the bound
            now[0] += 300
            admission.check_moving(400.0)
            await admission.leave()
            assert admission.try_enter()
        now[0] += 401
        with pytest.raises(SlotsStalled, match="all 2 generation slots taken and none given back for 401 s"):
            admission.check_moving(400.0)

    run(scenario())


# ------------------------------------------------------------------------------------------- base slots


class LruMultiplexer:
    """Serve's ``@serve.multiplexed`` as the base slots rely on it: at most ``size`` models, a hit moves a model to
    the recent end, a miss beyond capacity unloads the least recently used one (its ``__del__``, in a thread)."""

    def __init__(self, load: Any, size: int) -> None:
        self.load, self.size = load, size
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.unloaded: list[str] = []

    async def __call__(self, name: str) -> Any:
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        if len(self.models) >= self.size:
            evicted, model = self.models.popitem(last=False)
            self.unloaded.append(evicted)
            await asyncio.to_thread(model.__del__)
        self.models[name] = model = await self.load(name)
        return model


@pytest.fixture
def multiplexer(monkeypatch: pytest.MonkeyPatch) -> dict[str, LruMultiplexer]:
    import deployments.base_slots as base_slots

    made: dict[str, LruMultiplexer] = {}

    def loader(load: Any, size: int) -> LruMultiplexer:
        made["lru"] = LruMultiplexer(load, size)
        return made["lru"]

    monkeypatch.setattr(base_slots, "multiplexed_loader", loader)
    return made


class _Adapters:
    """What a slot needs of its LoRA adapters here: nothing is loaded."""

    @property
    def loaded(self) -> list[str]:
        return []


def test_a_busy_base_is_never_the_one_unloaded(multiplexer: dict[str, LruMultiplexer]) -> None:
    from deployments.base_slots import BaseSlots

    async def scenario() -> None:
        slots = BaseSlots(lambda name: (f"model-{name}", _Adapters()), max_models=2)
        a, _ = await slots.acquire("a")  # "a" stays busy
        b, _ = await slots.acquire("b")
        b.release()
        try:  # "a" is the least recently used, but busy: "b" must go (unloading "a" would wait for its job)
            c, waited = await asyncio.wait_for(slots.acquire("c"), 5)
        finally:
            a.release()  # never leave an unload waiting
        assert multiplexer["lru"].unloaded == ["b"]
        assert waited is not None and a.model == "model-a" and b.model is None
        assert sorted(slots.loaded) == ["a", "c"]
        c.release()

    run(scenario())


def test_when_every_base_is_busy_the_unload_waits_for_the_last_job(multiplexer: dict[str, LruMultiplexer]) -> None:
    from deployments.base_slots import BaseSlots

    async def scenario() -> None:
        slots = BaseSlots(lambda name: (f"model-{name}", _Adapters()), max_models=1)
        a, _ = await slots.acquire("a")
        loading = asyncio.create_task(slots.acquire("b"))
        await asyncio.sleep(0.1)
        assert not loading.done() and a.model == "model-a"  # the unload waits for "a"'s job
        released = threading.Event()

        def finish() -> None:
            released.set()
            a.release()

        await asyncio.to_thread(finish)
        b, _ = await asyncio.wait_for(loading, 5)
        assert released.is_set() and a.model is None and b.model == "model-b"
        b.release()

    run(scenario())


# ------------------------------------------------------------------------------------------- the channel


def test_a_superseded_attempt_is_told_to_stop_and_its_events_are_not_recorded() -> None:
    """After a takeover announces attempt 2, the earlier run (attempt 1) still stepping somewhere learns at its next
    report that it must stop, and none of its events reach the job's subscribers."""
    from deployments.job_events import JobEventsActor

    async def scenario() -> None:
        channel = JobEventsActor()
        job = "20261207T120000Z-00000000000000cc"
        first = await channel.publish(job, "step", {"step": 1, "total": 4}, attempt=1)
        assert not first.cancelled
        await channel.publish(job, "queued", {"position": None, "attempt": 2}, attempt=2)
        stale = await channel.publish(job, "step", {"step": 2, "total": 4}, attempt=1)
        assert stale.cancelled
        fresh = await channel.publish(job, "step", {"step": 1, "total": 4}, attempt=2)
        assert not fresh.cancelled
        events = await channel.wait(job, 0, 0.0)
        assert [(e.type, e.data.get("step")) for e in events] == [("step", 1), ("queued", None), ("step", 1)]
        assert (await channel.progress(job)).step == 1  # the new attempt's progress, not the orphan's step 2

    run(scenario())
