"""Denoiser deployment (large GPU): face condition + prompt embeddings -> images.

Requests are batched by *latents* (``num_images``), not by request count; inside a batch, jobs with
equal size/steps/scheduler/CFG/control window share every UNet and IdentityNet forward, each keeping its
own seeded generator and strengths.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from ray import serve as ray_serve

from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.errors import InstantIDError
from deployments.instantid.loading import load_denoiser
from deployments.instantid.params import GenerationParams
from deployments.instantid.weights import DENOISER_COMPONENTS, WeightsLayout
from deployments.messages import DenoiseResult, FaceResult, PromptResult, Timings, timed

logger = logging.getLogger("ray.serve")


class DeviceOutOfMemoryError(InstantIDError):
    """The accelerator ran out of memory for this batch; the replica is fine, the client may retry."""

    code = "overloaded"
    status = 503


@dataclass
class _Item:
    params: GenerationParams  # sized
    face: FaceResult
    prompt: PromptResult


def _latents(items: list[_Item]) -> int:
    return sum(item.params.num_images for item in items)


@ray_serve.deployment(name="Denoiser", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class DenoiserDeployment:
    def __init__(
        self,
        weights: dict[str, Any],
        *,
        device: str,
        dtype: str,
        vae_batch_size: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        layout = WeightsLayout.resolve(**weights, parts=("sdxl", "instantid"), sdxl_components=DENOISER_COMPONENTS)
        self.model = load_denoiser(layout, device=device, dtype=dtype, vae_batch_size=vae_batch_size)
        self.models = layout.describe()
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def generate(self, params: GenerationParams, face: FaceResult, prompt: PromptResult) -> DenoiseResult:
        """``face`` and ``prompt`` arrive as upstream responses resolved by Serve (no await in the caller)."""
        condition = face.condition
        item = _Item(params.sized(condition.width, condition.height), face, prompt)
        result = await self._batch(item)
        if isinstance(result, Exception):  # a failed group's error, returned per item by _batch
            raise result
        return result

    @ray_serve.batch(batch_size_fn=_latents)  # sizes come from the config (set in __init__)
    async def _batch(self, items: list[_Item]) -> list[DenoiseResult | Exception]:
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.params.batch_key(), []).append(index)
        results: list[DenoiseResult | Exception | None] = [None] * len(items)
        for indices in groups.values():
            group = [items[i] for i in indices]
            try:
                outputs = await asyncio.to_thread(self._run, group)
            except Exception as exc:  # one group failing must not fail the others
                outputs = [exc] * len(group)
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    def _run(self, group: list[_Item]) -> list[DenoiseResult]:
        jobs = [
            DenoiseJob(
                item.params,
                item.face.condition.embedding,
                item.face.condition.keypoints,
                item.face.condition.box,
                item.prompt.embeddings,
            )
            for item in group
        ]
        timings: Timings = {}
        try:
            with timed(timings, "denoise"):
                images = self.model.generate(jobs)
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            logger.warning("out of memory on a batch of %d latents", _latents(group))
            raise DeviceOutOfMemoryError("the GPU is out of memory for this request; retry later") from exc
        return [
            DenoiseResult(
                images=imgs,
                params=item.params,
                face=replace(item.face.condition.face, embedding=None),
                prompt_truncated=item.prompt.embeddings.truncated,
                timings={**item.face.timings, **item.prompt.timings, **timings},
            )
            for item, imgs in zip(group, images, strict=True)
        ]

    def model_info(self) -> dict[str, Any]:
        return dict(self.models)

    def check_health(self) -> None:
        if next(self.model.unet.parameters()).isnan().any():
            raise RuntimeError("UNet weights are corrupted (NaN)")
