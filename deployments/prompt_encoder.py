"""PromptEncoder deployment (small GPU): prompts -> SDXL text embeddings, batched across requests."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve as ray_serve

from deployments.instantid.loading import load_prompt_encoder
from deployments.instantid.weights import PROMPT_COMPONENTS, WeightsLayout
from deployments.messages import PromptRequest, PromptResult, Timings, timed


@ray_serve.deployment(name="PromptEncoder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class PromptEncoderDeployment:
    def __init__(
        self,
        weights: dict[str, Any],
        *,
        device: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        layout = WeightsLayout.resolve(**weights, parts=("sdxl",), sdxl_components=PROMPT_COMPONENTS)
        self.encoder = load_prompt_encoder(layout, device=device, dtype=dtype)
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def encode(self, request: PromptRequest) -> PromptResult:
        return await self._encode_batch(request)

    @ray_serve.batch  # sizes come from the config (set in __init__)
    async def _encode_batch(self, requests: list[PromptRequest]) -> list[PromptResult]:
        return await asyncio.to_thread(self._encode_now, requests)

    def _encode_now(self, requests: list[PromptRequest]) -> list[PromptResult]:
        results: list[PromptResult | None] = [None] * len(requests)
        for cfg in (True, False):  # one forward per CFG mode
            rows = [i for i, r in enumerate(requests) if r.do_classifier_free_guidance == cfg]
            if not rows:
                continue
            timings: Timings = {}
            with timed(timings, "prompt"):
                embeddings = self.encoder.encode(
                    [requests[i].prompt for i in rows], [requests[i].negative_prompt for i in rows], cfg
                )
            for i, emb in zip(rows, embeddings, strict=True):
                results[i] = PromptResult(emb, dict(timings))
        return [r for r in results if r is not None]

    def check_health(self) -> None:
        if next(self.encoder.encoders[1].parameters()).isnan().any():
            raise RuntimeError("text encoder weights are corrupted (NaN)")
