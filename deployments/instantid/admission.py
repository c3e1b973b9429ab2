"""Which waiting job may join the continuous batcher's running set: always (greedy), or only while its rows pay.

Joining a running set is worth it only where a forward has a large fixed cost: a GPU at small batches is
launch-bound (SDXL on an H200: one image with CFG, 2 rows, steps in about 0.11 s, and 4 rows in about 0.14 s), so a
job that shares a forward pays little more than its rows' share. Where a forward costs in proportion to its rows
(a CPU), sharing saves nothing and only spreads every step of the jobs already running over more rows: each job
then takes as long as the whole set, and the long jobs' latency grows with every short one that passes through.
There the best a batcher can do is what static batching does, run jobs to completion, oldest first.

:class:`MarginalAdmission` decides between the two from the replica's own measurements: per cost key (a base and
latent size), a least-squares line ``seconds = launch + per_row x rows`` through the median forward time at each
row count seen. A job of ``k`` rows joins a running set of ``R`` rows of its group when the forward it shares
costs it at most ``(1 - min_row_saving)`` of a forward of its own: ``cost(R + k) - cost(R) <= (1 - f) cost(k)``,
which on the line is ``launch / (launch + per_row x k) >= f``. Until two row counts have been measured it admits
as greedy does, because batching is what produces the row counts it must measure.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LineFit:
    """A forward's seconds as ``launch_s + per_row_s x rows``, with what it was fitted from."""

    launch_s: float
    per_row_s: float
    points: dict[int, float]  # rows -> median seconds
    samples: dict[int, int]  # rows -> forwards measured (the points' weights)

    def seconds(self, rows: int) -> float:
        return self.launch_s + self.per_row_s * rows

    def residuals(self) -> dict[int, float]:
        """Measured median minus the line, per row count."""
        return {rows: value - self.seconds(rows) for rows, value in self.points.items()}


def fit_line(points: dict[int, float], weights: dict[int, int]) -> LineFit | None:
    """Weighted least squares through (rows, seconds); None without two distinct row counts."""
    if len(points) < 2:
        return None
    total = sum(weights[r] for r in points)
    mean_x = sum(weights[r] * r for r in points) / total
    mean_y = sum(weights[r] * points[r] for r in points) / total
    sxx = sum(weights[r] * (r - mean_x) ** 2 for r in points)
    sxy = sum(weights[r] * (r - mean_x) * (points[r] - mean_y) for r in points)
    slope = sxy / sxx
    return LineFit(mean_y - slope * mean_x, slope, dict(points), {r: weights[r] for r in points})


class ForwardCosts:
    """Forward seconds measured per (cost key, rows): the last ``window`` of each, fitted on demand.

    Medians per row count, so a forward slowed by a neighbour's burst or a garbage collection does not move the
    line, and a row count not seen lately keeps its last measurements.
    """

    def __init__(self, *, window: int = 32, min_samples: int = 3) -> None:
        if window < 1 or min_samples < 1 or min_samples > window:
            raise ValueError("need 1 <= min_samples <= window")
        self.window = window
        self.min_samples = min_samples
        self._seen: dict[Hashable, dict[int, deque[float]]] = {}
        self._fits: dict[Hashable, LineFit | None] = {}
        self._lock = threading.Lock()

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        with self._lock:
            by_rows = self._seen.setdefault(key, {})
            by_rows.setdefault(rows, deque(maxlen=self.window)).append(seconds)
            self._fits.pop(key, None)

    def fit(self, key: Hashable) -> LineFit | None:
        """The line for ``key`` over the row counts measured at least ``min_samples`` times; None until two are."""
        with self._lock:
            if key not in self._fits:
                ready = {r: s for r, s in self._seen.get(key, {}).items() if len(s) >= self.min_samples}
                points = {r: statistics.median(s) for r, s in ready.items()}
                self._fits[key] = fit_line(points, {r: len(s) for r, s in ready.items()})
            return self._fits[key]

    def measured(self) -> list[Hashable]:
        """The cost keys with measurements."""
        with self._lock:
            return list(self._seen)


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
        fit = self.costs.fit(key)
        if fit is None:  # cold start: batch, which measures the row counts the fit needs
            return True
        if running_rows == 0:  # another group runs: this one would take turns, sharing nothing
            return False
        alone = fit.seconds(rows)
        joined = fit.seconds(running_rows + rows) - fit.seconds(running_rows)
        return alone > 0 and joined <= (1 - self.min_row_saving) * alone

    def record(self, key: Hashable, rows: int, seconds: float) -> None:
        self.costs.record(key, rows, seconds)

    def describe(self) -> dict[str, object]:
        fits = {}
        for key in self.costs.measured():
            fit = self.costs.fit(key)
            fits[str(key)] = (
                None
                if fit is None
                else {
                    "launch_s": fit.launch_s,
                    "per_row_s": fit.per_row_s,
                    "median_s_by_rows": {str(r): s for r, s in sorted(fit.points.items())},
                    "forwards_by_rows": {str(r): n for r, n in sorted(fit.samples.items())},
                }
            )
        return {"admission": self.name, "min_row_saving": self.min_row_saving, "fits": fits}
