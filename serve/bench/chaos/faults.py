"""The soak's faults: which ones, when, and running them one after another while the traffic goes on.

Each fault is announced on stderr (one line with a UTC timestamp when it starts, one when it ends) and recorded with
its start, its end and what it did. A fault "ends" when the service has been given back what it lost: a replacement
replica runs, the event channel is back, the lost node's replicas run on the head node and a new node has joined,
the S3 process is continued or restarted, the restarted service answers.

Kinds: ``replica`` (one replica of each deployment in turn, killed without a Ray restart: Serve replaces it),
``events-actor`` (the job event channel, restarted by Ray), ``node`` (the second node's raylet, SIGKILL),
``s3-outage`` (the embedded S3 stopped for ``--s3-outage-s`` with SIGSTOP/SIGCONT: same data, same port; a
supervisor that restarts a dead store cannot shorten it), ``s3-crash`` (SIGKILL: the service should start its S3
again; if it has not within ``--s3-restart-grace-s``, the bench restarts the service and the fault says so),
``service-restart`` (SIGTERM the whole service, start it again on the same S3 data).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.bench import progress

from .config import DEPLOYMENTS
from .records import FaultKind, FaultLog
from .stack import ChaosStack

KINDS: tuple[FaultKind, ...] = ("replica", "events-actor", "node", "s3-outage", "s3-crash", "service-restart")
MIN_GAP_S = 5.0  # between one fault's end and the next one's start
BUSY_WAIT_S = 30.0  # how long a kill may wait for work in flight, so that the replica dies mid-request
MID_REQUEST = ("Ingress", "Denoiser")  # the replicas whose death mid-request the service promises to hide


@dataclass(frozen=True)
class PlannedFault:
    kind: FaultKind
    target: str
    at_s: float  # seconds after the traffic started


def plan(kinds: list[FaultKind], duration_s: float, spacing_s: float) -> list[PlannedFault]:
    """One round of ``kinds`` (``replica`` once per deployment), repeated while rounds fit ``duration_s`` at
    ``spacing_s`` between faults; spread evenly between a lead-in (a baseline for the first fault) and a tail (for the
    last one's recovery)."""
    one_round = [(kind, target) for kind in kinds for target in (DEPLOYMENTS.values() if kind == "replica" else [kind])]
    if not one_round:
        return []
    lead = min(60.0, duration_s * 0.1)
    tail = min(120.0, duration_s * 0.2)
    usable = max(1.0, duration_s - lead - tail)
    rounds = max(1, int(usable // (spacing_s * len(one_round))))
    faults = one_round * rounds
    step = usable / len(faults)
    return [PlannedFault(kind, target, lead + i * step) for i, (kind, target) in enumerate(faults)]


def announce(event: str, fault: FaultLog) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    progress(f"{stamp} FAULT {event}: {fault.kind} {fault.target}" + (f" ({fault.error})" if fault.error else ""))


class FaultRunner:
    """Runs a plan in a thread, one fault at a time, never before its planned time nor before the last one ended."""

    def __init__(
        self,
        stack: ChaosStack,
        planned: list[PlannedFault],
        s3_outage_s: float,
        s3_grace_s: float,
        busy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.stack = stack
        self.busy = busy
        self.planned = planned
        self.s3_outage_s = s3_outage_s
        self.s3_grace_s = s3_grace_s
        self.log: list[FaultLog] = []
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="faults")
        self._t0 = 0.0

    def start(self, t0: float) -> FaultRunner:
        self._t0 = t0
        self._thread.start()
        return self

    def stop(self, timeout_s: float) -> None:
        """Start no further fault; wait (bounded) for the one running to end."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        try:
            for planned in self.planned:
                wait = max(self._t0 + planned.at_s, (self.log[-1].ended_at or 0) + MIN_GAP_S if self.log else 0)
                if self._stop.wait(max(0.0, wait - time.time())):
                    return
                self.log.append(self._one(planned))
        finally:
            self.done.set()

    def _one(self, planned: PlannedFault) -> FaultLog:
        waited = 0.0
        if planned.kind == "replica" and planned.target in MID_REQUEST:
            started = time.monotonic()
            while not self.busy() and time.monotonic() - started < BUSY_WAIT_S and not self._stop.is_set():
                time.sleep(0.2)
            waited = time.monotonic() - started
        fault = FaultLog(kind=planned.kind, target=planned.target, started_at=time.time())
        announce("start", fault)
        try:
            fault.detail = self._cause(planned)
            if waited:
                fault.detail |= {"waited_for_work_in_flight_s": round(waited, 1), "work_in_flight": self.busy()}
        except Exception as exc:  # recorded: a fault that could not be caused is part of the report
            fault.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        fault.ended_at = time.time()
        announce("end", fault)
        return fault

    def _cause(self, planned: PlannedFault) -> dict:
        stack = self.stack
        if planned.kind == "replica":
            return stack.kill_replica(planned.target)
        if planned.kind == "events-actor":
            return stack.kill_channel()
        if planned.kind == "node":
            return stack.lose_node()
        if planned.kind == "s3-outage":
            return stack.stall_s3(self.s3_outage_s)
        if planned.kind == "s3-crash":
            return stack.crash_s3(self.s3_grace_s)
        return stack.restart_service()
