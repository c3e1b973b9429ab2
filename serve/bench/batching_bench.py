"""``instantid bench serve --open-loop``: static against continuous batching, under the same open-loop load.

One run, one local stack (``local.yaml``: tiny weights, CPU, embedded S3), the Denoiser deployed first with
``batching.mode: static`` and then redeployed with ``continuous``; everything else stays up. For each mode:

1. saturation: ``--clients`` closed-loop clients send the request mix back to back; the completed requests per
   second is the mode's saturation throughput. Static's is the *capacity* the load phase is sized from.
2. load: Poisson arrivals at ``--load-fraction`` x capacity (the same seeded arrival times and the same mix in
   both modes), each request sent at its scheduled time whatever is still in flight (open loop: a slow server
   does not slow the arrivals down, so queueing shows in the latencies instead of hiding in the client).
   Latency is measured from the scheduled arrival to the response.

The mix draws each request's step count and image count uniformly from ``--mix-steps`` and ``--mix-images``
(default 4, 8, 30 steps and 1 or 2 images): the case static batching handles worst, since only equal step
counts share its forwards. Mean rows per forward comes from the Denoiser's own counters over each phase.

``--admission`` runs continuous batching once per admission policy named (the first is the report's
``continuous``; default: the config's). ``--cost-model FILE`` makes the run a SIMULATION: the Denoiser's network
forward becomes a wait of ``launch_s + per_row_s x rows`` seconds fitted from a GPU denoise-bench report
(``serve/bench/cost_model.py``), while the batcher, the Serve deployments, the ingress, S3 and HTTP stay real.
Such a report says ``SIMULATED`` at its top, with the file and the constants, and so does every progress line.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.config import DenoiserCostModel
from serve.bench import BenchError, emit, machine_facts, percentile, progress, ratio
from serve.bench.cost_model import CostFit, fit_report
from serve.bench.stack import own_cluster_and_tiny_weights, post_json, request_body

APP = "instantid"


@dataclass(frozen=True)
class Shot:
    """One request of the mix: when it is due (seconds after the phase starts), its steps, images and seed."""

    at: float
    steps: int
    images: int
    seed: int


def request_mix(args: argparse.Namespace, count: int, rate: float | None, seed: int) -> list[Shot]:
    """``count`` requests with uniformly drawn steps and images; Poisson arrival times at ``rate`` (or all at 0)."""
    rng = random.Random(seed)
    shots, at = [], 0.0
    for i in range(count):
        if rate is not None:
            at += rng.expovariate(rate)
        shots.append(Shot(at, rng.choice(args.mix_steps), rng.choice(args.mix_images), 1000 + i))
    return shots


def _body(photo: bytes, args: argparse.Namespace, shot: Shot) -> dict[str, Any]:
    return {**request_body(photo, args.size, shot.steps, shot.seed), "num_images": shot.images}


def _phase_summary(
    done: list[tuple[Shot, float, dict[str, Any]]], errors: list[str], wall: float, counters: dict[str, float]
) -> dict[str, Any]:
    latencies = [latency for _, latency, _ in done]
    by_steps: dict[str, list[float]] = {}
    for shot, latency, _ in done:
        by_steps.setdefault(str(shot.steps), []).append(latency)
    return {
        "requests": len(done),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "throughput_rps": len(done) / wall if wall else None,
        "throughput_images_per_s": sum(shot.images for shot, _, _ in done) / wall if wall else None,
        "latency": {f"p{q}_s": percentile(latencies, q) for q in (50, 95, 99)},
        "p95_by_steps_s": {steps: percentile(values, 95) for steps, values in sorted(by_steps.items())},
        "latency_parts_s": _latency_parts(done),
        "mean_rows_per_forward": counters["rows"] / counters["forwards"] if counters["forwards"] else None,
        "forwards": counters["forwards"],
    }


def _latency_parts(done: list[tuple[Shot, float, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """p50 and p95 of where a request's latency went, from the responses' ``timings``: waiting at the Denoiser
    (``denoise_queue``), denoising (first step to its images), and everything outside the Denoiser (face, prompt,
    storage, HTTP, Serve's queues)."""
    parts: dict[str, list[float]] = {"denoise_queue": [], "denoise": [], "outside_denoiser": []}
    for _, latency, payload in done:
        timings = payload.get("timings") or {}
        queue = (timings.get("denoise_queue") or {}).get("seconds")
        denoise = (timings.get("denoise") or {}).get("seconds")
        if queue is None or denoise is None:
            continue
        parts["denoise_queue"].append(queue)
        parts["denoise"].append(denoise)
        parts["outside_denoiser"].append(latency - queue - denoise)
    return {name: {"p50": percentile(v, 50), "p95": percentile(v, 95)} for name, v in parts.items()}


class Phases:
    """Sends the mix to one served app and reads the Denoiser's batching counters around each phase."""

    def __init__(self, url: str, photo: bytes, args: argparse.Namespace) -> None:
        self.url, self.photo, self.args = url + "/v1/generate", photo, args

    @staticmethod
    def _counters() -> dict[str, Any]:
        return denoiser_stats()

    def _send(self, shot: Shot, due: float, done: list, errors: list, lock: threading.Lock) -> None:
        try:
            _, payload = post_json(self.url, _body(self.photo, self.args, shot), timeout=self.args.request_timeout)
        except (BenchError, OSError) as exc:
            with lock:
                errors.append(str(exc)[:200])
            return
        latency = time.perf_counter() - due
        with lock:
            done.append((shot, latency, payload))

    def closed_loop(self, shots: list[Shot]) -> dict[str, Any]:
        """``--clients`` clients, each sending the next request of ``shots`` as soon as its last one returned."""
        done: list = []
        errors: list[str] = []
        lock = threading.Lock()
        queue = iter(shots)
        before = self._counters()
        start = time.perf_counter()

        def client() -> None:
            while True:
                with lock:
                    shot = next(queue, None)
                if shot is None:
                    return
                self._send(shot, time.perf_counter(), done, errors, lock)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        return _phase_summary(done, errors, wall, _delta(before, self._counters()))

    def open_loop(self, shots: list[Shot]) -> dict[str, Any]:
        """Each request sent at its scheduled time in its own thread, whatever is still in flight."""
        done: list = []
        errors: list[str] = []
        lock = threading.Lock()
        before = self._counters()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(shots)) as pool:
            for shot in shots:
                due = start + shot.at
                time.sleep(max(0.0, due - time.perf_counter()))
                pool.submit(self._send, shot, due, done, errors, lock)
        wall = time.perf_counter() - start
        return _phase_summary(done, errors, wall, _delta(before, self._counters()))


def denoiser_stats() -> dict[str, Any]:
    """The served Denoiser's ``batching_stats()``."""
    from ray import serve as ray_serve

    return ray_serve.get_deployment_handle("Denoiser", APP).batching_stats.remote().result()


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in ("forwards", "rows")}


@dataclass(frozen=True)
class Variant:
    """One deployment of the Denoiser under test: its batching mode, and in continuous mode its admission policy."""

    name: str  # the report's key
    mode: str
    admission: str | None = None  # None: static


def variants(admissions: list[str]) -> list[Variant]:
    """static, then continuous once per admission policy (the first is the report's ``continuous``)."""
    runs = [Variant("static", "static")]
    for index, admission in enumerate(dict.fromkeys(admissions)):
        runs.append(Variant("continuous" if index == 0 else f"continuous-{admission}", "continuous", admission))
    return runs


def _deploy(serve_file, variant: Variant, cost_model: DenoiserCostModel | None) -> None:
    from ray import serve as ray_serve

    from serve.app import build_app

    for app, config in serve_file.app_configs():
        update: dict[str, Any] = {"mode": variant.mode}
        if variant.admission is not None:
            update["admission"] = variant.admission
        batching = config.denoiser.batching.model_copy(update=update)
        denoiser = config.denoiser.model_copy(update={"batching": batching, "cost_model": cost_model})
        config = config.model_copy(update={"denoiser": denoiser})
        ray_serve.run(build_app(config), name=app.get("name", APP), route_prefix=app.get("route_prefix", "/"))
    served = denoiser_stats().get("simulated")
    expected = None if cost_model is None else cost_model.model_dump()
    if served != expected:  # a simulated report must never come from real forwards, nor a real one from a wait
        raise BenchError(f"the Denoiser runs with cost model {served}, the bench asked for {expected}")


def simulation_label(fit: CostFit) -> str:
    """The line that marks every output of a run with a cost model."""
    return (
        f"SIMULATED: forwards wait {fit.launch_s:.5g} s + {fit.per_row_s:.5g} s/row, fitted from {fit.source} "
        f"({fit.measured}); the rest of the stack is real"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serve.tools.demo import local_config_path
    from serve.tools.runner import ServeFile, free_port, local_stack

    fit = fit_report(args.cost_model) if args.cost_model is not None else None
    cost_model = fit.cost_model([f"{args.size}x{args.size}"]) if fit is not None else None
    label = simulation_label(fit) if fit is not None else None
    if label is not None:
        progress(label)
    weights, photo = own_cluster_and_tiny_weights(args.home)
    serve_file = ServeFile.load(local_config_path())
    admissions = args.admission or [serve_file.app_configs()[0][1].denoiser.batching.admission]
    results: dict[str, Any] = {}
    capacity: float | None = None
    saturation_shots = request_mix(args, args.saturation_requests, None, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="instantid-bench-batching-") as tmp:
        for app in serve_file.apps:
            app["args"]["weights"]["root"] = str(weights)
            app["args"]["storage"]["embedded_data_dir"] = str(Path(tmp) / "s3")
            app["args"]["storage"]["spool_dir"] = str(Path(tmp) / "spool")
        with local_stack(serve_file, port=free_port()) as stack:
            phases = Phases(stack["url"], photo, args)
            for variant in variants(admissions):
                mode = variant.name + (" (SIMULATED)" if label else "")
                progress(f"{mode}: deploying")
                _deploy(serve_file, variant, cost_model)
                warm = [Shot(0.0, steps, 1, 1) for steps in sorted(set(args.mix_steps))]
                phases.closed_loop(warm)  # every replica once, every step count once
                progress(f"{mode}: saturation, {len(saturation_shots)} requests from {args.clients} clients")
                saturation = phases.closed_loop(saturation_shots)
                if capacity is None:
                    capacity = saturation["throughput_rps"]
                    if not capacity:
                        raise BenchError(f"static batching completed no request: {saturation['error_samples']}")
                rate = args.load_fraction * capacity
                load_shots = request_mix(args, args.load_requests, rate, seed=args.seed + 1)
                progress(f"{mode}: open-loop load, {len(load_shots)} requests at {rate:.3f}/s")
                load = phases.open_loop(load_shots)
                results[variant.name] = {"saturation": saturation, "load": load}
                if variant.admission is not None:
                    results[variant.name]["admission"] = denoiser_stats()["admission"]
    static = results["static"]
    report: dict[str, Any] = {"benchmark": "serve-batching"}
    if fit is not None and label is not None:
        report["SIMULATED"] = label
        report["cost_model"] = {**fit.describe(), "applies_to": f"the bench's {args.size}x{args.size} requests"}
    return report | {
        "machine": machine_facts(("torch", "ray", "diffusers")),
        "settings": {
            "config": "serve/configs/local.yaml (tiny weights, CPU, embedded S3)"
            + (f"; SIMULATED forwards (cost model from {fit.source})" if fit is not None else ""),
            "admission": admissions,
            "size": args.size,
            "mix_steps": args.mix_steps,
            "mix_images": args.mix_images,
            "clients": args.clients,
            "saturation_requests": args.saturation_requests,
            "load_requests": args.load_requests,
            "load_fraction": args.load_fraction,
            "seed": args.seed,
        },
        "capacity_rps": capacity,
        "load_rate_rps": args.load_fraction * capacity if capacity else None,
        **results,
        **{f"{name}_over_static": _over(results[name], static) for name in results if name != "static"},
    }


def _over(continuous: dict[str, Any], static: dict[str, Any]) -> dict[str, float | None]:
    return {
        "p95_at_load": ratio(continuous["load"]["latency"]["p95_s"], static["load"]["latency"]["p95_s"]),
        "p50_at_load": ratio(continuous["load"]["latency"]["p50_s"], static["load"]["latency"]["p50_s"]),
        "throughput_at_saturation": ratio(
            continuous["saturation"]["throughput_rps"], static["saturation"]["throughput_rps"]
        ),
    }


def main_from_args(args: argparse.Namespace) -> int:
    # Ray, SeaweedFS and the loaders may print; stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(args)
    emit(report, args.out)
    if "SIMULATED" in report:
        progress(report["SIMULATED"])
    return 0
