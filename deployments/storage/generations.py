"""Generations in S3: object layout, ids, encoding, and a store that only reports what S3 really has.

Layout (UTC date, keys built here only, never from user input)::

    PREFIX/YYYY/MM/DD/ID/image-N.EXT     N = 0, 1, ...; EXT = png | jpg | webp
    PREFIX/YYYY/MM/DD/ID/meta.json       the caller's meta + the list of stored images

IDs look like ``20250101T120000Z-0123456789abcdef``: they sort by creation time and carry their own date, so
``GET /v1/generations/{id}`` finds the objects without listing the bucket, and the strict regex check means
a request path can never steer a key elsewhere.

Used by the ResultStore Serve deployment and by the CLI; no Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from deployments.instantid.errors import InstantIDError

from .s3 import S3Client, S3Settings, ensure_bucket, is_not_found, make_client

__all__ = [
    "CONTENT_TYPES",
    "EXTENSIONS",
    "META_NAME",
    "S3_ERRORS",
    "GenerationNotFound",
    "GenerationStore",
    "ImageFormat",
    "PreparedGeneration",
    "SafetyInfo",
    "StorageError",
    "StoredGeneration",
    "StoredImage",
    "describe_error",
    "encode_image",
    "encode_meta",
    "generation_date",
    "generation_prefix",
    "new_generation_id",
    "validate_generation_id",
]

ImageFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
META_NAME = "meta.json"
S3_ERRORS = (BotoCoreError, ClientError)
# S3 did not answer at all (no connection, or no response in time): retrying anything now waits the same again.
UNREACHABLE = (BotoConnectionError, ReadTimeoutError, ConnectionClosedError)

_ID_RE = re.compile(r"^(?P<stamp>[0-9]{8}T[0-9]{6}Z)-(?P<rand>[0-9a-f]{16})$")
_ID_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


class StorageError(InstantIDError):
    """S3 could not store or read a result (down, timed out, refused, or an object failed verification).

    A 503: the request itself was fine and may succeed later.
    """

    code = "storage_unavailable"
    status = 503

    @property
    def public_message(self) -> str:
        """S3's own words name the endpoint, the bucket and object keys: those stay in the service's logs."""
        return "storage is unavailable; retry shortly"


class GenerationNotFound(InstantIDError, KeyError):
    """No generation with that id (its meta.json is absent). Also a ``KeyError`` for dict-like callers."""

    code = "not_found"
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


# ----------------------------------------------------------------------------------------------- ids


def new_generation_id(now: datetime | None = None) -> str:
    """A fresh id ``YYYYMMDDTHHMMSSZ-<16 hex>``: UTC time (sortable, gives the date folder) + 64 random bits."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{now.strftime(_ID_TIME_FORMAT)}-{secrets.token_hex(8)}"


def is_generation_id(text: str) -> bool:
    """Whether ``text`` has the form of a generation id (see :func:`validate_generation_id`)."""
    try:
        validate_generation_id(text)
    except ValueError:
        return False
    return True


def validate_generation_id(generation_id: str) -> str:
    """Return ``generation_id`` if it is exactly what :func:`new_generation_id` makes, else ``ValueError``.

    The timestamp must also be a real UTC time, so the derived date folder is always valid.
    """
    if not isinstance(generation_id, str):
        raise ValueError("generation id must be a string")
    match = _ID_RE.fullmatch(generation_id)
    if match is None:
        raise ValueError("invalid generation id: expected YYYYMMDDTHHMMSSZ-<16 lowercase hex digits>")
    try:
        datetime.strptime(match["stamp"], _ID_TIME_FORMAT)
    except ValueError:
        raise ValueError("invalid generation id: its timestamp is not a valid date/time") from None
    return generation_id


def generation_date(generation_id: str) -> date:
    """The UTC date encoded in a (valid) id: the ``YYYY/MM/DD`` folder of its objects."""
    stamp = validate_generation_id(generation_id)[:8]
    return date(int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]))


def generation_time(generation_id: str) -> datetime:
    """The UTC time, to the second, encoded in a (valid) id: when it was made, whatever became of it since (the job
    sweep tells a submission still being stored from an abandoned one by it)."""
    stamp = validate_generation_id(generation_id)[:16]
    return datetime.strptime(stamp, _ID_TIME_FORMAT).replace(tzinfo=timezone.utc)


def generation_prefix(prefix: str, generation_id: str) -> str:
    """``PREFIX/YYYY/MM/DD/ID`` (no trailing slash) for a valid id."""
    day = generation_date(generation_id)
    return f"{prefix}/{day.year:04d}/{day.month:02d}/{day.day:02d}/{generation_id}"


# ------------------------------------------------------------------------------------------ encoding


def encode_image(rgb: np.ndarray, fmt: ImageFormat, quality: int) -> tuple[bytes, str]:
    """Encode an ``HxWx3`` uint8 RGB array; returns ``(bytes, content_type)``.

    ``quality`` (1-100) applies to JPEG and WebP; PNG is lossless and ignores it. No metadata (EXIF etc.)
    is written, so nothing about the request leaks through the image file.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", None)
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got shape={shape} dtype={dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape={rgb.shape}")
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of {sorted(CONTENT_TYPES)}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    image = Image.fromarray(np.ascontiguousarray(rgb))
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue(), CONTENT_TYPES[fmt]


def _json_default(value: Any) -> Any:
    """Let meta carry numpy scalars/arrays, paths and datetimes without every caller converting them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


def encode_meta(meta: dict[str, Any]) -> bytes:
    """UTF-8 JSON with sorted keys (stable, diffable); NaN/Infinity refused since they are not JSON."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_default).encode()


# ------------------------------------------------------------------------------------------- models


# One image confirmed in S3; also what API responses list (its class docstring would become the schema's text).
class IdentityScore(BaseModel):
    """Several people in one image: how one identity came out in its region."""

    model_config = ConfigDict(frozen=True, from_attributes=True)  # read from the face stage's scores as they come

    index: int = Field(description="The identity's index in the request's identities.")
    box: list[float] | None = Field(
        description="x1, y1, x2, y2 of the region's best-matching face in the image; null when none was found."
    )
    similarity: float | None = Field(description="Its cosine similarity with the identity's photos (ArcFace).")


class SafetyInfo(BaseModel):
    """The safety check's verdict on one stored image."""

    model_config = ConfigDict(frozen=True)

    flagged: bool = Field(description="A score reached the deployment's threshold.")
    scores: dict[str, float] = Field(description="The classifier's scores in [0, 1] by category (open_nsfw: nsfw).")
    blurred: bool = Field(default=False, description="The stored image is the blurred version (policy blur).")


class StoredImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str
    url: str = Field(description="Presigned GET URL; expires.")
    width: int
    height: int
    bytes: int
    content_type: str
    identity_similarity: float | None = Field(
        default=None,
        description="Cosine similarity of the largest face in the image with the request's identity (ArcFace, the "
        "model the input side uses); null when no face was found.",
    )
    index: int | None = Field(
        default=None,
        description="Its place among the request's images (its seed offset); differs from its place in this list when "
        "the safety check refused an earlier image.",
    )
    safety: SafetyInfo | None = Field(default=None, description="The safety check's verdict (absent when it is off).")
    below_min_identity_similarity: bool | None = Field(
        default=None, description="With min_identity_similarity: true when this image scored below it (or has no face)."
    )
    identities: list[IdentityScore] | None = Field(
        default=None,
        description="Several people: per identity, its region's best-matching face and similarity; "
        "identity_similarity is then the lowest of them (null when any region shows no face).",
    )

    @property
    def key(self) -> str:
        return self.uri.split("/", 3)[3]


@dataclass
class PreparedGeneration:
    """A generation encoded and ready to upload: ``objects`` are ``(key, bytes, content_type)``, meta.json last."""

    generation_id: str
    objects: list[tuple[str, bytes, str]]
    image_records: list[dict[str, Any]]

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.objects[-1][1])


class StoredGeneration(BaseModel):
    """What :meth:`GenerationStore.write` confirmed in S3: the id, the meta.json key, and the images."""

    model_config = ConfigDict(frozen=True)

    id: str
    meta_key: str
    images: list[StoredImage]


# -------------------------------------------------------------------------------------------- store


class GenerationStore:
    """The generations in one bucket/prefix: writes them, reads them back, presigns their images, deletes them.

    Every S3 failure surfaces as :class:`StorageError` (HTTP 503) and a missing generation as
    :class:`GenerationNotFound` (404); callers never see botocore exceptions.
    """

    def __init__(self, client: S3Client, settings: S3Settings) -> None:
        self.client = client
        self.settings = settings
        # Presigning is local: a second client only names the public endpoint in the URLs it signs.
        self._presigner = client
        if settings.public_endpoint is not None:
            public = settings.model_copy(update={"endpoint_url": settings.public_endpoint})
            self._presigner = make_client(public)

    def __repr__(self) -> str:
        return f"GenerationStore(bucket={self.settings.bucket!r}, prefix={self.settings.prefix!r})"

    # -- helpers ------------------------------------------------------------------------------------

    def _uri(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    def _stored_image(self, record: dict[str, Any]) -> StoredImage:
        """A meta.json image record (``key``, ``bytes``, ``sha256``, ...) with its URI and a fresh presigned URL."""
        fields = {k: v for k, v in record.items() if k not in ("key", "sha256")}  # sha256 stays in meta.json
        return StoredImage(uri=self._uri(record["key"]), url=self.presign(record["key"]), **fields)

    def meta_key(self, generation_id: str) -> str:
        """Key of the generation's meta.json (validates the id)."""
        return f"{generation_prefix(self.settings.prefix, generation_id)}/{META_NAME}"

    def image_key(self, generation_id: str, index: int, fmt: ImageFormat) -> str:
        """Key of image ``index`` of a generation (validates the id)."""
        return f"{generation_prefix(self.settings.prefix, generation_id)}/image-{index}.{EXTENSIONS[fmt]}"

    # -- operations ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Check the bucket is reachable (creating it when ``settings.create_bucket``), at deployment start.

        Failing here turns a misconfiguration into a clear startup error instead of a 503 on every request.
        """
        try:
            ensure_bucket(
                self.client, self.settings.bucket, region=self.settings.region, create=self.settings.create_bucket
            )
        except S3_ERRORS as exc:
            raise StorageError(f"bucket {self.settings.bucket!r} is not usable: {describe_error(exc)}") from exc

    def prepare(
        self,
        generation_id: str,
        images: Sequence[np.ndarray],
        fmt: ImageFormat,
        quality: int,
        meta: dict[str, Any],
        extra_objects: Sequence[tuple[str, bytes, str]] = (),
        identity_similarities: Sequence[float | None] | None = None,
        identity_scores: Sequence[Sequence[Any]] | None = None,
        image_fields: Sequence[dict[str, Any]] | None = None,
        markers: Sequence[str] = (),
    ) -> PreparedGeneration:
        """Encode everything a generation stores, without touching S3 (so it can be spooled and replayed).

        meta.json receives ``id`` and ``images`` (key, bytes, sha256, content type, size in pixels), which
        overwrite same-named caller keys: the store's record of what it stored is authoritative. Bad
        arguments (including meta that is not JSON-serialisable) raise ``ValueError``/``TypeError``.
        ``extra_objects`` are ``(name, bytes, content_type)`` stored next to the images (e.g. input photos
        the client asked to keep); names are fixed by the server. ``identity_scores`` (several people): per image,
        one score per identity (an :class:`IdentityScore`, or an object with its fields); the image's
        ``identity_similarity`` is then their minimum. ``image_fields``: more fields per image record (its index among
        the request's images, the safety verdict). ``markers``: keys of empty objects written with the generation,
        before its meta.json (an owner's history entry, ``history.py``), anywhere under the prefix.
        """
        validate_generation_id(generation_id)
        if not images:
            raise ValueError("prepare() needs at least one image")
        base = generation_prefix(self.settings.prefix, generation_id)
        objects: list[tuple[str, bytes, str]] = []
        image_records = []
        for index, rgb in enumerate(images):
            data, content_type = encode_image(rgb, fmt, quality)
            key = self.image_key(generation_id, index, fmt)
            objects.append((key, data, content_type))
            image_records.append(
                {
                    "key": key,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "content_type": content_type,
                    "width": rgb.shape[1],
                    "height": rgb.shape[0],
                    "identity_similarity": None if identity_similarities is None else identity_similarities[index],
                }
            )
            if identity_scores is not None:
                scores = [IdentityScore.model_validate(score).model_dump() for score in identity_scores[index]]
                values = [score["similarity"] for score in scores]
                image_records[-1]["identities"] = scores
                image_records[-1]["identity_similarity"] = None if None in values or not values else min(values)
            if image_fields is not None:  # never over the store's own record of what it stored
                image_records[-1] = {**image_fields[index], **image_records[-1]}
        for name, data, content_type in extra_objects:
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9]+)?", name):
                raise ValueError(f"invalid object name {name!r}")
            objects.append((f"{base}/{name}", data, content_type))
        for key in markers:
            if not key.startswith(self.settings.prefix + "/") or ".." in key.split("/"):
                raise ValueError(f"a marker outside the prefix: {key!r}")
            objects.append((key, b"", "application/octet-stream"))
        meta_bytes = encode_meta({**meta, "id": generation_id, "images": image_records})
        objects.append((self.meta_key(generation_id), meta_bytes, "application/json"))
        return PreparedGeneration(generation_id, objects, image_records)

    def upload(self, prepared: PreparedGeneration) -> StoredGeneration:
        """Upload every object (meta.json last) and confirm each (HEAD, size) before returning.

        On any S3 failure :class:`StorageError` is raised, so success is only ever reported for objects that are
        really there, and the objects of this generation are deleted (best effort) unless S3 could not be reached:
        then a delete would only wait out the same timeouts again before the client hears of the failure, and what
        was written (images, never meta.json, so no route shows them) is overwritten by the spool's upload or
        expired by the bucket's lifecycle rule.
        """
        attempted: list[str] = []
        try:
            for key, data, content_type in prepared.objects:
                attempted.append(key)
                self._put_and_confirm(key, data, content_type)
        except (*S3_ERRORS, StorageError) as exc:
            if not isinstance(exc, UNREACHABLE):
                self._delete_keys_quietly(attempted)
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"could not store generation {prepared.generation_id}: {describe_error(exc)}") from exc
        stored = [self._stored_image(record) for record in prepared.image_records]
        return StoredGeneration(id=prepared.generation_id, meta_key=prepared.objects[-1][0], images=stored)

    def _put_and_confirm(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=data, ContentType=content_type)
        head = self.client.head_object(Bucket=self.settings.bucket, Key=key)
        size = int(head.get("ContentLength", -1))
        if size != len(data):
            raise StorageError(f"{self._uri(key)} verification failed: S3 has {size} bytes, uploaded {len(data)}")

    def _delete_keys_quietly(self, keys: Sequence[str]) -> None:
        """Best effort: S3 may be the thing that is down, so errors here are swallowed."""
        for key in keys:
            with contextlib.suppress(*S3_ERRORS):
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)

    def read(self, generation_id: str) -> dict[str, Any]:
        """The generation's meta.json as a dict; :class:`GenerationNotFound` when it does not exist."""
        key = self.meta_key(generation_id)
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except S3_ERRORS as exc:
            if is_not_found(exc):
                raise GenerationNotFound(f"generation {generation_id} not found") from None
            raise StorageError(f"could not read generation {generation_id}: {describe_error(exc)}") from exc
        try:
            meta = json.loads(body)
        except ValueError as exc:
            raise StorageError(f"{self._uri(key)} is not valid JSON") from exc
        if not isinstance(meta, dict):
            raise StorageError(f"{self._uri(key)} is not a JSON object")
        return meta

    def get(self, generation_id: str) -> StoredGeneration:
        """:meth:`read` as a :class:`StoredGeneration` with fresh presigned URLs (for the GET endpoint)."""
        return self.get_from_meta(generation_id, self.read(generation_id))

    def get_from_meta(self, generation_id: str, meta: dict[str, Any]) -> StoredGeneration:
        """A :class:`StoredGeneration` with fresh presigned URLs from an already-read meta.json."""
        try:
            images = [self._stored_image(record) for record in meta.get("images", [])]
        except (TypeError, ValueError, KeyError) as exc:
            raise StorageError(f"meta.json of generation {generation_id} has an unexpected image list") from exc
        return StoredGeneration(id=generation_id, meta_key=self.meta_key(generation_id), images=images)

    def read_image(self, generation_id: str, index: int) -> tuple[bytes, str]:
        """Image ``index`` of a generation, as bytes and content type (for clients that cannot reach S3)."""
        records = self.read(generation_id).get("images", [])
        if not 0 <= index < len(records):
            raise GenerationNotFound(f"generation {generation_id} has no image {index}")
        key = records[index]["key"]
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except S3_ERRORS as exc:
            if is_not_found(exc):
                raise GenerationNotFound(f"generation {generation_id} has no image {index}") from exc
            raise StorageError(f"could not read {self._uri(key)}: {describe_error(exc)}") from exc
        return body, records[index]["content_type"]

    def presign(self, key: str) -> str:
        """A presigned GET URL valid ``settings.presign_expiry_s``; only for keys under our prefix.

        Signing is local (no request), so S3 being down does not matter; missing credentials do
        (:class:`StorageError`).
        """
        if not key.startswith(self.settings.prefix + "/") or ".." in key.split("/"):
            raise ValueError(f"refusing to presign a key outside the result prefix: {key!r}")
        try:
            return self._presigner.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.settings.bucket, "Key": key},
                ExpiresIn=self.settings.presign_expiry_s,
            )
        except BotoCoreError as exc:  # e.g. no credentials at all
            raise StorageError(f"could not presign {self._uri(key)}: {describe_error(exc)}") from exc

    def delete(self, generation_id: str) -> int:
        """Delete every object of the generation; returns how many were deleted (0: nothing was there)."""
        prefix = generation_prefix(self.settings.prefix, generation_id) + "/"
        try:
            keys = [
                item["Key"]
                for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.settings.bucket, Prefix=prefix
                )
                for item in page.get("Contents", [])
            ]
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                response = self.client.delete_objects(
                    Bucket=self.settings.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(
                        f"could not delete {len(response['Errors'])} object(s) of generation {generation_id}, "
                        f"e.g. {first.get('Key')}: {first.get('Code')}"
                    )
        except S3_ERRORS as exc:
            raise StorageError(f"could not delete generation {generation_id}: {describe_error(exc)}") from exc
        return len(keys)


def describe_error(exc: BaseException) -> str:
    """A short reason for logs and API errors; botocore messages carry no credentials."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip().rstrip(":")
    # botocore's connection errors name the endpoint URL (host, port, bucket, key): not for API errors
    return f"{type(exc).__name__}: {_ENDPOINT_URL.sub('the storage endpoint', str(exc))}"


_ENDPOINT_URL = re.compile(r"\"?[a-z][a-z0-9+.-]*://[^\s\"]+\"?", re.IGNORECASE)
