"""``instantid bench chaos``: the soak from start to report (see the package docstring for what it does and why).

Phases: a stack of its own (service subprocess, second node, embedded S3 in the work folder); a warm-up; a short
closed-loop capacity measurement; open-loop traffic at ``--load`` of that capacity while the faults run in a
thread; every job polled to its end; S3 read back; the checks; the JSON report on stdout (and ``--out``) and the
PNG (``--plot``). The work folder keeps the logs of the service and the second node, the client log and the S3
snapshot (``runlog.json``, ``s3-snapshot.json``), so a run's verdicts can be read again from its evidence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from serve.bench import BenchError, emit, machine_facts, progress

from .checks import run_checks
from .config import APP_NAME, SIZING, bench_config, write_bench_config
from .faults import FaultRunner, plan
from .plot import plot
from .receiver import WebhookReceiver
from .records import RunLog, S3Snapshot
from .report import report
from .rss import RssSampler
from .s3_audit import snapshot
from .stack import ChaosStack, StackPaths
from .timing_checks import TimingSettings
from .traffic import Traffic, TrafficSettings

SERVICE_TIMEOUT_S = 120.0  # api.request_timeout_s in the bench's config (the client waits longer)
MAX_OVERRUN_S = 900.0  # traffic goes on while faults still run, at most this long past --minutes
SPOOL_WAIT_S = 120.0


@dataclass
class HostileTarget:
    """What a hostile corpus case needs of the service (see hostile.Target)."""

    url: str
    config: Any
    s3: Any


def _weights(home: Path | None) -> Path:
    from deployments.tiny.weights import tiny_weights_present, write_tiny_weights
    from serve.tools.cli import instantid_home

    weights = (home or instantid_home()).expanduser() / "weights" / "tiny"
    if not tiny_weights_present(weights):
        progress(f"making tiny weights in {weights}")
        write_tiny_weights(weights)
    return weights


async def _wait_spooled(stack: ChaosStack, traffic: Traffic, prefix: str) -> None:
    """503s that kept their generation in the spool: wait (bounded) until each is in S3."""
    from deployments.storage.generations import generation_prefix

    spooled = {(e.error or {}).get("generation_id") for e in traffic.recorder.exchanges if e.status == 503} - {None}
    end = time.time() + SPOOL_WAIT_S
    while spooled and time.time() < end:
        client = await asyncio.to_thread(stack.s3)
        for generation in list(spooled):
            with contextlib.suppress(Exception):
                key = f"{generation_prefix(prefix, generation)}/meta.json"
                await asyncio.to_thread(client.head_object, Bucket=stack.bucket, Key=key)
                spooled.discard(generation)
        if spooled:
            await asyncio.sleep(3.0)


async def _drive(stack: ChaosStack, traffic: Traffic, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """Warm-up, capacity, open loop with faults, drain; the timestamps and figures the report needs."""
    started = time.time()
    progress("warm-up: each feature of the mix once")
    warm = await traffic.warm_up()
    if warm == 0:
        raise BenchError("no warm-up request succeeded; see the service log in the work folder")
    progress(f"capacity: {traffic.settings.capacity_clients} closed-loop clients for {args.capacity_s:.0f} s")
    capacity = await traffic.capacity(args.capacity_s)
    if capacity <= 0:
        raise BenchError("the capacity measurement got no 200 at all")
    rate = args.load * capacity
    duration = args.minutes * 60.0
    t0 = time.time()
    planned = plan(args.faults, duration, args.fault_spacing_s)
    runner = FaultRunner(stack, planned, args.s3_outage_s, args.s3_restart_grace_s, traffic.busy).start(t0)
    window = min(60.0, max(20.0, duration / 6))
    tail = 30.0 + window  # the last fault's recovery window must hold requests

    def until() -> float:
        """The end of the traffic: ``--minutes``, or later while faults still run and for the last one's recovery."""
        cap = t0 + duration + MAX_OVERRUN_S
        if not runner.done.is_set():
            return cap
        last = max((f.ended_at or 0.0 for f in runner.log), default=0.0)
        return min(max(t0 + duration, last + tail), cap)

    progress(
        f"open loop: {rate:.2f} requests/s ({args.load} x {capacity:.2f}) for {duration:.0f} s, {len(planned)} faults"
    )
    arrivals = await traffic.open_loop(rate, until)
    traffic_end = time.time()
    runner.stop(timeout_s=600.0)
    progress(f"traffic over after {traffic_end - t0:.0f} s ({arrivals} arrivals); polling jobs to their end")
    await traffic.finish_jobs(args.drain_s)
    await _wait_spooled(stack, traffic, prefix)
    return {
        "started": started,
        "t0": t0,
        "traffic_end": traffic_end,
        "faults": runner.log,
        "planned": [p.__dict__ for p in planned],
        "window_s": window,
        "capacity": {
            "warmup_success_rate": warm,
            "closed_loop_clients": traffic.settings.capacity_clients,
            "seconds": args.capacity_s,
            "requests_per_s": capacity,
            "load": args.load,
            "open_loop_rate_per_s": rate,
            "arrivals": arrivals,
            "skipped_at_in_flight_cap": traffic.skipped,
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serve.config import AppConfig
    from serve.tools.demo import local_config_path
    from serve.tools.runner import free_port

    weights = _weights(args.home)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="instantid-chaos-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    progress(f"work folder: {work}")
    secret = secrets.token_hex(24)
    local = yaml.safe_load(local_config_path().read_text())
    document = bench_config(
        local, work=work, weights=weights, port=free_port(), webhook_secret=secret, request_timeout_s=SERVICE_TIMEOUT_S
    )
    config_path = write_bench_config(document, work / "serve.yaml")
    app_args = next(app["args"] for app in document["applications"] if app.get("name") == APP_NAME)
    config = AppConfig.model_validate(app_args)
    bucket, prefix = config.storage.s3.bucket, config.storage.s3.prefix

    receiver = WebhookReceiver(secret).start()
    stack = ChaosStack(StackPaths(work, config_path), bucket, prefix)
    sampler: RssSampler | None = None
    try:
        stack.start()
        sampler = RssSampler(stack.processes, APP_NAME, args.rss_interval_s).start()
        target = HostileTarget(stack.url, config, SimpleNamespace(bucket=bucket))
        settings = TrafficSettings(
            seed=args.seed, request_timeout_s=args.request_timeout_s, job_deadline_s=args.job_deadline_s
        )
        traffic = Traffic(stack.url, target, receiver.url, settings)

        async def drive() -> dict[str, Any]:
            try:
                return await _drive(stack, traffic, args, prefix)
            finally:
                await traffic.close()

        driven = asyncio.run(drive())
        log = RunLog(
            started_at=driven["started"],
            warmup_end=driven["t0"],
            traffic_end=driven["traffic_end"],
            exchanges=traffic.recorder.exchanges,
            jobs=traffic.jobs,
            deliveries=receiver.snapshot(),
            faults=driven["faults"],
            rss=sampler.stop(),
            internal_markers=sorted(stack.markers),
        )
        (work / "runlog.json").write_text(log.model_dump_json())
        progress("reading S3 back")
        s3 = snapshot(stack.s3(), bucket, prefix)
        (work / "s3-snapshot.json").write_text(s3.model_dump_json())
    finally:
        if sampler is not None:
            sampler.stop()
        progress("stopping the stack")
        stack.stop()
        receiver.stop()
    context = {
        "t0": driven["t0"],
        "window_s": driven["window_s"],
        "job_deadline_s": args.job_deadline_s,
        "settings": {
            "minutes": args.minutes,
            "seed": args.seed,
            "faults": args.faults,
            "planned_faults": driven["planned"],
            "s3_outage": f"{args.s3_outage_s:.0f} s of SIGSTOP/SIGCONT of the embedded S3's process group",
            "s3_restart_grace_s": args.s3_restart_grace_s,
            "request_timeout_s": args.request_timeout_s,
            "service_request_timeout_s": SERVICE_TIMEOUT_S,
            "job_deadline_s": args.job_deadline_s,
            "sizing": {section: {"replicas": r, "num_cpus": c} for section, (r, c) in SIZING.items()},
            "workdir": str(work),
            "config": "serve/configs/local.yaml (tiny weights, CPU) with the bench's paths, sizing and webhooks",
        },
        "capacity": driven["capacity"],
        "stack": {"placement": stack.placement, "url": stack.url},
        "machine": machine_facts(("torch", "ray", "httpx", "boto3")),
    }
    (work / "context.json").write_text(json.dumps(context))
    return finish(context, log, s3, args.plot)


def finish(context: dict[str, Any], log: RunLog, s3: S3Snapshot, plot_path: Path | None) -> dict[str, Any]:
    """The checks and the report (and the plot) from a run's records: the last phase of a run, or all of a recheck."""
    timing = TimingSettings(window_s=context["window_s"])
    checks = run_checks(log, s3, timing, context["job_deadline_s"])
    if plot_path is not None:
        plot(log, plot_path, context["t0"])
        progress(f"plot: {plot_path}")
    settings = {**context["settings"], "timing": timing.model_dump()}
    return report(
        log,
        checks,
        t0=context["t0"],
        settings=settings,
        capacity=context["capacity"],
        stack=context["stack"],
        machine=context["machine"],
    )


def recheck(work: Path, plot_path: Path | None) -> dict[str, Any]:
    """The report of a finished run, from the records it left in its work folder (nothing is started)."""
    try:
        context = json.loads((work / "context.json").read_text())
        log = RunLog.model_validate_json((work / "runlog.json").read_text())
        s3 = S3Snapshot.model_validate_json((work / "s3-snapshot.json").read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{work} holds no finished run's records: {exc}") from None
    return finish(context, log, s3, plot_path)


def summary(result: dict[str, Any]) -> str:
    """Verdicts and headline numbers, for a terminal."""
    lines = [f"{name:28} {verdict}" for name, verdict in result["verdicts"].items()]
    lines.append("headline: " + ", ".join(f"{k} {v}" for k, v in result["headline"].items()))
    return "\n".join(lines)


def main_from_args(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # Ray, SeaweedFS and the loaders may print; stdout is the JSON
        result = recheck(args.recheck, args.plot) if args.recheck is not None else run(args)
    print(summary(result), file=sys.stderr, flush=True)
    emit(result, args.out)
    return 0
