"""ResultStore deployment (CPU): encode images, upload them and meta.json to S3, confirm, presign."""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from deployments.messages import DenoiseResult
from deployments.storage.results import ResultWriter
from deployments.storage.s3 import S3Settings, make_client


@serve.deployment(name="ResultStore", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class ResultStoreDeployment:
    def __init__(self, s3: dict[str, Any]) -> None:
        settings = S3Settings(**s3)
        self.writer = ResultWriter(make_client(settings), settings)
        self.writer.ensure_bucket()

    def save(
        self, record: dict[str, Any], output: DenoiseResult, output_format: str, output_quality: int
    ) -> dict[str, Any]:
        """Store one generation; returns the stored objects and every stage's timing.

        ``output`` arrives as the Denoiser's response, resolved by Serve. Raises StorageError (503) when S3
        fails, after removing what was partly written: success means every object is confirmed in S3.
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
        stored = self.writer.write(record["id"], list(output.images), output_format, output_quality, meta)
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
        """meta.json of a generation with fresh presigned URLs for its images."""
        meta = self.writer.read(generation_id)
        for image in meta.get("images", []):
            image["url"] = self.writer.presign(image["key"])
            image["uri"] = f"s3://{self.writer.settings.bucket}/{image['key']}"
        return meta

    def delete(self, generation_id: str) -> int:
        return self.writer.delete(generation_id)

    def check_health(self) -> None:
        self.writer.ensure_bucket()
