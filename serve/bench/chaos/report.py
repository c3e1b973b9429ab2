"""The soak's JSON report: settings, capacity, traffic counts, faults, every check's verdict and evidence, and the
headline numbers a test or a person reads first."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .records import RunLog
from .verdicts import CheckResult


def headline(checks: list[CheckResult]) -> dict[str, int]:
    """The numbers the soak exists for (all must be 0): lost, duplicated, stuck, malformed, hostile not 4xx; and,
    reported beside them, what Ray Serve's proxy answered itself in plain text: 500s for requests in flight on a
    killed Ingress replica and 404s while the restarted service's app was not deployed yet (no code of ours runs
    for those; a client resends them, with its Idempotency-Key)."""
    by = {check.name: check.counts for check in checks}
    stored, jobs, twice = by["results_stored"], by["jobs_terminal"], by["nothing_twice"]
    return {
        "lost": stored["lost"] + stored["spooled_lost"],
        "corrupt_or_mismatched": stored["corrupt"] + stored["mismatched"],
        "duplicated": twice["stored_twice"] + twice["job_runs_unaccounted"] + twice["deliveries_repeated"],
        "orphaned": sum(by["no_orphaned_results"][k] for k in ("of_failed_requests", "of_failed_jobs", "unclaimed")),
        "stuck": jobs["stuck"] + jobs["late"],
        "malformed_errors": by["error_bodies"]["malformed"],
        "leaking_errors": by["error_bodies"]["leaking"],
        "hostile_not_4xx": by["hostile_4xx"]["not_4xx"],
        "failures_not_explained": by["failures_explained"]["not_hidden"] + by["failures_explained"]["unexplained"],
        "ray_proxy_answers": by["error_bodies"]["proxy_500"],
        "stored_for_ray_proxy_answers": by["no_orphaned_results"].get("of_proxy_answers", 0),
    }


def traffic_counts(log: RunLog, t0: float) -> dict[str, Any]:
    """Requests by kind and outcome, over the whole run and in the open-loop part alone."""

    def outcome(status: int | None) -> str:
        return "no answer" if status is None else str(status)

    every = Counter((e.kind, outcome(e.status)) for e in log.exchanges)
    open_loop = [e for e in log.exchanges if e.scheduled_at >= t0]
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, status), count in sorted(every.items()):
        by_kind.setdefault(kind, {})[status] = count
    return {
        "exchanges": len(log.exchanges),
        "open_loop_exchanges": len(open_loop),
        "by_kind_and_status": by_kind,
        "jobs_accepted": len(log.jobs),
        "webhook_deliveries": len(log.deliveries),
        "transport_errors": dict(Counter(e.transport_error.split(":")[0] for e in log.exchanges if e.transport_error)),
    }


def report(
    log: RunLog,
    checks: list[CheckResult],
    *,
    t0: float,
    settings: dict[str, Any],
    capacity: dict[str, Any],
    stack: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    numbers = headline(checks)
    return {
        "benchmark": "chaos",
        "machine": machine,
        "settings": settings,
        "stack": stack,
        "capacity": capacity,
        "traffic": traffic_counts(log, t0),
        "faults": [
            {
                **fault.model_dump(exclude={"started_at", "ended_at"}),
                "start_s": round(fault.started_at - t0, 1),
                "end_s": None if fault.ended_at is None else round(fault.ended_at - t0, 1),
                "seconds": None if fault.ended_at is None else round(fault.ended_at - fault.started_at, 1),
            }
            for fault in log.faults
        ],
        "headline": numbers,
        "verdicts": {check.name: check.verdict for check in checks},
        "passed": all(check.verdict != "fail" for check in checks),
        "checks": [check.model_dump() for check in checks],
    }
