"""``instantid bench serve``: what Ray Serve costs and buys, against the same work done in-process.

One run measures both, on the same tiny weights, photo, size, steps and seeds:

- in-process: ``instantid generate``'s code path (:class:`deployments.instantid.pipeline.InstantIDPipeline`)
  plus the same image encoding the ResultStore does, one request after another;
- served: the packaged ``local.yaml`` on a local Ray with an embedded SeaweedFS, started the way
  ``instantid demo`` starts them (``serve.tools.runner.local_stack``), over HTTP on 127.0.0.1: latency at
  concurrency 1 (median, p95) and throughput at ``--concurrency`` clients (the Denoiser batches them).

It reports serve / in-process ratios and a per-stage breakdown from the responses' ``timings`` (face,
prompt, denoise, store; overhead = total - the sum of the stages; face and prompt run concurrently, so
the critical-path overhead is given too). At concurrency 1, in-process and served requests alternate
so that both meet the same background load. Only loopback addresses are used; the number of requests
and the wall time are bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve.bench import emit, machine_facts, median, percentile, progress, ratio
from serve.bench.stack import (
    OUTPUT_FORMAT,
    OUTPUT_QUALITY,
    PROMPT,
    own_cluster_and_tiny_weights,
    post_json,
    request_body,
)

STAGES = ("face", "prompt", "denoise", "store")


class Deadline:
    """Stops new requests once ``seconds`` have passed; requests in flight still finish."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.end


# ------------------------------------------------------------------------------------------ summaries


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "median_s": median(latencies),
        "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "max_s": max(latencies, default=None),
    }


def stage_breakdown(
    timings: list[dict[str, float]], clients: list[float] | None = None, *, concurrent_face_prompt: bool = False
) -> dict[str, Any]:
    """Median seconds per stage and of the overheads, over requests; ``timings`` are {stage: seconds}.

    ``overhead_s`` = total - (face + prompt + denoise + store), per request. Face and prompt run
    concurrently in the served graph (``concurrent_face_prompt``), so ``critical_path_overhead_s``
    subtracts only the longer of the two: the time spent in transport, queues, batching waits and the
    ingress. ``http_s`` is what the
    client waited beyond the ingress's own total (proxy, HTTP, JSON).
    """
    if not timings:
        return {}
    out: dict[str, Any] = {}
    for stage in (*STAGES, "encode", "total"):
        values = [t[stage] for t in timings if stage in t]
        if values:
            out[f"{stage}_s"] = median(values)
    present = [s for s in (*STAGES, "encode") if all(s in t for t in timings)]
    out["overhead_s"] = median([t["total"] - sum(t[s] for s in present) for t in timings])
    if concurrent_face_prompt and "face" in present and "prompt" in present:
        rest = [s for s in present if s not in ("face", "prompt")]
        out["critical_path_overhead_s"] = median(
            [t["total"] - max(t["face"], t["prompt"]) - sum(t[s] for s in rest) for t in timings]
        )
    if clients is not None:
        out["http_s"] = median([c - t["total"] for c, t in zip(clients, timings, strict=True)])
    return out


def _seconds(response: dict[str, Any]) -> dict[str, float]:
    return {stage: float(value["seconds"]) for stage, value in response["timings"].items()}


# ------------------------------------------------------------------------------------------ in-process


class InProcess:
    """``instantid generate``'s pipeline in this process: plan, generate (the face stage decodes the photo), encode.

    Stages are timed by wrapping the pipeline parts' entry points on these instances only.
    """

    def __init__(self, weights: Path, photo: bytes, args: argparse.Namespace) -> None:
        from deployments.generation.local import InstantIDPipeline
        from deployments.instantid.weights import WeightsLayout

        start = time.perf_counter()
        self.pipeline = InstantIDPipeline.from_layout(
            WeightsLayout.from_root(weights), device="cpu", dtype="float32", providers=["CPUExecutionProvider"]
        )
        self.load_s = time.perf_counter() - start
        self.photo, self.args = photo, args
        self.current: dict[str, float] = {}
        self._wrap(self.pipeline.face, "analyze", "face")
        self._wrap(self.pipeline.prompt, "encode", "prompt")
        self._wrap(self.pipeline.denoise, "generate", "denoise")

    def _wrap(self, owner: Any, method: str, stage: str) -> None:
        inner: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[stage] = self.current.get(stage, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed)

    def one(self, seed: int) -> dict[str, float]:
        """One request's stage seconds and ``total``, like a served response's ``timings``."""
        from deployments.generation.plan import GenerationInputs
        from deployments.instantid.options import GenerationOptions
        from deployments.storage.generations import encode_image

        self.current = {}
        start = time.perf_counter()
        size, steps = self.args.size, self.args.steps
        options = GenerationOptions(
            prompt=PROMPT, style="none", width=size, height=size, seed=seed, num_inference_steps=steps
        )
        output = self.pipeline(options, GenerationInputs(faces=(self.photo,)))
        encode_start = time.perf_counter()
        encode_image(output.images[0], OUTPUT_FORMAT, OUTPUT_QUALITY)
        end = time.perf_counter()
        return {**self.current, "encode": end - encode_start, "total": end - start}


# ------------------------------------------------------------------------------------------ measurement


def measure(weights: Path, photo: bytes, args: argparse.Namespace, deadline: Deadline, scratch: Path) -> dict:
    """Start local.yaml's stack; alternate in-process and served requests at concurrency 1; then load it.

    Alternating request by request (and swapping who goes first) makes both sides share whatever else the
    machine is doing, which matters on small shared machines; Ray's replicas are idle during an in-process
    request and the driver is idle during a served one.
    """
    from serve.tools.demo import local_config_path
    from serve.tools.runner import ServeFile, free_port, local_stack

    serve_file = ServeFile.load(local_config_path())
    for app in serve_file.apps:
        app_args = app["args"]
        app_args["weights"]["root"] = str(weights)
        app_args["storage"]["embedded_data_dir"] = str(scratch / "s3")
        app_args["storage"]["spool_dir"] = str(scratch / "spool")
    denoiser = serve_file.app_configs()[0][1].denoiser
    served_threads = replica_threads(denoiser.deployment.ray_actor_options)
    local_threads = args.in_process_threads or served_threads
    start = time.perf_counter()
    with local_stack(serve_file, port=free_port()) as stack:
        startup_s = time.perf_counter() - start
        url = stack["url"] + "/v1/generate"
        progress(f"serving on {stack['url']} after {startup_s:.1f} s; loading the in-process pipeline, warming up")
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(local_threads)  # like for like: the replica's thread count, unless told otherwise
        local = InProcess(weights, photo, args)
        seeds = iter(range(1, 1_000_000))
        lock = threading.Lock()

        def next_seed() -> int:
            with lock:
                return next(seeds)

        def send() -> tuple[float, dict[str, Any]]:
            return post_json(url, request_body(photo, args.size, args.steps, next_seed()), timeout=300)

        local.one(0)
        send()  # the first request through every replica
        with ThreadPoolExecutor(args.concurrency) as pool:  # and one full batch
            list(pool.map(lambda _: send(), range(args.concurrency)))

        progress(f"concurrency 1: {args.requests} served requests alternating with {args.requests} in-process")
        sequential: list[tuple[float, dict[str, Any]]] = []
        local_timings: list[dict[str, float]] = []
        for i in range(args.requests):
            if deadline.passed:
                break
            if i % 2:
                sequential.append(send())
                local_timings.append(local.one(next_seed()))
            else:
                local_timings.append(local.one(next_seed()))
                sequential.append(send())
        local_load_s = local.load_s
        del local
        torch.set_num_threads(previous_threads)

        progress(f"concurrency {args.concurrency}: {args.requests} requests")
        concurrent: list[tuple[float, dict[str, Any]]] = []
        in_flight = [0]

        def worker() -> None:
            while not deadline.passed:
                with lock:
                    if len(concurrent) + in_flight[0] >= args.requests:
                        return
                    in_flight[0] += 1
                try:
                    result = send()
                finally:
                    with lock:
                        in_flight[0] -= 1
                with lock:
                    concurrent.append(result)

        wall_start = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall_start

    def phase(results: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
        clients = [c for c, _ in results]
        return {
            "latency": latency_summary(clients),
            "breakdown": stage_breakdown([_seconds(r) for _, r in results], clients, concurrent_face_prompt=True),
        }

    concurrent_phase = phase(concurrent)
    concurrent_phase["concurrency"] = args.concurrency
    concurrent_phase["throughput_images_per_s"] = len(concurrent) / wall if concurrent else None
    local_latencies = [t["total"] for t in local_timings]
    return {
        "serve": {
            "startup_s": startup_s,
            "config": "serve/configs/local.yaml (tiny weights, CPU, embedded S3)",
            "denoiser_batching": denoiser.batching.model_dump(),
            "denoiser_torch_threads": served_threads,
            "concurrency_1": phase(sequential),
            "concurrency_n": concurrent_phase,
        },
        "in_process": {
            "load_s": local_load_s,
            "torch_threads": local_threads,
            "latency": latency_summary(local_latencies),
            # One request at a time, back to back: what a loop over `instantid generate`'s code path gives.
            "throughput_images_per_s": len(local_latencies) / sum(local_latencies) if local_latencies else None,
            "breakdown": stage_breakdown(local_timings),
            "note": "one request at a time (no server, no batching); 'encode' is the ResultStore's image encoding",
        },
    }


def replica_threads(ray_actor_options: dict[str, Any]) -> int:
    """The torch/OpenMP threads a CPU replica gets: OMP_NUM_THREADS when set, else Ray's rule.

    Ray sets OMP_NUM_THREADS = max(floor(num_cpus), 1) in workers that have none, so a replica with
    num_cpus 0.5 computes on one thread where a plain process would use every core; comparing the two
    as they come would measure thread counts, not serving.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(os.environ["OMP_NUM_THREADS"]), 1)
    return max(math.floor(float(ray_actor_options.get("num_cpus", 1))), 1)


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    weights, photo = own_cluster_and_tiny_weights(args.home)
    deadline = Deadline(args.max_seconds)

    with tempfile.TemporaryDirectory(prefix="instantid-bench-serve-") as tmp:
        measured = measure(weights, photo, args, deadline, Path(tmp))
    result, local = measured["serve"], measured["in_process"]

    c1, cn = result["concurrency_1"], result["concurrency_n"]
    return {
        "benchmark": "serve",
        "machine": machine_facts(("torch", "ray", "diffusers", "onnxruntime")),
        "settings": {
            "requests_per_phase": args.requests,
            "concurrency": args.concurrency,
            "steps": args.steps,
            "size": args.size,
            "weights": "tiny (random; real code paths, meaningless pictures)",
            "output": f"{OUTPUT_FORMAT} q{OUTPUT_QUALITY}",
            "max_seconds": args.max_seconds,
            "stopped_by_deadline": deadline.passed,
        },
        "serve": result,
        "in_process": local,
        "serve_over_in_process": {
            "latency_median": ratio(c1["latency"]["median_s"], local["latency"]["median_s"]),
            "latency_p95": ratio(c1["latency"]["p95_s"], local["latency"]["p95_s"]),
            "throughput": ratio(cn["throughput_images_per_s"], local["throughput_images_per_s"]),
        },
    }


def main_from_args(args: argparse.Namespace) -> int:
    # Ray, SeaweedFS and the loaders may print; stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(args)
    emit(report, args.out)
    return 0
