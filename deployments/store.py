"""ResultStore deployment (CPU): encode images, upload them and meta.json to S3, confirm, presign.

When S3 fails even after the client's bounded retries, the finished generation goes to a disk spool and
the request fails with a retryable 503 naming the generation id; a background thread uploads spooled
generations once S3 answers again, and ``get`` finds them meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ray import serve

from deployments.messages import DenoiseResult
from deployments.storage.idempotency import IdempotencyRecord, IdempotencyRecords
from deployments.storage.results import GenerationNotFound, ResultWriter, StorageError
from deployments.storage.s3 import S3Settings, make_client
from deployments.storage.spool import Spool

logger = logging.getLogger("ray.serve")


class SpooledError(StorageError):
    """S3 refused the upload; the generation is safe in the spool and will be uploaded later."""

    def __init__(self, message: str, generation_id: str = "") -> None:
        super().__init__(message)
        self.generation_id = generation_id

    def __reduce__(self):
        return (type(self), (self.message, self.generation_id))


@serve.deployment(name="ResultStore", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class ResultStoreDeployment:
    def __init__(self, s3: dict[str, Any], spool_dir: str | None = None, spool_retry_s: float = 5.0) -> None:
        settings = S3Settings(**s3)
        self.writer = ResultWriter(make_client(settings), settings)
        self.idempotency = IdempotencyRecords(self.writer.client, settings)
        self.spool = Spool(spool_dir) if spool_dir else None
        self._stop = threading.Event()
        try:
            self.writer.ensure_bucket()
        except StorageError:
            if self.spool is None:
                raise
            logger.warning("S3 is not reachable at start; generations will be spooled until it is")
        if self.spool is not None:
            threading.Thread(target=self._drain_forever, args=(spool_retry_s,), daemon=True, name="spool-drain").start()

    def save(
        self,
        record: dict[str, Any],
        output: DenoiseResult,
        output_format: str,
        output_quality: int,
        inputs: dict[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Store one generation; returns the stored objects and every stage's timing.

        ``output`` arrives as the Denoiser's response, resolved by Serve. ``inputs`` (only when the client
        asked to keep its photos) are stored next to the images. Success means every object is confirmed in
        S3; otherwise SpooledError (503, generation kept) or StorageError (503, no spool configured).
        """
        start = time.time()
        timings = dict(output.timings)
        timings["store"] = {"start": start, "end": start, "seconds": 0.0}
        meta = {
            **record,
            "parameters": {
                **record.get("parameters", {}),
                "width": output.params.width,
                "height": output.params.height,
            },
            "face": output.face,
            "prompt_truncated": output.prompt_truncated,
            "timings": timings,
        }
        extra = [
            (f"input-{name}.{_extension(data)}", data, _content_type(data)) for name, data in (inputs or {}).items()
        ]
        prepared = self.writer.prepare(record["id"], list(output.images), output_format, output_quality, meta, extra)
        try:
            stored = self.writer.upload(prepared)
        except StorageError as exc:
            if self.spool is None:
                raise
            self.spool.put(prepared)
            logger.warning("S3 upload of %s failed (%s); spooled for a later upload", record["id"], exc.message)
            raise SpooledError(
                f"storage is unavailable; generation {record['id']} is kept and will be uploaded when it returns "
                f"(GET /v1/generations/{record['id']})",
                record["id"],
            ) from exc
        end = time.time()
        timings["store"] = {"start": start, "end": end, "seconds": end - start}
        return {
            "stored": stored.model_dump(),
            "timings": timings,
            "face": output.face,
            "width": output.params.width,
            "height": output.params.height,
            "prompt_truncated": output.prompt_truncated,
        }

    def get(self, generation_id: str) -> dict[str, Any]:
        """meta.json with fresh presigned URLs, or the spooled meta (``status: pending_upload``)."""
        try:
            meta = self.writer.read(generation_id)
        except (GenerationNotFound, StorageError):
            if self.spool is not None and self.spool.contains(generation_id):
                meta = self.spool.load(generation_id).meta
                meta["status"] = "pending_upload"
                return meta
            raise
        stored = {image.key: image for image in self.writer.get_from_meta(generation_id, meta).images}
        for image in meta.get("images", []):
            image["url"] = stored[image["key"]].url
            image["uri"] = stored[image["key"]].uri
        meta["status"] = "stored"
        return meta

    def delete(self, generation_id: str) -> int:
        removed = 0
        if self.spool is not None and self.spool.contains(generation_id):
            self.spool.remove(generation_id)
            removed += 1
        return removed + self.writer.delete(generation_id)

    # Idempotency records: conditional S3 writes, so ingress replicas coordinate (serve/idempotency.py).
    def read_idempotency(self, digest: str) -> IdempotencyRecord | None:
        return self.idempotency.read(digest)

    def claim_idempotency(self, digest: str, body: dict[str, Any]) -> str | None:
        return self.idempotency.claim(digest, body)

    def replace_idempotency(self, digest: str, body: dict[str, Any], etag: str) -> str | None:
        return self.idempotency.replace(digest, body, etag)

    def release_idempotency(self, digest: str) -> None:
        self.idempotency.release(digest)

    def drain_spool(self) -> int:
        """Upload what the spool holds; returns how many generations were uploaded (stops at the first error)."""
        if self.spool is None:
            return 0
        uploaded = 0
        for generation_id in self.spool.pending():
            try:
                self.writer.upload(self.spool.load(generation_id))
            except StorageError:
                break
            self.spool.remove(generation_id)
            uploaded += 1
            logger.info("uploaded spooled generation %s", generation_id)
        return uploaded

    def _drain_forever(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.drain_spool()
            except Exception:  # keep draining on the next tick whatever happened
                logger.exception("spool drain failed")

    def check_health(self) -> None:
        """Unhealthy when S3 is unreachable and nothing would keep the results (no spool)."""
        try:
            self.writer.ensure_bucket()
        except StorageError:
            if self.spool is None:
                raise

    def __del__(self) -> None:
        self._stop.set()


def _extension(data: bytes) -> str:
    return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(_content_type(data), "bin")


def _content_type(data: bytes) -> str:
    from deployments.instantid.images import sniff_format

    return {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(
        sniff_format(data) or "", "application/octet-stream"
    )
