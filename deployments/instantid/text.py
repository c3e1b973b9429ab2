"""SDXL prompt encoding as its own step: text in, embeddings out.

It runs in its own deployment (a small GPU), so it loads only the two tokenizers and text encoders of an
SDXL folder. The math is SDXL's: penultimate hidden states of CLIP-L and OpenCLIP bigG concatenated
(768 + 1280 = 2048 per token), and the projected pooled output of the second encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class PromptEmbeddings:
    """One prompt's SDXL conditioning, on the CPU so it travels between processes compactly.

    ``embeds`` (77, 2048), ``pooled`` (1280,); the negatives are None when CFG is off.
    ``truncated``: whether the prompt or negative prompt lost tokens to CLIP's 77-token limit.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    truncated: bool = False


class SDXLPromptEncoder:
    """The two SDXL text encoders; ``encode`` takes a batch of prompts."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        tokenizer_2: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        self.tokenizers = (tokenizer, tokenizer_2)
        self.encoders = (text_encoder.eval(), text_encoder_2.eval())
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def device(self) -> torch.device:
        return self.encoders[1].device

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        hidden_parts: list[torch.Tensor] = []
        pooled = None
        truncated = [False] * len(texts)
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.encoders, strict=True)):
            tokens = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            full = tokenizer(texts, padding=False, truncation=False)["input_ids"]
            truncated = [t or len(ids) > tokenizer.model_max_length for t, ids in zip(truncated, full, strict=True)]
            output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
            hidden_parts.append(output.hidden_states[-2])
            if index == 1:
                pooled = output[0]  # text_embeds: the projected pooled output of encoder 2
        assert pooled is not None
        return torch.cat(hidden_parts, dim=-1), pooled, truncated

    @torch.no_grad()
    def encode(
        self, prompts: list[str], negative_prompts: list[str | None], do_classifier_free_guidance: bool
    ) -> list[PromptEmbeddings]:
        """Encode prompts (and negatives when CFG is on), batched in one forward per encoder.

        As in diffusers' SDXL pipelines, an absent (None) negative prompt gives zero negative embeddings
        when the model asks for it (``force_zeros_for_empty_prompt``); an empty string is encoded.
        """
        if len(prompts) != len(negative_prompts):
            raise ValueError("prompts and negative_prompts must have the same length")
        texts = list(prompts)
        negative_rows: list[int | None] = []
        if do_classifier_free_guidance:
            for negative in negative_prompts:
                if negative is None and self.force_zeros_for_empty_prompt:
                    negative_rows.append(None)
                else:
                    negative_rows.append(len(texts))
                    texts.append(negative or "")
        hidden, pooled, truncated = self._encode_texts(texts)
        hidden, pooled = hidden.float().cpu(), pooled.float().cpu()

        results = []
        for row in range(len(prompts)):
            negative_embeds = negative_pooled = None
            was_truncated = truncated[row]
            if do_classifier_free_guidance:
                negative_row = negative_rows[row]
                if negative_row is None:
                    negative_embeds, negative_pooled = (
                        torch.zeros_like(hidden[row]),
                        torch.zeros_like(pooled[row]),
                    )
                else:
                    negative_embeds, negative_pooled = hidden[negative_row], pooled[negative_row]
                    was_truncated = was_truncated or truncated[negative_row]
            results.append(
                PromptEmbeddings(
                    hidden[row].clone(),
                    pooled[row].clone(),
                    None if negative_embeds is None else negative_embeds.clone(),
                    None if negative_pooled is None else negative_pooled.clone(),
                    was_truncated,
                )
            )
        return results
