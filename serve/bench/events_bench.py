"""``instantid bench events``: do many Server-Sent Events subscribers slow a job's generation?

One run, one local stack (``serve/configs/local.yaml``: tiny weights, local Ray, embedded SeaweedFS, started
the way ``instantid bench serve`` starts it), the same jobs twice:

- warm-up: one job (with one subscriber, so the streaming path is warm too), not measured;
- baseline: ``--jobs`` jobs one after another (``POST /v1/jobs``, fixed seeds), nobody subscribed;
- loaded: the same jobs (same seeds), each with ``--subscribers`` clients following its ``events_url`` from
  right after submission.

Per job it records the end-to-end time (submit until ``GET /v1/jobs/{id}``, polled every 0.1 s, says
succeeded) and the server's own denoise time (``result.timings.denoise.seconds``); per subscriber, whether it
got the terminal event, how many ``step`` events it saw and when its first and terminal events came. The
report gives loaded / baseline ratios of both times: event streams have their own limit
(``api.jobs.max_event_streams``) and should cost generation nothing. The subscribers run in this process, on
the same machine as the stack, so on a small machine their parsing competes with the server for the CPU; the
denoise time is measured inside the denoiser and shows what the streams cost generation itself.
JSON on stdout (and ``--out``); progress and a short table on stderr. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve.bench import BenchError, emit, machine_facts, median, progress, ratio, rounded
from serve.bench.stack import own_cluster_and_tiny_weights, request_body

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.1
WARMUP_SEED, FIRST_SEED = 0, 1000  # job i of each phase uses FIRST_SEED + i
JOB_TIMEOUT_S = 300.0  # one job, submit to outcome (local.yaml's request_timeout_s)
STREAM_GRACE_S = 30.0  # how long subscribers may still take after the job finished


# ------------------------------------------------------------------------------------------ one job


async def follow(client: Any, url: str, submitted: float) -> dict[str, Any]:
    """One subscriber: read ``url``'s event stream until its terminal event (or an error); what it saw."""
    seen: dict[str, Any] = {"terminal": None, "steps": 0, "events": 0, "keepalives": 0, "error": None}
    seen |= {"first_event_s": None, "terminal_s": None}
    try:
        async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:200]
                seen["error"] = f"HTTP {response.status_code}: {body}"
                return seen
            kind, has_data = "message", False
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    seen["keepalives"] += 1
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    has_data = True
                elif not line and has_data:  # a blank line ends an event
                    now = time.perf_counter() - submitted
                    seen["events"] += 1
                    if seen["first_event_s"] is None:
                        seen["first_event_s"] = now
                    if kind == "step":
                        seen["steps"] += 1
                    elif kind in TERMINAL:
                        seen["terminal"], seen["terminal_s"] = kind, now
                        return seen
                    kind, has_data = "message", False
            seen["error"] = "the stream ended before a terminal event"
    except Exception as exc:  # counted, not raised: a broken stream is a result of this benchmark
        seen["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return seen


async def poll(client: Any, status_url: str, submitted: float, refused: Counter) -> dict[str, Any]:
    """``GET status_url`` every POLL_S until the job is finished; its final body.

    A 502/503/504 or a broken connection is what a polling client retries: it is counted in ``refused`` and
    polled again, so that the report shows it instead of ending the run.
    """
    import httpx

    while True:
        if time.perf_counter() - submitted > JOB_TIMEOUT_S:
            raise BenchError(f"{status_url} did not finish within {JOB_TIMEOUT_S:.0f} s")
        try:
            answer = await client.get(status_url)
        except httpx.TransportError as exc:
            refused[type(exc).__name__] += 1
        else:
            if answer.status_code in (502, 503, 504):
                refused[f"HTTP {answer.status_code}: {answer.text[:120]}"] += 1
            elif answer.status_code != 200:
                raise BenchError(f"GET {status_url} answered HTTP {answer.status_code}: {answer.text[:300]}")
            elif answer.json()["status"] in TERMINAL:
                return answer.json()
        await asyncio.sleep(POLL_S)


async def run_job(client: Any, body: dict[str, Any], subscribers: int) -> dict[str, Any]:
    """Submit one job, start ``subscribers`` followers at once, poll its status until it finishes."""
    submitted = time.perf_counter()
    response = await client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise BenchError(f"POST /v1/jobs answered HTTP {response.status_code}: {response.text[:300]}")
    accepted = response.json()
    followers = [asyncio.create_task(follow(client, accepted["events_url"], submitted)) for _ in range(subscribers)]
    refused: Counter = Counter()
    try:
        state = await poll(client, accepted["status_url"], submitted, refused)
        end_to_end = time.perf_counter() - submitted
        done, _ = await asyncio.wait(followers, timeout=STREAM_GRACE_S) if followers else (set(), set())
    finally:
        for task in followers:
            task.cancel()
    timings = (state.get("result") or {}).get("timings") or {}
    return {
        "seed": body["seed"],
        "status": state["status"],
        "error": state.get("error"),
        "attempts": state.get("attempts"),  # > 1: the job was taken over (its lease lapsed) and run again
        "end_to_end_s": end_to_end,
        "denoise_s": float(timings["denoise"]["seconds"]) if "denoise" in timings else None,
        "server_total_s": float(timings["total"]["seconds"]) if "total" in timings else None,
        "stages_s": {stage: float(value["seconds"]) for stage, value in timings.items() if stage != "total"},
        "poll_errors": dict(refused),
        "subscribers": [task.result() if task in done else _late() for task in followers],
    }


def _late() -> dict[str, Any]:
    return {"terminal": None, "steps": 0, "error": f"no terminal event {STREAM_GRACE_S:.0f} s after the job finished"}


# ------------------------------------------------------------------------------------------ phases


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": median(values),
        "mean_s": statistics.fmean(values) if values else None,
        "min_s": min(values, default=None),
        "max_s": max(values, default=None),
    }


def kind(error: str) -> str:
    """An error message with its ``name=number`` values as ``name=N``: one refusal at any queue length is one kind."""
    return re.sub(r"=\d+", "=N", error)


def phase_summary(jobs: list[dict[str, Any]], subscribers: int, steps: int) -> dict[str, Any]:
    """Both times over the phase's succeeded jobs; failures and refused polls; with subscribers, what they got."""
    succeeded = [job for job in jobs if job["status"] == "succeeded"]
    refused: Counter = Counter()
    for job in jobs:
        for error, count in job["poll_errors"].items():
            refused[kind(error)] += count
    summary: dict[str, Any] = {
        "jobs": len(jobs),
        "succeeded": len(succeeded),
        "failures": [
            {"seed": job["seed"], "status": job["status"], "error": job["error"]}
            for job in jobs
            if job["status"] != "succeeded"
        ],
        "end_to_end": spread([job["end_to_end_s"] for job in succeeded]),
        "denoise": spread([job["denoise_s"] for job in succeeded]),
        "server_total": spread([job["server_total_s"] for job in succeeded if job["server_total_s"] is not None]),
        "reruns": sum((job["attempts"] or 1) - 1 for job in jobs),
        "poll_errors": sum(refused.values()),
        "poll_error_kinds": dict(refused.most_common(5)),
        "per_job": [_job_row(job, subscribers > 0) for job in jobs],
    }
    if not subscribers:
        return summary
    seen = [s for job in jobs for s in job["subscribers"]]
    completed = [s for s in seen if s["terminal"] is not None]
    steps_seen = [s["steps"] for s in completed]
    errors = Counter(kind(s["error"]) for s in seen if s["error"] is not None)
    summary["subscribers"] = {
        "per_job": subscribers,
        "total": len(seen),
        "completed": len(completed),
        "terminal_events": dict(Counter(s["terminal"] for s in completed)),
        "step_events": {
            "expected_per_job": steps,
            "min": min(steps_seen, default=None),
            "median": median(steps_seen),
            "max": max(steps_seen, default=None),
            "all_steps": sum(n >= steps for n in steps_seen),
        },
        "first_event_s": spread([s["first_event_s"] for s in completed]),
        "terminal_event_s": spread([s["terminal_s"] for s in completed]),
        "keepalives": sum(s.get("keepalives", 0) for s in seen),
        "stream_errors": sum(errors.values()),
        "stream_error_kinds": dict(errors.most_common(5)),
    }
    return summary


def _job_row(job: dict[str, Any], subscribed: bool) -> dict[str, Any]:
    keys = ("seed", "status", "attempts", "end_to_end_s", "denoise_s", "server_total_s", "stages_s")
    row = {key: job[key] for key in keys}
    row["poll_errors"] = sum(job["poll_errors"].values())
    if subscribed:
        row["subscribers_completed"] = sum(s["terminal"] is not None for s in job["subscribers"])
        row["step_events_min"] = min((s["steps"] for s in job["subscribers"]), default=None)
    return row


async def measure(url: str, photo: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, baseline and loaded phases against the stack at ``url``; the measured part of the report."""
    import httpx

    limits = httpx.Limits(max_connections=args.subscribers + 16, max_keepalive_connections=args.subscribers + 16)
    timeout = httpx.Timeout(60.0, pool=60.0)  # reads: heartbeats come every api.jobs.heartbeat_s (15 s)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        def body(seed: int) -> dict[str, Any]:
            return request_body(photo, args.size, args.steps, seed)

        start = time.perf_counter()
        warmup = await run_job(client, body(WARMUP_SEED), 1)
        warmup_s = time.perf_counter() - start
        if warmup["status"] != "succeeded":
            raise BenchError(f"the warm-up job ended {warmup['status']}: {warmup['error']}")
        if warmup["subscribers"][0]["terminal"] is None:
            raise BenchError(f"the warm-up's subscriber got no terminal event: {warmup['subscribers'][0]['error']}")
        phases: dict[str, list[dict[str, Any]]] = {}
        for name, subscribers in (("baseline", 0), ("loaded", args.subscribers)):
            progress(f"{name}: {args.jobs} jobs one after another, {subscribers} subscribers each")
            phases[name] = []
            for i in range(args.jobs):
                job = await run_job(client, body(FIRST_SEED + i), subscribers)
                phases[name].append(job)
                got = sum(s["terminal"] is not None for s in job["subscribers"])
                extra = f", {got}/{subscribers} subscribers got the outcome" if subscribers else ""
                denoise = "-" if job["denoise_s"] is None else f"{job['denoise_s']:.2f} s"
                refused = sum(job["poll_errors"].values())
                extra += f", attempt {job['attempts']}" if (job["attempts"] or 1) > 1 else ""
                extra += f", {refused} polls refused" if refused else ""
                progress(
                    f"  seed {job['seed']}: {job['status']} after {job['end_to_end_s']:.2f} s, denoise {denoise}{extra}"
                )
    baseline = phase_summary(phases["baseline"], 0, args.steps)
    loaded = phase_summary(phases["loaded"], args.subscribers, args.steps)
    b_e2e, l_e2e, b_den, l_den = baseline["end_to_end"], loaded["end_to_end"], baseline["denoise"], loaded["denoise"]
    return {
        "warmup_s": warmup_s,
        "baseline": baseline,
        "loaded": loaded,
        "loaded_over_baseline": {
            "end_to_end_median": ratio(l_e2e["median_s"], b_e2e["median_s"]),
            "end_to_end_mean": ratio(l_e2e["mean_s"], b_e2e["mean_s"]),
            "denoise_median": ratio(l_den["median_s"], b_den["median_s"]),
            "denoise_mean": ratio(l_den["mean_s"], b_den["mean_s"]),
        },
    }


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serve.tools.demo import local_config_path
    from serve.tools.runner import ServeFile, free_port, local_stack

    weights, photo = own_cluster_and_tiny_weights(args.home)

    serve_file = ServeFile.load(local_config_path())
    jobs_config = serve_file.app_configs()[0][1].api.jobs
    if args.subscribers > jobs_config.max_event_streams:
        progress(
            f"warning: {args.subscribers} subscribers > api.jobs.max_event_streams ({jobs_config.max_event_streams}):"
            " the extra ones are refused (503) and counted as stream errors"
        )
    with tempfile.TemporaryDirectory(prefix="instantid-bench-events-") as tmp:
        for app in serve_file.apps:
            app["args"]["weights"]["root"] = str(weights)
            app["args"]["storage"]["embedded_data_dir"] = str(Path(tmp) / "s3")
            app["args"]["storage"]["spool_dir"] = str(Path(tmp) / "spool")
        start = time.perf_counter()
        with local_stack(serve_file, port=free_port()) as stack:
            startup_s = time.perf_counter() - start
            progress(f"serving on {stack['url']} after {startup_s:.1f} s; warming up with one job")
            measured = asyncio.run(measure(stack["url"], photo, args))
    return {
        "benchmark": "events",
        "machine": machine_facts(("torch", "ray", "httpx", "onnxruntime")),
        "settings": {
            "jobs": args.jobs,
            "subscribers": args.subscribers,
            "steps": args.steps,
            "size": args.size,
            "seeds": [FIRST_SEED + i for i in range(args.jobs)],
            "poll_interval_s": POLL_S,
            "max_event_streams": jobs_config.max_event_streams,
            "heartbeat_s": jobs_config.heartbeat_s,
            "config": "serve/configs/local.yaml (tiny weights, CPU, embedded S3)",
            "weights": "tiny (random; real code paths, meaningless pictures)",
            "subscribers_in": "this process (asyncio + httpx), on the same machine as the stack",
        },
        "serve": {"startup_s": startup_s, "warmup_s": measured.pop("warmup_s")},
        **measured,
    }


def table(report: dict[str, Any]) -> str:
    """The headline numbers, for a terminal."""
    b, loaded, ratio = report["baseline"], report["loaded"], report["loaded_over_baseline"]
    subs = loaded["subscribers"]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [
        f"{'':24}{'baseline':>10}{'loaded':>10}{'ratio':>8}",
        f"{'end-to-end median (s)':24}{cell(b['end_to_end']['median_s']):>10}"
        f"{cell(loaded['end_to_end']['median_s']):>10}{cell(ratio['end_to_end_median']):>8}",
        f"{'end-to-end mean (s)':24}{cell(b['end_to_end']['mean_s']):>10}"
        f"{cell(loaded['end_to_end']['mean_s']):>10}{cell(ratio['end_to_end_mean']):>8}",
        f"{'denoise median (s)':24}{cell(b['denoise']['median_s']):>10}"
        f"{cell(loaded['denoise']['median_s']):>10}{cell(ratio['denoise_median']):>8}",
        f"{'denoise mean (s)':24}{cell(b['denoise']['mean_s']):>10}"
        f"{cell(loaded['denoise']['mean_s']):>10}{cell(ratio['denoise_mean']):>8}",
        f"subscribers: {subs['completed']}/{subs['total']} got the outcome, step events per stream "
        f"{subs['step_events']['min']}..{subs['step_events']['max']} of {subs['step_events']['expected_per_job']}, "
        f"{subs['stream_errors']} stream errors",
        f"jobs succeeded: {b['succeeded']}/{b['jobs']} baseline, {loaded['succeeded']}/{loaded['jobs']} loaded; "
        f"reruns (lease lapsed): {b['reruns']} baseline, {loaded['reruns']} loaded; "
        f"status polls refused: {b['poll_errors']} baseline, {loaded['poll_errors']} loaded",
    ]
    return "\n".join(rows)


def main_from_args(args: argparse.Namespace) -> int:
    # Ray, SeaweedFS and the loaders may print; stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(args)
    print(table(rounded(report)), file=sys.stderr, flush=True)
    emit(report, args.out)
    return 0
