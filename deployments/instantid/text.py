"""SDXL prompt encoding as its own step: text in, embeddings out; long and weighted prompts.

It runs in its own deployment (a small GPU), so it loads only the two tokenizers and text encoders of an
SDXL folder. The math is SDXL's: penultimate hidden states of CLIP-L and OpenCLIP bigG concatenated
(768 + 1280 = 2048 per token), and the projected pooled output of the second encoder.

Long prompts: nothing is truncated. Each tokenizer turns the prompt (without special tokens) into token ids,
cut into chunks of 75; each chunk is encoded as ``bos + chunk + eos`` padded to 77 with that tokenizer's own
pad token, and the chunks' embeddings are concatenated along the sequence: ``embeds`` is (77 * chunks, 2048).
An empty prompt is one chunk. A prompt of at most 75 tokens without weighting syntax is encoded exactly as
diffusers' SDXL ``encode_prompt`` (and this module before long prompts) does, bit for bit.

Weighted prompts: A1111 syntax, ``(word)``, ``(word:1.3)``, ``[word]`` (see prompt_syntax.py). A weight w != 1
moves a token's embedding, after the encoder forward, away from or towards the embedding at its chunk's eos
position: ``e[j] = e[eos] + (e[j] - e[eos]) * w``. This is the formula of the InstantID reference,
``LongPromptWeight.get_weighted_text_embeddings_sdxl`` in ``pipeline_stable_diffusion_xl_instantid_full.py``
(copied there from diffusers' community ``lpw_stable_diffusion_xl``). Tokens of weight 1 are not touched.

Where we differ from that reference function, on purpose:

- It tokenizes for BOTH encoders with the first tokenizer (the ``tokenizer_2`` lines are commented out); we give
  each encoder its own tokenizer, as diffusers' SDXL pipelines do (in SDXL the two differ in the pad token).
- It hard-codes CLIP's bos/eos ids (49406/49407) in its chunking and pads with eos only (never with the
  tokenizer's pad token); we use each tokenizer's own bos, eos and pad ids.
- Its last chunk is not padded to 77 (``pad_last_block`` is left False), so its sequence is 77 * (k - 1) + n + 2
  long, and a prompt of exactly 75 * m tokens gets an extra 2-token chunk ``bos eos``; every chunk here is 77
  tokens, and 75 * m tokens make m chunks. Its anchor ``e[-1]`` is the last position of the unpadded chunk,
  i.e. the eos, which is the position we anchor on (with CLIP's causal attention, padding after the eos does not
  change the states up to the eos).
- It pools from the LAST chunk (``pooled_prompt_embeds`` is overwritten in the chunk loop); we pool from the
  FIRST chunk, so a long prompt's pooled vector is that of its beginning.
- It keeps the weights in float16 (``torch.tensor(..., dtype=torch.float16)``: 1.1 becomes 1.0996, and a weight
  within fp16 rounding of 1 counts as 1); we keep them in float32 and weight the float32 embeddings.
- It applies the first encoder's per-token weights to the concatenated 2048 features (the second tokenization's
  weights are computed but unused, and one branch even assigns ``prompt_weights_2 = prompt_weights + ...``); we
  weight each encoder's features with the weights of its own tokenization.
- It makes the negative as long as the positive by appending eos TOKENS to the shorter token list before
  chunking; we append whole empty CHUNKS (``bos eos pad...``) to the one with fewer chunks (see ``encode``).
- It always encodes a negative prompt (default ""); we keep diffusers' ``force_zeros_for_empty_prompt``: an
  absent negative gives zero embeddings.
- Its parser (A1111's) turns ``BREAK`` into a token weighted -1; ours treats ``BREAK`` as text (prompt_syntax.py).
- It encodes one prompt, chunk by chunk (one forward per chunk and encoder); we encode all chunks of all prompts
  of a call in one forward per encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .prompt_syntax import parse_weighted_prompt


@dataclass
class PromptEmbeddings:
    """One prompt's SDXL conditioning, on the CPU so it travels between processes compactly.

    ``embeds`` (77 * chunks, 2048): the chunks' embeddings one after the other; ``pooled`` (1280,), from the first
    chunk. With CFG the negatives have the same shapes as the positives (zeros when the negative prompt was
    absent and the model forces zeros); they are None when CFG is off. ``chunks``: how many 77-token chunks.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    chunks: int = 1


@dataclass
class _Chunk:
    """One tokenizer's share of a prompt chunk: at most 75 token ids (no special tokens) and their weights."""

    ids: list[int]
    weights: list[float]


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
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError("the two tokenizers must have the same model_max_length")
        self.chunk_length = tokenizer.model_max_length  # 77: bos + 75 tokens + eos

    @property
    def device(self) -> torch.device:
        return self.encoders[1].device

    def _chunks(self, tokenizer: CLIPTokenizer, runs: list[tuple[str, float]]) -> list[_Chunk]:
        """A parsed prompt as one tokenizer's chunks of at most 75 tokens; at least one (empty) chunk."""
        ids: list[int] = []
        weights: list[float] = []
        tokenized = tokenizer([text for text, _ in runs], add_special_tokens=False, verbose=False)["input_ids"]
        for run_ids, (_, weight) in zip(tokenized, runs, strict=True):
            ids.extend(run_ids)
            weights.extend([weight] * len(run_ids))
        body = self.chunk_length - 2
        chunks = [_Chunk(ids[i : i + body], weights[i : i + body]) for i in range(0, len(ids), body)]
        return chunks or [_Chunk([], [])]

    def _row(self, tokenizer: CLIPTokenizer, chunk: _Chunk) -> tuple[list[int], list[float], int]:
        """``bos + chunk + eos`` padded to 77 with the tokenizer's pad token, its weights, the eos position."""
        pad = self.chunk_length - 2 - len(chunk.ids)
        ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
        weights = [1.0, *chunk.weights, 1.0] + [1.0] * pad
        return ids, weights, len(chunk.ids) + 1

    def _encode_chunks(self, texts: list[list[list[_Chunk]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts[t][k]``: text t's chunks for tokenizer k. One forward per encoder over all chunks of all texts
        (rows in text order, chunks in order). Returns the weighted hidden states (rows, 77, 2048) and the
        pooled output of each row (rows, 1280), float32 on the CPU."""
        hidden_parts: list[torch.Tensor] = []
        pooled = None
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.encoders, strict=True)):
            rows = [self._row(tokenizer, chunk) for per_tokenizer in texts for chunk in per_tokenizer[index]]
            input_ids = torch.tensor([ids for ids, _, _ in rows], dtype=torch.long)
            output = encoder(input_ids.to(encoder.device), output_hidden_states=True)
            hidden = output.hidden_states[-2].float().cpu()
            if index == 1:
                pooled = output[0].float().cpu()  # text_embeds: the projected pooled output of encoder 2
            weights = torch.tensor([w for _, w, _ in rows], dtype=torch.float32)
            weighted = weights != 1.0
            if weighted.any():
                # The reference's formula, on the float32 states; only positions of weight != 1 are written.
                eos = torch.tensor([position for _, _, position in rows])
                anchor = hidden[torch.arange(len(rows)), eos][:, None, :]
                moved = anchor + (hidden - anchor) * weights[:, :, None]
                hidden = torch.where(weighted[:, :, None], moved, hidden)
            hidden_parts.append(hidden)
        assert pooled is not None
        return torch.cat(hidden_parts, dim=-1), pooled

    @torch.no_grad()
    def encode(
        self, prompts: list[str], negative_prompts: list[str | None], do_classifier_free_guidance: bool
    ) -> list[PromptEmbeddings]:
        """Encode prompts (and negatives when CFG is on), all chunks batched in one forward per encoder.

        As in diffusers' SDXL pipelines, an absent (None) negative prompt gives zero negative embeddings
        when the model asks for it (``force_zeros_for_empty_prompt``); an empty string is encoded.

        CFG concatenates a request's positive and negative embeddings, so they must be equally long: the one
        with fewer chunks is padded with chunks that encode an empty chunk (``bos eos pad...``, exactly what an
        empty prompt's single chunk is). Different requests may have different chunk counts.
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

        # texts[t][k]: text t's chunks for tokenizer k.
        chunked = [
            [self._chunks(tokenizer, parse_weighted_prompt(text)) for tokenizer in self.tokenizers] for text in texts
        ]
        counts = [max(len(per_tokenizer) for per_tokenizer in text) for text in chunked]
        for row, negative_row in enumerate(negative_rows):  # positive and negative: the same number of chunks
            if negative_row is not None:
                counts[row] = counts[negative_row] = max(counts[row], counts[negative_row])
        for text, count in zip(chunked, counts, strict=True):
            for per_tokenizer in text:
                per_tokenizer.extend(_Chunk([], []) for _ in range(count - len(per_tokenizer)))

        hidden, pooled = self._encode_chunks(chunked)
        starts = [sum(counts[:t]) for t in range(len(texts))]

        def embeds_of(t: int) -> torch.Tensor:
            return hidden[starts[t] : starts[t] + counts[t]].reshape(-1, hidden.shape[-1]).clone()

        results = []
        for row in range(len(prompts)):
            embeds, first_pooled = embeds_of(row), pooled[starts[row]].clone()
            negative_embeds = negative_pooled = None
            if do_classifier_free_guidance:
                negative_row = negative_rows[row]
                if negative_row is None:
                    negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(first_pooled)
                else:
                    negative_embeds, negative_pooled = embeds_of(negative_row), pooled[starts[negative_row]].clone()
            results.append(PromptEmbeddings(embeds, first_pooled, negative_embeds, negative_pooled, counts[row]))
        return results
