"""The soak's traffic: a warm-up, a short closed-loop capacity measurement, then open-loop Poisson arrivals at a
fraction of that capacity, and afterwards every accepted job polled to its end.

Open loop because clients do not slow down when the service does: arrivals are drawn up front from the seed
(exponential gaps, then the kind of request and its contents), so a stalled service meets the same requests a
healthy one would, and latency counts from each request's scheduled arrival. Every request has a timeout and the
number of requests in flight is capped (arrivals beyond the cap are counted, not sent).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from serve.bench import progress

from .client import Recorder
from .hostile import CORPUS, Target
from .mix import GenerationSpec, draw_spec, warmup_specs
from .records import JobLog, StreamLog
from .sse import follow

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class TrafficSettings:
    seed: int
    request_timeout_s: float = 180.0
    job_deadline_s: float = 600.0
    max_in_flight: int = 64
    shares: dict[str, float] = field(
        default_factory=lambda: {"generate_json": 0.35, "generate_multipart": 0.25, "job": 0.3, "hostile": 0.1}
    )
    subscribe_share: float = 0.7  # of jobs, followed over SSE
    callback_share: float = 0.6  # of jobs, with a webhook
    capacity_clients: int = 3


class Traffic:
    """Sends the soak's requests to ``url``; records exchanges in ``recorder`` and accepted jobs in ``jobs``."""

    def __init__(self, url: str, target: Target, callback_url: str, settings: TrafficSettings) -> None:
        self.url = url.rstrip("/")
        self.target = target
        self.callback_url = callback_url
        self.settings = settings
        self.recorder = Recorder()
        self.jobs: list[JobLog] = []
        self.skipped = 0  # arrivals not sent: the in-flight cap was reached
        self._in_flight: set[asyncio.Task] = set()
        self._streams: set[asyncio.Task] = set()
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), trust_env=False
        )

    async def close(self) -> None:
        for task in self._streams:
            task.cancel()
        await self._client.aclose()

    # ------------------------------------------------------------------------------------------ one request

    def _request_id(self, kind: str) -> str:
        return f"chaos-{kind}-{self.recorder.next_seq():06d}"

    async def generate(self, spec: GenerationSpec, multipart: bool, scheduled_at: float, label: str = "") -> bool:
        kind = "generate_multipart" if multipart else "generate_json"
        if multipart:
            fields, files = spec.multipart()
            body = {"data": fields, "files": files}
        else:
            body = {"json": spec.json_body()}
        exchange, _ = await self.recorder.send(
            self._client,
            kind,
            label or spec.label,
            "POST",
            f"{self.url}/v1/generate",
            scheduled_at=scheduled_at,
            request_id=self._request_id("gen"),
            timeout_s=self.settings.request_timeout_s,
            **body,
        )
        return exchange.status == 200

    async def job(self, spec: GenerationSpec, subscribe: bool, callback: bool, scheduled_at: float) -> None:
        body = spec.json_body()
        if callback:
            body["callback_url"] = self.callback_url
        request_id = self._request_id("job")
        exchange, accepted = await self.recorder.send(
            self._client,
            "job_submit",
            spec.label,
            "POST",
            f"{self.url}/v1/jobs",
            scheduled_at=scheduled_at,
            request_id=request_id,
            timeout_s=60.0,
            json=body,
        )
        if exchange.status != 202 or not isinstance(accepted, dict) or not accepted.get("id"):
            return
        job = JobLog(
            seq=exchange.seq,
            job_id=accepted["id"],
            request_id=request_id,
            variant=spec.label,
            accepted_at=exchange.finished_at,
            callback=callback,
        )
        self.jobs.append(job)
        if subscribe:
            events_url = accepted.get("events_url") or f"/v1/jobs/{job.job_id}/events"
            url = events_url if events_url.startswith("http") else f"{self.url}{events_url}"
            deadline = job.accepted_at + self.settings.job_deadline_s
            job.stream = StreamLog()  # filled in place: a stream cut short by the end of the run still counts
            task = asyncio.create_task(follow(self._client, url, deadline, self.recorder, job.seq, job.stream))
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    def busy(self) -> bool:
        """Whether work is running in the service now: a generation in flight, or a job accepted in the last 30 s
        whose outcome nobody has seen yet (so that a replica killed now dies mid-request). Read from another thread."""
        now = time.time()
        recent = [job for job in list(self.jobs) if job.accepted_at > now - 30 and job.final is None]
        return bool(self._in_flight) or any(job.stream is None or job.stream.terminal is None for job in recent)

    # ------------------------------------------------------------------------------------------ phases

    async def warm_up(self) -> float:
        """Each feature once (loads of bases, LoRAs, ControlNets), two at a time; how many answered 200."""
        specs = warmup_specs()
        ok = 0
        for start in range(0, len(specs), 2):
            results = await asyncio.gather(
                *(self.generate(spec, False, time.time(), f"warmup:{spec.label}") for spec in specs[start : start + 2])
            )
            ok += sum(results)
        return ok / len(specs)

    async def capacity(self, seconds: float) -> float:
        """Closed loop: ``capacity_clients`` clients sending the mix back to back for ``seconds``; 200s per second."""
        rng = random.Random(self.settings.seed + 1)
        specs = [draw_spec(rng) for _ in range(1000)]
        started = time.time()
        end = started + seconds
        done = 0

        async def client(index: int) -> None:
            nonlocal done
            position = index
            while time.time() < end and position < len(specs):
                if await self.generate(specs[position], position % 2 == 1, time.time(), "capacity"):
                    done += 1
                position += self.settings.capacity_clients

        await asyncio.gather(*(client(i) for i in range(self.settings.capacity_clients)))
        return done / (time.time() - started)

    async def open_loop(self, rate: float, until: Callable[[], float]) -> int:
        """Poisson arrivals at ``rate`` per second until ``until()`` (a time.time(), asked again at each arrival: the
        faults may extend the run); the arrivals drawn. Waits for the requests in flight (each bounded by its
        timeout) before returning."""
        rng = random.Random(self.settings.seed)
        kinds, weights = zip(*self.settings.shares.items(), strict=True)
        arrivals = 0
        at = time.time()
        while True:
            at += rng.expovariate(rate)
            if at >= until():
                break
            kind = rng.choices(kinds, weights)[0]
            spec = draw_spec(rng)
            case = rng.choice(CORPUS)
            subscribe = rng.random() < self.settings.subscribe_share
            callback = rng.random() < self.settings.callback_share
            await asyncio.sleep(max(0.0, at - time.time()))
            arrivals += 1
            if len(self._in_flight) >= self.settings.max_in_flight:
                self.skipped += 1
                continue
            if kind == "hostile":
                work = self.recorder.hostile(case, self.target, at)
            elif kind == "job":
                work = self.job(spec, subscribe, callback, at)
            else:
                work = self.generate(spec, kind == "generate_multipart", at)
            task = asyncio.create_task(work)
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self.settings.request_timeout_s + 30)
        return arrivals

    async def finish_jobs(self, bound_s: float) -> None:
        """Poll every accepted job until it ends, its deadline passes, or ``bound_s`` is up; then the streams."""
        end = time.time() + bound_s
        pending = list(self.jobs)
        while pending and time.time() < end:
            still = []
            for job in pending:
                exchange, body = await self.recorder.send(
                    self._client, "job_status", job.job_id, "GET", f"{self.url}/v1/jobs/{job.job_id}", timeout_s=30.0
                )
                if isinstance(body, dict) and exchange.status == 200:
                    job.final, job.final_at, job.poll_error = body, time.time(), None
                else:
                    job.poll_error = exchange.transport_error or f"HTTP {exchange.status}"
                past_deadline = time.time() > job.accepted_at + self.settings.job_deadline_s
                if (job.final or {}).get("status") not in TERMINAL and not past_deadline:
                    still.append(job)
            pending = still
            if pending:
                progress(f"{len(pending)} job(s) not finished yet; polling again")
                await asyncio.sleep(3.0)
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=max(5.0, end - time.time()))
