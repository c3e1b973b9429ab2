"""The prompt stage: prompts in, SDXL text embeddings out, with the request's LoRAs' text-encoder parts active.

:func:`encode_prompts` is what the PromptEncoder deployment runs for every batch it collects (one LoRA set per
call); :class:`PromptStage` is the same for one request, in-process.
"""

from __future__ import annotations

from collections.abc import Sequence

from deployments.instantid.loras import LoraAdapters
from deployments.instantid.text import SDXLPromptEncoder

from .messages import PromptRequest, PromptResult, StageTiming, Timings, timed


def encode_prompts(
    encoder: SDXLPromptEncoder, adapters: LoraAdapters, requests: Sequence[PromptRequest], replica: str = ""
) -> tuple[list[PromptResult], float]:
    """Encode ``requests`` (all with the same LoRA set): one forward per CFG mode. Returns the results in order and
    the seconds the LoRA switch took (0 when the set was active already)."""
    lora_seconds = adapters.activate(requests[0].model.loras)
    results: list[PromptResult | None] = [None] * len(requests)
    for cfg in (True, False):
        rows = [i for i, r in enumerate(requests) if r.do_classifier_free_guidance == cfg]
        if not rows:
            continue
        timings: Timings = {}
        with timed(timings, "prompt"):
            embeddings = encoder.encode(
                [requests[i].prompt for i in rows], [requests[i].negative_prompt for i in rows], cfg
            )
        if lora_seconds:
            start = timings["prompt"].start
            timings["prompt_lora_load"] = StageTiming(start=start, end=start + lora_seconds, seconds=lora_seconds)
        for i, emb in zip(rows, embeddings, strict=True):
            results[i] = PromptResult(emb, dict(timings), replica)
    return [r for r in results if r is not None], lora_seconds


class PromptStage:
    """One base's text encoders and their LoRA adapters, encoding one request at a time."""

    def __init__(self, encoder: SDXLPromptEncoder, adapters: LoraAdapters) -> None:
        self.encoder = encoder
        self.adapters = adapters

    def encode(self, request: PromptRequest) -> PromptResult:
        return encode_prompts(self.encoder, self.adapters, [request])[0][0]
