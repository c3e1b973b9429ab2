"""The application's metrics, defined once: names, kinds, tags and buckets, plus small typed recording helpers.

Metrics go through Ray's metrics API (``ray.util.metrics``), so they are served on every node's Prometheus
endpoint beside Serve's own and appear in the Ray dashboard. Prometheus sees each name with Ray's ``ray_`` prefix
(:func:`exported_name`); Ray adds ``WorkerId`` (one per replica process), ``NodeAddress`` and ``SessionName``.

Every tag has a bounded set of values (application, deployment, stage, route, status, code, reason, kind, model
name, S3 operation, safety policy): never a request id, a prompt or a generation id, which would make one series per
request.

The Ray metric objects are made on first use in each process (a replica, the spool thread), never when this module
is imported: the model math and the CLI import modules that import this one without a Ray worker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("ray.serve")

PROMETHEUS_PREFIX = "ray_"  # what Ray's exporter puts before every application metric name

MetricKind = Literal["counter", "gauge", "histogram"]

# Latencies from milliseconds (a warm face analysis) to the request timeout (a cold generation).
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
COUNT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
RATE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Ray wants positive boundaries: the first bucket also holds the (rare) negative cosines.
SIMILARITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# The stages a generation's timings name that are recorded as stage latencies (a photo's own analysis,
# ``face_photo_N``, is recorded as ``face_photo``; model loads have their own metrics).
STAGES = frozenset({"face", "face_photo", "prompt", "control_maps", "denoise", "safety", "store", "total"})


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as given to Ray; Prometheus shows it with PROMETHEUS_PREFIX
    kind: MetricKind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()


REQUESTS = MetricSpec(
    "instantid_requests_total",
    "counter",
    "HTTP requests answered by the ingress, by route template, status and error code (ok for a success).",
    ("application", "route", "status", "code"),
)
ADMISSION_REJECTIONS = MetricSpec(
    "instantid_admission_rejections_total",
    "counter",
    "Requests the ingress refused at admission (503): overloaded (max_in_flight) or too_many_streams.",
    ("application", "reason"),
)
STAGE_SECONDS = MetricSpec(
    "instantid_stage_seconds",
    "histogram",
    "Seconds each stage of a successful generation took (face, prompt, control_maps, denoise, store, total).",
    ("application", "stage"),
    SECONDS_BUCKETS,
)
IDENTITY_SIMILARITY = MetricSpec(
    "instantid_identity_similarity",
    "histogram",
    "Per generated image: cosine of its face with the requested identity (images without a face are not counted).",
    ("application", "model"),
    SIMILARITY_BUCKETS,
)
IDENTITY_NO_FACE = MetricSpec(
    "instantid_identity_no_face_total",
    "counter",
    "Generated images in which no face was found (their identity similarity is null).",
    ("application", "model"),
)
QUEUE_WAIT = MetricSpec(
    "instantid_denoiser_queue_wait_seconds",
    "histogram",
    "From the denoiser's generate() entry to the start of the job's denoising (base load and batching wait).",
    ("application", "model"),
    SECONDS_BUCKETS,
)
ROWS_PER_FORWARD = MetricSpec(
    "instantid_denoiser_rows_per_forward",
    "histogram",
    "UNet rows per forward (images, x2 with classifier-free guidance); one observation per static batch or per "
    "continuous-batching forward.",
    ("application",),
    COUNT_BUCKETS,
)
JOBS_PER_BATCH = MetricSpec(
    "instantid_denoiser_jobs_per_batch",
    "histogram",
    "Requests sharing a forward: per static batch, or per continuous-batching forward.",
    ("application",),
    COUNT_BUCKETS,
)
STEPS_PER_SECOND = MetricSpec(
    "instantid_denoiser_steps_per_second",
    "histogram",
    "Denoising steps per second of a static batch or of one continuous-batching forward (all its rows advance).",
    ("application",),
    RATE_BUCKETS,
)
MODEL_LOADS = MetricSpec(
    "instantid_model_loads_total",
    "counter",
    "Models loaded by a replica: kind base (an SDXL base) or lora (the LoRAs a batch needed, tagged by base).",
    ("application", "deployment", "kind", "model"),
)
MODEL_LOAD_SECONDS = MetricSpec(
    "instantid_model_load_seconds",
    "histogram",
    "Seconds a model load took.",
    ("application", "deployment", "kind", "model"),
    SECONDS_BUCKETS,
)
GPU_MEMORY_ALLOCATED = MetricSpec(
    "instantid_gpu_memory_allocated_bytes",
    "gauge",
    "Bytes of GPU memory held by tensors in the replica (torch.cuda.memory_allocated; WorkerId tells replicas apart).",
    ("application", "deployment"),
)
GPU_MEMORY_RESERVED = MetricSpec(
    "instantid_gpu_memory_reserved_bytes",
    "gauge",
    "Bytes of GPU memory reserved by the replica's caching allocator (torch.cuda.memory_reserved).",
    ("application", "deployment"),
)
S3_RETRIES = MetricSpec(
    "instantid_s3_retries_total",
    "counter",
    "S3 requests sent again after a failed attempt (botocore's retries), by operation.",
    ("application", "deployment", "operation"),
)
SAFETY_FLAGGED = MetricSpec(
    "instantid_safety_flagged_total",
    "counter",
    "Generated images the safety check flagged, by the policy applied to them (flag: kept, blur: stored blurred, "
    "refuse: not stored).",
    ("application", "policy"),
)
SPOOL_DEPTH = MetricSpec(
    "instantid_spool_depth",
    "gauge",
    "Generations waiting in a result store's disk spool for S3.",
    ("application", "deployment"),
)
SPOOL_OLDEST_AGE = MetricSpec(
    "instantid_spool_oldest_age_seconds",
    "gauge",
    "Age of the oldest spooled generation (0 when the spool is empty).",
    ("application", "deployment"),
)

ALL_METRICS: tuple[MetricSpec, ...] = (
    REQUESTS,
    ADMISSION_REJECTIONS,
    STAGE_SECONDS,
    IDENTITY_SIMILARITY,
    IDENTITY_NO_FACE,
    QUEUE_WAIT,
    ROWS_PER_FORWARD,
    JOBS_PER_BATCH,
    STEPS_PER_SECOND,
    MODEL_LOADS,
    MODEL_LOAD_SECONDS,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_RESERVED,
    S3_RETRIES,
    SPOOL_DEPTH,
    SPOOL_OLDEST_AGE,
    SAFETY_FLAGGED,
)


# Serve's own series (as Prometheus sees them) that cluster/monitoring's dashboard and alerts use beside ours:
# HTTP answers by status (also the 503s Serve's proxy gives itself when a deployment's queue is full), latency,
# replica starts and health.
SERVE_SERIES = frozenset(
    {
        "ray_serve_num_http_requests_total",
        "ray_serve_num_http_error_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_serve_deployment_queued_queries",
        "ray_serve_deployment_replica_starts_total",
        "ray_serve_deployment_replica_healthy",
    }
)


def exported_name(spec: MetricSpec) -> str:
    """The metric's name on Ray's Prometheus endpoint (histograms add _bucket, _sum and _count to it)."""
    return PROMETHEUS_PREFIX + spec.name


def exported_series_names() -> frozenset[str]:
    """Every series name Prometheus can see from this application."""
    names: set[str] = set()
    for spec in ALL_METRICS:
        base = exported_name(spec)
        names |= {base + suffix for suffix in ("_bucket", "_sum", "_count")} if spec.kind == "histogram" else {base}
    return frozenset(names)


# ------------------------------------------------------------------------------------------- the Ray objects


@functools.cache
def _metric(spec: MetricSpec) -> Any:
    """The process's Ray metric object for ``spec``, made on first use."""
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags)


@functools.cache
def _replica_tags() -> tuple[str, str]:
    """(application, deployment) of the Serve replica this process is; empty strings outside a replica."""
    try:
        from ray import serve as ray_serve

        context = ray_serve.get_replica_context()
        return context.app_name, context.deployment
    except Exception:  # not a replica (a test calling a deployment class directly, the CLI)
        return "", ""


def tags_for(spec: MetricSpec, **given: str) -> dict[str, str]:
    """Exactly ``spec``'s tags: the replica's application and deployment where ``spec`` has them, then ``given``."""
    application, deployment = _replica_tags()
    tags = {"application": application, "deployment": deployment, **given}
    return {key: str(tags[key]) for key in spec.tags}


def _record(spec: MetricSpec, value: float, **tags: str) -> None:
    """One observation; a metrics failure is logged and never fails the request."""
    try:
        metric = _metric(spec)
        resolved = tags_for(spec, **tags)
        if spec.kind == "counter":
            metric.inc(value, tags=resolved)
        elif spec.kind == "gauge":
            metric.set(value, tags=resolved)
        else:
            metric.observe(value, tags=resolved)
    except Exception:
        logger.warning("recording metric %s failed", spec.name, exc_info=True)


# --------------------------------------------------------------------------------------------------- ingress


def record_request(route: str, status: int, code: str) -> None:
    """An HTTP request answered by the ingress (``code``: the error code, ``ok`` for a success)."""
    _record(REQUESTS, 1, route=route, status=str(status), code=code)


def record_admission_rejected(reason: str) -> None:
    _record(ADMISSION_REJECTIONS, 1, reason=reason)


def stage_name(timing_key: str) -> str | None:
    """The stage a timings key is recorded under, or None for keys with metrics of their own (model loads)."""
    name = "face_photo" if timing_key.startswith("face_photo_") else timing_key
    return name if name in STAGES else None


def record_generation(seconds_by_stage: Mapping[str, float], model: str, similarities: Iterable[float | None]) -> None:
    """A successful generation: each stage's seconds and each image's identity similarity."""
    for key, seconds in seconds_by_stage.items():
        stage = stage_name(key)
        if stage is not None:
            _record(STAGE_SECONDS, seconds, stage=stage)
    for similarity in similarities:
        if similarity is None:
            _record(IDENTITY_NO_FACE, 1, model=model)
        else:
            _record(IDENTITY_SIMILARITY, similarity, model=model)


# -------------------------------------------------------------------------------------------------- denoiser


def record_queue_wait(model: str, seconds: float) -> None:
    """From the denoiser's generate() call to its job's first step (the response's ``denoise_queue`` timing)."""
    _record(QUEUE_WAIT, seconds, model=model)


def record_denoise_batch(jobs: int, rows: int, steps: int, seconds: float) -> None:
    """One static batch's (or one continuous forward's, ``steps`` 1) shape and speed, then the replica's GPU memory
    (a forward is when it peaks)."""
    _record(JOBS_PER_BATCH, jobs)
    _record(ROWS_PER_FORWARD, rows)
    if seconds > 0 and steps > 0:
        _record(STEPS_PER_SECOND, steps / seconds)
    record_gpu_memory()


def record_model_load(kind: Literal["base", "lora"], model: str, seconds: float) -> None:
    """A base or LoRA load in this replica and how long it took; then the replica's GPU memory."""
    _record(MODEL_LOADS, 1, kind=kind, model=model)
    _record(MODEL_LOAD_SECONDS, seconds, kind=kind, model=model)
    record_gpu_memory()


def record_gpu_memory() -> None:
    """The replica's GPU memory (allocated and reserved by torch); nothing on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return
    _record(GPU_MEMORY_ALLOCATED, float(torch.cuda.memory_allocated()))
    _record(GPU_MEMORY_RESERVED, float(torch.cuda.memory_reserved()))


# ----------------------------------------------------------------------------------------------- safety check


def record_safety(policy: str, flagged: Iterable[bool]) -> None:
    """One generation's verdicts: each flagged image counts once, under the policy that decided its fate."""
    for is_flagged in flagged:
        if is_flagged:
            _record(SAFETY_FLAGGED, 1, policy=policy)


# ------------------------------------------------------------------------------------------------------ store


def record_s3_retry(operation: str) -> None:
    _record(S3_RETRIES, 1, operation=operation)


def record_spool(depth: int, oldest_age_s: float) -> None:
    _record(SPOOL_DEPTH, depth)
    _record(SPOOL_OLDEST_AGE, oldest_age_s)


def age_since(unix_seconds: float | None) -> float:
    """Seconds since ``unix_seconds`` (0 for None: nothing waiting)."""
    return 0.0 if unix_seconds is None else max(0.0, time.time() - unix_seconds)
