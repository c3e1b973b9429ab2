"""Typed answers of the routes that ``serve/schemas.py`` has no model for (jobs and stored generations are documents
of the job system and the result store, whose modules import Ray): the fields a client reads, the rest kept."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.schemas import GenerateResponse

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class JobInfo(BaseModel):
    """``GET /v1/jobs/{id}``'s body (also the ``state`` and outcome events' data)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatus
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    attempts: int = 1
    result: GenerateResponse | None = Field(default=None, description="On success: /v1/generate's body.")
    error: dict[str, Any] | None = Field(default=None, description="On failure: code and message.")

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobEvent(BaseModel):
    """One Server-Sent Event of ``GET /v1/jobs/{id}/events``: its type (``state``, ``queued``, ``stage``, ``step``,
    ``succeeded``, ``failed``, ``cancelled``), its id (absent on ``state`` and some outcomes) and its JSON data."""

    type: str
    id: int | None = None
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


class GenerationImage(BaseModel):
    """One image of a stored generation (meta.json's record plus a fresh presigned ``url``)."""

    model_config = ConfigDict(extra="allow")

    uri: str | None = None
    url: str | None = None
    width: int
    height: int
    bytes: int
    content_type: str
    sha256: str | None = None
    identity_similarity: float | None = None


class Generation(BaseModel):
    """``GET /v1/generations/{id}``: the stored meta.json (every field kept) with fresh URLs; ``status`` is
    ``stored`` or ``pending_upload`` (S3 was down; the images wait in the service's spool)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str = "stored"
    images: list[GenerationImage] = Field(default_factory=list)
