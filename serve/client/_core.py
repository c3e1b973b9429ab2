"""Everything the sync and async clients share: request building, answer parsing, the retry decision and the
Server-Sent Events parser. The two clients differ only in how they send a request and how they sleep, so each
route's rules live here once.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from serve.client.errors import APIError, ServiceUnreachable
from serve.client.models import JobEvent
from serve.schemas import GenerateRequest, IdentityCreateRequest

API_KEY_ENV = "INSTANTID_API_KEY"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# A photo: a file path, its bytes, an RGB uint8 HxWx3 numpy array or a PIL image.
Photo = Any
T = TypeVar("T", bound=BaseModel)

# Retried on: 503 (overloaded, storage unavailable: the service says when to come back) and 409 for an
# Idempotency-Key whose first request still runs (it answers Retry-After too).
RETRY_STATUSES = frozenset({503})
RETRY_CODES_409 = frozenset({"idempotency_key_in_progress"})
# Errors where the request provably never reached the service: safe to resend even without an idempotency key.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a request is tried again.

    ``max_retries`` bounds the count, ``max_wait_s`` the total time spent waiting between attempts (a
    ``Retry-After`` that would pass it ends the retries at once rather than being cut short: the service said the
    answer would still be no). Connection errors back off exponentially from ``backoff_s`` with jitter."""

    max_retries: int = 3
    max_wait_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, waited_s: float, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1), or None to give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            wait = max(0.0, retry_after)
        else:
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        return wait if waited_s + wait <= self.max_wait_s else None


@dataclass
class Call:
    """One HTTP request as a route builds it. ``retry_unsent_only``: the route may create something twice if
    resent, so only a request that never left (connection refused) or that the service refused is retried."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ok: tuple[int, ...] = (200,)
    retry_unsent_only: bool = False


def api_key_from(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def base_headers(api_key: str | None) -> dict[str, str]:
    """The service takes keys as ``Authorization: Bearer TOKEN`` (README, Access)."""
    headers = {"Accept": "application/json", "User-Agent": "instantid-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def default_timeout(timeout_s: float) -> httpx.Timeout:
    """A generation holds the connection for its whole run: the read timeout is the long one."""
    return httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))


# ------------------------------------------------------------------------------------------------ photos


def photo_bytes(photo: Photo) -> bytes:
    """A photo as file bytes: paths are read, bytes pass through, arrays and PIL images are encoded as PNG
    (lossless, so the service sees exactly these pixels)."""
    if isinstance(photo, (bytes, bytearray, memoryview)):
        return bytes(photo)
    if isinstance(photo, (str, os.PathLike)):
        return Path(photo).expanduser().read_bytes()
    image = photo
    if type(photo).__module__ == "numpy":
        import numpy as np

        array = np.asarray(photo)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a photo array must be uint8 HxWx3 RGB, got {array.dtype} {array.shape}")
        from PIL import Image

        image = Image.fromarray(array, "RGB")
    if not hasattr(image, "save"):
        raise TypeError(f"a photo is a path, bytes, a uint8 HxWx3 array or a PIL image, not {type(photo).__name__}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(photo: Photo) -> str:
    return base64.b64encode(photo_bytes(photo)).decode()


def face_fields(face: Photo | list[Photo] | None) -> dict[str, Any]:
    """One photo -> ``face_image_b64``; a list -> ``face_images`` (several photos of one person)."""
    if face is None:
        return {}
    if isinstance(face, (list, tuple)):
        return {"face_images": [{"b64": b64(p)} for p in face]}
    return {"face_image_b64": b64(face)}


# ------------------------------------------------------------------------------------------------ routes


def generation_body(
    request: GenerateRequest | dict[str, Any] | None,
    face: Photo | list[Photo] | None,
    pose: Photo | None,
    init_image: Photo | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The JSON body of /v1/generate and /v1/jobs, checked against the service's own schema before sending (a
    bad field fails here with pydantic's message, not after an upload)."""
    if isinstance(request, GenerateRequest):
        body = request.model_dump(mode="json", exclude_unset=True)
    else:
        body = dict(request or {})
    body.update(fields)
    body.update(face_fields(face))
    if pose is not None:
        body["pose_image_b64"] = b64(pose)
    if init_image is not None:
        body["init_image_b64"] = b64(init_image)
    GenerateRequest.model_validate(body)
    return body


def with_idempotency(call: Call, key: str | None) -> Call:
    """Every attempt of one logical call carries the same key, so the service runs it once."""
    call.headers[IDEMPOTENCY_HEADER] = key or uuid.uuid4().hex
    return call


def generate_call(body: dict[str, Any], idempotency_key: str | None) -> Call:
    return with_idempotency(Call("POST", "/v1/generate", json=body), idempotency_key)


def submit_call(body: dict[str, Any], idempotency_key: str | None) -> Call:
    return with_idempotency(Call("POST", "/v1/jobs", json=body, ok=(202,)), idempotency_key)


def enrol_call(face: Photo | list[Photo], name: str | None, keep_photos: bool, fields: dict[str, Any]) -> Call:
    """``POST /v1/identities`` has no Idempotency-Key: a resend could enrol twice, so it is resent only unsent."""
    body = {**fields, **face_fields(face), "keep_photos": keep_photos}
    if name is not None:
        body["name"] = name
    IdentityCreateRequest.model_validate(body)
    return Call("POST", "/v1/identities", json=body, ok=(201,), retry_unsent_only=True)


def page_call(path: str, cursor: str | None, limit: int) -> Call:
    """One page of a listing (``/v1/identities``, ``/v1/generations``): ``cursor`` is the previous page's."""
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    return Call("GET", path, params=params)


def path_id(value: str) -> str:
    """An id as one path segment (ids are plain; anything else would change the route)."""
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"invalid id {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ answers


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from(response: httpx.Response) -> APIError:
    """The service's ``{"error": {"code", "message", "request_id"}}``, or what a proxy in front answered."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return APIError(
            response.status_code,
            str(error.get("code", "error")),
            str(error.get("message", "")),
            request_id=error.get("request_id"),
            generation_id=error.get("generation_id"),
            retry_after=retry_after_s(response),
            body=body,
        )
    text = response.text.strip()[:200] or response.reason_phrase
    return APIError(
        response.status_code,
        "http_error",
        text,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after_s(response),
        body=body,
    )


def retryable(response: httpx.Response) -> bool:
    if response.status_code in RETRY_STATUSES:
        return True
    return response.status_code == 409 and error_from(response).code in RETRY_CODES_409


def lost_in_the_proxy(response: httpx.Response) -> bool:
    """A 500 that is not the service's JSON error: Ray Serve's HTTP proxy answers it, as plain text, for a request
    whose ingress replica died while running it. The request may have run or not; sent again with the same
    Idempotency-Key (generate and submit always carry one) it runs at most once, so it is retried like a 503."""
    content_type = response.headers.get("content-type", "")
    return response.status_code == 500 and not content_type.startswith("application/json")


def parse(model: type[T], response: httpx.Response) -> T:
    return model.model_validate(response.json())


class Attempts:
    """The retry loop's bookkeeping, shared by both clients: each outcome (an answer or a transport error) either
    ends the call or gives the wait before the next attempt."""

    def __init__(self, call: Call, policy: RetryPolicy) -> None:
        self.call, self.policy = call, policy
        self.attempt = 0
        self.waited_s = 0.0

    def start(self) -> None:
        self.attempt += 1

    def after_answer(self, response: httpx.Response) -> float | None:
        """None: the answer is final (returned or raised by :meth:`result`); else seconds to wait."""
        if response.status_code in self.call.ok:
            return None
        if not (retryable(response) or (lost_in_the_proxy(response) and not self.call.retry_unsent_only)):
            return None
        return self._wait(self.policy.delay(self.attempt, self.waited_s, retry_after_s(response)))

    def after_error(self, error: httpx.TransportError) -> float:
        """Seconds to wait after a transport error; raises :class:`ServiceUnreachable` when the call must end."""
        unsent = isinstance(error, NOT_SENT)
        delay = (
            self.policy.delay(self.attempt, self.waited_s, None) if unsent or not self.call.retry_unsent_only else None
        )
        if delay is None:
            raise ServiceUnreachable(
                f"{self.call.method} {self.call.path}: {type(error).__name__}: {error}", self.attempt
            )
        return self._wait(delay)  # type: ignore[return-value]

    def _wait(self, delay: float | None) -> float | None:
        if delay is not None:
            self.waited_s += delay
        return delay

    def result(self, response: httpx.Response) -> httpx.Response:
        if response.status_code in self.call.ok:
            return response
        raise error_from(response)


# ------------------------------------------------------------------------------------------------ events


class EventParser:
    """Server-Sent Events from lines (``id:``, ``event:``, ``data:``; a blank line ends an event; ``:`` lines are
    comments, the stream's keep-alives)."""

    def __init__(self) -> None:
        self._type, self._id, self._data = "message", None, []  # type: tuple[str, int | None, list[str]]

    def feed(self, line: str) -> JobEvent | None:
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            if not self._data:
                self._type, self._id = "message", None
                return None
            event = JobEvent(type=self._type, id=self._id, data=json.loads("\n".join(self._data)))
            self._type, self._id, self._data = "message", None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and value.isdigit():
            self._id = int(value)
        return None


def events_call(job_id: str, last_event_id: int | None, previews: bool) -> Call:
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = str(last_event_id)
    params = {"previews": "1"} if previews else None
    return Call("GET", f"/v1/jobs/{path_id(job_id)}/events", params=params, headers=headers)


class Progress:
    """An optional tqdm bar over a job's denoising steps (tqdm is imported only when a bar is asked for)."""

    def __init__(self, enabled: bool, description: str) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, desc=description, unit="step", leave=True)

    def show(self, event: JobEvent) -> None:
        if self.bar is None:
            return
        data = event.data
        if event.type == "step":
            total, step = data.get("total"), data.get("step")
            if total and self.bar.total != total:
                self.bar.reset(total=total)
            if step is not None:
                self.bar.n = step
                self.bar.refresh()
        elif event.type in ("stage", "queued"):
            stage = data.get("stage") or ("queued" if event.type == "queued" else None)
            if stage:
                self.bar.set_postfix_str(str(stage))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finished(job_id: str, info: Any) -> Any:
    """A finished job's result (a :class:`GenerateResponse`); :class:`JobFailed` for failed or cancelled."""
    from serve.client.errors import InstantIDClientError, JobFailed

    if info.status == "succeeded" and info.result is not None:
        return info.result
    if info.done:
        raise JobFailed(info)
    raise InstantIDClientError(f"job {job_id}: its event stream ended while it was {info.status}")
