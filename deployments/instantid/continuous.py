"""Step-level ("continuous") batching of denoising jobs, as LLM servers batch at each token.

A :class:`ContinuousBatcher` keeps a running set of jobs and advances them one step at a time: at every step
boundary new jobs join and ended jobs leave (their latents are decoded and their result handed back at once).
Jobs that can share a forward form a *group* (same weights -- base and LoRA set -- latent size, prompt length
and set of extra ControlNets); each job keeps its own steps, scheduler, timesteps, guidance, strengths and
windows (see :meth:`InstantIDDenoiser.step`).

Bounds and fairness:

- ``max_rows`` limits the UNet rows of admitted jobs (a job's rows: its images, doubled with CFG). Waiting
  jobs are admitted strictly oldest first: a large job at the head is never overtaken, so none starves; a
  single job larger than the limit runs alone.
- An :class:`~.admission.AdmissionPolicy` decides whether the head joins a running set at all: greedy (whenever it
  fits) or marginal (only while sharing a forward saves its rows enough time, by the forwards measured so far: on
  compute-bound hardware jobs then run to completion one after another, see ``admission``). An empty set always
  takes the head.
- Only one group steps at a time. The group that has the turn keeps it for ``turn_steps`` consecutive
  steps, then, if another group has jobs, the turn passes to the group holding the oldest job. Runs of steps
  rather than alternating every step, because a switch can cost something (fusing another LoRA set into the
  UNet); a turn of one fast-mode generation's length bounds how long any group waits.
- When the batcher is idle, the first arrival waits ``gather_s`` so that near-simultaneous requests start in
  one forward; while jobs run, arrivals join at the next step boundary without waiting.

The batcher runs its steps in one worker thread (the model is not thread-safe, and the caller's event loop
must stay free); callers submit from any thread and get a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from .admission import AdmissionPolicy, GreedyAdmission
from .batch_rows import StepBatch
from .denoiser import DenoiseJob, InstantIDDenoiser


@dataclass
class StepGroup:
    """What jobs that share forwards share: a key, the model, and how to make its weights current.

    ``enter()`` is entered around every run of this group's steps (for example: hold the base's lock and
    switch its LoRA set in); it returns the seconds a switch cost (0 when nothing changed). ``cost_key``: which
    groups' forwards cost alike (a base and latent size, whatever the LoRA set); None: the group's own key.
    """

    key: Hashable
    model: InstantIDDenoiser
    enter: Callable[[], AbstractContextManager[float]]
    cost_key: Hashable | None = None

    @property
    def costs_as(self) -> Hashable:
        return self.key if self.cost_key is None else self.cost_key


@dataclass
class JobStats:
    """How a job was batched: the run it joined, its forwards, and who shared them."""

    run: str = ""  # jobs of one group that ran while the group never emptied share a run id
    forwards: int = 0
    rows: int = 0  # summed over its forwards
    most_jobs: int = 0  # the most jobs in one of its forwards (itself included)
    most_rows: int = 0
    most_images: int = 0  # latents in that forward
    switch_s: float = 0.0  # weight switches (LoRA sets) paid at the start of its group's runs

    @property
    def mean_rows(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0


@dataclass
class Outcome:
    """A job's images (None when it was dropped at a step boundary) and its batching record."""

    images: np.ndarray | None
    stats: JobStats
    started: float  # unix time of its first step
    ended: float


@dataclass
class _Entry:
    job: DenoiseJob
    group: StepGroup
    rows: int
    order: int
    submitted: float
    future: Future = field(default_factory=Future)
    stats: JobStats = field(default_factory=JobStats)
    started: float | None = None
    running: bool = False  # model.start(job) done
    cancelled: bool = False


class ContinuousBatcher:
    """Admits, groups and steps jobs; see the module docstring for the policy."""

    def __init__(
        self,
        *,
        max_rows: int,
        turn_steps: int,
        gather_s: float,
        run_prefix: str = "run",
        on_forward: Callable[[int, int, float], None] | None = None,
        admission: AdmissionPolicy | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``on_forward(jobs, rows, seconds)`` is called after every forward (metrics), in the worker thread.
        ``admission``: greedy when None. ``clock`` times the forwards the admission policy learns from (tests
        give a model that advances its own clock)."""
        if max_rows < 1 or turn_steps < 1 or gather_s < 0:
            raise ValueError("max_rows and turn_steps must be >= 1 and gather_s >= 0")
        self.max_rows = max_rows
        self.admission: AdmissionPolicy = admission if admission is not None else GreedyAdmission()
        self._clock = clock
        self.turn_steps = turn_steps
        self.gather_s = gather_s
        self._run_prefix = run_prefix
        self._on_forward = on_forward
        self._runs = itertools.count(1)
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._waiting: deque[_Entry] = deque()
        self._admitted: dict[Hashable, list[_Entry]] = {}  # group key -> its admitted jobs, oldest first
        self._run_ids: dict[Hashable, str] = {}
        self._rows_admitted = 0
        self._turn: Hashable | None = None
        self._turn_steps = 0
        self._closed = False
        self._batches: dict[Hashable, tuple[tuple[int, ...], StepBatch]] = {}  # per group, while its set holds
        self.forwards = 0
        self.rows_stepped = 0
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public
    def submit(self, job: DenoiseJob, group: StepGroup) -> tuple[Future, Callable[[], None]]:
        """Queue ``job``; returns its future (an :class:`Outcome`, or the exception that failed it) and a function
        that cancels it (it leaves the queue, or the running set at the next step boundary)."""
        entry = _Entry(job, group, job.params.unet_rows, next(self._order), time.time())
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(entry)
            self._lock.notify_all()

        def cancel() -> None:
            with self._lock:
                entry.cancelled = True
                self._lock.notify_all()

        return entry.future, cancel

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (a replica whose batcher stopped must be replaced, not sent jobs)."""
        return self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """Jobs waiting and running, and rows admitted, now."""
        with self._lock:
            running = sum(len(entries) for entries in self._admitted.values())
            return {"waiting": len(self._waiting), "running": running, "rows": self._rows_admitted}

    def close(self) -> None:
        """Stop after the current step; jobs not finished fail with RuntimeError."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------------------------------ policy
    def _admit(self) -> None:
        """Oldest first while the rows fit (a job larger than the limit goes alone) and the admission policy agrees
        (an empty set always takes the head); drop cancelled waiters."""
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._resolve(head, None)
                continue
            key = head.group.key
            if self._rows_admitted:
                if self._rows_admitted + head.rows > self.max_rows:
                    return
                group_rows = sum(e.rows for e in self._admitted.get(key, ()))
                if not self.admission.admits(head.group.costs_as, group_rows, head.rows):
                    return
            self._waiting.popleft()
            if not self._admitted.get(key):
                self._run_ids[key] = f"{self._run_prefix}-{next(self._runs)}"
            head.stats.run = self._run_ids[key]
            self._admitted.setdefault(key, []).append(head)
            self._rows_admitted += head.rows

    def _next_group(self) -> Hashable | None:
        """The group that steps next: the turn holder until its run of steps ends, then the oldest job's group."""
        groups = [key for key, entries in self._admitted.items() if entries]
        if not groups:
            self._turn = None
            return None
        if self._turn in groups and (self._turn_steps < self.turn_steps or len(groups) == 1):
            return self._turn
        others = [key for key in groups if key != self._turn] or groups
        chosen = min(others, key=lambda key: self._admitted[key][0].order)
        self._turn, self._turn_steps = chosen, 0
        return chosen

    # ------------------------------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._admit()
                if self._closed:
                    break
                key = self._next_group()
                if key is None:
                    self._lock.wait()
                    if self._waiting and self.gather_s:  # let near-simultaneous arrivals start together
                        deadline = time.perf_counter() + self.gather_s
                        while not self._closed and (left := deadline - time.perf_counter()) > 0:
                            self._lock.wait(left)
                    continue
                entries = list(self._admitted[key])
            self._run_step(entries)
        with self._lock:
            leftover = list(self._waiting) + [e for entries in self._admitted.values() for e in entries]
            self._waiting.clear()
            self._admitted.clear()
        for entry in leftover:
            entry.future.set_exception(RuntimeError("the denoiser is shutting down"))

    def _run_step(self, entries: list[_Entry]) -> None:
        """One step of one group (under its ``enter()``), then hand back whoever ended."""
        group = entries[0].group
        model = group.model
        ended: list[tuple[_Entry, np.ndarray | BaseException | None]] = []
        try:
            with group.enter() as switch_s:
                now = time.time()
                running = []
                for entry in entries:
                    if entry.cancelled:
                        entry.job._state = {}
                        ended.append((entry, None))
                        continue
                    if switch_s:
                        entry.stats.switch_s += switch_s
                    if not entry.running:
                        try:
                            model.start(entry.job)
                        except Exception as exc:  # one job's bad input fails that job only
                            ended.append((entry, exc))
                            continue
                        entry.running, entry.started = True, now
                    running.append(entry)
                if running:
                    jobs = [e.job for e in running]
                    batch = self._batch_for(group, jobs)
                    stepping = self._clock()
                    done = {id(j) for j in model.step(jobs, batch)}
                    seconds = self._clock() - stepping
                    rows = batch.rows
                    self.admission.record(group.costs_as, rows, seconds)
                    images = sum(e.job.params.num_images for e in running)
                    self.forwards += 1
                    self.rows_stepped += rows
                    if self._on_forward is not None:
                        self._on_forward(len(running), rows, seconds)
                    for entry in running:
                        stats = entry.stats
                        stats.forwards += 1
                        stats.rows += rows
                        stats.most_jobs = max(stats.most_jobs, len(running))
                        stats.most_rows = max(stats.most_rows, rows)
                        stats.most_images = max(stats.most_images, images)
                        if id(entry.job) in done:
                            ended.append((entry, model.finish(entry.job)))
        except Exception as exc:  # a failed forward (out of memory, a bug) fails the jobs that were in it
            failed = {id(e) for e, _ in ended}
            ended += [(e, exc) for e in entries if id(e) not in failed]
            for entry in entries:
                entry.job._state = {}
        with self._lock:
            self._turn_steps += 1
            gone = {id(e) for e, _ in ended}
            if gone:
                key = group.key
                self._admitted[key] = [e for e in self._admitted[key] if id(e) not in gone]
                self._rows_admitted -= sum(e.rows for e, _ in ended)
                self._batches.pop(key, None)
                if not self._admitted[key]:  # the run ended: forget the group until it comes back
                    del self._admitted[key], self._run_ids[key]
        for entry, result in ended:
            self._resolve(entry, result)

    def _batch_for(self, group: StepGroup, jobs: list[DenoiseJob]) -> StepBatch:
        """The group's rows, rebuilt only when its set of jobs changed (jobs are compared by identity)."""
        ids = tuple(id(j) for j in jobs)
        cached = self._batches.get(group.key)
        if cached is None or cached[0] != ids:
            cached = self._batches[group.key] = (ids, group.model.batch(jobs))
        return cached[1]

    def _resolve(self, entry: _Entry, result: np.ndarray | BaseException | None) -> None:
        if isinstance(result, BaseException):
            entry.future.set_exception(result)
            return
        started = entry.started if entry.started is not None else time.time()
        entry.future.set_result(Outcome(result, entry.stats, started, time.time()))
