"""The ingress's autoscaling policy: replicas for the generations the replicas report, never for open streams."""

from __future__ import annotations

from types import SimpleNamespace

from ray.serve.config import AutoscalingConfig

from serve.ingress.autoscaling import GENERATIONS_METRIC, generation_slots_policy


def context(reported: dict[str, float] | None, *, current: int = 2, low: int = 1, high: int = 8) -> SimpleNamespace:
    """The fields of Serve's AutoscalingContext the policy reads (its real config model)."""
    config = AutoscalingConfig(min_replicas=low, max_replicas=high, target_ongoing_requests=16)
    metrics = None if reported is None else {GENERATIONS_METRIC: reported}
    return SimpleNamespace(
        aggregated_metrics=metrics,
        config=config,
        target_num_replicas=current,
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state={"kept": True},
    )


def test_replicas_follow_the_reported_generations_within_bounds() -> None:
    assert generation_slots_policy(context({"a": 16.0, "b": 17.0}))[0] == 3  # 33 generations, 16 per replica
    assert generation_slots_policy(context({"a": 0.0, "b": 0.0}))[0] == 1  # idle: the minimum, whatever streams
    assert generation_slots_policy(context({"a": 500.0}))[0] == 8  # the maximum
    assert generation_slots_policy(context({"a": 0.0}, low=0))[0] == 0


def test_without_reports_the_deployment_keeps_its_size_and_state() -> None:
    assert generation_slots_policy(context(None, current=3)) == (3, {"kept": True})
    assert generation_slots_policy(context({}, current=2)) == (2, {"kept": True})
