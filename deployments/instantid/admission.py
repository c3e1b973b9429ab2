"""Which waiting job may join the continuous batcher's running set: always (greedy), or only while its rows pay.

Joining a running set is worth it only where a forward has a large fixed cost: a GPU at small batches is
launch-bound (SDXL on an H200: one image with CFG, 2 rows, steps in about 0.11 s, and 4 rows in about 0.14 s), so a
job that shares a forward pays little more than its rows' share. Where a forward costs in proportion to its rows
(a CPU), sharing saves nothing and only spreads every step of the jobs already running over more rows: each job
then takes as long as the whole set, and the long jobs' latency grows with every short one that passes through.
There the best a batcher can do is what static batching does, run jobs to completion, oldest first.

:class:`MarginalAdmission` decides between the two from the replica's own forwards. With a forward's seconds
``t = c x (r0 + rows)``, ``r0`` is its fixed cost counted in rows; a job of ``k`` rows that shares a forward pays
``c x k`` instead of ``c x (r0 + k)`` alone, so sharing saves it the fraction ``r0 / (r0 + k)`` of its time, and it
joins when that is at least ``min_row_saving``. ``r0`` comes from neighbouring forwards of one cost key whose rows
differ (a job joined or left): two points fix the line, ``r0 = intercept / slope``. A ratio of neighbours, not a fit
over every forward, because a shared machine slows whole stretches of forwards at once (another process's burst
on the CPU): that scales both neighbours alike and cancels in the ratio, where a line through medians taken at
different times would read the slowdown as a fixed cost. The policy takes the median of the last estimates, and
until it has a few it admits as greedy does, because batching is what makes the row counts change.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Hashable
from typing import Protocol


def launch_rows(rows: tuple[int, int], seconds: tuple[float, float]) -> float:
    """The fixed cost in rows, ``intercept / slope``, of the line through two forwards of different rows.

    ``inf`` when the second costs no more per added row than nothing (a flat or falling line: rows are free);
    negative when the line passes below the origin (each row costs more in a larger batch).
    """
    (r1, r2), (t1, t2) = rows, seconds
    slope = (t2 - t1) / (r2 - r1)
    if slope <= 0:
        return math.inf
    return (t1 - slope * r1) / slope


class ForwardCosts:
    """What the forwards of each cost key measured: the last ``window`` estimates of the fixed cost in rows (from
    neighbouring forwards of different rows) and, for reports, the last ``window`` seconds per row count."""

    def __init__(self, *, window: int = 32, min_estimates: int = 3) -> None:
        if window < 1 or min_estimates < 1 or min_estimates > window:
            raise ValueError("need 1 <= min_estimates <= window")
        self.window = window
        self.min_estimates = min_estimates
        self._last: dict[Hashable, tuple[int, float]] = {}
        self._estimates: dict[Hashable, deque[float]] = {}
        self._seconds: dict[Hashable, dict[int, deque[float]]] = {}
        self._lock = threading.Lock()

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        with self._lock:
            last = self._last.get(key)
            if last is not None and last[0] != rows:
                estimate = launch_rows((last[0], rows), (last[1], seconds))
                self._estimates.setdefault(key, deque(maxlen=self.window)).append(estimate)
            self._last[key] = (rows, seconds)
            by_rows = self._seconds.setdefault(key, {})
            by_rows.setdefault(rows, deque(maxlen=self.window)).append(seconds)

    def launch_rows(self, key: Hashable) -> float | None:
        """The median estimate of the fixed cost in rows; None until ``min_estimates`` were made."""
        with self._lock:
            estimates = self._estimates.get(key, ())
            return statistics.median(estimates) if len(estimates) >= self.min_estimates else None

    def describe(self, key: Hashable) -> dict[str, object]:
        launch = self.launch_rows(key)
        with self._lock:
            by_rows = self._seconds.get(key, {})
            return {
                "launch_rows": None if launch is None or math.isinf(launch) else launch,
                "launch_free": launch is not None and math.isinf(launch),
                "estimates": len(self._estimates.get(key, ())),
                "median_s_by_rows": {str(r): statistics.median(s) for r, s in sorted(by_rows.items())},
                "forwards_by_rows": {str(r): len(s) for r, s in sorted(by_rows.items())},
            }

    def measured(self) -> list[Hashable]:
        """The cost keys with measurements."""
        with self._lock:
            return list(self._last)


class AdmissionPolicy(Protocol):
    """What the batcher asks before a waiting job joins a non-empty running set, and tells after each forward."""

    name: str

    def admits(self, key: Hashable, running_rows: int, rows: int) -> bool:
        """Whether a job of ``rows`` rows joins now; ``running_rows``: its group's rows already running (0: its
        group has none, so it would share no forward)."""
        ...

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        """A forward of ``rows`` rows of cost key ``key`` took ``seconds``."""
        ...

    def describe(self) -> dict[str, object]:
        """The policy and what it has measured (for ``batching_stats``)."""
        ...


class GreedyAdmission:
    """Every job that fits ``max_rows`` joins (the batcher checks the limit)."""

    name = "greedy"

    def admits(self, key: Hashable, running_rows: int, rows: int) -> bool:
        return True

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"admission": self.name}


class MarginalAdmission:
    """A job joins only while sharing a forward saves at least ``min_row_saving`` of its rows' time (module doc)."""

    name = "marginal"

    def __init__(self, min_row_saving: float, costs: ForwardCosts | None = None) -> None:
        if not 0 < min_row_saving < 1:
            raise ValueError("min_row_saving must be in (0, 1)")
        self.min_row_saving = min_row_saving
        self.costs = costs if costs is not None else ForwardCosts()

    def admits(self, key: Hashable, running_rows: int, rows: int) -> bool:
        launch = self.costs.launch_rows(key)
        if launch is None:  # cold start: batch, which makes the row counts change
            return True
        if running_rows == 0:  # another group runs: this one would take turns, sharing no forward
            return False
        return launch > 0 and (math.isinf(launch) or launch / (launch + rows) >= self.min_row_saving)

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        self.costs.record(key, rows, seconds)

    def describe(self) -> dict[str, object]:
        measured = {str(key): self.costs.describe(key) for key in self.costs.measured()}
        return {"admission": self.name, "min_row_saving": self.min_row_saving, "measured": measured}
