"""The channel that carries a job's progress events and its cancellation between replicas: one named Ray actor.

Why an actor: every replica of every deployment (the ingress that streams events, the denoiser that makes
steps, the store) can reach a named actor with one non-blocking call, it keeps a bounded window of recent events
per job in memory, and subscribers long-poll it (``wait``) instead of polling S3. Events are not durable: the
durable state of a job (status, result, error) lives in S3 and is what a late subscriber gets first; the actor
only adds the live part (stage, step, previews). Ray's pub/sub is internal API, so it is not used.

A denoiser reports a step with ``publish`` and reads the answer (cancelled? previews wanted?) on the next step
without waiting for it, so the loop never blocks on the channel.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import ray

CHANNEL_NAME = "instantid-job-events"
CHANNEL_NAMESPACE = "instantid"
WINDOW = 512  # events kept per job (a 100-step job with stages and previews fits)
MAX_JOBS = 4096  # jobs remembered; the least recently touched are forgotten first


class JobStatus(str, enum.Enum):
    """A job's status: queued and running, then one of the three terminal ones, whose event ends every stream."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def is_terminal_event(event_type: str) -> bool:
    """Whether an event of this type is a job's outcome (its status name)."""
    return event_type in {status.value for status in JobStatus if status.terminal}


@dataclass(frozen=True)
class JobEvent:
    seq: int  # 1, 2, 3, ... per job: the SSE id, for Last-Event-ID
    type: str
    data: dict[str, Any]
    at: float


@dataclass(frozen=True)
class PublishAnswer:
    """What a publisher learns from the channel: stop this job, and whether anyone wants previews."""

    cancelled: bool
    previews: bool


@dataclass(frozen=True)
class JobProgress:
    """The live part of a job's status that only the channel knows: its current stage and step, and the id of its
    last event (0: none yet)."""

    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    last_event_id: int = 0


@dataclass
class _Job:
    events: deque[JobEvent] = field(default_factory=lambda: deque(maxlen=WINDOW))
    seq: int = 0
    cancelled: bool = False
    previews: bool = False
    latest_step: tuple[int, int] | None = None  # (step, total)
    stage: str | None = None
    attempt: int = 0  # the newest run of the job announced (a takeover's run supersedes the ones before it)


class JobEventsActor:
    """Bounded per-job event windows, cancellation flags and preview requests (an async actor)."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._changed = asyncio.Condition()

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job()
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        self._jobs.move_to_end(job_id)
        return job

    async def publish(
        self, job_id: str, type_: str, data: dict[str, Any] | None = None, attempt: int | None = None
    ) -> PublishAnswer:
        """Record an event of ``job_id``. A run that names its ``attempt`` learns whether it was superseded: an event
        of an attempt older than the newest announced is not recorded, and the answer tells the run to stop."""
        job = self._job(job_id)
        if attempt is not None:
            if attempt < job.attempt:
                return PublishAnswer(cancelled=True, previews=False)
            job.attempt = attempt
        data = data or {}
        job.seq += 1
        job.events.append(JobEvent(job.seq, type_, data, time.time()))
        if type_ == "queued":  # (again, after a takeover: the earlier attempt's progress no longer counts)
            job.latest_step, job.stage = None, "queued"
        elif type_ == "step":
            job.latest_step = (int(data["step"]), int(data["total"]))
        elif type_ == "stage" and data.get("phase") == "start":
            job.stage = str(data["stage"])
        async with self._changed:
            self._changed.notify_all()
        return PublishAnswer(job.cancelled, job.previews)

    async def cancel(self, job_id: str) -> None:
        self._job(job_id).cancelled = True
        async with self._changed:
            self._changed.notify_all()

    async def want_previews(self, job_id: str) -> None:
        self._job(job_id).previews = True

    async def progress(self, job_id: str) -> JobProgress:
        """The live part of a job's status: its current stage and step."""
        job = self._jobs.get(job_id)
        if job is None:
            return JobProgress()
        step, total = job.latest_step if job.latest_step is not None else (None, None)
        return JobProgress(job.stage, step, total, job.seq)

    async def wait(self, job_id: str, after: int, timeout_s: float) -> list[JobEvent]:
        """Events with ``seq > after``, waiting up to ``timeout_s`` for the first (long poll); empty on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self._jobs.get(job_id)
            if job is not None:
                fresh = [event for event in job.events if event.seq > after]
                if fresh:
                    return fresh
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return []


@functools.lru_cache(maxsize=1)
def job_events() -> ray.actor.ActorHandle:
    """The channel: created by the first replica that asks, shared by all (detached, so it outlives any one
    replica; zero CPUs, so it never takes a slot a model could use; restarted by Ray should its process die, with
    its windows empty: the durable state is in S3). One handle per process."""
    actor = ray.remote(JobEventsActor).options(
        name=CHANNEL_NAME,
        namespace=CHANNEL_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=-1,
    )
    return actor.remote()


CHANNEL_TIMEOUT_S = 5.0  # a stage waits this long for the channel's answer before it goes on without it


def checked_publish(job: Any, type_: str, data: dict[str, Any]) -> PublishAnswer | None:
    """Publish an event of ``job`` (a ``JobTicket``) and wait for the channel's answer: None when the channel does not
    answer (its actor is restarting), so a stage goes on without progress events rather than failing the job; the
    durable job state in S3, not the channel, decides the job's outcome."""
    try:
        reference = job_events().publish.remote(job.id, type_, data, attempt=job.attempt)
        return ray.get(reference, timeout=CHANNEL_TIMEOUT_S)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None


class StepReporter:
    """A denoising job's ``on_step``: reports each step to the channel and stops the job once it is cancelled.

    A run that a takeover superseded (its ``attempt`` is no longer the newest) is told so in the same answer and
    stops like a cancelled one. The channel's answer to a step's report is read at the next step only if it has
    arrived (``ray.wait`` with no timeout), so the loop never waits on the channel; a cancellation is seen one or two
    steps after it was made. A preview (the only host copy of the latents) is made every ``preview_every`` steps,
    and only while a subscriber asked for previews.
    """

    def __init__(
        self, channel: ray.actor.ActorHandle, job_id: str, answer: PublishAnswer, preview_every: int, attempt: int = 1
    ) -> None:
        self.channel = channel
        self.job_id = job_id
        self.attempt = attempt
        self.answer = answer
        self.preview_every = preview_every
        self._pending: ray.ObjectRef | None = None
        self.last_step = 0

    def __call__(self, step: int, total: int, latents: Any) -> bool:
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self.answer = ray.get(ready[0])
                self._pending = None
        if self.answer.cancelled:
            return True
        self.last_step = step
        data: dict[str, Any] = {"step": step, "total": total}
        if self.answer.previews and (step % self.preview_every == 0 or step == total):
            from deployments.instantid.previews import preview_data_url

            data["preview"] = preview_data_url(latents)
        reference = self.channel.publish.remote(self.job_id, "step", data, attempt=self.attempt)
        if self._pending is None:
            self._pending = reference
        return False
