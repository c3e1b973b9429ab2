"""Saved identities at the ingress: enrol a person once (``POST /v1/identities``), generate by id, list, read and
delete them. An identity is biometric data: it is its owner's alone (another owner gets 404), listed page by page,
and deleting it removes every object it had.

Enrolment runs the photos through the face stage exactly as a generation would (one ``identify`` call per photo,
then the stage combines them), so a generation from the saved identity gives the image the photos give. The
records live in S3 (``deployments/storage/identities.py``), read and written by the ingress itself in a worker
thread, as job records are.
"""

# No "from __future__ import annotations": FastAPI must see real types on the route methods.

import asyncio
import hashlib
import time
from typing import Literal

from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response
from ray.serve.handle import DeploymentHandle

from deployments.generation.messages import Enrolment, IdentityRequest, StageTiming
from deployments.generation.saved import saved_faces, saved_photos
from deployments.instantid.images import sniff_format
from deployments.storage.identities import (
    MAX_PAGE,
    IdentityStore,
    SavedIdentity,
    SavedPhoto,
    new_identity_id,
    now_iso,
)
from serve.schemas import IdentityCreateRequest, IdentityInfo, IdentityList, IdentityPhotoInfo

from .auth import ANONYMOUS
from .http_app import app
from .inputs import IDENTITY_FILES, ImageInputs
from .openapi import IDENTITY_BODY

_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class Identities:
    """The owner-scoped identity operations the routes and the handle API call."""

    def __init__(self, store: IdentityStore, face: DeploymentHandle, images: ImageInputs) -> None:
        self.store = store
        self.face = face
        self.images = images

    async def enrol(self, request: IdentityCreateRequest, owner: str) -> IdentityInfo:
        """Analyse the photos once and store the identity (the photos themselves only with ``keep_photos``)."""
        photos = await self.images.photos(
            request.photos(), "face_image" if request.face_images is None else "face_images"
        )
        identified = [
            self.face.identify.remote(IdentityRequest(data, i, len(photos), request.face_index, thumbnail=i == 0))
            for i, data in enumerate(photos)
        ]
        enrolment: Enrolment = await self.face.enrol.remote(request.identity_combine, *identified)
        entries = saved_photos(enrolment.chosen)
        record = SavedIdentity(
            id=new_identity_id(),
            owner=owner,
            name=request.name,
            created_at=now_iso(),
            identity_combine=request.identity_combine,
            embedding=enrolment.embedding.tolist(),
            photos=[
                SavedPhoto(
                    sha256=hashlib.sha256(data).hexdigest(),
                    content_type=_CONTENT_TYPES.get(sniff_format(data) or "") if request.keep_photos else None,
                    **entry,
                )
                for data, entry in zip(photos, entries, strict=True)
            ],
            photos_kept=request.keep_photos,
        )
        kept = list(photos) if request.keep_photos else None
        await asyncio.to_thread(self.store.save, record, enrolment.thumbnail, kept)
        return await self.info(record)

    async def list(self, owner: str, cursor: str | None, limit: int) -> IdentityList:
        records, next_cursor = await asyncio.to_thread(self.store.list, owner, cursor, limit)
        return IdentityList(identities=[await self.info(r) for r in records], next_cursor=next_cursor)

    async def get(self, owner: str, identity_id: str, include_embeddings: bool = False) -> IdentityInfo:
        record = await asyncio.to_thread(self.store.read, owner, identity_id)
        return await self.info(record, include_embeddings)

    async def delete(self, owner: str, identity_id: str) -> int:
        return await asyncio.to_thread(self.store.delete, owner, identity_id)

    async def record(self, owner: str, identity_id: str) -> SavedIdentity:
        """The saved identity's record (404 when it is not ``owner``'s)."""
        return await asyncio.to_thread(self.store.read, owner, identity_id)

    async def faces(self, owner: str, identity_id: str, identity: int | None = None) -> tuple[SavedIdentity, tuple]:
        """The saved identity's record and its faces as the face stage's results (no photo is analysed again)."""
        started = time.time()
        record = await asyncio.to_thread(self.store.read, owner, identity_id)
        return record, saved_faces(record, StageTiming.since(started), identity)

    async def info(self, record: SavedIdentity, include_embeddings: bool = False) -> IdentityInfo:
        url = await asyncio.to_thread(self.store.thumbnail_url, record.owner, record.id)
        return IdentityInfo(
            id=record.id,
            name=record.name,
            created_at=record.created_at,
            identity_combine=record.identity_combine,
            photos=[
                IdentityPhotoInfo(
                    index=i,
                    sha256=p.sha256,
                    width=p.width,
                    height=p.height,
                    face_index=p.face_index,
                    box=p.box,
                    keypoints=p.keypoints,
                    score=p.score,
                    stored=p.content_type is not None,
                )
                for i, p in enumerate(record.photos)
            ],
            photos_kept=record.photos_kept,
            thumbnail_url=url,
            embedding=record.embedding if include_embeddings else None,
            photo_embeddings=[p.embedding for p in record.photos] if include_embeddings else None,
        )


class IdentityRoutes:
    """The Ingress's identity routes and handle methods: a mixin, the Ingress holds ``identities`` and the request
    helpers (``_principal``, ``_read_body``) its HTTP routes use."""

    identities: Identities

    # ------------------------------------------------------------------------------ Python handle API
    async def enrol_identity(self, request: IdentityCreateRequest, owner: str = ANONYMOUS) -> IdentityInfo:
        """Enrol a person (see ``POST /v1/identities``); ``owner`` as for ``generate``."""
        return await self.identities.enrol(request, owner)

    async def list_identities(self, owner: str = ANONYMOUS, cursor: str | None = None, limit: int = 50) -> IdentityList:
        return await self.identities.list(owner, cursor, limit)

    async def get_identity(
        self, identity_id: str, owner: str = ANONYMOUS, include_embeddings: bool = False
    ) -> IdentityInfo:
        return await self.identities.get(owner, identity_id, include_embeddings)

    async def delete_identity(self, identity_id: str, owner: str = ANONYMOUS) -> int:
        return await self.identities.delete(owner, identity_id)

    # ------------------------------------------------------------------------------------ HTTP routes
    @app.post(
        "/v1/identities",
        status_code=201,
        response_model=IdentityInfo,
        summary="Enrol a person: their photos analysed once, stored as a saved identity to generate by id",
        openapi_extra=IDENTITY_BODY,
    )
    async def http_enrol_identity(self, request: Request) -> JSONResponse:
        owner = self._principal(request)  # type: ignore[attr-defined]
        body = IdentityCreateRequest(**await self._read_body(request, IDENTITY_FILES))  # type: ignore[attr-defined]
        info = await self.enrol_identity(body, owner)
        return JSONResponse(
            info.model_dump(mode="json"), status_code=201, headers={"Location": f"v1/identities/{info.id}"}
        )

    @app.get("/v1/identities", response_model=IdentityList, summary="The owner's saved identities, page by page")
    async def http_list_identities(
        self, request: Request, cursor: str | None = None, limit: int = Query(default=50, ge=1, le=MAX_PAGE)
    ) -> JSONResponse:
        listed = await self.list_identities(self._principal(request), cursor, limit)  # type: ignore[attr-defined]
        return JSONResponse(listed.model_dump(mode="json"))

    @app.get("/v1/identities/{identity_id}", response_model=IdentityInfo, summary="One saved identity")
    async def http_get_identity(
        self, identity_id: str, request: Request, include: Literal["embeddings"] | None = None
    ) -> JSONResponse:
        owner = self._principal(request)  # type: ignore[attr-defined]
        info = await self.get_identity(identity_id, owner, include == "embeddings")
        return JSONResponse(info.model_dump(mode="json"))

    @app.delete("/v1/identities/{identity_id}", status_code=204, summary="Delete a saved identity, every object")
    async def http_delete_identity(self, identity_id: str, request: Request) -> Response:
        await self.delete_identity(identity_id, self._principal(request))  # type: ignore[attr-defined]
        return Response(status_code=204)
