"""The blocking client (``httpx.Client``). Each method builds its request and parses its answer with ``_core``; this
module only sends, sleeps and reads event streams."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from serve.client import _core as core
from serve.client._core import Attempts, Call, Photo, RetryPolicy
from serve.client.errors import ServiceUnreachable
from serve.client.models import Generation, JobEvent, JobInfo
from serve.schemas import (
    GenerateRequest,
    GenerateResponse,
    GenerationList,
    HistoryEntry,
    IdentityInfo,
    IdentityList,
    JobAccepted,
    ModelsResponse,
)


class InstantIDClient:
    """The service's HTTP API from Python: ``InstantIDClient("http://host:8000")``.

    ``api_key`` (else ``INSTANTID_API_KEY``) is sent as a bearer token. Requests are retried on connection errors
    and on 503 (honouring ``Retry-After``) within ``retry``'s bounds; generations and jobs carry one
    ``Idempotency-Key`` over all their attempts, so a retry never generates twice. ``timeout_s`` is the read
    timeout: a generation holds its connection until the images are stored."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.url,
            headers=core.base_headers(core.api_key_from(api_key)),
            timeout=core.default_timeout(timeout_s),
            transport=transport,
        )

    def __enter__(self) -> InstantIDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -------------------------------------------------------------------------------------------- generations
    def generate(
        self,
        request: GenerateRequest | dict[str, Any] | None = None,
        *,
        face: Photo | list[Photo] | None = None,
        pose: Photo | None = None,
        init_image: Photo | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> GenerateResponse:
        """``POST /v1/generate``: the images, stored. Fields are the request schema's (``prompt``, ``seed``, ...)."""
        body = core.generation_body(request, face, pose, init_image, fields)
        return core.parse(GenerateResponse, self._send(core.generate_call(body, idempotency_key)))

    def submit(
        self,
        request: GenerateRequest | dict[str, Any] | None = None,
        *,
        face: Photo | list[Photo] | None = None,
        pose: Photo | None = None,
        init_image: Photo | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobAccepted:
        """``POST /v1/jobs``: the same request as an async job; follow it with :meth:`wait` or :meth:`events`."""
        body = core.generation_body(request, face, pose, init_image, fields)
        return core.parse(JobAccepted, self._send(core.submit_call(body, idempotency_key)))

    def job(self, job_id: str) -> JobInfo:
        return core.parse(JobInfo, self._send(Call("GET", f"/v1/jobs/{core.path_id(job_id)}")))

    def cancel(self, job_id: str) -> JobInfo | None:
        """Cancel an unfinished job (its body, ``cancelled`` soon); a finished one is deleted with its images: None."""
        response = self._send(Call("DELETE", f"/v1/jobs/{core.path_id(job_id)}", ok=(202, 204)))
        return None if response.status_code == 204 else core.parse(JobInfo, response)

    def events(self, job_id: str, *, previews: bool = False, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events until its outcome; a dropped stream is reopened with ``Last-Event-ID`` (no event twice)."""
        last, drops = last_event_id, 0
        while True:
            response = self._send(core.events_call(job_id, last, previews), stream=True)
            parser = core.EventParser()
            try:
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    last = event.id if event.id is not None else last
                    yield event
                    if event.terminal:
                        return
                return  # the service ended the stream: the job is gone
            except httpx.TransportError as exc:
                drops += 1
                if drops > self.retry.max_retries:
                    raise ServiceUnreachable(f"events of job {job_id}: {type(exc).__name__}: {exc}", drops) from exc
                time.sleep(self.retry.backoff_s)
            finally:
                response.close()

    def wait(self, job_id: str, *, progress: bool = False) -> GenerateResponse:
        """The job's result once it succeeds (:class:`JobFailed` if it fails or is cancelled), read from its events;
        ``progress``: a tqdm bar over its steps."""
        bar = core.Progress(progress, job_id)
        try:
            for event in self.events(job_id):
                bar.show(event)
                if event.terminal:
                    return core.finished(job_id, JobInfo.model_validate(event.data))
        finally:
            bar.close()
        return core.finished(job_id, self.job(job_id))

    def generation(self, generation_id: str) -> Generation:
        return core.parse(Generation, self._send(Call("GET", f"/v1/generations/{core.path_id(generation_id)}")))

    def image(self, generation_id: str, index: int = 0) -> bytes:
        """Image ``index`` as stored (its format's bytes), streamed through the service (no S3 access needed)."""
        path = f"/v1/generations/{core.path_id(generation_id)}/images/{int(index)}"
        return self._send(Call("GET", path)).content

    def delete_generation(self, generation_id: str) -> None:
        self._send(Call("DELETE", f"/v1/generations/{core.path_id(generation_id)}", ok=(204,)))

    def list_generations(self, *, cursor: str | None = None, limit: int = 20) -> GenerationList:
        """``GET /v1/generations``: the caller's generations, newest first, one page."""
        return core.parse(GenerationList, self._send(core.page_call("/v1/generations", cursor, limit)))

    def iter_generations(self, *, limit: int = 20) -> Iterator[HistoryEntry]:
        """Every generation of the caller, newest first, page after page."""
        cursor = None
        while True:
            page = self.list_generations(cursor=cursor, limit=limit)
            yield from page.generations
            if not (cursor := page.next_cursor):
                return

    def models(self) -> ModelsResponse:
        return core.parse(ModelsResponse, self._send(Call("GET", "/v1/models")))

    # --------------------------------------------------------------------------------------- saved identities
    def enrol_identity(
        self, face: Photo | list[Photo], *, name: str | None = None, keep_photos: bool = False, **fields: Any
    ) -> IdentityInfo:
        """``POST /v1/identities``: 1-8 photos of one person analysed once; generate with ``identity_id=info.id``."""
        return core.parse(IdentityInfo, self._send(core.enrol_call(face, name, keep_photos, fields)))

    def list_identities(self, *, cursor: str | None = None, limit: int = 50) -> IdentityList:
        return core.parse(IdentityList, self._send(core.page_call("/v1/identities", cursor, limit)))

    def iter_identities(self, *, limit: int = 50) -> Iterator[IdentityInfo]:
        """Every identity of the caller, oldest first, page after page."""
        cursor = None
        while True:
            page = self.list_identities(cursor=cursor, limit=limit)
            yield from page.identities
            if not (cursor := page.next_cursor):
                return

    def identity(self, identity_id: str, *, include_embeddings: bool = False) -> IdentityInfo:
        params = {"include": "embeddings"} if include_embeddings else None
        call = Call("GET", f"/v1/identities/{core.path_id(identity_id)}", params=params)
        return core.parse(IdentityInfo, self._send(call))

    def delete_identity(self, identity_id: str) -> None:
        self._send(Call("DELETE", f"/v1/identities/{core.path_id(identity_id)}", ok=(204,)))

    # ------------------------------------------------------------------------------------------------ sending
    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """One call, retried as ``_core.Attempts`` decides; an error answer raises :class:`APIError`."""
        attempts = Attempts(call, self.retry)
        while True:
            attempts.start()
            request = self._http.build_request(
                call.method, call.path, json=call.json, params=call.params, headers=call.headers
            )
            try:
                response = self._http.send(request, stream=stream)
                if stream and response.status_code not in call.ok:
                    response.read()
            except httpx.TransportError as exc:
                time.sleep(attempts.after_error(exc))
                continue
            delay = attempts.after_answer(response)
            if delay is None:
                if stream and response.status_code not in call.ok:
                    response.close()
                return attempts.result(response)
            response.close()
            time.sleep(delay)
