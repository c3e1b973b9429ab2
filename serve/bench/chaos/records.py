"""What the soak records, as plain data: the client's log, the jobs it followed, the webhooks it received, the faults
it caused, the replicas' memory, and what S3 held at the end. The checker (checks.py) reads only these, so it can
be fed synthetic records in tests, and a run's records can be saved and checked again.

Times are Unix seconds (``time.time()``) throughout: the bench, the service's job records (ISO timestamps) and S3's
``LastModified`` are compared on one machine's clock.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

ExchangeKind = Literal["generate_json", "generate_multipart", "job_submit", "hostile", "job_status", "job_events"]
FaultKind = Literal["replica", "events-actor", "node", "s3-outage", "s3-crash", "service-restart"]


class ImageRef(BaseModel):
    """One image as a response listed it."""

    uri: str
    bytes: int | None = None


class Exchange(BaseModel):
    """One HTTP request the client made and how it ended (``status`` None: no answer, see ``transport_error``)."""

    seq: int
    kind: ExchangeKind
    variant: str = Field(description="What the request exercised (a mix label, or the hostile case's id).")
    request_id: str | None = Field(default=None, description="The X-Request-ID sent (None: the case sets its own).")
    scheduled_at: float = Field(description="When the open-loop schedule wanted it sent (latency counts from here).")
    sent_at: float
    finished_at: float
    status: int | None = None
    transport_error: str | None = None
    content_type: str | None = None
    error: dict[str, Any] | None = Field(default=None, description="The parsed ``error`` object of a JSON error body.")
    body_excerpt: str | None = Field(default=None, description="The start of a non-2xx body that was not our JSON.")
    retry_after: str | None = None
    generation_id: str | None = None
    images: list[ImageRef] = Field(default_factory=list)
    expected_status: list[int] | None = Field(default=None, description="Hostile: the statuses the corpus expects.")
    expected_code: list[str] | None = None

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.scheduled_at


class StreamLog(BaseModel):
    """One SSE subscriber of a job: what it saw until the terminal event (reconnecting with Last-Event-ID)."""

    connects: int = 0
    events: int = 0
    last_event_id: int | None = None
    terminal: str | None = None
    terminal_at: float | None = None
    errors: list[str] = Field(default_factory=list)


class JobLog(BaseModel):
    """An accepted job (202), its subscriber if any, and its state as polled after the run."""

    seq: int
    job_id: str
    request_id: str
    variant: str
    accepted_at: float
    callback: bool
    stream: StreamLog | None = None
    final: dict[str, Any] | None = Field(default=None, description="The last GET /v1/jobs/{id} body.")
    final_at: float | None = None
    poll_error: str | None = None


class Delivery(BaseModel):
    """One POST the webhook receiver got."""

    delivery_id: str | None
    job_id: str | None
    status: str | None = Field(description="The job status in the delivered body.")
    received_at: float
    signature_ok: bool
    answered: int = Field(description="The HTTP status the receiver answered (2xx: acknowledged).")


class FaultLog(BaseModel):
    """One fault: what was done to what, when it started and when the service was given back its part."""

    kind: FaultKind
    target: str
    started_at: float
    ended_at: float | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(default=None, description="Why the fault could not be caused or undone.")


class RssSample(BaseModel):
    t: float
    pid: int
    deployment: str
    rss: int


class StoredObject(BaseModel):
    key: str
    size: int
    last_modified: float
    sha256: str | None = Field(default=None, description="Computed from the object's bytes (images only).")


class S3Snapshot(BaseModel):
    """What the bucket held after the run: every generation's objects and its parsed meta.json."""

    bucket: str
    prefix: str
    objects: dict[str, StoredObject] = Field(default_factory=dict)
    metas: dict[str, dict[str, Any]] = Field(default_factory=dict, description="generation id -> parsed meta.json")
    unreadable: dict[str, str] = Field(default_factory=dict, description="meta.json key -> why it could not be read")


class RunLog(BaseModel):
    """Everything one soak recorded: the checker's whole input."""

    started_at: float
    traffic_end: float
    warmup_end: float
    exchanges: list[Exchange] = Field(default_factory=list)
    jobs: list[JobLog] = Field(default_factory=list)
    deliveries: list[Delivery] = Field(default_factory=list)
    faults: list[FaultLog] = Field(default_factory=list)
    rss: list[RssSample] = Field(default_factory=list)
    internal_markers: list[str] = Field(
        default_factory=list, description="Addresses and paths an error message must never show (S3 endpoint, ...)."
    )
