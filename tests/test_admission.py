"""The continuous batcher's admission policies, on measured seconds and a fake model that keeps its own clock.

No test sleeps through a forward: the policy is given the seconds a forward took, and in the batcher tests the
fake model's ``step`` advances the batcher's injected clock by what its cost line says a forward of that many rows
costs. The check that compute-bound forwards run jobs one at a time is itself shown to fail on a policy that always
admits (the planted bug).
"""

from __future__ import annotations

import itertools
import math
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
    launch_rows,
)
from deployments.instantid.continuous import ContinuousBatcher, Outcome, StepGroup
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.params import GenerationParams

GPU = (0.0574, 0.0236)  # launch, per row: the H200 fit (SDXL 1024 px, float16): launch-bound at small batches
CPU = (0.0, 0.045)  # the tiny model on this CPU: every row costs the same, nothing is fixed


def line(launch: float, per_row: float) -> Callable[[int], float]:
    return lambda rows: launch + per_row * rows


def measured(cost: Callable[[int], float], rows: tuple[int, ...] = (2, 4, 6, 4)) -> MarginalAdmission:
    """A marginal policy that has seen forwards of ``rows`` (in turn) under ``cost``."""
    policy = MarginalAdmission(0.2)
    for r in rows:
        policy.record("g", r, cost(r))
    return policy


# ------------------------------------------------------------------------------------------- measuring


def test_two_forwards_of_different_rows_give_the_fixed_cost_in_rows() -> None:
    gpu = line(*GPU)
    assert launch_rows((2, 4), (gpu(2), gpu(4))) == pytest.approx(GPU[0] / GPU[1])  # 2.43 rows
    assert launch_rows((6, 2), (gpu(6), gpu(2))) == pytest.approx(GPU[0] / GPU[1])  # either order
    assert launch_rows((2, 4), (0.09, 0.18)) == pytest.approx(0.0)  # compute-bound
    assert launch_rows((2, 4), (0.10, 0.30)) < 0  # each row costs more in the larger batch
    assert math.isinf(launch_rows((2, 4), (0.2, 0.2)))  # rows cost nothing measurable


def test_a_slowdown_of_the_whole_machine_is_not_read_as_a_fixed_cost() -> None:
    """Forwards of 2 rows, then a neighbour's burst triples every forward's time while the set is 4 and 6 rows:
    neighbouring forwards see the same slowdown, so the estimate stays 0 rows. A line through the medians per row
    count would read the burst as a large fixed cost."""
    cpu = line(*CPU)
    costs = ForwardCosts(window=8, min_estimates=3)
    for rows, slowdown in [(2, 1), (2, 1), (4, 1), (4, 3), (6, 3), (4, 3), (6, 3), (2, 3)]:
        costs.record("g", rows, cpu(rows) * slowdown)
    assert costs.launch_rows("g") == pytest.approx(0.0, abs=1e-9)
    medians = costs.describe("g")["median_s_by_rows"]
    assert medians["2"] < medians["4"] / 2  # the medians alone would suggest launch-bound forwards


def test_forward_costs_need_a_few_estimates_and_take_their_median() -> None:
    gpu = line(*GPU)
    costs = ForwardCosts(window=8, min_estimates=3)
    for rows in (2, 2, 4, 2):
        costs.record("g", rows, gpu(rows))
    assert costs.launch_rows("g") is None  # two changes of rows: two estimates
    costs.record("g", 4, gpu(4))
    assert costs.launch_rows("g") == pytest.approx(GPU[0] / GPU[1])
    costs.record("g", 2, gpu(2) * 5)  # one forward slowed by a garbage collection: two wild estimates
    costs.record("g", 4, gpu(4))
    assert costs.launch_rows("g") == pytest.approx(GPU[0] / GPU[1])  # the median ignores them, the last is wild
    costs.record("g", 2, gpu(2))
    assert costs.launch_rows("g") == pytest.approx(GPU[0] / GPU[1])
    assert costs.launch_rows("other") is None  # each cost key has its own
    described = costs.describe("g")
    assert described["estimates"] == 6 and described["forwards_by_rows"] == {"2": 5, "4": 3}
    for _ in range(8):
        costs.record("g", 4, 0.3)
        costs.record("g", 2, 0.15)  # the window forgets old estimates
    assert costs.launch_rows("g") == pytest.approx(0.0)


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


def test_marginal_admission_is_greedy_until_the_rows_changed_a_few_times() -> None:
    policy = MarginalAdmission(0.2)
    assert policy.admits("g", 2, 2)  # nothing measured
    for _ in range(3):
        policy.record("g", 2, 0.09)
    assert policy.admits("g", 2, 2)  # one row count: nothing to compare
    for rows in (4, 2):
        policy.record("g", rows, 0.045 * rows)
    assert policy.admits("g", 2, 2)  # two estimates
    policy.record("g", 4, 0.18)
    assert not policy.admits("g", 2, 2)  # three say compute-bound
    assert policy.admits("another size", 2, 2)  # which says nothing of another cost key


def test_forwards_whose_rows_cost_more_in_larger_batches_are_never_shared_and_free_rows_always_are() -> None:
    """A negative fixed cost (bigger batches cost more per row, as on a CPU past its caches) refuses; forwards
    that cost the same whatever their rows admit."""
    assert not measured(line(-0.02, 0.05)).admits("g", 4, 2)
    assert measured(line(0.1, 0.0)).admits("g", 4, 8)


def test_the_policies_describe_what_they_measured() -> None:
    assert GreedyAdmission().describe() == {"admission": "greedy"}
    described = measured(line(*GPU)).describe()
    assert described["admission"] == "marginal" and described["min_row_saving"] == 0.2
    seen = described["measured"]["g"]
    assert seen["launch_rows"] == pytest.approx(GPU[0] / GPU[1]) and seen["estimates"] == 3
    assert seen["forwards_by_rows"] == {"2": 1, "4": 2, "6": 1} and not seen["launch_free"]
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


def test_the_config_names_the_policy_and_its_threshold() -> None:
    from pydantic import ValidationError

    from deployments.config import DenoiserBatching
    from deployments.denoiser import admission_policy

    default = admission_policy(DenoiserBatching())
    assert isinstance(default, MarginalAdmission) and default.min_row_saving == 0.2
    assert isinstance(admission_policy(DenoiserBatching(admission="greedy")), GreedyAdmission)
    assert admission_policy(DenoiserBatching(min_row_saving=0.5)).min_row_saving == 0.5
    for bad in ({"admission": "eager"}, {"min_row_saving": 0}, {"min_row_saving": 1}):
        with pytest.raises(ValidationError):
            DenoiserBatching.model_validate(bad)
