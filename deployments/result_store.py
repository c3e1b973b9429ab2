"""ResultStore deployment (CPU): encode images, upload them and meta.json to S3, confirm, presign.

When S3 fails even after the client's bounded retries, the finished generation goes to a disk spool and
the request fails with a retryable 503 naming the generation id; a background thread uploads spooled
generations once S3 answers again, and ``get`` finds them meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from ray import serve as ray_serve

from deployments import metrics
from deployments.generation.messages import (
    DenoiseResult,
    GenerationMeta,
    GenerationRecord,
    SafetyResult,
    SavedGeneration,
    StageTiming,
)
from deployments.generation.safety_stage import screen
from deployments.instantid.errors import GenerationCancelled
from deployments.job_events import checked_publish, job_events
from deployments.replica import replica_id
from deployments.storage.conditional import ConditionalRecord
from deployments.storage.generations import GenerationNotFound, GenerationStore, StorageError
from deployments.storage.history import GenerationHistory, thumbnail, thumbnail_name
from deployments.storage.idempotency_records import IdempotencyRecords
from deployments.storage.s3 import S3Settings, make_client, on_retry
from deployments.storage.spool import Spool, SpooledError

logger = logging.getLogger("ray.serve")


@ray_serve.deployment(name="ResultStore", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class ResultStoreDeployment:
    def __init__(self, s3: dict[str, Any], *, spool_dir: str | None, spool_retry_s: float) -> None:
        settings = S3Settings(**s3)
        self.generations = GenerationStore(make_client(settings), settings)
        self.history = GenerationHistory(self.generations)
        on_retry(self.generations.client, metrics.record_s3_retry)
        self.idempotency = IdempotencyRecords(self.generations.client, settings)
        self.spool = Spool(spool_dir) if spool_dir else None
        self._stop = threading.Event()
        try:
            self.generations.ensure_bucket()
        except StorageError:
            if self.spool is None:
                raise
            logger.warning("S3 is not reachable at start; generations will be spooled until it is")
        if self.spool is not None:
            threading.Thread(target=self._drain_forever, args=(spool_retry_s,), daemon=True, name="spool-drain").start()

    def save(
        self,
        record: GenerationRecord,
        output: DenoiseResult,
        output_format: str,
        output_quality: int,
        inputs: dict[str, bytes] | None = None,
        identity_similarities: list[float | None] | None = None,
        identity_scores: list[list[dict[str, Any]]] | None = None,
        safety: SafetyResult | None = None,
        repaired: list[dict[str, Any]] | None = None,
    ) -> SavedGeneration:
        """Store one generation; returns the stored objects and every stage's timing.

        ``output`` arrives as the Denoiser's response, resolved by Serve, and so do ``identity_similarities`` (the
        FaceAnalyzer's score of each image, recorded with it), or with several people ``identity_scores`` (per image,
        each identity's score in its region). ``inputs`` (only when the client
        asked to keep its photos) are stored next to the images. Success means every object is confirmed in
        S3; otherwise SpooledError (503, generation kept) or StorageError (503, no spool configured).
        ``safety`` (the SafetyChecker's verdicts, resolved by Serve) is applied before anything is encoded: a blurred
        or refused image's original is never written, to S3 or the spool; ContentRefusedError (422) if none is left.
        ``repaired`` (the FaceAnalyzer's, with a face detail pass): each face repainted, its scores before and after.
        """
        start = time.time()
        job = record.job
        if job is not None:
            answer = checked_publish(job, "stage", {"stage": "store", "phase": "start"})
            if answer is not None and answer.cancelled:  # cancelled by its owner, or superseded by a takeover
                raise GenerationCancelled(f"job {job.id} (attempt {job.attempt}) was cancelled or taken over")
        screened = screen(output.images, safety, identity_similarities, identity_scores)
        timings = {**output.timings, **(safety.timings if safety is not None else {})}
        stage_replicas = {**output.replicas, **({"safety": safety.replica} if safety is not None else {})}
        # meta.json is written during this stage: it records when the stage started (its end is not known yet).
        timings["store"] = StageTiming(start=start, end=start, seconds=0.0)
        meta = {
            **dataclasses.asdict(record),
            "parameters": {**record.parameters, "width": output.params.width, "height": output.params.height},
            "model": output.model.describe(),
            "face": output.face.to_dict(),
            "faces": [chosen.to_dict() for chosen in output.faces],
            "prompt_chunks": output.prompt_chunks,
            "replicas": stage_replicas,
            "batch": dataclasses.asdict(output.batch) if output.batch is not None else None,
            **({"layout": output.layout} if output.layout is not None else {}),
            "timings": {stage: timing.model_dump() for stage, timing in timings.items()},
            **({"safety": screened.meta} if screened.meta is not None else {}),
            **({"repaired_faces": repaired} if repaired is not None else {}),
        }
        extra = [
            (f"input-{name}.{_extension(data)}", data, _content_type(data)) for name, data in (inputs or {}).items()
        ]
        extra += [(thumbnail_name(i), thumbnail(image), "image/webp") for i, image in enumerate(screened.images)]
        prepared = self.generations.prepare(
            record.id,
            screened.images,
            output_format,
            output_quality,
            meta,
            extra,
            screened.identity_similarities,
            screened.identity_scores,
            screened.fields,
            markers=[self.history.marker(record.owner, record.id)],
        )
        try:
            stored = self.generations.upload(prepared)
        except StorageError as exc:
            if self.spool is None:
                raise
            self.spool.put(prepared)
            self._record_spool()
            logger.warning("S3 upload of %s failed (%s); spooled for a later upload", record.id, exc.message)
            raise SpooledError(
                f"storage is unavailable; generation {record.id} is kept and will be uploaded when it returns "
                f"(GET /v1/generations/{record.id})",
                record.id,
            ) from exc
        timings["store"] = StageTiming.since(start)
        if job is not None:
            job_events().publish.remote(job.id, "stage", {"stage": "store", "phase": "end"}, attempt=job.attempt)
        replicas = {**stage_replicas, "store": replica_id()}
        return SavedGeneration(
            stored,
            output.params,
            output.model,
            output.face,
            output.faces,
            output.prompt_chunks,
            timings,
            replicas,
            output.batch,
            output.layout,
            screened.meta,
            repaired,
        )

    def get(self, generation_id: str) -> GenerationMeta:
        """meta.json with fresh presigned URLs, or the spooled meta (``status: pending_upload``)."""
        try:
            document = self.generations.read(generation_id)
        except (GenerationNotFound, StorageError):
            if self.spool is not None and self.spool.contains(generation_id):
                document = self.spool.load(generation_id).meta
                document["status"] = "pending_upload"
                return GenerationMeta(document, document.get("owner"), [], "pending_upload")
            raise
        images = self.generations.get_from_meta(generation_id, document).images
        for record, image in zip(document.get("images", []), images, strict=True):
            record["url"], record["uri"] = image.url, image.uri
        document["status"] = "stored"
        return GenerationMeta(document, document.get("owner"), images, "stored")

    def read_image(self, generation_id: str, index: int) -> tuple[bytes, str]:
        return self.generations.read_image(generation_id, index)

    def history_page(self, owner: str, cursor: str | None, limit: int) -> dict[str, Any]:
        """``owner``'s generations, newest first (``GET /v1/generations``)."""
        return self.history.page(owner, cursor, limit)

    def delete(self, generation_id: str) -> int:
        """Every object of the generation (and a spooled copy), then its marker in its owner's history."""
        try:
            owner = self.generations.read(generation_id).get("owner")
        except (GenerationNotFound, StorageError):
            owner = None
        removed = 0
        if self.spool is not None and self.spool.contains(generation_id):
            self.spool.remove(generation_id)
            removed += 1
        removed += self.generations.delete(generation_id)
        if isinstance(owner, str):
            self.history.forget(owner, generation_id)
        return removed

    # Idempotency records: conditional S3 writes, so ingress replicas coordinate (serve/idempotency_guard.py).
    def read_idempotency(self, digest: str) -> ConditionalRecord | None:
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
                self.generations.upload(self.spool.load(generation_id))
            except StorageError:
                break
            self.spool.remove(generation_id)
            uploaded += 1
            logger.info("uploaded spooled generation %s", generation_id)
        return uploaded

    def _drain_forever(self, period_s: float) -> None:
        self._record_spool()
        while not self._stop.wait(period_s):
            try:
                self.drain_spool()
            except Exception:  # keep draining on the next tick whatever happened
                logger.exception("spool drain failed")
            self._record_spool()

    def _record_spool(self) -> None:
        """The spool's depth and the age of its oldest entry, as gauges (an operator alerts on a growing age).

        Never raises: it runs right after a generation was stored or spooled, and a gauge must not turn that
        success into an error answer for an image that is kept."""
        if self.spool is None:
            return
        try:
            metrics.record_spool(len(self.spool.pending()), metrics.age_since(self.spool.oldest_time()))
        except Exception:
            logger.exception("could not read the spool's depth for its gauges")

    def check_health(self) -> None:
        """Unhealthy when S3 is unreachable and nothing would keep the results (no spool)."""
        try:
            self.generations.ensure_bucket()
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
