"""The continuous batcher's admission policies, on measured seconds and a fake model that keeps its own clock.

No test sleeps through a forward: the policy is given the seconds a forward took, and in the batcher tests the
fake model's ``step`` advances the batcher's injected clock by what its cost line says a forward of that many rows
costs. The check that compute-bound forwards run jobs one at a time is itself shown to fail on a policy that always
admits (the planted bug).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pytest

from deployments.instantid.admission import (
    AdmissionPolicy,
    ForwardCosts,
    GreedyAdmission,
    MarginalAdmission,
    fit_line,
)
from deployments.instantid.continuous import ContinuousBatcher, Outcome, StepGroup
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.params import GenerationParams

GPU = (0.0574, 0.0236)  # launch, per row: the H200 fit (SDXL 1024 px, float16): launch-bound at small batches
CPU = (0.0, 0.045)  # the tiny model on this CPU: every row costs the same, nothing is fixed


def line(launch: float, per_row: float) -> Callable[[int], float]:
    return lambda rows: launch + per_row * rows


def measured(cost: Callable[[int], float], rows: tuple[int, ...] = (2, 4), times: int = 3) -> MarginalAdmission:
    """A marginal policy that has seen ``times`` forwards of each of ``rows`` under ``cost``."""
    policy = MarginalAdmission(0.2)
    for r in rows:
        for _ in range(times):
            policy.record("g", r, cost(r))
    return policy


# ------------------------------------------------------------------------------------------- fitting


def test_the_fit_recovers_a_line_and_needs_two_row_counts() -> None:
    fit = fit_line({2: 0.1046, 4: 0.1518, 8: 0.2462}, {2: 1, 4: 1, 8: 1})
    assert fit is not None
    assert fit.launch_s == pytest.approx(0.0574, abs=1e-9) and fit.per_row_s == pytest.approx(0.0236, abs=1e-9)
    assert all(abs(r) < 1e-9 for r in fit.residuals().values())
    assert fit_line({2: 0.1}, {2: 5}) is None


def test_forward_costs_take_medians_per_row_count_and_wait_for_enough_forwards() -> None:
    costs = ForwardCosts(window=8, min_samples=3)
    for seconds in (0.10, 0.10, 0.10):
        costs.record("g", 2, seconds)
    costs.record("g", 4, 0.20)
    costs.record("g", 4, 0.20)
    assert costs.fit("g") is None  # rows 4 seen twice: not yet a point
    costs.record("g", 4, 5.0)  # a forward slowed by a neighbour's burst
    costs.record("g", 4, 0.20)
    fit = costs.fit("g")
    assert fit is not None and fit.points == {2: 0.10, 4: 0.20}  # the outlier does not move the median
    assert fit.launch_s == pytest.approx(0.0, abs=1e-12) and fit.per_row_s == pytest.approx(0.05)
    assert costs.fit("other") is None  # each cost key has its own line
    for _ in range(8):
        costs.record("g", 4, 0.30)  # the window forgets old forwards
    assert costs.fit("g").points[4] == pytest.approx(0.30)


# ------------------------------------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("cost", "running", "rows", "admits"),
    [
        (GPU, 2, 2, True),  # sharing saves a 1-image job 55% of a forward of its own
        (GPU, 12, 4, True),  # a 2-image job 38%, whatever already runs (the line's marginal cost is flat)
        (CPU, 2, 2, False),  # compute-bound: sharing saves nothing
        (CPU, 12, 4, False),
        (GPU, 0, 2, False),  # its group has nothing running: it would take turns, sharing no forward
        ((0.01, 0.045), 2, 2, False),  # saves 10% < 20%
        ((0.03, 0.045), 2, 2, True),  # saves 25%
    ],
)
def test_marginal_admission_admits_only_rows_that_pay(cost, running, rows, admits) -> None:
    assert measured(line(*cost)).admits("g", running, rows) is admits


def test_marginal_admission_is_greedy_until_it_has_measured_two_row_counts() -> None:
    policy = MarginalAdmission(0.2)
    assert policy.admits("g", 2, 2)  # nothing measured
    for _ in range(3):
        policy.record("g", 2, 0.09)
    assert policy.admits("g", 2, 2)  # one row count: no line yet
    for _ in range(3):
        policy.record("g", 4, 0.18)
    assert not policy.admits("g", 2, 2)  # the line says compute-bound
    assert policy.admits("another size", 2, 2)  # which says nothing of another cost key


def test_a_forward_cost_that_shrinks_with_rows_is_never_shared() -> None:
    """A negative fitted launch cost (bigger batches cost more per row, as on a CPU past its caches) refuses."""
    assert not measured(line(-0.02, 0.05)).admits("g", 4, 2)


def test_the_policies_describe_what_they_measured() -> None:
    assert GreedyAdmission().describe() == {"admission": "greedy"}
    described = measured(line(*GPU)).describe()
    assert described["admission"] == "marginal" and described["min_row_saving"] == 0.2
    fit = described["fits"]["g"]
    assert fit["launch_s"] == pytest.approx(GPU[0]) and fit["per_row_s"] == pytest.approx(GPU[1])
    assert fit["forwards_by_rows"] == {"2": 3, "4": 3}
    with pytest.raises(ValueError, match="min_row_saving"):
        MarginalAdmission(0.0)


# ------------------------------------------------------------------------------------------- in the batcher


@dataclass
class _Rows:
    rows: int


class FakeModel:
    """Steps jobs without networks; each forward advances ``clock`` by ``cost(rows)`` (no sleeping)."""

    def __init__(self, cost: Callable[[int], float]) -> None:
        self.cost = cost
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def start(self, job: DenoiseJob) -> None:
        job._state = {"left": job.params.num_inference_steps}

    def batch(self, jobs: list[DenoiseJob]) -> _Rows:
        return _Rows(sum(j.params.unet_rows for j in jobs))

    def step(self, jobs: list[DenoiseJob], batch: _Rows) -> list[DenoiseJob]:
        self.now += self.cost(batch.rows)
        for job in jobs:
            job._state["left"] -= 1
        return [job for job in jobs if job._state["left"] == 0]

    def finish(self, job: DenoiseJob) -> np.ndarray:
        job._state = {}
        return np.zeros((job.params.num_images, 1, 1, 3), dtype=np.uint8)


def fake_job(steps: int, images: int) -> DenoiseJob:
    params = GenerationParams(width=64, height=64, num_inference_steps=steps, num_images=images, guidance_scale=5.0)
    return DenoiseJob(params, np.zeros(512, np.float32), np.zeros((5, 2), np.float32), np.zeros(4, np.float32), None)


WAVE = [(4, 1), (8, 2), (30, 1), (4, 2), (8, 1), (30, 2)]  # (steps, images): the bench's mix


def two_waves(policy: AdmissionPolicy, cost: Callable[[int], float]) -> list[Outcome]:
    """Submit the mix at once (it starts together after the idle gather), wait, then submit it again; the second
    wave's outcomes, when the policy has measured the first wave's forwards."""
    model = FakeModel(cost)
    batcher = ContinuousBatcher(max_rows=16, turn_steps=8, gather_s=0.2, admission=policy, clock=model.clock)
    group = StepGroup("g", model, lambda: nullcontext(0.0))  # type: ignore[arg-type]  # a fake model
    try:
        waves = []
        for _ in range(2):
            futures = [batcher.submit(fake_job(steps, images), group)[0] for steps, images in WAVE]
            waves.append([future.result(30) for future in futures])
    finally:
        batcher.close()
    return waves[1]


def assert_compute_bound_jobs_run_alone_oldest_first(policy: AdmissionPolicy) -> None:
    """On a CPU-like cost line the second wave runs one job at a time, to completion, in arrival order."""
    outcomes = two_waves(policy, line(*CPU))
    assert [o.stats.most_jobs for o in outcomes] == [1] * len(WAVE)
    assert [o.ended for o in outcomes] == sorted(o.ended for o in outcomes)


def test_compute_bound_forwards_run_jobs_alone_to_completion() -> None:
    assert_compute_bound_jobs_run_alone_oldest_first(MarginalAdmission(0.2))


def test_the_compute_bound_check_fails_on_a_policy_that_always_admits() -> None:
    """The planted bug: a policy that admits every job (greedy) batches the CPU-like wave, and the check says so."""
    with pytest.raises(AssertionError):
        assert_compute_bound_jobs_run_alone_oldest_first(GreedyAdmission())


def test_launch_bound_forwards_are_shared_as_greedy_shares_them() -> None:
    marginal = two_waves(MarginalAdmission(0.2), line(*GPU))
    greedy = two_waves(GreedyAdmission(), line(*GPU))
    assert [o.stats.most_jobs for o in marginal] == [o.stats.most_jobs for o in greedy]
    # the first five (14 rows) share forwards; the sixth would pass max_rows 16: the limit, not the policy, bounds it
    assert max(o.stats.most_jobs for o in marginal) == 5 and max(o.stats.most_rows for o in marginal) == 14


def test_the_batcher_feeds_the_policy_every_forward_with_its_rows() -> None:
    seen: list[tuple[object, int, float]] = []

    class Recording(GreedyAdmission):
        def record(self, key, rows, seconds):
            seen.append((key, rows, seconds))

    model = FakeModel(line(*GPU))
    batcher = ContinuousBatcher(max_rows=16, turn_steps=8, gather_s=0.2, admission=Recording(), clock=model.clock)
    group = StepGroup("g", model, lambda: nullcontext(0.0), cost_key=("base", 64))  # type: ignore[arg-type]
    try:
        futures = [batcher.submit(fake_job(steps, 1), group)[0] for steps in (2, 3)]
        [future.result(30) for future in futures]
    finally:
        batcher.close()
    assert [(key, rows) for key, rows, _ in seen] == [(("base", 64), 4), (("base", 64), 4), (("base", 64), 2)]
    assert [s for _, _, s in seen] == pytest.approx([line(*GPU)(4)] * 2 + [line(*GPU)(2)])
    assert list(itertools.accumulate(s for _, _, s in seen))[-1] == pytest.approx(model.now)
