"""Reading requests: JSON or multipart bodies with size limits, and input images from base64 or allowed ``s3://``.

A multipart request becomes the same fields as the JSON body: each file part ``NAME`` arrives as
``NAME_b64`` (its bytes in base64), every other part as a field of its own name, so one pydantic model
validates both. The bytes of an image are checked later, by the stage that decodes them
(``deployments.instantid.images``); here only sizes and declared types are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from deployments.generation.plan import PersonInput
from deployments.instantid.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    UnsupportedImageTypeError,
)
from deployments.instantid.options import CONTROLNET_NAMES, MAX_FACE_PHOTOS
from deployments.storage.identities import SavedIdentity
from deployments.storage.inputs import S3InputReader
from serve.config import ApiConfig
from serve.ingress.errors import ApiError
from serve.schemas import CONTROL_IMAGE_PART, IDENTITY_PARTS, FacePhoto, IdentityChoice

# Multipart file parts -> the JSON field each fills (``NAME`` -> ``NAME_b64``); the first is required.
GENERATE_FILES = {
    "face_image": "face_image",
    "pose_image": "pose_image",
    "init_image": "init_image",
    "target_image": "target_image",
    "mask_image": "mask_image",
    **{CONTROL_IMAGE_PART.format(name): CONTROL_IMAGE_PART.format(name) for name in CONTROLNET_NAMES},
    **{part: part for part in IDENTITY_PARTS},
}
# /v1/generate's name works here too; several people's parts show their layout
FACES_FILES = {"image": "image", "face_image": "image", **{part: part for part in IDENTITY_PARTS}}
IDENTITY_FILES = {"face_image": "face_image"}  # POST /v1/identities: the person's photos
# Instead of a face photo part: several people's parts, or saved identities (form fields) in their place.
INSTEAD_OF_A_PHOTO = (*IDENTITY_PARTS, "identity_id", "identities")
# Generation requests: the face photo and each person's photos may each be sent up to MAX_FACE_PHOTOS times.
GENERATE_REPEATED = {
    "face_image": ("face_images", MAX_FACE_PHOTOS),
    **{part: (f"{part}_images", MAX_FACE_PHOTOS) for part in IDENTITY_PARTS},
}
MAX_FORM_FIELDS = 64
MAX_FORM_FIELD_BYTES = 64 * 1024
_IMAGE_CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream"}


async def _read_limited(request: Request, limit: int, idle_timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_request", "invalid Content-Length")
        if int(declared) > limit:
            raise ImageTooLargeError(f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:  # a client that stops sending (slowloris) must not hold an ingress slot forever
            chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", f"no body data for {idle_timeout_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, api: ApiConfig, files: Mapping[str, str]) -> dict[str, Any]:
    """A generation or faces request's fields (``files``: ``GENERATE_FILES`` or ``FACES_FILES``), within ``api``'s
    limits: face photos and identity parts may repeat, identity parts stand in for the face photo."""
    return await read_fields(
        request,
        max_upload_bytes=api.max_upload_bytes,
        max_request_bytes=api.max_request_bytes,
        idle_timeout_s=api.body_idle_timeout_s,
        files=files,
        repeated=GENERATE_REPEATED,
        alternatives=INSTEAD_OF_A_PHOTO,
    )


async def read_fields(
    request: Request,
    *,
    max_upload_bytes: int,
    max_request_bytes: int,
    idle_timeout_s: float,
    files: Mapping[str, str],
    repeated: Mapping[str, tuple[str, int]] | None = None,
    alternatives: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The request's fields, from a JSON or a multipart body; a 408 when the body stalls for ``idle_timeout_s``.

    ``files`` maps each accepted multipart file part to the field it fills (``NAME`` -> ``FIELD_b64``); several
    part names may fill one field (aliases). The first field of ``files`` is required in multipart requests, unless
    a part of ``alternatives`` (fields) is given instead (several people's ``identity_N`` parts).
    ``repeated``: fields whose part may be repeated (``FIELD`` -> (list field, most parts)): one part fills
    ``FIELD_b64`` as usual, several fill the list field as ``[{"b64": ...}, ...]`` in the order sent.
    """
    body = await _read_limited(request, max_request_bytes, idle_timeout_s)
    request._body = body  # starlette parses forms from the cached body
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise ApiError(400, "invalid_request", "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(422, "invalid_parameter", "the JSON body must be an object")
        return fields
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_upload_bytes, files, repeated or {}, alternatives)
    raise UnsupportedImageTypeError(
        f"content type {content_type or '(none)'} is not accepted; use application/json or multipart/form-data"
    )


def most_file_parts(files: Mapping[str, str], repeated: Mapping[str, tuple[str, int]]) -> int:
    """How many file parts a multipart body may hold: each accepted part once, the repeatable ones up to their
    most; a body with more is refused before its parts are parsed (400)."""
    return len(files) + sum(most for _, most in repeated.values())


async def _read_multipart(
    request: Request,
    max_upload_bytes: int,
    files: Mapping[str, str],
    repeated: Mapping[str, tuple[str, int]],
    alternatives: tuple[str, ...] = (),
) -> dict[str, Any]:
    # One part more than allowed still parses, so that the model's own limit reports it (a 422 naming the field).
    max_files = most_file_parts(files, repeated)
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES)
    except Exception as exc:  # malformed multipart, too many parts
        raise ApiError(400, "invalid_request", f"could not parse the multipart body: {exc}") from None
    fields: dict[str, Any] = {}
    uploads: dict[str, list[bytes]] = {}  # target field -> the bytes of each part
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            target = files.get(name)
            if target is None:
                raise ApiError(422, "invalid_parameter", f"unexpected file field {name!r}")
            if target in uploads and target not in repeated:
                raise ApiError(422, "invalid_parameter", f"file {name!r} given twice")
            uploads.setdefault(target, []).append(await _read_upload(name, value, max_upload_bytes))
        elif name in fields:
            raise ApiError(422, "invalid_parameter", f"field {name!r} given twice")
        elif name in files:
            raise ApiError(422, "invalid_parameter", f"{name} must be a file part")
        else:
            fields[name] = value
    required = next(iter(files.values()))
    if required not in uploads and not any(name in uploads or name in fields for name in alternatives):
        instead = f" (or {', '.join(alternatives[:2])}, ... for several people, or identity_id)" if alternatives else ""
        raise ApiError(422, "invalid_parameter", f"multipart requests need a file part {required!r}{instead}")
    for target, parts in uploads.items():
        encoded = [base64.b64encode(data).decode() for data in parts]
        if len(encoded) == 1:
            fields[f"{target}_b64"] = encoded[0]
        else:
            fields[repeated[target][0]] = [{"b64": b64} for b64 in encoded]
    return fields


async def _read_upload(name: str, upload: UploadFile, limit: int) -> bytes:
    kind = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in _IMAGE_CONTENT_TYPES:
        raise UnsupportedImageTypeError(f"{name}: content type {kind} is not an image we accept")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLargeError(f"{name} is larger than {limit} bytes")
    if not data:
        raise InvalidImageError(f"{name} is empty")
    return data


def decode_b64(data: str, field: str, limit: int) -> bytes:
    """Base64 (or a ``data:`` URI) to bytes, refusing more than ``limit`` decoded bytes before decoding."""
    if len(data) > limit * 4 // 3 + 8:
        raise ImageTooLargeError(f"{field} is larger than {limit} bytes")
    try:
        raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"{field} is not valid base64") from None
    if not raw:
        raise InvalidImageError(f"{field} is empty")
    return raw


class ImageInputs:
    """Input images as bytes, from base64 or from an ``s3://`` URI in an allowed bucket (never a URL)."""

    def __init__(self, reader: S3InputReader, max_bytes: int) -> None:
        self.reader = reader
        self.max_bytes = max_bytes

    async def load(self, b64: str | None, uri: str | None, field: str) -> bytes:
        if b64 is not None:
            return decode_b64(b64, field, self.max_bytes)
        if uri is None:
            raise InvalidParameterError(f"{field} is required")
        return await asyncio.to_thread(self.reader.read, uri, field, self.max_bytes)

    async def photos(self, photos: list[FacePhoto], field: str) -> tuple[bytes, ...]:
        """One person's photos, loaded concurrently; errors name ``field`` (one photo) or ``field[i]``."""
        names = [field] if len(photos) == 1 else [f"{field}[{i}]" for i in range(len(photos))]
        return tuple(await asyncio.gather(*(self.load(p.b64, p.uri, n) for p, n in zip(photos, names, strict=True))))

    async def people(
        self, identities: list[IdentityChoice], saved: Mapping[int, tuple[SavedIdentity, tuple]] | None = None
    ) -> tuple[PersonInput, ...]:
        """Every identity's photos (all loaded concurrently) with its choices; ``saved``: by identity index, the saved
        identities' records and faces (``Identities.faces``) for those given by ``identity_id``."""
        saved = saved or {}
        loads = [
            self.load(photo.b64, photo.uri, f"identities[{i}].images[{j}]")
            for i, identity in enumerate(identities)
            for j, photo in enumerate(identity.images or ())
        ]
        flat = iter(await asyncio.gather(*loads))
        people = []
        for i, identity in enumerate(identities):
            if i in saved:
                record, known = saved[i]
                people.append(
                    PersonInput((), 0, record.identity_combine, identity.spec(), known=known, saved_identity=record.id)
                )
            else:
                photos = tuple(next(flat) for _ in identity.images or ())
                people.append(PersonInput(photos, identity.face_index, identity.identity_combine, identity.spec()))
        return tuple(people)
