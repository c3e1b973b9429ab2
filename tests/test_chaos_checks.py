"""The chaos soak's checker on planted faults: synthetic client logs and an S3 (a fake client read by the real
snapshot code) where one thing is wrong must fail exactly the check that guards it, and a clean run must pass.

No Ray, no S3 server: the checker is a pure function of the records (serve/bench/chaos/checks.py)."""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
from typing import Any

import pytest

from serve.bench.chaos.checks import (
    error_bodies_are_ours,
    faults_heal,
    hostile_get_4xx,
    jobs_are_terminal,
    no_orphaned_results,
    nothing_twice,
    results_are_stored,
    run_checks,
    streams_end_with_the_outcome,
    webhooks_arrive_signed,
)
from serve.bench.chaos.records import Delivery, Exchange, FaultLog, ImageRef, JobLog, RssSample, RunLog, StreamLog
from serve.bench.chaos.s3_audit import snapshot
from serve.bench.chaos.timing_checks import TimingSettings, failures_explained, latency_recovers, memory_is_flat

BUCKET, PREFIX = "instantid", "generations"
T0 = 1_800_000_000.0
GEN_ID = "20270115T080000Z-00000000000000aa"
JOB_ID = "20270115T080001Z-00000000000000bb"


class FakeS3:
    """The two calls the snapshot makes (a paginated listing, get_object) over a dict of objects."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def get_paginator(self, name: str) -> Any:
        assert name == "list_objects_v2"
        store = self

        class Paginator:
            def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:
                when = datetime.datetime.fromtimestamp(T0, datetime.timezone.utc)
                contents = [
                    {"Key": k, "Size": len(v), "LastModified": when}
                    for k, v in sorted(store.objects.items())
                    if k.startswith(Prefix)
                ]
                return [{"Contents": contents}]

        return Paginator()

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        return {"Body": io.BytesIO(self.objects[Key])}


def _folder(generation_id: str) -> str:
    return f"{PREFIX}/2027/01/15/{generation_id}"


def _store(s3: FakeS3, generation_id: str, request_id: str, job_id: str | None, starts: dict[str, float]) -> list[dict]:
    """A generation as the ResultStore writes it: one image, then meta.json with its sha256; the images listed."""
    image = f"image of {generation_id}".encode()
    key = f"{_folder(generation_id)}/image-0.png"
    s3.put(key, image)
    meta = {
        "id": generation_id,
        "request_id": request_id,
        "job_id": job_id,
        "timings": {stage: {"start": at, "end": at + 1, "seconds": 1.0} for stage, at in starts.items()},
        "images": [{"key": key, "bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()}],
    }
    s3.put(f"{_folder(generation_id)}/meta.json", json.dumps(meta).encode())
    return [{"uri": f"s3://{BUCKET}/{key}", "bytes": len(image)}]


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat()


def clean_run() -> tuple[RunLog, FakeS3]:
    """One 200 from /v1/generate, one job that succeeded with its webhook delivered once, one hostile 422."""
    s3 = FakeS3()
    starts = {"face": T0 + 1, "denoise": T0 + 2}
    listed = _store(s3, GEN_ID, "chaos-gen-000001", None, starts)
    job_images = _store(s3, JOB_ID, "chaos-job-000002", JOB_ID, starts)
    generate = Exchange(
        seq=1,
        kind="generate_json",
        variant="plain",
        request_id="chaos-gen-000001",
        scheduled_at=T0,
        sent_at=T0,
        finished_at=T0 + 2,
        status=200,
        content_type="application/json",
        generation_id=GEN_ID,
        images=[ImageRef(**image) for image in listed],
    )
    hostile = Exchange(
        seq=3,
        kind="hostile",
        variant="prompt-empty",
        scheduled_at=T0,
        sent_at=T0,
        finished_at=T0 + 0.1,
        status=422,
        content_type="application/json",
        error={"code": "invalid_parameter", "message": "prompt is empty", "request_id": "abc"},
        expected_status=[422],
        expected_code=["invalid_parameter"],
    )
    final = {
        "id": JOB_ID,
        "status": "succeeded",
        "attempts": 1,
        "created_at": _iso(T0),
        "updated_at": _iso(T0 + 5),
        "result": {"id": JOB_ID, "images": job_images, "timings": {s: {"start": at} for s, at in starts.items()}},
        "error": None,
        "webhook": {"delivered": True, "attempts": 1, "status": 204},
    }
    job = JobLog(
        seq=2,
        job_id=JOB_ID,
        request_id="chaos-job-000002",
        variant="plain",
        accepted_at=T0,
        callback=True,
        stream=StreamLog(connects=1, events=6, last_event_id=6, terminal="succeeded", terminal_at=T0 + 5),
        final=final,
    )
    delivery = Delivery(
        delivery_id="d1", job_id=JOB_ID, status="succeeded", received_at=T0 + 5, signature_ok=True, answered=204
    )
    log = RunLog(
        started_at=T0 - 60,
        warmup_end=T0,
        traffic_end=T0 + 100,
        exchanges=[generate, hostile],
        jobs=[job],
        deliveries=[delivery],
        internal_markers=["127.0.0.1:23456", "/tmp/instantid-chaos-x"],
    )
    return log, s3


def test_a_clean_run_passes_every_check() -> None:
    log, s3 = clean_run()
    verdicts = {c.name: c.verdict for c in run_checks(log, snapshot(s3, BUCKET, PREFIX), TimingSettings(), 600)}
    assert {name: v for name, v in verdicts.items() if v == "fail"} == {}
    assert verdicts["results_stored"] == verdicts["nothing_twice"] == verdicts["jobs_terminal"] == "pass"


# ------------------------------------------------------------------------------------------ the three planted faults


def test_a_deleted_image_of_a_200_is_reported_lost() -> None:
    log, s3 = clean_run()
    del s3.objects[f"{_folder(GEN_ID)}/image-0.png"]
    check = results_are_stored(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail"
    assert check.counts["lost"] == 1 and check.counts["checked"] == 2
    assert check.evidence[0]["generation"] == GEN_ID and "image-0.png" in check.evidence[0]["detail"]


def test_a_deleted_meta_json_and_an_altered_image_are_reported() -> None:
    log, s3 = clean_run()
    del s3.objects[f"{_folder(GEN_ID)}/meta.json"]
    s3.put(f"{_folder(JOB_ID)}/image-0.png", b"not what meta.json hashed")
    check = results_are_stored(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail"
    assert (check.counts["lost"], check.counts["corrupt"]) == (1, 1)


def test_a_job_left_running_past_its_deadline_is_reported_stuck() -> None:
    log, _ = clean_run()
    log.jobs[0].final = {**log.jobs[0].final, "status": "running", "updated_at": _iso(T0 + 900), "result": None}
    check = jobs_are_terminal(log, deadline_s=600)
    assert check.verdict == "fail" and check.counts["stuck"] == 1
    assert check.evidence[0]["job"] == JOB_ID and check.evidence[0]["status"] == "running"


def test_a_job_that_ended_after_its_deadline_is_reported_late() -> None:
    log, _ = clean_run()
    log.jobs[0].final = {**log.jobs[0].final, "updated_at": _iso(T0 + 700)}
    check = jobs_are_terminal(log, deadline_s=600)
    assert check.verdict == "fail" and check.counts["late"] == 1


def test_a_webhook_delivered_twice_is_reported_duplicated() -> None:
    log, s3 = clean_run()
    log.deliveries.append(log.deliveries[0].model_copy(update={"received_at": T0 + 9}))
    check = nothing_twice(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail" and check.counts["deliveries_repeated"] == 1
    assert check.evidence[0] == {"problem": "delivery_repeated", "delivery_id": "d1", "acknowledged": 2}


# ------------------------------------------------------------------------------------------ the other invariants


def test_a_request_stored_twice_and_a_job_stored_by_another_run_are_duplicates() -> None:
    log, s3 = clean_run()
    _store(s3, "20270115T080002Z-00000000000000cc", "chaos-gen-000001", None, {"denoise": T0})
    _store(s3, JOB_ID, "chaos-job-000002", JOB_ID, {"face": T0 + 1, "denoise": T0 + 30})  # a later run rewrote it
    check = nothing_twice(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail"
    assert (check.counts["stored_twice"], check.counts["job_runs_unaccounted"]) == (1, 1)
    assert {e["problem"] for e in check.evidence} == {"stored_twice", "stored_by_another_run"}


def test_a_second_webhook_for_a_job_of_one_attempt_is_a_duplicate_run() -> None:
    log, s3 = clean_run()
    log.deliveries.append(log.deliveries[0].model_copy(update={"delivery_id": "d2"}))
    assert nothing_twice(log, snapshot(s3, BUCKET, PREFIX)).counts["job_runs_unaccounted"] == 1
    log.jobs[0].final["attempts"] = 2  # a takeover: two completions are what attempts says
    assert nothing_twice(log, snapshot(s3, BUCKET, PREFIX)).verdict == "pass"


def _error(log: RunLog, **fields: Any) -> Exchange:
    base = log.exchanges[0].model_copy(update={"status": 503, "generation_id": None, "images": []})
    return base.model_copy(update=fields)


def test_error_bodies_must_be_our_json_and_name_nothing_internal() -> None:
    log, _ = clean_run()
    log.exchanges.append(_error(log, seq=10, content_type="text/plain", body_excerpt="Internal Server Error"))
    leak = {"code": "storage_unavailable", "message": "S3 at http://127.0.0.1:23456 timed out", "request_id": "r"}
    log.exchanges.append(_error(log, seq=11, content_type="application/json", error=leak))
    check = error_bodies_are_ours(log)
    assert check.verdict == "fail"
    assert (check.counts["malformed"], check.counts["leaking"]) == (1, 1)
    assert check.evidence[1]["shows"] == ["127.0.0.1:23456"]


def test_the_proxys_plain_500_counts_apart_only_while_an_ingress_replica_is_killed() -> None:
    """Ray Serve's proxy answers a request whose Ingress replica died with a plain-text 500: counted apart (and as
    explained) during an Ingress kill, malformed and unexplained at any other time."""
    log, _ = clean_run()
    log.faults = [FaultLog(kind="replica", target="Ingress", started_at=T0 + 10, ended_at=T0 + 20, detail={})]
    plain = {"status": 500, "content_type": "text/plain; charset=utf-8", "body_excerpt": "Internal Server Error"}
    log.exchanges.append(_error(log, seq=40, sent_at=T0 + 12, finished_at=T0 + 13, **plain))
    assert error_bodies_are_ours(log).verdict == "pass" and error_bodies_are_ours(log).counts["proxy_500"] == 1
    explained = failures_explained(log, TimingSettings())
    assert explained.verdict == "pass" and explained.counts["lost_with_the_ingress"] == 1
    log.exchanges.append(_error(log, seq=41, sent_at=T0 + 300, finished_at=T0 + 301, **plain))
    check = error_bodies_are_ours(log)
    assert check.verdict == "fail" and (check.counts["proxy_500"], check.counts["malformed"]) == (1, 1)
    assert failures_explained(log, TimingSettings()).counts["unexplained"] == 1


def test_a_node_loss_that_took_an_ingress_replica_explains_the_proxys_500_and_dropped_connections() -> None:
    """The lost node held an Ingress replica: its in-flight requests got the proxy's plain 500 or a connection
    closed unanswered, counted apart like an Ingress kill's; a node loss without one explains neither."""
    log, _ = clean_run()
    lost = {"replicas_lost": ["Denoiser:abc", "Ingress:def"]}
    log.faults = [FaultLog(kind="node", target="node", started_at=T0 + 10, ended_at=T0 + 20, detail=lost)]
    plain = {"status": 500, "content_type": "text/plain; charset=utf-8", "body_excerpt": "Internal Server Error"}
    log.exchanges.append(_error(log, seq=40, sent_at=T0 + 12, finished_at=T0 + 13, **plain))
    dropped = "RemoteProtocolError: Server disconnected without sending a response."
    gone = {"status": None, "content_type": None, "body_excerpt": None, "error": None, "transport_error": dropped}
    log.exchanges.append(_error(log, seq=41, sent_at=T0 + 12, finished_at=T0 + 14, **gone))
    assert error_bodies_are_ours(log).counts["proxy_500"] == 1 and error_bodies_are_ours(log).verdict == "pass"
    explained = failures_explained(log, TimingSettings())
    assert explained.verdict == "pass" and explained.counts["lost_with_the_ingress"] == 2
    log.faults[0].detail["replicas_lost"] = ["Denoiser:abc"]
    explained = failures_explained(log, TimingSettings())
    assert explained.verdict == "fail" and explained.counts["not_hidden"] == 2
    assert error_bodies_are_ours(log).counts["malformed"] == 1


def test_the_proxys_404_counts_apart_only_while_the_service_restarts() -> None:
    log, _ = clean_run()
    log.faults = [FaultLog(kind="service-restart", target="service-restart", started_at=T0 + 10, ended_at=T0 + 60)]
    missing = {
        "status": 404,
        "content_type": "text/plain; charset=utf-8",
        "body_excerpt": "Path '/v1/generate' not found.",
    }
    log.exchanges.append(_error(log, seq=50, sent_at=T0 + 30, finished_at=T0 + 30.1, **missing))
    assert error_bodies_are_ours(log).verdict == "pass" and error_bodies_are_ours(log).counts["proxy_500"] == 1
    log.exchanges.append(_error(log, seq=51, sent_at=T0 + 300, finished_at=T0 + 300.1, **missing))
    assert error_bodies_are_ours(log).counts["malformed"] == 1


def test_a_hostile_request_answered_with_a_5xx_fails_and_an_unanswered_one_is_counted() -> None:
    log, _ = clean_run()
    hostile = log.exchanges[1]
    log.exchanges += [
        hostile.model_copy(update={"seq": 20, "status": 500}),
        hostile.model_copy(update={"seq": 21, "status": None, "transport_error": "ConnectError"}),
    ]
    check = hostile_get_4xx(log)
    assert check.verdict == "fail"
    assert (check.counts["not_4xx"], check.counts["unanswered"]) == (1, 1)


def test_a_stream_without_the_outcome_and_an_undelivered_webhook_fail() -> None:
    log, _ = clean_run()
    log.jobs[0].stream = StreamLog(connects=3, errors=["ReadTimeout"])
    log.deliveries = []
    assert streams_end_with_the_outcome(log).counts["no_outcome"] == 1
    assert webhooks_arrive_signed(log).counts["undelivered"] == 1


def test_5xx_are_explained_only_by_outages_never_by_replica_losses() -> None:
    log, _ = clean_run()
    log.faults = [
        FaultLog(kind="replica", target="Denoiser", started_at=T0 + 10, ended_at=T0 + 20, detail={"replaced": True}),
        FaultLog(kind="s3-outage", target="s3-outage", started_at=T0 + 200, ended_at=T0 + 260),
    ]
    during_kill = _error(log, seq=30, sent_at=T0 + 12, finished_at=T0 + 13, error={"code": "replica_unavailable"})
    during_outage = _error(log, seq=31, sent_at=T0 + 230, finished_at=T0 + 231, error={"code": "storage_unavailable"})
    outside = _error(log, seq=32, sent_at=T0 + 120, finished_at=T0 + 121, status=None, transport_error="ReadTimeout")
    log.exchanges += [during_kill, during_outage, outside]
    check = failures_explained(log, TimingSettings())
    assert check.verdict == "fail"
    assert (check.counts["not_hidden"], check.counts["during_outages"], check.counts["unexplained"]) == (1, 1, 1)


def test_a_fault_the_service_did_not_heal_fails() -> None:
    log, _ = clean_run()
    log.faults = [FaultLog(kind="s3-crash", target="s3-crash", started_at=T0, ended_at=T0 + 40, detail={})]
    log.faults[0].detail["restarted_by_service"] = False
    assert faults_heal(log).counts["not_healed"] == 1


def _latencies(log: RunLog, start: float, seconds: float, latency: float) -> None:
    for i in range(int(seconds)):
        at = start + i
        log.exchanges.append(log.exchanges[0].model_copy(update={"scheduled_at": at, "finished_at": at + latency}))


def test_latency_that_stays_high_after_a_fault_fails_and_too_few_samples_are_inconclusive() -> None:
    log, _ = clean_run()
    log.faults = [FaultLog(kind="node", target="node", started_at=T0 + 100, ended_at=T0 + 120, detail={})]
    _latencies(log, T0 + 40, 60, 1.0)  # before: 1 s
    _latencies(log, T0 + 150, 60, 2.0)  # 30 s after the end: 2 s
    check = latency_recovers(log, TimingSettings())
    assert check.verdict == "fail" and check.counts["per_fault"][0]["ratio"] == pytest.approx(2.0, rel=0.01)
    log.exchanges = [e for e in log.exchanges if e.scheduled_at < T0 + 150]
    assert latency_recovers(log, TimingSettings()).verdict == "inconclusive"


def test_replica_memory_growth_beyond_two_percent_fails() -> None:
    log, _ = clean_run()
    for i in range(30):
        at = T0 + i * 10
        log.rss.append(RssSample(t=at, pid=1, deployment="Denoiser", rss=500 << 20))
        log.rss.append(RssSample(t=at, pid=2, deployment="Ingress", rss=(200 << 20) + i * (1 << 20)))
    check = memory_is_flat(log, TimingSettings())
    assert check.verdict == "fail" and [row["pid"] for row in check.evidence] == [2]


def test_the_checker_does_not_change_its_input() -> None:
    log, s3 = clean_run()
    before = copy.deepcopy(log.model_dump())
    run_checks(log, snapshot(s3, BUCKET, PREFIX), TimingSettings(), 600)
    assert log.model_dump() == before


def test_a_stored_generation_nobody_was_told_about_is_an_orphan() -> None:
    log, s3 = clean_run()
    failed = _error(log, seq=40, request_id="chaos-gen-000040", error={"code": "internal_error"})
    log.exchanges.append(failed)
    _store(s3, "20270115T080003Z-00000000000000dd", "chaos-gen-000040", None, {"denoise": T0})
    _store(s3, "20270115T080004Z-00000000000000ee", "someone-else", None, {"denoise": T0})
    check = no_orphaned_results(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail"
    assert (check.counts["of_failed_requests"], check.counts["unclaimed"]) == (1, 1)
    log.jobs[0].final = {**log.jobs[0].final, "status": "failed", "error": {"code": "internal_error", "message": "x"}}
    assert no_orphaned_results(log, snapshot(s3, BUCKET, PREFIX)).counts["of_failed_jobs"] == 1


def test_a_generation_stored_before_its_ingress_died_is_counted_apart_only_during_that_fault() -> None:
    """The ResultStore stored the image, then the Ingress died: the proxy's plain-text 500 reached the client and
    the generation is in the owner's history; the same answer outside an Ingress kill or restart is an orphan."""
    log, s3 = clean_run()
    log.faults = [FaultLog(kind="replica", target="Ingress", started_at=T0 + 10, ended_at=T0 + 20, detail={})]
    plain = {"status": 500, "content_type": "text/plain; charset=utf-8", "body_excerpt": "Internal Server Error"}
    log.exchanges.append(
        _error(log, seq=40, request_id="chaos-gen-000040", sent_at=T0 + 8, finished_at=T0 + 12, **plain)
    )
    _store(s3, "20270115T080003Z-00000000000000dd", "chaos-gen-000040", None, {"denoise": T0 + 9})
    check = no_orphaned_results(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "pass" and check.counts["of_proxy_answers"] == 1
    log.exchanges.append(
        _error(log, seq=41, request_id="chaos-gen-000041", sent_at=T0 + 300, finished_at=T0 + 301, **plain)
    )
    _store(s3, "20270115T080004Z-00000000000000ee", "chaos-gen-000041", None, {"denoise": T0 + 300})
    check = no_orphaned_results(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail" and (check.counts["of_proxy_answers"], check.counts["of_failed_requests"]) == (1, 1)


def test_the_proxys_plain_500_for_a_request_in_flight_when_the_service_stops_counts_apart() -> None:
    """A request sent just before a service restart and cut when its drain time ran out: the proxy's 500."""
    log, _ = clean_run()
    log.faults = [FaultLog(kind="service-restart", target="service-restart", started_at=T0 + 10, ended_at=T0 + 60)]
    plain = {"status": 500, "content_type": "text/plain; charset=utf-8", "body_excerpt": "Internal Server Error"}
    log.exchanges.append(_error(log, seq=40, sent_at=T0 + 2, finished_at=T0 + 30, **plain))
    check = error_bodies_are_ours(log)
    assert check.verdict == "pass" and check.counts["proxy_500"] == 1


def test_a_generation_rewritten_after_its_job_ended_is_a_run_nobody_accounts_for() -> None:
    log, s3 = clean_run()
    log.jobs[0].final["attempts"] = 2
    log.jobs[0].final["updated_at"] = _iso(T0 - 30)  # the job ended; S3's copy was written (T0) 30 s later
    check = nothing_twice(log, snapshot(s3, BUCKET, PREFIX))
    assert check.verdict == "fail" and check.evidence[0]["problem"] == "stored_after_the_job_ended"


def test_load_shed_is_not_a_hostile_failure_and_is_explained_only_during_faults() -> None:
    log, _ = clean_run()
    shed = {"code": "overloaded", "message": "the service is at capacity; retry shortly", "request_id": "r"}
    log.exchanges.append(
        log.exchanges[1].model_copy(update={"seq": 50, "status": 503, "error": shed, "retry_after": "5"})
    )
    hostile = hostile_get_4xx(log)
    assert hostile.verdict == "pass" and hostile.counts["shed"] == 1
    log.faults = [FaultLog(kind="replica", target="Denoiser", started_at=T0 + 10, ended_at=T0 + 20, detail={})]
    during = _error(log, seq=51, sent_at=T0 + 15, finished_at=T0 + 16, error=shed, retry_after="5")
    log.exchanges.append(during)
    assert failures_explained(log, TimingSettings()).counts["shed_during_faults"] == 1
    log.exchanges.append(during.model_copy(update={"seq": 52, "sent_at": T0 + 500, "finished_at": T0 + 501}))
    assert failures_explained(log, TimingSettings()).counts["unexplained"] == 1


def test_a_failed_job_counts_as_a_failure_to_explain() -> None:
    log, _ = clean_run()
    log.jobs[0].final = {**log.jobs[0].final, "status": "failed", "error": {"code": "internal_error", "message": "x"}}
    check = failures_explained(log, TimingSettings())
    assert check.verdict == "fail" and check.evidence[0]["what"] == f"job {JOB_ID}"
