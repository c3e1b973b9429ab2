"""The soak's invariants over what was recorded: a pure function of (client log, S3 snapshot) to verdicts.

Nothing here talks to a service: the run's records (records.py) and what S3 held afterwards are the whole input,
so every check can be fed a planted fault in a unit test and must fail on it. The timing checks (latency after a
fault, replica memory, which failures a fault explains) are in timing_checks.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .records import Exchange, RunLog, S3Snapshot
from .timing_checks import (
    TimingSettings,
    failures_explained,
    latency_recovers,
    lost_with_the_ingress,
    memory_is_flat,
)
from .verdicts import CheckResult, epoch, result

TERMINAL = ("succeeded", "failed", "cancelled")
WRITE_SLACK_S = 2.0  # S3's LastModified has second resolution; the job record is written right after the store
ERROR_FIELDS = ("code", "message", "request_id")


def _generations(log: RunLog) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(who reported it, generation id, the images it listed) for every 200 and every succeeded job."""
    found = []
    for e in log.exchanges:
        if e.kind in ("generate_json", "generate_multipart") and e.status == 200 and e.generation_id:
            found.append((f"{e.kind} #{e.seq} ({e.request_id})", e.generation_id, [i.model_dump() for i in e.images]))
    for job in log.jobs:
        if job.final and job.final.get("status") == "succeeded":
            images = (job.final.get("result") or {}).get("images") or []
            found.append(
                (f"job {job.job_id}", job.job_id, [{"uri": i["uri"], "bytes": i.get("bytes")} for i in images])
            )
    return found


def results_are_stored(log: RunLog, s3: S3Snapshot) -> CheckResult:
    """Every 200 and succeeded job: meta.json and every image in S3, readable, each image's sha256 and size equal to
    meta.json's record of it, and the response listing exactly those URIs; every spooled 503 uploaded by the end."""
    evidence: list[dict[str, Any]] = []
    counts = {"checked": 0, "lost": 0, "corrupt": 0, "mismatched": 0, "spooled_checked": 0, "spooled_lost": 0}
    for origin, generation_id, listed in _generations(log):
        counts["checked"] += 1
        meta = s3.metas.get(generation_id)
        if meta is None:
            counts["lost"] += 1
            reason = next((why for key, why in s3.unreadable.items() if generation_id in key), "no meta.json")
            evidence.append({"problem": "lost", "by": origin, "generation": generation_id, "detail": reason})
            continue
        records = meta.get("images") or []
        problems = []
        for record in records:
            stored = s3.objects.get(record.get("key", ""))
            if stored is None:
                problems.append(("lost", f"{record.get('key')} is not in S3"))
            elif stored.sha256 != record.get("sha256"):
                problems.append(
                    ("corrupt", f"{record['key']}: sha256 {stored.sha256} != meta's {record.get('sha256')}")
                )
            elif stored.size != record.get("bytes"):
                problems.append(("corrupt", f"{record['key']}: {stored.size} bytes != meta's {record.get('bytes')}"))
        uris = [f"s3://{s3.bucket}/{record.get('key')}" for record in records]
        if [image["uri"] for image in listed] != uris:
            problems.append(("mismatched", f"the response lists {[i['uri'] for i in listed]}, meta.json {uris}"))
        sizes = [image.get("bytes") for image in listed]
        if any(size is not None for size in sizes) and sizes != [record.get("bytes") for record in records]:
            problems.append(("mismatched", f"the response's sizes {sizes} differ from meta.json's"))
        if not records:
            problems.append(("lost", "meta.json lists no image"))
        for kind in {kind for kind, _ in problems}:
            counts[kind] += 1
        evidence += [{"problem": k, "by": origin, "generation": generation_id, "detail": d} for k, d in problems]
    for e in log.exchanges:
        spooled = (e.error or {}).get("generation_id")
        if e.status == 503 and spooled:
            counts["spooled_checked"] += 1
            if spooled not in s3.metas:
                counts["spooled_lost"] += 1
                evidence.append({"problem": "spooled_lost", "by": f"{e.kind} #{e.seq}", "generation": spooled})
    failed = any(counts[k] for k in ("lost", "corrupt", "mismatched", "spooled_lost"))
    what = "every 200 and succeeded job has meta.json and its images in S3 with matching sha256, sizes and URIs"
    return result("results_stored", what, counts, evidence, failed)


def jobs_are_terminal(log: RunLog, deadline_s: float) -> CheckResult:
    """Every accepted job ended (succeeded, or failed with an error code) within ``deadline_s`` of its acceptance."""
    counts: dict[str, Any] = {"accepted": len(log.jobs), "stuck": 0, "late": 0, "failed_without_code": 0}
    by_status: dict[str, int] = defaultdict(int)
    evidence: list[dict[str, Any]] = []
    for job in log.jobs:
        final = job.final or {}
        status = final.get("status")
        by_status[str(status)] += 1
        if status not in TERMINAL:
            counts["stuck"] += 1
            evidence.append(
                {
                    "problem": "stuck",
                    "job": job.job_id,
                    "status": status,
                    "attempts": final.get("attempts"),
                    "updated_at": final.get("updated_at"),
                    "poll_error": job.poll_error,
                }
            )
            continue
        if status == "failed" and not (final.get("error") or {}).get("code"):
            counts["failed_without_code"] += 1
            evidence.append({"problem": "failed_without_code", "job": job.job_id, "error": final.get("error")})
        finished = epoch(final.get("updated_at"))
        if finished is not None and finished - job.accepted_at > deadline_s:
            counts["late"] += 1
            took = round(finished - job.accepted_at, 1)
            evidence.append({"problem": "late", "job": job.job_id, "took_s": took, "deadline_s": deadline_s})
    counts["by_status"] = dict(by_status)
    failed = bool(counts["stuck"] or counts["late"] or counts["failed_without_code"])
    what = f"every accepted job is terminal (failed ones with an error code) within {deadline_s:.0f} s"
    return result("jobs_terminal", what, counts, evidence, failed)


def _stage_starts(timings: dict[str, Any] | None) -> dict[str, float]:
    return {k: v.get("start") for k, v in (timings or {}).items() if isinstance(v, dict) and k not in ("total",)}


def nothing_twice(log: RunLog, s3: S3Snapshot) -> CheckResult:
    """No request stored two generations; no job completed more often than its ``attempts`` say (webhooks sent for
    it, or a stored generation that is not the run the job reports); no delivery id acknowledged twice."""
    evidence: list[dict[str, Any]] = []
    counts = {"generations": len(s3.metas), "stored_twice": 0, "job_runs_unaccounted": 0, "deliveries_repeated": 0}
    by_request: dict[str, list[str]] = defaultdict(list)
    for generation_id, meta in s3.metas.items():
        if meta.get("job_id") is None and meta.get("request_id"):
            by_request[meta["request_id"]].append(generation_id)
    for request_id, ids in sorted(by_request.items()):
        if len(ids) > 1:
            counts["stored_twice"] += 1
            evidence.append({"problem": "stored_twice", "request_id": request_id, "generations": sorted(ids)})
    deliveries: dict[str, set[str]] = defaultdict(set)
    acknowledged: dict[str, int] = defaultdict(int)
    for delivery in log.deliveries:
        if delivery.job_id and delivery.delivery_id:
            deliveries[delivery.job_id].add(delivery.delivery_id)
        if delivery.delivery_id and 200 <= delivery.answered < 300:
            acknowledged[delivery.delivery_id] += 1
    for delivery_id, times in sorted(acknowledged.items()):
        if times > 1:
            counts["deliveries_repeated"] += 1
            evidence.append({"problem": "delivery_repeated", "delivery_id": delivery_id, "acknowledged": times})
    for job in log.jobs:
        attempts = int((job.final or {}).get("attempts") or 1)
        sent = len(deliveries.get(job.job_id, ()))
        if sent > attempts:
            counts["job_runs_unaccounted"] += 1
            evidence.append(
                {"problem": "webhooks_beyond_attempts", "job": job.job_id, "webhooks": sent, "attempts": attempts}
            )
        meta, final = s3.metas.get(job.job_id), job.final or {}
        reported = _stage_starts((final.get("result") or {}).get("timings"))
        stored = _stage_starts((meta or {}).get("timings"))
        common = sorted(set(reported) & set(stored) - {"store"})
        finished = epoch(final.get("updated_at"))
        written = next((o.last_modified for k, o in s3.objects.items() if k.endswith(f"/{job.job_id}/meta.json")), None)
        late = finished is not None and written is not None and written > finished + WRITE_SLACK_S
        if final.get("status") == "succeeded" and late:
            counts["job_runs_unaccounted"] += 1
            late = round(written - finished, 1)
            evidence.append(
                {
                    "problem": "stored_after_the_job_ended",
                    "job": job.job_id,
                    "seconds_after": late,
                    "attempts": attempts,
                }
            )
            continue
        rerun = any(reported[k] != stored[k] for k in common)
        if final.get("status") == "succeeded" and meta and attempts == 1 and rerun:
            counts["job_runs_unaccounted"] += 1
            evidence.append(
                {
                    "problem": "stored_by_another_run",
                    "job": job.job_id,
                    "attempts": attempts,
                    "reported_stage_starts": {k: reported[k] for k in common},
                    "stored_stage_starts": {k: stored[k] for k in common},
                }
            )
    failed = any(counts[k] for k in ("stored_twice", "job_runs_unaccounted", "deliveries_repeated"))
    what = "no generation stored twice, no job completed beyond its attempts, no webhook delivery acknowledged twice"
    return result("nothing_twice", what, counts, evidence, failed)


def _error_shape_ok(e: Exchange) -> bool:
    error = e.error or {}
    json_body = (e.content_type or "").startswith("application/json")
    return json_body and all(isinstance(error.get(k), str) and error.get(k) for k in ERROR_FIELDS)


def error_bodies_are_ours(log: RunLog, grace_s: float = TimingSettings().fault_grace_s) -> CheckResult:
    """Every non-2xx answer is ``{"error": {"code", "message", "request_id"}}`` JSON, and no message shows an internal
    address or path (the S3 endpoint, the Ray address, the bench's folders). Ray Serve's proxy's own plain-text 500
    for a request whose Ingress replica was killed under it (by a replica kill or a service restart) is counted
    apart (``proxy_500``), and only then."""
    counts = {"non_2xx": 0, "malformed": 0, "leaking": 0, "proxy_500": 0}
    evidence: list[dict[str, Any]] = []
    for e in log.exchanges:
        if e.status is None or 200 <= e.status < 300:
            continue
        counts["non_2xx"] += 1
        where = {"seq": e.seq, "kind": e.kind, "variant": e.variant, "status": e.status}
        if lost_with_the_ingress(e, log, grace_s):
            counts["proxy_500"] += 1
            continue
        if not _error_shape_ok(e):
            counts["malformed"] += 1
            body = e.body_excerpt if e.error is None else e.error
            evidence.append({"problem": "malformed", **where, "content_type": e.content_type, "body": body})
            continue
        message = str(e.error.get("message"))
        shown = [marker for marker in log.internal_markers if marker and marker in message]
        if shown:
            counts["leaking"] += 1
            evidence.append(
                {"problem": "leaking", **where, "code": e.error.get("code"), "shows": shown, "message": message[:300]}
            )
    failed = bool(counts["malformed"] or counts["leaking"])
    what = 'every non-2xx is {"error": {"code", "message", "request_id"}} JSON and names no internal address or path'
    return result("error_bodies", what, counts, evidence, failed)


def hostile_get_4xx(log: RunLog) -> CheckResult:
    """Every hostile request that was answered got a 4xx. Apart: unanswered ones (the service was down) and load shed
    before the request was read (503 ``overloaded`` with Retry-After: admission comes before reading a body)."""
    hostile = [e for e in log.exchanges if e.kind == "hostile"]
    counts = {"sent": len(hostile), "answered": 0, "not_4xx": 0, "unanswered": 0, "shed": 0}
    counts["unexpected_status_or_code"] = 0
    evidence: list[dict[str, Any]] = []
    for e in hostile:
        if e.status is None:
            counts["unanswered"] += 1
            continue
        counts["answered"] += 1
        if e.status == 503 and (e.error or {}).get("code") == "overloaded" and e.retry_after is not None:
            counts["shed"] += 1
        elif not 400 <= e.status < 500:
            counts["not_4xx"] += 1
            evidence.append(
                {"case": e.variant, "seq": e.seq, "status": e.status, "error": e.error, "body": e.body_excerpt}
            )
        elif (e.expected_status and e.status not in e.expected_status) or (
            e.expected_code and (e.error or {}).get("code") not in e.expected_code
        ):
            counts["unexpected_status_or_code"] += 1
    note = "unexpected_status_or_code: a 4xx, but not the one tests/test_hostile.py expects (not a failure here)"
    return result(
        "hostile_4xx", "every answered hostile request got a 4xx", counts, evidence, bool(counts["not_4xx"]), note
    )


def streams_end_with_the_outcome(log: RunLog) -> CheckResult:
    """Every job subscriber (reconnecting with Last-Event-ID) got the terminal event of the job's final status."""
    followed = [job for job in log.jobs if job.stream is not None]
    counts = {"streams": len(followed), "ended_with_outcome": 0, "no_outcome": 0, "wrong_outcome": 0, "reconnects": 0}
    evidence: list[dict[str, Any]] = []
    for job in followed:
        stream = job.stream
        counts["reconnects"] += max(0, stream.connects - 1)
        final = (job.final or {}).get("status")
        if stream.terminal is None:
            counts["no_outcome"] += 1
            evidence.append(
                {
                    "problem": "no_outcome",
                    "job": job.job_id,
                    "final": final,
                    "connects": stream.connects,
                    "errors": stream.errors[-5:],
                }
            )
        elif final in TERMINAL and stream.terminal != final:
            counts["wrong_outcome"] += 1
            evidence.append({"problem": "wrong_outcome", "job": job.job_id, "stream": stream.terminal, "final": final})
        else:
            counts["ended_with_outcome"] += 1
    failed = bool(counts["no_outcome"] or counts["wrong_outcome"])
    return result(
        "streams_end_with_outcome", "every event stream ends with the job's outcome", counts, evidence, failed
    )


def webhooks_arrive_signed(log: RunLog) -> CheckResult:
    """Every delivery carries a valid signature; every finished job with a callback was delivered to the receiver."""
    counts = {"deliveries": len(log.deliveries), "bad_signature": 0, "jobs_with_callback": 0, "undelivered": 0}
    evidence: list[dict[str, Any]] = []
    for delivery in log.deliveries:
        if not delivery.signature_ok:
            counts["bad_signature"] += 1
            evidence.append({"problem": "bad_signature", "delivery_id": delivery.delivery_id, "job": delivery.job_id})
    acked = {d.job_id for d in log.deliveries if d.signature_ok and 200 <= d.answered < 300}
    for job in log.jobs:
        if not job.callback or (job.final or {}).get("status") not in TERMINAL:
            continue
        counts["jobs_with_callback"] += 1
        if job.job_id not in acked:
            counts["undelivered"] += 1
            evidence.append({"problem": "undelivered", "job": job.job_id, "webhook": (job.final or {}).get("webhook")})
    failed = bool(counts["bad_signature"] or counts["undelivered"])
    what = "every webhook is signed correctly and every finished job with a callback_url was delivered"
    return result("webhooks", what, counts, evidence, failed)


def no_orphaned_results(log: RunLog, s3: S3Snapshot, grace_s: float = TimingSettings().fault_grace_s) -> CheckResult:
    """S3 holds no generation its client was not told about: none for a request answered with an error (other than
    the spooled 503 that names it), none for a job that failed or was cancelled, none from a request id the client
    never sent (a hostile request, or a run nobody asked for).

    One case is counted apart (``of_proxy_answers``): the Ingress replica died after the ResultStore had stored the
    image, so Ray Serve's proxy, not the service, answered its plain-text 500 (see ``lost_with_the_ingress``). The
    generation is complete and listed in its owner's history (``GET /v1/generations``), where it can be deleted."""
    counts = {
        "generations": len(s3.metas),
        "of_failed_requests": 0,
        "of_failed_jobs": 0,
        "unclaimed": 0,
        "of_proxy_answers": 0,
    }
    evidence: list[dict[str, Any]] = []
    requests = {
        e.request_id: e for e in log.exchanges if e.request_id and e.kind in ("generate_json", "generate_multipart")
    }
    jobs = {job.job_id: job for job in log.jobs}
    submitted = {e.request_id for e in log.exchanges if e.kind == "job_submit" and e.request_id}
    for generation_id, meta in sorted(s3.metas.items()):
        job_id, request_id = meta.get("job_id"), meta.get("request_id")
        if job_id is not None:
            job = jobs.get(job_id)
            status = (job.final or {}).get("status") if job else None
            if job is None and request_id not in submitted:
                counts["unclaimed"] += 1
                evidence.append({"problem": "unclaimed", "generation": generation_id, "request_id": request_id})
            elif status in ("failed", "cancelled") and generation_id not in str((job.final or {}).get("error")):
                counts["of_failed_jobs"] += 1  # (a failed job whose error names its spooled generation told its client)
                error = (job.final or {}).get("error")
                evidence.append(
                    {"problem": "of_failed_job", "generation": generation_id, "job_status": status, "error": error}
                )
            continue
        exchange = requests.get(request_id)
        if exchange is None:
            counts["unclaimed"] += 1
            evidence.append({"problem": "unclaimed", "generation": generation_id, "request_id": request_id})
        elif exchange.status != 200 and lost_with_the_ingress(exchange, log, grace_s):
            counts["of_proxy_answers"] += 1
        elif exchange.status != 200 and (exchange.error or {}).get("generation_id") != generation_id:
            counts["of_failed_requests"] += 1
            code = (exchange.error or {}).get("code") or exchange.transport_error
            evidence.append(
                {
                    "problem": "of_failed_request",
                    "generation": generation_id,
                    "request_id": request_id,
                    "answer": exchange.status,
                    "code": code,
                }
            )
    failed = any(counts[k] for k in ("of_failed_requests", "of_failed_jobs", "unclaimed"))
    what = "S3 holds no generation of a failed request or job, nor one no client request asked for"
    return result("no_orphaned_results", what, counts, evidence, failed)


HEALED = {"replica": "replaced", "events-actor": "restarted", "node": "replaced", "s3-crash": "restarted_by_service"}


def faults_heal(log: RunLog) -> CheckResult:
    """Every fault was caused, and the service healed what it lost by itself: Serve replaced a killed replica and the
    lost node's replicas, Ray restarted the event channel, the service restarted its crashed S3 store."""
    counts = {"faults": len(log.faults), "not_caused": 0, "not_healed": 0}
    evidence: list[dict[str, Any]] = []
    for fault in log.faults:
        if fault.error is not None:
            counts["not_caused"] += 1
            evidence.append({"problem": "not_caused", "fault": f"{fault.kind}:{fault.target}", "error": fault.error})
            continue
        flag = HEALED.get(fault.kind)
        if flag is not None and not fault.detail.get(flag):
            counts["not_healed"] += 1
            evidence.append({"problem": "not_healed", "fault": f"{fault.kind}:{fault.target}", "detail": fault.detail})
    failed = bool(counts["not_caused"] or counts["not_healed"])
    what = "every fault was caused and healed by the service itself (replicas, node, event channel, S3 process)"
    return result("faults_heal", what, counts, evidence, failed)


def run_checks(log: RunLog, s3: S3Snapshot, settings: TimingSettings, job_deadline_s: float) -> list[CheckResult]:
    """Every check, in the order the report lists them."""
    return [
        results_are_stored(log, s3),
        jobs_are_terminal(log, job_deadline_s),
        nothing_twice(log, s3),
        no_orphaned_results(log, s3, settings.fault_grace_s),
        error_bodies_are_ours(log, settings.fault_grace_s),
        hostile_get_4xx(log),
        streams_end_with_the_outcome(log),
        webhooks_arrive_signed(log),
        faults_heal(log),
        failures_explained(log, settings),
        latency_recovers(log, settings),
        memory_is_flat(log, settings),
    ]
