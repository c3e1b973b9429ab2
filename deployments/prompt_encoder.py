"""PromptEncoder deployment (small GPU): the prompt stage (``deployments/generation/prompt_stage.py``) batched,
per base and LoRA set.

Bases are loaded through Serve's model multiplexing (the ingress routes by base name); each base's text encoders
carry the text-encoder parts of the catalogue's LoRAs. Serve splits every batch by base; within it, prompts
with the same LoRA set share one forward per CFG mode.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ray import serve as ray_serve

from deployments import metrics
from deployments.base_slots import BaseSlot, BaseSlots, ReplicaModels, run_locked
from deployments.generation.messages import PromptRequest, PromptResult
from deployments.generation.prompt_stage import encode_prompts
from deployments.instantid.loading import load_prompt_encoder
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.text import SDXLPromptEncoder
from deployments.instantid.weights import PROMPT_COMPONENTS
from deployments.replica import replica_id

TEXT_PARTS = ("text_encoder", "text_encoder_2")


@ray_serve.deployment(name="PromptEncoder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class PromptEncoderDeployment:
    async def __init__(
        self,
        *,
        models: dict[str, Any],
        cache_dir: str | None,
        device: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self.models = ReplicaModels.prepare(models, cache_dir, TEXT_PARTS)
        self.device, self.dtype = device, dtype
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.bases = BaseSlots(self._build, self.models.catalogue.max_models_per_replica)
        slot, _ = await self.bases.acquire(self.models.catalogue.default_base)  # the default base is warm at start
        slot.release()

    def _build(self, name: str) -> tuple[SDXLPromptEncoder, LoraAdapters]:
        base = self.models.base(name, PROMPT_COMPONENTS)
        encoder = load_prompt_encoder(base=base, device=self.device, dtype=self.dtype)
        return encoder, self.models.adapters(dict(zip(TEXT_PARTS, encoder.encoders, strict=True)))

    async def encode(self, request: PromptRequest) -> PromptResult:
        slot, waited = await self.bases.acquire(request.model.base)
        try:
            result = await self._encode_batch((request, slot))
        finally:
            slot.release()
        if waited is not None:
            result.timings["prompt_model_load"] = waited
        return result

    @ray_serve.batch  # sizes come from the config (set in __init__); Serve splits batches by base
    async def _encode_batch(self, items: list[tuple[PromptRequest, BaseSlot]]) -> list[PromptResult]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (request, _) in enumerate(items):
            groups[(id(items[index][1]), request.model.adapter_key())].append(index)
        results: list[PromptResult | None] = [None] * len(items)
        for indices in groups.values():
            slot = items[indices[0]][1]
            requests = [items[i][0] for i in indices]
            encoded = await run_locked(slot, lambda s=slot, r=requests: self._encode_now(s, r))
            for index, result in zip(indices, encoded, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def _encode_now(self, slot: BaseSlot[SDXLPromptEncoder], requests: list[PromptRequest]) -> list[PromptResult]:
        encoder = slot.model
        assert encoder is not None
        replica = replica_id()
        results, lora_seconds = encode_prompts(encoder, slot.adapters, requests, replica)
        if lora_seconds:
            metrics.record_model_load("lora", requests[0].model.base, lora_seconds)
        return results

    def loaded_bases(self) -> list[str]:
        return self.bases.loaded

    def check_health(self) -> None:
        for slot in self.bases.slots():
            encoder = slot.model
            if encoder is not None and next(encoder.encoders[1].parameters()).isnan().any():
                raise RuntimeError(f"text encoder weights of base {slot.name} are corrupted (NaN)")
