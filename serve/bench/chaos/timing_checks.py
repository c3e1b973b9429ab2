"""The soak's invariants over time: which failures a fault explains, tail latency after each fault, replica memory.

Pure functions of the run's records, like checks.py. A fault's window is from its start to its end plus a grace
period; what the service must hide (a lost replica, node or event channel: the ingress retries a generation once on
another replica) and what it cannot (S3 down, the service itself restarting: clients get honest 503s or no answer)
decide whether a failed request inside a window is a violation.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from .records import Exchange, FaultLog, RunLog
from .verdicts import CheckResult, epoch, p99, result

HIDDEN_FAULTS = ("replica", "events-actor", "node")  # the service must hide these from clients
OUTAGE_FAULTS = ("s3-outage", "s3-crash", "service-restart")  # these it may answer with 503s or not at all
GENERATE = ("generate_json", "generate_multipart")
SHED = "overloaded"  # the documented answer to more work than the replicas left can take (503 + Retry-After)


class TimingSettings(BaseModel):
    recovery_delay_s: float = 30.0  # p99 must be back within this long after a fault ends
    window_s: float = 60.0  # latency windows before the fault and after the delay
    latency_factor: float = 1.5
    min_samples: int = 5
    fault_grace_s: float = 30.0  # failures this long after a fault's end are still the fault's
    rss_limit: float = 0.02
    rss_min_span_s: float = 60.0  # a shorter series says nothing about growth
    rss_settle_s: float = 60.0  # a replica's first minute (loading, first requests of each kind) is not counted


def _window(fault: FaultLog, log: RunLog, grace_s: float) -> tuple[float, float]:
    end = fault.ended_at if fault.ended_at is not None else log.traffic_end
    return fault.started_at - 1.0, end + grace_s


def _overlapping(begin: float, end: float, log: RunLog, grace_s: float) -> list[FaultLog]:
    """The faults whose window (start to end plus ``grace_s``) overlaps ``[begin, end]``."""
    return [f for f in log.faults if begin <= _window(f, log, grace_s)[1] and end >= _window(f, log, grace_s)[0]]


PROXY_ANSWER = "Internal Server Error"  # Ray Serve's proxy, as text/plain, for a request whose ingress replica died
DROPPED = "RemoteProtocolError: Server disconnected"  # the client's record of a connection closed unanswered


def lost_with_the_ingress(e: Exchange, log: RunLog, grace_s: float) -> bool:
    """Whether ``e`` is Ray Serve's HTTP proxy answering for an Ingress replica killed with the request in flight
    (or, during a service restart, for the application not deployed yet: a plain-text 404 "Path ... not found").

    The proxy, not our code, answers then: a plain-text 500 (``ray/serve/_private/http_util.py`` maps the replica's
    ``RayActorError`` to it; Serve has no setting for its body). The service cannot retry a request whose own
    replica died; a client may send it again with its Idempotency-Key (``serve.client`` does). A service restart
    stops the Ingress the same way once its drain time is up, so a request still in flight then gets that 500 too.
    Such answers are counted apart, only while an Ingress replica is lost (killed, or on the lost node) or a service
    restart is under way; so is a connection the proxy closed unanswered while an Ingress replica was lost."""
    if (e.content_type or "").startswith("application/json"):
        return False
    body = e.body_excerpt or ""
    begin, end = e.sent_at, e.finished_at if e.finished_at is not None else e.sent_at
    faults = _overlapping(begin, end, log, grace_s)
    if e.status == 500 and body.startswith(PROXY_ANSWER):
        return any(_ingress_lost(f) or f.kind == "service-restart" for f in faults)
    if e.status is None and (e.transport_error or "").startswith(DROPPED):
        return any(_ingress_lost(f) for f in faults)
    # While the service restarts, the proxy is up before the application is deployed again: "Path ... not found".
    if e.status == 404 and body.startswith("Path '") and "not found" in body:
        return any(f.kind == "service-restart" for f in faults)
    return False


def _ingress_lost(fault: FaultLog) -> bool:
    """Whether ``fault`` took an Ingress replica with its requests: an Ingress kill, or a node loss whose replicas
    included one."""
    if fault.kind == "replica":
        return fault.target == "Ingress"
    lost = (fault.detail.get("replicas_lost") or []) if fault.kind == "node" else []
    return any(str(replica).startswith("Ingress:") for replica in lost)


def _failures(log: RunLog, grace_s: float) -> list[dict[str, Any]]:
    """Every request that got a 5xx or no answer (hostile ones aside), and every job that failed: what, when, why."""
    found = []
    for e in log.exchanges:
        if e.kind == "hostile" or (e.status is not None and e.status < 500):
            continue
        code = (e.error or {}).get("code") or (f"HTTP {e.status}" if e.status else (e.transport_error or "no answer"))
        message = (e.error or {}).get("message") or e.body_excerpt or e.transport_error or ""
        found.append(
            {
                "what": f"{e.kind} #{e.seq}",
                "variant": e.variant,
                "status": e.status,
                "code": str(code),
                "message": message,
                "span": (e.sent_at, e.finished_at),
                "shed": e.status == 503 and code == SHED and e.retry_after is not None,
                "proxy": lost_with_the_ingress(e, log, grace_s),
            }
        )
    for job in log.jobs:
        final = job.final or {}
        if final.get("status") != "failed":
            continue
        error = final.get("error") or {}
        finished = epoch(final.get("updated_at")) or log.traffic_end
        found.append(
            {
                "what": f"job {job.job_id}",
                "variant": job.variant,
                "status": "failed",
                "code": str(error.get("code")),
                "message": str(error.get("message") or ""),
                "span": (job.accepted_at, finished),
                "shed": False,
                "proxy": False,
            }
        )
    return found


def failures_explained(log: RunLog, settings: TimingSettings) -> CheckResult:
    """Every 5xx, unanswered request (hostile ones aside) and failed job overlaps an S3 outage or a service restart,
    or is load shed (``overloaded`` with Retry-After) while a fault has taken capacity away. One that overlaps only
    losses the service must hide (it retries a generation once on another replica), or no fault at all, fails."""
    counts: dict[str, Any] = {"failures": 0, "during_outages": 0, "shed_during_faults": 0, "not_hidden": 0}
    counts["lost_with_the_ingress"] = 0
    counts["unexplained"] = 0
    codes: dict[str, int] = defaultdict(int)
    evidence: list[dict[str, Any]] = []
    for failure in _failures(log, settings.fault_grace_s):
        counts["failures"] += 1
        codes[failure["code"][:60]] += 1
        begin, end = failure["span"]
        faults = _overlapping(begin, end, log, settings.fault_grace_s)
        if failure["proxy"]:
            counts["lost_with_the_ingress"] += 1
            continue
        if any(f.kind in OUTAGE_FAULTS for f in faults):
            counts["during_outages"] += 1
            continue
        if faults and failure["shed"]:
            counts["shed_during_faults"] += 1
            continue
        problem = "not_hidden" if faults else "unexplained"
        counts[problem] += 1
        row = {k: v for k, v in failure.items() if k not in ("span", "shed", "proxy")}
        row |= {
            "problem": problem,
            "message": failure["message"][:300],
            "faults": [f"{f.kind}:{f.target}" for f in faults],
        }
        evidence.append({**row, "at_s": round(begin - log.started_at, 1)})
    counts["by_code"] = dict(codes)
    failed = bool(counts["not_hidden"] or counts["unexplained"])
    what = (
        "5xx, unanswered requests and failed jobs happen only during S3 outages and service restarts, or as load shed "
    )
    what += "while a fault took capacity (a lost replica, node or event channel is hidden by a retry)"
    return result("failures_explained", what, counts, evidence, failed)


def latency_recovers(log: RunLog, settings: TimingSettings) -> CheckResult:
    """After each fault, the p99 latency of successful generations (counted from their scheduled arrival) in the
    window starting ``recovery_delay_s`` after its end is within ``latency_factor`` of the p99 in the window before it
    started. Too few requests in either window: inconclusive for that fault."""
    samples = [(e.scheduled_at, e.latency_s) for e in log.exchanges if e.kind in GENERATE and e.status == 200]
    rows, evidence = [], []
    failed = inconclusive = 0
    for fault in log.faults:
        if fault.ended_at is None:
            continue
        before = [lat for t, lat in samples if fault.started_at - settings.window_s <= t < fault.started_at]
        start = fault.ended_at + settings.recovery_delay_s
        after = [lat for t, lat in samples if start <= t < start + settings.window_s]
        row: dict[str, Any] = {"fault": f"{fault.kind}:{fault.target}", "before_n": len(before), "after_n": len(after)}
        row |= {"before_p99_s": p99(before), "after_p99_s": p99(after)}
        if len(before) < settings.min_samples or len(after) < settings.min_samples:
            row["verdict"] = "inconclusive"
            inconclusive += 1
        else:
            row["ratio"] = row["after_p99_s"] / row["before_p99_s"]
            row["verdict"] = "pass" if row["ratio"] <= settings.latency_factor else "fail"
            if row["verdict"] == "fail":
                failed += 1
                evidence.append(row)
        rows.append(row)
    counts = {"faults": len(rows), "recovered": len(rows) - failed - inconclusive, "not_recovered": failed}
    counts |= {"inconclusive": inconclusive, "per_fault": rows}
    what = (
        f"p99 latency is back within {settings.latency_factor}x of its pre-fault value "
        f"{settings.recovery_delay_s:.0f} s after each fault ends"
    )
    check = result("latency_recovers", what, counts, evidence, bool(failed))
    if not failed and inconclusive:
        check.verdict = "inconclusive"
        check.note = f"fewer than {settings.min_samples} successful requests in a window for {inconclusive} fault(s)"
    return check


def memory_is_flat(log: RunLog, settings: TimingSettings) -> CheckResult:
    """Each replica process's RSS, from the end of warm-up (or ``rss_settle_s`` after it started, if later) to its
    last sample, grows less than ``rss_limit``. Medians of the first and last three samples damp one-off spikes; a
    replica restarted by a fault is another process and so another series."""
    series: dict[int, list[tuple[float, int, str]]] = defaultdict(list)
    for sample in log.rss:
        series[sample.pid].append((sample.t, sample.rss, sample.deployment))
    rows, evidence = [], []
    failed = short = 0
    for pid, points in sorted(series.items()):
        points.sort()
        begin = max(log.warmup_end, points[0][0] + settings.rss_settle_s)
        kept = [p for p in points if p[0] >= begin]
        row: dict[str, Any] = {"pid": pid, "deployment": points[0][2], "samples": len(kept)}
        if len(kept) < 3 or kept[-1][0] - kept[0][0] < settings.rss_min_span_s:
            short += 1
            continue
        first = statistics.median(p[1] for p in kept[:3])
        last = statistics.median(p[1] for p in kept[-3:])
        row |= {"span_s": round(kept[-1][0] - kept[0][0], 1), "first_mib": first / 2**20, "last_mib": last / 2**20}
        row["growth"] = (last - first) / first
        if row["growth"] >= settings.rss_limit:
            failed += 1
            evidence.append(row)
        rows.append(row)
    counts = {"replicas_measured": len(rows), "growing": failed, "too_short": short, "per_replica": rows}
    what = f"after warm-up each replica's RSS grows less than {settings.rss_limit:.0%} over the run"
    check = result("memory_flat", what, counts, evidence, bool(failed))
    if not rows:
        check.verdict = "inconclusive"
        check.note = f"no replica was sampled for {settings.rss_min_span_s:.0f} s after warm-up"
    return check
