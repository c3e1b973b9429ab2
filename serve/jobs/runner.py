"""A job from acceptance to its outcome, on whichever ingress replica holds its lease.

The replica that accepts a job stores its request and state in S3 and runs it in the background: it waits for a
generation slot in arrival order, holds the job's lease (renewed every third of ``lease_s``) while the generation
runs, writes the outcome once (only while it still holds the lease), publishes it to the event channel and sends
the webhook. A replica that dies stops renewing; every replica's sweep takes over jobs whose lease expired and runs
them again from the start (``attempts`` goes up; the job id is the generation id and generation is deterministic
for the seed, so a rerun rewrites the same result). A run whose lease is lost (taken over, or the job cancelled)
is cancelled at once, so two replicas never finish the same attempt. A cancellation is a state change plus a flag
in the event channel, which the denoiser reads at its next step. The sweep also removes what S3 trouble left
behind: a finished job's request, and the request and marker of a submission that failed before its state existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from deployments import metrics
from deployments.generation.messages import JobTicket
from deployments.job_events import JobStatus
from deployments.storage.generations import generation_time, new_generation_id, validate_generation_id
from serve.ingress.errors import ApiError, classify_error
from serve.schemas import GenerateRequest, GenerateResponse, JobAccepted

from .admission import Admission
from .events import SharedFeeds, follow_events
from .leases import Leases
from .state import JobError, JobNotFound, JobsConfig, JobState, JobStates, WebhookOutcome, now_iso, public_body
from .webhooks import WebhookSettings, deliver

logger = logging.getLogger("ray.serve")

# request, request id, owner, the job and this run's attempt
Generate = Callable[[GenerateRequest, str, str, JobTicket], Awaitable[GenerateResponse]]


class JobRunner:
    """Runs this replica's jobs and takes over others' abandoned ones.

    ``generate(request, request_id, owner, job_id)`` runs one generation; ``delete_generation(job_id)`` removes a
    job's stored images; ``webhook_secret(owner)`` is the key a webhook to that owner is signed with (None: none).
    ``owner_scoped``: another owner's job is "not found" (API keys on). ``service`` names the Serve application
    this replica belongs to: its sweep takes over only that application's jobs, never those of another application
    storing its jobs under the same bucket and prefix.
    """

    def __init__(
        self,
        *,
        states: JobStates,
        channel: Any,
        admission: Admission,
        leases: Leases,
        replica: str,
        service: str,
        config: JobsConfig,
        request_timeout_s: float,
        generate: Generate,
        delete_generation: Callable[[str], Awaitable[Any]],
        webhook_secret: Callable[[str], str | None],
        webhooks: WebhookSettings,
        owner_scoped: bool,
    ) -> None:
        self.states, self.channel, self.admission, self.leases = states, channel, admission, leases
        self.replica, self.service, self.config, self.request_timeout_s = replica, service, config, request_timeout_s
        self.generate, self.delete_generation = generate, delete_generation
        self.webhook_secret, self.webhooks, self.owner_scoped = webhook_secret, webhooks, owner_scoped
        self.feeds = SharedFeeds(channel)
        self.streams = 0  # event streams open on this replica
        self._runs: dict[str, asyncio.Task] = {}  # jobs this replica runs
        self._cancelling: set[str] = set()  # of those, the ones cancelled by their owner
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------- the API
    async def submit(self, request: GenerateRequest, request_id: str, owner: str, base_path: str) -> JobAccepted:
        """Store a checked request as a new job and start it here."""
        self.ensure_sweeper()
        created = now_iso()
        state = JobState(
            id=new_generation_id(),
            owner=owner,
            request_id=request_id,
            status=JobStatus.QUEUED,
            created_at=created,
            updated_at=created,
            service=self.service,
            lease=self.leases.grant(self.replica),
            callback_url=request.callback_url,
        )
        # As sent (unset fields stay unset: a mode's preset fills them, and validation sees the same request).
        await self.states.create(state, request.model_dump(mode="json", exclude_unset=True))
        self._start(state.id, request, owner, request_id)
        url = f"{base_path}/v1/jobs/{state.id}"
        return JobAccepted(id=state.id, status="queued", status_url=url, events_url=f"{url}/events")

    async def get(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """The job's status (and its result or error once finished)."""
        self.ensure_sweeper()
        state = await self.owned(job_id, owner)
        return public_body(state, await self.channel.progress.remote(job_id))

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any] | None:
        """Cancel an unfinished job (the denoiser drops it at its next step): its body. A finished job is deleted
        with its generation: None."""
        state = await self.owned(job_id, owner)
        if state.status.terminal:
            if state.status is JobStatus.SUCCEEDED:
                await self.delete_generation(job_id)
            await self.states.delete(job_id)
            return None
        await self.channel.cancel.remote(job_id)

        def cancel(current: JobState) -> bool:
            if current.status.terminal:
                return False
            current.finish(JobStatus.CANCELLED)
            return True

        final = await self.states.update(job_id, cancel)
        if final is None:
            raise JobNotFound(f"job {job_id} not found")
        if final.status is JobStatus.CANCELLED:
            self.channel.publish.remote(job_id, "cancelled", public_body(final))
        if job_id in self._runs:
            self._cancelling.add(job_id)
            self._runs[job_id].cancel()
        return public_body(final)

    async def events(self, job_id: str, owner: str | None, last_event_id: int, previews: bool) -> AsyncIterator[bytes]:
        """The job's Server-Sent Events, within their own limit (open streams never take generation slots)."""
        if self.streams >= self.config.max_event_streams:
            metrics.record_admission_rejected("too_many_streams")
            raise ApiError(
                503, "too_many_streams", "too many open event streams; poll the job instead", {"Retry-After": "5"}
            )
        state = await self.owned(job_id, owner)
        if previews:
            await self.channel.want_previews.remote(job_id)
        self.streams += 1
        try:
            async for chunk in follow_events(
                job_id,
                self.channel,
                self.feeds,
                state,
                lambda: self.states.read(job_id),
                last_event_id,
                self.config.heartbeat_s,
            ):
                yield chunk
        finally:
            self.streams -= 1

    async def owned(self, job_id: str, owner: str | None) -> JobState:
        """The job's state; "not found" for an invalid id or, when owner-scoped, another owner's job."""
        try:
            validate_generation_id(job_id)
        except ValueError:
            raise JobNotFound(f"job {job_id} not found") from None
        state = await self.states.read(job_id)
        if state is None or (owner is not None and self.owner_scoped and state.owner != owner):
            raise JobNotFound(f"job {job_id} not found")
        return state

    # ------------------------------------------------------------------------------------- running a job
    def _start(self, job_id: str, request: GenerateRequest, owner: str, request_id: str) -> None:
        task = asyncio.create_task(self._run(job_id, request, owner, request_id))
        self._runs[job_id] = task
        task.add_done_callback(lambda _: (self._runs.pop(job_id, None), self._cancelling.discard(job_id)))

    async def _run(self, job_id: str, request: GenerateRequest, owner: str, request_id: str) -> None:
        """Run one job to its end while holding its lease; write the outcome unless the owner cancelled first."""
        keeper = asyncio.create_task(self._keep_lease(job_id, asyncio.current_task()))
        try:
            status, result, error = await self._outcome(job_id, request, owner, request_id)
        except asyncio.CancelledError:
            if job_id not in self._cancelling:
                raise  # the replica is stopping or lost the lease: another replica takes the job over
            status, result, error = JobStatus.CANCELLED, None, None
        finally:
            keeper.cancel()

        wrote = False

        def finish(current: JobState) -> bool:
            nonlocal wrote
            wrote = not current.status.terminal and current.lease is not None and current.lease.holder == self.replica
            if wrote:
                current.finish(status, result, error)
            return wrote

        final = None
        for attempt in range(5):  # S3 trouble must not lose a finished job's outcome (it would run again)
            try:
                final = await self.states.update(job_id, finish)
                break
            except Exception:
                logger.warning("job %s: writing its outcome failed (try %d)", job_id, attempt + 1, exc_info=True)
                await asyncio.sleep(min(2**attempt, self.config.lease_s / 3))
        if final is None:
            return
        if wrote:  # a cancellation was published by the DELETE that wrote it
            self.channel.publish.remote(job_id, final.status.value, public_body(final))
        if final.status is JobStatus.CANCELLED and status is JobStatus.SUCCEEDED:
            await self.delete_generation(job_id)  # cancelled while it was being stored: keep nothing
        if final.callback_url and (wrote or final.status is JobStatus.CANCELLED):
            await self._deliver_webhook(final, owner)

    async def _outcome(
        self, job_id: str, request: GenerateRequest, owner: str, request_id: str
    ) -> tuple[JobStatus, dict[str, Any] | None, JobError | None]:
        def queued(position: int) -> None:
            self.channel.publish.remote(job_id, "queued", {"position": position})

        try:
            await self.admission.wait_turn(job_id, queued)
            try:

                def running(current: JobState) -> bool:
                    if current.status.terminal:
                        return False
                    current.status = JobStatus.RUNNING
                    return True

                state = await self.states.update(job_id, running)
                if state is None or state.status is not JobStatus.RUNNING:
                    raise asyncio.CancelledError
                self.channel.publish.remote(job_id, "stage", {"stage": "prepare", "phase": "start"})
                response = await asyncio.wait_for(
                    self.generate(request, request_id, owner, JobTicket(job_id, state.attempts)),
                    self.request_timeout_s,
                )
            finally:
                await self.admission.leave()
        except asyncio.TimeoutError:
            return JobStatus.FAILED, None, JobError(code="timeout", message="the job timed out")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job's failure is its outcome, mapped as a request's would be
            info = classify_error(exc)
            if info.code == "cancelled":
                return JobStatus.CANCELLED, None, None
            return JobStatus.FAILED, None, JobError(code=info.code, message=info.message)
        return JobStatus.SUCCEEDED, response.model_dump(mode="json"), None

    async def _keep_lease(self, job_id: str, runner: asyncio.Task | None) -> None:
        """Renew the lease every third of its length; stop the run when the job was cancelled or taken over."""
        while True:
            await asyncio.sleep(self.config.lease_s / 3)

            def renew(current: JobState) -> bool:
                if current.status.terminal or current.lease is None or current.lease.holder != self.replica:
                    return False
                current.lease = self.leases.grant(self.replica)
                return True

            try:
                state = await self.states.update(job_id, renew)
            except Exception:  # S3 trouble: try again at the next renewal, the lease has slack
                logger.warning("job %s: lease renewal failed", job_id, exc_info=True)
                continue
            held = state is not None and state.lease is not None and state.lease.holder == self.replica
            if state is None or state.status.terminal or not held:
                if state is not None and state.status is JobStatus.CANCELLED:
                    self._cancelling.add(job_id)
                if runner is not None:
                    runner.cancel()
                return

    async def _deliver_webhook(self, final: JobState, owner: str) -> None:
        """Send the final body and record how that ended, with the reason when it was not delivered (the
        delivery's error names at most the host, so the owner may see it). Without a secret (the owner's key was
        revoked since) nothing is sent, and the outcome says so."""
        assert final.callback_url is not None
        secret = self.webhook_secret(owner) or ""
        result = await deliver(final.callback_url, public_body(final), secret, self.webhooks)
        outcome = WebhookOutcome(
            delivered=result.delivered, attempts=result.attempts, status=result.status, error=result.error
        )

        def record(current: JobState) -> bool:
            current.webhook = outcome
            return True

        await self.states.update(final.id, record)

    # ------------------------------------------------------------------------------------------ takeover
    def ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.warning("job sweep failed", exc_info=True)
            await asyncio.sleep(self.config.sweep_interval_s)

    async def sweep(self) -> list[str]:
        """Take over unfinished jobs whose lease expired (their replica died) and run them again: their ids.

        It also finishes removals that S3 failed: the request of a finished job (its marker outlived it), and what
        a failed submission left with no state (see :meth:`_remove_abandoned`)."""
        taken_over = []
        for job_id in await self.states.active():
            if job_id in self._runs:
                continue
            state = await self.states.read(job_id)
            if state is None:
                await self._remove_abandoned(job_id)
                continue
            if state.status.terminal:
                await self.states.retire(job_id)
                continue
            if not (self._ours(state) and self.leases.expired(state.lease)):
                continue

            def take(current: JobState) -> bool:
                if current.status.terminal or not (self._ours(current) and self.leases.expired(current.lease)):
                    return False
                current.status = JobStatus.QUEUED
                current.lease = self.leases.grant(self.replica)
                current.attempts += 1
                return True

            taken = await self.states.update(job_id, take)
            if taken is None or taken.lease is None or taken.lease.holder != self.replica or job_id in self._runs:
                continue
            request = await self._stored_request(job_id)
            if request is None:
                continue
            logger.warning("job %s: its lease expired; taking it over (attempt %d)", job_id, taken.attempts)
            # Announced with its attempt: a run of an earlier attempt still going somewhere stops at its next step.
            self.channel.publish.remote(
                job_id, "queued", {"position": None, "attempt": taken.attempts}, attempt=taken.attempts
            )
            self._start(job_id, request, taken.owner, taken.request_id)
            taken_over.append(job_id)
        return taken_over

    def _ours(self, state: JobState) -> bool:
        """Whether this replica's application accepted the job (a record without one: any application's)."""
        return not state.service or state.service == self.service

    async def _remove_abandoned(self, job_id: str) -> None:
        """A marker with no state: a submission that failed (the client got a 503) and could not remove what it
        had stored, S3 failing too, or one that another replica is storing right now. Its request may hold face
        photos, kept for nobody. Once the job id, which holds when it was made, is older than a lease, a failed
        state takes the empty place (only if still empty: a create still under way then fails at its own state
        write instead of completing a job without its request), and the request and marker go as a finished
        job's do."""
        made = generation_time(job_id)
        if self.leases.clock() - made.timestamp() < self.config.lease_s:
            return
        error = JobError(code="storage_unavailable", message="the job could not be stored when it was submitted")
        failed = JobState(
            id=job_id,
            owner="",  # it was only in the state never written: nobody's (with API keys on, a 404 to everyone)
            request_id="",
            status=JobStatus.FAILED,
            created_at=made.isoformat(),
            updated_at=now_iso(),
            error=error,
        )
        if await self.states.create_state(failed):
            logger.warning("job %s: removing what its failed submission left in S3", job_id)
            await self.states.retire(job_id)

    async def _stored_request(self, job_id: str) -> GenerateRequest | None:
        """The job's request as it was accepted; a request that cannot be read back fails the job (instead of
        looping through takeovers)."""
        body = await self.states.read_request(job_id)
        try:
            return GenerateRequest.model_validate(body)
        except (ValidationError, TypeError) as exc:
            logger.warning("job %s: unreadable stored request (%s)", job_id, type(exc).__name__)
        error = JobError(code="internal_error", message="the job's request could not be read back")

        def fail(current: JobState) -> bool:
            current.finish(JobStatus.FAILED, error=error)
            return True

        failed = await self.states.update(job_id, fail)
        if failed is not None:
            self.channel.publish.remote(job_id, "failed", public_body(failed))
        return None
