"""The face-token resampler: a 512-d identity vector -> 16 tokens in the UNet's cross-attention space.

A small Perceiver: learned query latents attend to the projected embedding (and to themselves) in
``depth`` layers of attention + feed-forward. Parameter names follow the published ``image_proj``
state dict of ``ip-adapter.bin`` exactly, so the real file and the tiny test files load strictly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import WeightsError

HEAD_DIM = 64  # the published model uses heads of 64; the head count is derived from the inner width


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of a resampler; the real ``ip-adapter.bin`` gives 1280/4/20/16/512/2048/4."""

    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = HEAD_DIM
    num_queries: int = 16
    embedding_dim: int = 512
    output_dim: int = 2048
    ff_mult: int = 4

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], dim_head: int = HEAD_DIM) -> ResamplerConfig:
        """Read every size from tensor shapes so any file in the published layout loads without a config."""
        try:
            latents = state_dict["latents"]
            dim, embedding_dim = state_dict["proj_in.weight"].shape[0], state_dict["proj_in.weight"].shape[1]
            output_dim = state_dict["proj_out.weight"].shape[0]
            inner = state_dict["layers.0.0.to_q.weight"].shape[0]
            hidden = state_dict["layers.0.1.1.weight"].shape[0]
        except KeyError as exc:
            raise WeightsError(f"image_proj state dict is missing {exc.args[0]!r}: not an InstantID resampler") from exc
        layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))}
        if inner % dim_head:
            raise WeightsError(f"resampler inner width {inner} is not a multiple of the head size {dim_head}")
        return cls(
            dim=dim,
            depth=len(layer_ids),
            heads=inner // dim_head,
            dim_head=dim_head,
            num_queries=latents.shape[1],
            embedding_dim=embedding_dim,
            output_dim=output_dim,
            ff_mult=hidden // dim,
        )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(inputs, latents); q and k are each scaled by dim_head**-0.25 (fp32 softmax)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        scale = self.dim_head**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices 0..3 are part of the published key names (layers.i.1.{0,1,3}).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Identity embedding (B, N, embedding_dim) -> face tokens (B, num_queries, output_dim)."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / config.dim**0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(config.dim, config.dim_head, config.heads),
                    _feed_forward(config.dim, config.ff_mult),
                ]
            )
            for _ in range(config.depth)
        )

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> Resampler:
        """Build with sizes read from the state dict and load it strictly."""
        model = cls(ResamplerConfig.from_state_dict(state_dict))
        try:
            result = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as exc:  # a tensor whose size disagrees with the sizes read from the others
            raise WeightsError(f"image_proj tensors have inconsistent sizes: {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                "image_proj does not match the published resampler layout: "
                f"missing {sorted(result.missing_keys)[:8]}, unexpected {sorted(result.unexpected_keys)[:8]}"
            )
        return model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(embeddings.shape[0], -1, -1)
        x = self.proj_in(embeddings)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @torch.no_grad()
    def face_tokens(
        self, embeddings: torch.Tensor, with_negative: bool, negative: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positive tokens for (B, 512) or (B, N, 512) embeddings, and the CFG negatives.

        The negatives are the resampler applied to a ZERO embedding (not zero tokens), as published, or to
        ``negative`` (same shape as ``embeddings``: the optional face-token noise).
        Returns ``(positive, negative)``, each (B, num_queries, output_dim); negative is None without CFG.
        """
        param = self.latents
        if embeddings.ndim == 2:
            embeddings = embeddings[:, None, :]
        embeddings = embeddings.to(device=param.device, dtype=param.dtype)
        if not with_negative:
            return self(embeddings), None
        if negative is None:
            negative = torch.zeros_like(embeddings)
        else:
            negative = negative.reshape(embeddings.shape).to(embeddings)
        both = self(torch.cat([negative, embeddings]))
        negative, positive = both.chunk(2)
        return positive, negative
