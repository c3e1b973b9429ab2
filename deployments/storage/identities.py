"""Saved identities in S3: a person enrolled once, used by id, deleted without a trace.

Layout (keys built here only; the owner's name never appears in a key)::

    IDENTITIES_PREFIX/OWNER/ID/identity.json   the record: embeddings, each photo's face geometry and sha256
    IDENTITIES_PREFIX/OWNER/ID/thumbnail.webp  a 128 px face thumbnail
    IDENTITIES_PREFIX/OWNER/ID/photo-N.EXT     the photos themselves, only when the client asked to keep them

``OWNER`` is the first 32 hex digits of the owner's SHA-256, so one owner's identities are one prefix (listed
and scoped without reading records) and no key holds a name. ``ID`` looks like ``idt-20261207T120000Z-<16 hex>``:
ids sort by enrolment time and are validated by a strict pattern before they reach a key. The identities live
under their own prefix, apart from the results: a lifecycle rule that expires generations never expires a person
an owner chose to keep. An identity is biometric data: deleting it removes every object under its prefix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError
from pydantic import BaseModel, ConfigDict, Field

from deployments.instantid.errors import InstantIDError

from .generations import S3_ERRORS, StorageError, describe_error, new_generation_id
from .s3 import S3Client, S3Settings, is_not_found, make_client

IDENTITY_RECORD = "identity.json"
THUMBNAIL = "thumbnail.webp"
_ID_RE = re.compile(r"^idt-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}$")
MAX_PAGE = 100


class IdentityNotFound(InstantIDError):
    """No such identity, or another owner's (which is the same to the asker)."""

    code = "not_found"
    status = 404


class SavedPhoto(BaseModel):
    """One enrolled photo: its chosen face as analysed, and what identifies the photo without keeping it."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    width: int
    height: int
    face_index: int
    box: list[float]
    keypoints: list[list[float]]
    score: float
    embedding: list[float] = Field(repr=False)
    content_type: str | None = Field(default=None, description="Set when the photo itself is kept.")


class SavedIdentity(BaseModel):
    """An identity's record: who owns it, how its photos combine, and each photo's analysis."""

    model_config = ConfigDict(extra="forbid")

    id: str
    owner: str
    name: str | None = None
    created_at: str
    identity_combine: str
    embedding: list[float] | list[list[float]] = Field(
        repr=False, description="The photos' combined identity (one vector; one per photo with concat)."
    )
    photos: list[SavedPhoto]
    photos_kept: bool = False

    @classmethod
    def from_export(cls, document: dict[str, Any]) -> SavedIdentity:
        """The record an export holds (``GET /v1/identities/{id}?include=embeddings``, saved to a file), for a
        generation without the service; ``ValueError`` when the document is no such export."""
        embeddings = document.get("photo_embeddings")
        photos = document.get("photos")
        if not isinstance(embeddings, list) or not isinstance(photos, list) or len(embeddings) != len(photos):
            raise ValueError("not an identity export with embeddings (GET /v1/identities/ID?include=embeddings)")
        fields = ("sha256", "width", "height", "face_index", "box", "keypoints", "score")
        return cls(
            id=document.get("id", ""),
            owner="",
            name=document.get("name"),
            created_at=document.get("created_at", ""),
            identity_combine=document.get("identity_combine", ""),
            embedding=document.get("embedding", []),
            photos=[
                SavedPhoto(**{k: photo.get(k) for k in fields}, embedding=embedding)
                for photo, embedding in zip(photos, embeddings, strict=True)
            ],
        )


def new_identity_id() -> str:
    return "idt-" + new_generation_id()


def validate_identity_id(identity_id: str) -> str:
    """``identity_id`` if it is exactly what :func:`new_identity_id` makes: nothing else reaches a key."""
    if not isinstance(identity_id, str) or not _ID_RE.fullmatch(identity_id):
        raise IdentityNotFound(f"identity {str(identity_id)[:80]!r} not found")
    return identity_id


def owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


class IdentityStore:
    """Saved identities of every owner under ``settings.identities_prefix`` in the results bucket."""

    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings
        self.prefix = settings.identities_prefix
        # Presigning is local: a second client only names the public endpoint in the URLs it signs.
        self._presigner = client
        if settings.public_endpoint is not None:
            self._presigner = make_client(settings.model_copy(update={"endpoint_url": settings.public_endpoint}))

    def thumbnail_url(self, owner: str, identity_id: str) -> str:
        """A presigned URL of the identity's thumbnail (valid ``presign_expiry_s``)."""
        key = f"{self._folder(owner, identity_id)}/{THUMBNAIL}"
        try:
            return self._presigner.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.settings.bucket, "Key": key},
                ExpiresIn=self.settings.presign_expiry_s,
            )
        except BotoCoreError as exc:
            raise StorageError(f"could not presign an identity's thumbnail: {describe_error(exc)}") from exc

    def _folder(self, owner: str, identity_id: str) -> str:
        return f"{self.prefix}/{owner_key(owner)}/{validate_identity_id(identity_id)}"

    def save(self, record: SavedIdentity, thumbnail: bytes, photos: list[bytes] | None = None) -> None:
        """Store the photos (when kept), the thumbnail, then the record last: an identity exists once its record
        does, and a failed save removes what it wrote."""
        folder = self._folder(record.owner, record.id)
        written: list[str] = []
        try:
            for index, data in enumerate(photos or []):
                kind = record.photos[index].content_type or "application/octet-stream"
                key = f"{folder}/photo-{index}.{_extension(kind)}"
                self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=data, ContentType=kind)
                written.append(key)
            key = f"{folder}/{THUMBNAIL}"
            self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=thumbnail, ContentType="image/webp")
            written.append(key)
            key = f"{folder}/{IDENTITY_RECORD}"
            body = record.model_dump_json().encode()
            self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=body, ContentType="application/json")
        except S3_ERRORS as exc:
            for key in written:
                try:
                    self.client.delete_object(Bucket=self.settings.bucket, Key=key)
                except S3_ERRORS:
                    break  # S3 is failing: the sweep of a later delete, or the owner's retry, finds the rest
            raise StorageError(f"could not store identity {record.id}: {describe_error(exc)}") from exc

    def read(self, owner: str, identity_id: str) -> SavedIdentity:
        """The record; :class:`IdentityNotFound` when it does not exist (or is another owner's)."""
        key = f"{self._folder(owner, identity_id)}/{IDENTITY_RECORD}"
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except S3_ERRORS as exc:
            if is_not_found(exc):
                raise IdentityNotFound(f"identity {identity_id} not found") from None
            raise StorageError(f"could not read identity {identity_id}: {describe_error(exc)}") from exc
        record = SavedIdentity.model_validate(json.loads(body))
        if record.owner != owner:  # the key is the owner's digest: a mismatch is a collision, not a leak to allow
            raise IdentityNotFound(f"identity {identity_id} not found")
        return record

    def list(self, owner: str, cursor: str | None = None, limit: int = 50) -> tuple[list[SavedIdentity], str | None]:
        """One page of the owner's identities, oldest first, and the cursor of the next page (None at the end).

        The cursor is opaque to clients: the last id of this page, encoded; a page after it starts right after it,
        so enrolments made between pages never shift what a client has seen."""
        limit = max(1, min(limit, MAX_PAGE))
        base = f"{self.prefix}/{owner_key(owner)}/"
        after = None if cursor is None else _decode_cursor(cursor)
        try:
            listed = self.client.list_objects_v2(
                Bucket=self.settings.bucket,
                Prefix=base,
                Delimiter="/",
                MaxKeys=limit,
                **({"StartAfter": f"{base}{after}/~"} if after else {}),
            )
        except S3_ERRORS as exc:
            raise StorageError(f"could not list identities: {describe_error(exc)}") from exc
        ids = [item["Prefix"][len(base) : -1] for item in listed.get("CommonPrefixes", [])]
        records = []
        for identity_id in ids:
            try:
                records.append(self.read(owner, identity_id))
            except IdentityNotFound:
                continue  # being deleted, or a save that failed half-way: not an identity
        more = listed.get("IsTruncated", False) and ids
        return records, (_encode_cursor(ids[-1]) if more else None)

    def photo(self, owner: str, identity_id: str, name: str) -> tuple[bytes, str]:
        """A stored object of the identity (the thumbnail or a kept photo) and its content type."""
        key = f"{self._folder(owner, identity_id)}/{name}"
        try:
            response = self.client.get_object(Bucket=self.settings.bucket, Key=key)
        except S3_ERRORS as exc:
            if is_not_found(exc):
                raise IdentityNotFound(f"identity {identity_id} has no {name}") from None
            raise StorageError(f"could not read identity {identity_id}: {describe_error(exc)}") from exc
        return response["Body"].read(), response.get("ContentType", "application/octet-stream")

    def delete(self, owner: str, identity_id: str) -> int:
        """Remove every object of the identity (its record first, so it stops existing at once): how many.

        A deletion that S3 interrupted can be asked again: the objects left without their record are removed then.
        :class:`IdentityNotFound` when the owner has nothing under that id."""
        folder = self._folder(owner, identity_id) + "/"
        try:
            self.read(owner, identity_id)
            found = True
        except IdentityNotFound:
            found = False
        removed = 0
        try:
            if found:
                self.client.delete_object(Bucket=self.settings.bucket, Key=folder + IDENTITY_RECORD)
                removed += 1
            for key in self.keys(owner, identity_id):
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)
                removed += 1
        except S3_ERRORS as exc:
            raise StorageError(f"could not delete identity {identity_id}: {describe_error(exc)}") from exc
        if not removed:
            raise IdentityNotFound(f"identity {identity_id} not found")
        return removed

    def keys(self, owner: str, identity_id: str) -> list[str]:
        """Every key under the identity's prefix (what a deletion must leave empty)."""
        folder = self._folder(owner, identity_id) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=folder)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _extension(content_type: str) -> str:
    return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(content_type, "bin")


def _encode_cursor(identity_id: str) -> str:
    return base64.urlsafe_b64encode(identity_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return validate_identity_id(base64.urlsafe_b64decode(padded.encode()).decode())
    except (ValueError, UnicodeDecodeError, IdentityNotFound):
        raise InvalidCursor("the cursor is not one this service gave out") from None


class InvalidCursor(InstantIDError):
    code = "invalid_parameter"
    status = 422


def record_json(record: SavedIdentity) -> dict[str, Any]:
    """The record as JSON, embeddings included (an export: the owner's own biometric data)."""
    return record.model_dump(mode="json")
