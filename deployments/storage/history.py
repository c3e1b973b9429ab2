"""An owner's generations, newest first: one empty marker object per generation, so a page is one S3 listing.

``{prefix}/history/{owner_key}/{rank}-{generation_id}``: ``owner_key`` is the SHA-256 of the owner (an owner's name
never becomes part of an S3 key as typed), and ``rank`` counts down from the generation id's time, so S3's
ascending key order lists the newest first. The marker is written with the generation (before its meta.json, in
the same upload, spooled with it when S3 fails) and removed when the generation is deleted; a marker whose
generation is gone (an S3 lifecycle rule expired it) is skipped and removed by the listing that finds it.

Each listed generation shows its images through presigned URLs, each with a small WebP thumbnail stored beside it
(``thumb-{index}.webp``, at most ``THUMBNAIL_PX`` on its long side).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from typing import Any

import numpy as np

from deployments.instantid.errors import InvalidParameterError

from .generations import (
    S3_ERRORS,
    GenerationNotFound,
    GenerationStore,
    StorageError,
    describe_error,
    generation_prefix,
    validate_generation_id,
)

HISTORY_DIR = "history"
THUMBNAIL_PX = 256
MAX_PAGE = 100
_LATEST = 99_999_999_999_999  # ranks count down from here: the newest generation has the smallest rank
_CURSOR = re.compile(r"^[0-9]{14}-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}$")


def owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


def history_key(prefix: str, owner: str, generation_id: str) -> str:
    """The marker of ``generation_id`` in ``owner``'s history."""
    stamp = validate_generation_id(generation_id)[:15].replace("T", "")  # YYYYMMDDHHMMSS
    return f"{prefix}/{HISTORY_DIR}/{owner_key(owner)}/{_LATEST - int(stamp):014d}-{generation_id}"


def thumbnail_name(index: int) -> str:
    return f"thumb-{index}.webp"


def thumbnail(rgb: np.ndarray) -> bytes:
    """A WebP of ``rgb`` at most ``THUMBNAIL_PX`` on its long side (Lanczos), for the history gallery."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=80)
    return buffer.getvalue()


class GenerationHistory:
    """Lists an owner's generations page by page and removes a generation's marker, over ``store``'s bucket."""

    def __init__(self, store: GenerationStore) -> None:
        self.store = store
        self.settings = store.settings

    def marker(self, owner: str, generation_id: str) -> str:
        return history_key(self.settings.prefix, owner, generation_id)

    def forget(self, owner: str, generation_id: str) -> None:
        """Remove the generation's marker (best effort: a marker left behind is removed by the next listing)."""
        with contextlib.suppress(*S3_ERRORS):
            self.store.client.delete_object(Bucket=self.settings.bucket, Key=self.marker(owner, generation_id))

    def page(self, owner: str, cursor: str | None, limit: int) -> dict[str, Any]:
        """Up to ``limit`` of ``owner``'s generations after ``cursor`` (a page's ``next_cursor``), newest first:
        ``{"generations": [...], "next_cursor": str | None}``. A malformed cursor is a 422."""
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise InvalidParameterError("cursor is not one this service gave (use a page's next_cursor)")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidParameterError(f"limit must be 1 to {MAX_PAGE}")
        folder = f"{self.settings.prefix}/{HISTORY_DIR}/{owner_key(owner)}/"
        arguments = {"Bucket": self.settings.bucket, "Prefix": folder, "MaxKeys": limit}
        if cursor is not None:
            arguments["StartAfter"] = folder + cursor
        try:
            listed = self.store.client.list_objects_v2(**arguments)
        except S3_ERRORS as exc:
            raise StorageError(f"could not list the generations: {describe_error(exc)}") from exc
        entries = []
        keys = [item["Key"] for item in listed.get("Contents", [])]
        for key in keys:
            generation_id = key[len(folder) :].split("-", 1)[1]
            try:
                meta = self.store.read(generation_id)
            except GenerationNotFound:  # expired or deleted while its marker stayed: forget it
                self.forget(owner, generation_id)
                continue
            if meta.get("owner") != owner:
                continue
            entries.append(self._entry(generation_id, meta))
        next_cursor = keys[-1][len(folder) :] if keys and listed.get("IsTruncated") else None
        return {"generations": entries, "next_cursor": next_cursor}

    def _entry(self, generation_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        """One generation as the gallery shows it: when, the parameters it ran with, the model, its images with
        presigned URLs (full size and thumbnail)."""
        base = generation_prefix(self.settings.prefix, generation_id)
        stored = self.store.get_from_meta(generation_id, meta)
        images = []
        for index, (record, image) in enumerate(zip(meta.get("images", []), stored.images, strict=True)):
            images.append(
                {
                    "index": index,
                    "width": record.get("width"),
                    "height": record.get("height"),
                    "url": image.url,
                    "thumbnail_url": self.store.presign(f"{base}/{thumbnail_name(index)}"),
                    "identity_similarity": record.get("identity_similarity"),
                }
            )
        return {
            "id": generation_id,
            "created_at": meta.get("created_at"),
            "job_id": meta.get("job_id"),
            "parameters": meta.get("parameters", {}),
            "model": meta.get("model"),
            "images": images,
        }
