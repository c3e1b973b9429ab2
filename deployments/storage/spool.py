"""A disk spool for finished generations that S3 would not take, uploaded later: nothing finished is lost.

Each generation is one folder ``SPOOL/ID/`` holding its objects as files plus ``manifest.json``; it is
written in a temporary sibling and renamed, so a crash never leaves a half-spooled generation, and it
survives replica restarts (on Kubernetes the spool is a persistent volume).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .generations import PreparedGeneration, StorageError, is_generation_id, validate_generation_id

MANIFEST = "manifest.json"


class SpooledError(StorageError):
    """S3 refused the upload; the generation is safe in the spool and will be uploaded later."""

    def __init__(self, message: str, generation_id: str = "") -> None:
        super().__init__(message)
        self.generation_id = generation_id

    def __reduce__(self):
        return (type(self), (self.message, self.generation_id))

    @property
    def public_message(self) -> str:
        return self.message  # written by the store: the generation id and its URL, no S3 internals


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, generation_id: str) -> Path:
        return self.directory / validate_generation_id(generation_id)

    def put(self, prepared: PreparedGeneration) -> Path:
        target = self._path(prepared.generation_id)
        staging = Path(tempfile.mkdtemp(prefix=".spool-", dir=self.directory))
        try:
            entries = []
            for index, (key, data, content_type) in enumerate(prepared.objects):
                name = f"object-{index}"
                (staging / name).write_bytes(data)
                entries.append({"file": name, "key": key, "content_type": content_type})
            manifest = {"id": prepared.generation_id, "objects": entries, "image_records": prepared.image_records}
            (staging / MANIFEST).write_text(json.dumps(manifest))
            for path in staging.iterdir():  # data on disk before the rename makes it visible
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def pending(self) -> list[str]:
        """Spooled generation ids, oldest first (ids sort by creation time).

        Only finished entries: a ``.spool-*`` staging folder already holds its manifest before its rename, and
        another thread (the drain, the gauges) listing the spool meanwhile must not take it for a generation."""
        return sorted(
            p.name
            for p in self.directory.iterdir()
            if is_generation_id(p.name) and p.is_dir() and (p / MANIFEST).is_file()
        )

    def oldest_time(self) -> float | None:
        """When the oldest spooled generation was written (unix seconds), None when the spool is empty."""
        times = []
        for generation_id in self.pending():  # ids order by the second; within one, only the files tell
            with contextlib.suppress(FileNotFoundError):  # uploaded meanwhile
                times.append((self._path(generation_id) / MANIFEST).stat().st_mtime)
        return min(times, default=None)

    def contains(self, generation_id: str) -> bool:
        return (self._path(generation_id) / MANIFEST).is_file()

    def load(self, generation_id: str) -> PreparedGeneration:
        folder = self._path(generation_id)
        manifest = json.loads((folder / MANIFEST).read_text())
        objects = [(e["key"], (folder / e["file"]).read_bytes(), e["content_type"]) for e in manifest["objects"]]
        return PreparedGeneration(manifest["id"], objects, manifest["image_records"])

    def remove(self, generation_id: str) -> None:
        shutil.rmtree(self._path(generation_id), ignore_errors=True)
