"""The asyncio client (``httpx.AsyncClient``): :class:`~serve.client.sync.InstantIDClient`'s methods as coroutines,
built on the same ``_core`` request builders, parsers and retry decisions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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


class AsyncInstantIDClient:
    """``async with AsyncInstantIDClient(url) as client: await client.generate(...)``; see ``InstantIDClient``."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=core.base_headers(core.api_key_from(api_key)),
            timeout=core.default_timeout(timeout_s),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncInstantIDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -------------------------------------------------------------------------------------------- generations
    async def generate(
        self,
        request: GenerateRequest | dict[str, Any] | None = None,
        *,
        face: Photo | list[Photo] | None = None,
        pose: Photo | None = None,
        init_image: Photo | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> GenerateResponse:
        body = core.generation_body(request, face, pose, init_image, fields)
        return core.parse(GenerateResponse, await self._send(core.generate_call(body, idempotency_key)))

    async def submit(
        self,
        request: GenerateRequest | dict[str, Any] | None = None,
        *,
        face: Photo | list[Photo] | None = None,
        pose: Photo | None = None,
        init_image: Photo | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobAccepted:
        body = core.generation_body(request, face, pose, init_image, fields)
        return core.parse(JobAccepted, await self._send(core.submit_call(body, idempotency_key)))

    async def job(self, job_id: str) -> JobInfo:
        return core.parse(JobInfo, await self._send(Call("GET", f"/v1/jobs/{core.path_id(job_id)}")))

    async def cancel(self, job_id: str) -> JobInfo | None:
        response = await self._send(Call("DELETE", f"/v1/jobs/{core.path_id(job_id)}", ok=(202, 204)))
        return None if response.status_code == 204 else core.parse(JobInfo, response)

    async def events(
        self, job_id: str, *, previews: bool = False, last_event_id: int | None = None
    ) -> AsyncIterator[JobEvent]:
        last, drops = last_event_id, 0
        while True:
            response = await self._send(core.events_call(job_id, last, previews), stream=True)
            parser = core.EventParser()
            try:
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    last = event.id if event.id is not None else last
                    yield event
                    if event.terminal:
                        return
                return
            except httpx.TransportError as exc:
                drops += 1
                if drops > self.retry.max_retries:
                    raise ServiceUnreachable(f"events of job {job_id}: {type(exc).__name__}: {exc}", drops) from exc
                await asyncio.sleep(self.retry.backoff_s)
            finally:
                await response.aclose()

    async def wait(self, job_id: str, *, progress: bool = False) -> GenerateResponse:
        bar = core.Progress(progress, job_id)
        try:
            async for event in self.events(job_id):
                bar.show(event)
                if event.terminal:
                    return core.finished(job_id, JobInfo.model_validate(event.data))
        finally:
            bar.close()
        return core.finished(job_id, await self.job(job_id))

    async def generation(self, generation_id: str) -> Generation:
        call = Call("GET", f"/v1/generations/{core.path_id(generation_id)}")
        return core.parse(Generation, await self._send(call))

    async def image(self, generation_id: str, index: int = 0) -> bytes:
        path = f"/v1/generations/{core.path_id(generation_id)}/images/{int(index)}"
        return (await self._send(Call("GET", path))).content

    async def delete_generation(self, generation_id: str) -> None:
        await self._send(Call("DELETE", f"/v1/generations/{core.path_id(generation_id)}", ok=(204,)))

    async def list_generations(self, *, cursor: str | None = None, limit: int = 20) -> GenerationList:
        """``GET /v1/generations``: the caller's generations, newest first, one page."""
        return core.parse(GenerationList, await self._send(core.page_call("/v1/generations", cursor, limit)))

    async def iter_generations(self, *, limit: int = 20) -> AsyncIterator[HistoryEntry]:
        """Every generation of the caller, newest first, page after page."""
        cursor = None
        while True:
            page = await self.list_generations(cursor=cursor, limit=limit)
            for entry in page.generations:
                yield entry
            if not (cursor := page.next_cursor):
                return

    async def models(self) -> ModelsResponse:
        return core.parse(ModelsResponse, await self._send(Call("GET", "/v1/models")))

    # --------------------------------------------------------------------------------------- saved identities
    async def enrol_identity(
        self, face: Photo | list[Photo], *, name: str | None = None, keep_photos: bool = False, **fields: Any
    ) -> IdentityInfo:
        return core.parse(IdentityInfo, await self._send(core.enrol_call(face, name, keep_photos, fields)))

    async def list_identities(self, *, cursor: str | None = None, limit: int = 50) -> IdentityList:
        return core.parse(IdentityList, await self._send(core.page_call("/v1/identities", cursor, limit)))

    async def iter_identities(self, *, limit: int = 50) -> AsyncIterator[IdentityInfo]:
        cursor = None
        while True:
            page = await self.list_identities(cursor=cursor, limit=limit)
            for info in page.identities:
                yield info
            if not (cursor := page.next_cursor):
                return

    async def identity(self, identity_id: str, *, include_embeddings: bool = False) -> IdentityInfo:
        params = {"include": "embeddings"} if include_embeddings else None
        call = Call("GET", f"/v1/identities/{core.path_id(identity_id)}", params=params)
        return core.parse(IdentityInfo, await self._send(call))

    async def delete_identity(self, identity_id: str) -> None:
        await self._send(Call("DELETE", f"/v1/identities/{core.path_id(identity_id)}", ok=(204,)))

    # ------------------------------------------------------------------------------------------------ sending
    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempts = Attempts(call, self.retry)
        while True:
            attempts.start()
            request = self._http.build_request(
                call.method, call.path, json=call.json, params=call.params, headers=call.headers
            )
            try:
                response = await self._http.send(request, stream=stream)
                if stream and response.status_code not in call.ok:
                    await response.aread()
            except httpx.TransportError as exc:
                await asyncio.sleep(attempts.after_error(exc))
                continue
            delay = attempts.after_answer(response)
            if delay is None:
                if stream and response.status_code not in call.ok:
                    await response.aclose()
                return attempts.result(response)
            await response.aclose()
            await asyncio.sleep(delay)
