"""Every error leaves the API as ``{"error": {"code", "message", "request_id"}}`` with the right HTTP status.

:func:`classify_error` is the one mapping from exceptions to statuses: our own errors carry their ``code`` and
``status`` (``deployments.instantid.errors``), also when they were raised in another deployment and arrive
wrapped by Ray; Serve's back-pressure and lost replicas become retryable 503s; validation errors 422s; anything
else is a 500 that says nothing about its cause. :func:`install_error_handlers` wires it into a FastAPI app.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations at run time.

import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.instantid.errors import InstantIDError
from serve.ingress.request_log import note

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OVERLOADED = ("overloaded", "the service is at capacity; retry shortly")
# A replica that died or is being replaced: the request may simply be retried.
REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
SERVE_OVERRIDDEN = (BackPressureError, DeploymentUnavailableError)  # Ray Serve adds plain-text handlers for these
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """An error with a status and code decided at the API boundary."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class ErrorInfo:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    generation_id: str | None = None


def request_id(request: Request) -> str:
    """Serve's proxy puts the request id (the client's X-Request-ID, or a new one) on the request and on
    every response; we reuse it so logs, errors, bodies and meta.json all carry the same id."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def error_response(request: Request, info: ErrorInfo) -> JSONResponse:
    body: dict[str, Any] = {"code": info.code, "message": info.message, "request_id": request_id(request)}
    note(request, code=info.code)  # for the request's log line and counter
    if info.generation_id:
        body["generation_id"] = info.generation_id
    return JSONResponse({"error": body}, status_code=info.status, headers=info.headers)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """The first few validation errors as ``field: problem; ...`` (for 422 bodies and the CLI)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def causes(exc: BaseException, depth: int = 8) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first: an error raised in another deployment arrives wrapped
    (``RayTaskError``, possibly several times along a chain of calls), with the original in its cause chain."""
    cause: BaseException | None = exc
    for _ in range(depth):
        if cause is None:
            return
        yield cause
        nxt = getattr(cause, "cause", None) or cause.__cause__
        cause = None if nxt is cause else nxt


def replica_gone(exc: BaseException) -> bool:
    """Whether a replica died under the request, at any depth of its cause chain (the Denoiser's death reaches the
    ingress through the ResultStore call it was an argument of): a transparent retry is safe."""
    for cause in causes(exc):
        if isinstance(cause, InstantIDError | BackPressureError):
            return False  # the request's own outcome, decided before any replica loss
        if isinstance(cause, REPLICA_GONE):
            return True
    return False


def classify_error(exc: BaseException) -> ErrorInfo:
    """Status, code, message and headers for any exception reaching the API, downstream ones included."""
    if isinstance(exc, ApiError):
        return ErrorInfo(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return ErrorInfo(422, "invalid_parameter", validation_message(exc))
    for cause in causes(exc):
        if isinstance(cause, InstantIDError):
            headers = {"Retry-After": "10"} if cause.status == 503 else {}
            return ErrorInfo(
                cause.status, cause.code, cause.public_message, headers, getattr(cause, "generation_id", None)
            )
        if isinstance(cause, BackPressureError):
            return ErrorInfo(503, *OVERLOADED, {"Retry-After": "5"})
        if isinstance(cause, REPLICA_GONE):
            return ErrorInfo(
                503, "replica_unavailable", "a worker failed while serving the request; retry", {"Retry-After": "5"}
            )
    return ErrorInfo(500, "internal_error", "internal error; quote the request id when reporting it")


async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    info = classify_error(exc)
    if info.status >= 500:
        logger.error("request %s failed: %s", request_id(request), exc, exc_info=info.status == 500)
    return error_response(request, info)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the same JSON error shape as everything else."""
    code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
    return error_response(request, ErrorInfo(exc.status_code, code, str(exc.detail), dict(exc.headers or {})))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the JSON shape above.

    Starlette sends the catch-all (Exception) handler's response and then re-raises, so Serve would log every
    refused request as a failure with a traceback, in the replica and again in the proxy (which must unpickle
    our exception, importing the whole ingress module: a stall of seconds on its first 4xx). The errors we
    expect get their own handlers, which do not re-raise; only unexpected ones reach the catch-all.
    """
    app.add_exception_handler(Exception, _any_error)
    expected_errors = (ApiError, InstantIDError, ValidationError, RequestValidationError, RayError, RayServeException)
    for expected in (*expected_errors, *SERVE_OVERRIDDEN):
        app.add_exception_handler(expected, _any_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
