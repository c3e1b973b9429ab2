"""Decoupled face-token cross-attention for the SDXL UNet.

Every UNet cross-attention layer attends twice with the same query: once to the text tokens with its
own K/V, once to the 16 face tokens with new K/V projections (``to_k_ip``/``to_v_ip``), and adds the
second result times the adapter strength. Self-attention is unchanged.

The strength and the optional face-region mask are *per call and per batch row*: they travel in a
:class:`FaceConditioning` object through ``cross_attention_kwargs``, never in module state, so one
UNet serves a batch of requests with different strengths. The pipeline makes one such object per batch
and passes it at every step, so what does not change between steps (the text and face tokens' K/V, the
resized strength x mask weights) is computed once: at batch 1 the UNet is launch-bound, and those small
per-layer kernels are most of what the face tokens would otherwise add. Under continuous batching the set of
rows changes while jobs run; the K/V projections are then kept per job (``parts``), so a job that joins or
leaves costs only its own projections and a concatenation, not a re-projection of everyone's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from torch import nn

from .errors import WeightsError

CONDITIONING_KWARG = "face"  # the cross_attention_kwargs key the processors read


@dataclass
class FaceConditioning:
    """What the face-token attention needs for the UNet calls of one batch (constant across steps).

    ``scale``: adapter strength per batch row, shape (rows,).
    ``region_mask``: optional (rows, k, H, W) mask at image resolution, one channel per identity; the face-token
    attention output is multiplied by it, resized (nearest) to each attention layer's resolution. One identity
    (k = 1): the "enhance non-face region" mask. Several people (k > 1): identity i's region, so each pixel attends
    to its own identity's tokens only, and to none outside every region.
    ``num_tokens``: face tokens per identity; the trailing ``k x num_tokens`` tokens of ``encoder_hidden_states``
    are face tokens, identity by identity (k is the mask's channel count, 1 without a mask).
    ``parts``: optional ``(rows, cache)`` per job, in row order: each job's K/V projections live in its own
    ``cache`` dict (kept by the job across steps and batch changes); without parts, the whole batch is one job.
    """

    scale: torch.Tensor
    num_tokens: int
    region_mask: torch.Tensor | None = None
    parts: Sequence[tuple[int, dict]] | None = None
    _weights: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)
    _split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    @property
    def identities(self) -> int:
        """How many people's face tokens the context holds (each attended separately, in its own region)."""
        return 1 if self.region_mask is None else int(self.region_mask.shape[1])

    def split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text tokens, face tokens)`` of ``context``, each contiguous, made once per context tensor.

        The UNet hands the same ``encoder_hidden_states`` to every cross-attention layer, and the pipeline
        the same one at every step. A new context tensor starts over, forgetting :meth:`projected`'s values.
        """
        if self._split is None or self._split[0] is not context:
            split = context.shape[1] - self.num_tokens * self.identities
            self._split = (context, context[:, :split].contiguous(), context[:, split:].contiguous())
            self._memo.clear()
        return self._split[1], self._split[2]

    def projected(
        self,
        layer: nn.Module,
        what: str,
        tokens: torch.Tensor,
        project: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """``project(tokens)``, computed once per context (see :meth:`split_context`), ``layer`` and ``what``.

        Used for the per-layer K/V projections of the text and face tokens: they depend on nothing that
        changes between denoising steps, so a 30-step generation projects them once instead of 30 times
        (two GEMMs per cross-attention layer and step, 140 launches per step at SDXL size). With ``parts``,
        each job's rows are projected once for as long as the job runs, and the batch's value is their
        concatenation.
        """
        key: Hashable = (id(layer), what)
        value = self._memo.get(key)
        if value is None:
            if not self.parts:
                value = project(tokens)
            else:
                pieces, start = [], 0
                for rows, cache in self.parts:
                    piece = cache.get(key)
                    if piece is None:
                        piece = cache[key] = project(tokens[start : start + rows])
                    pieces.append(piece)
                    start += rows
                joined = (torch.cat(group) for group in zip(*pieces, strict=True))
                value = pieces[0] if len(pieces) == 1 else tuple(joined)
            self._memo[key] = value
        return value

    def weight_for(self, sequence_length: int, dtype: torch.dtype) -> torch.Tensor:
        """What multiplies the face-token attention output at ``sequence_length`` pixels: strength x mask
        (:func:`face_weight`), computed once per resolution and dtype and kept: the pipeline makes one
        FaceConditioning per batch, and 70 layers x every step would otherwise redo the resize and two casts
        (small kernels whose launches dominate at batch 1).
        """
        key = (sequence_length, dtype)
        cached = self._weights.get(key)
        if cached is None:
            cached = self._weights[key] = face_weight(self.scale, self.region_mask, sequence_length, dtype)
        return cached


def face_weight(
    scale: torch.Tensor, region_mask: torch.Tensor | None, sequence_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Strength x region mask (resized, nearest) at an attention layer of ``sequence_length`` pixels.

    Shape (rows, seq, 1) with a one-identity mask, (rows, k, seq, 1) with k identities' masks, else (rows, 1, 1).
    """
    scale = scale.view(-1, 1, 1)
    if region_mask is None:
        return scale.to(dtype)
    resized = F.interpolate(region_mask, size=attention_size(*region_mask.shape[-2:], sequence_length), mode="nearest")
    if region_mask.shape[1] == 1:
        return (scale * resized.flatten(1)[:, :, None]).to(dtype)
    return (scale[:, None] * resized.flatten(2)[..., None]).to(dtype)


def attention_size(height: int, width: int, sequence_length: int) -> tuple[int, int]:
    """The (rows, columns) of an attention layer of ``sequence_length`` pixels, for a ``height`` x ``width`` mask.

    The UNet halves its feature maps with stride-2 convolutions (padding 1), which round odd sides up, so the layer
    is the mask's shape halved with rounding up as often as it takes (a 184-pixel side: 23 latent pixels, then 12
    and 6). Scaling both sides by one square-root factor instead picks the wrong pair for some shapes (a 264 x 384
    image's 9 x 12 layer came out 9 x 13, and the step failed on the mismatch). A length that is no such halving
    (a mask not of the image's shape) falls back to that aspect-preserving size.
    """
    rows, columns = height, width
    while rows * columns > sequence_length:
        rows, columns = -(-rows // 2), -(-columns // 2)
    if rows * columns == sequence_length:
        return rows, columns
    factor = math.sqrt(height * width / sequence_length)
    return round(height / factor), round(width / factor)


@dataclass
class StaticFaceConditioning:
    """:class:`FaceConditioning` without memory: every call computes from the tensors it holds.

    For a step that must be capturable (a CUDA graph replays kernels, it cannot fill a cache) or compiled (a
    cache filled on the first call would be a different program on the second): the text and face K/V are
    projected at every step (two GEMMs per cross-attention layer, under 1% of a step's FLOPs at SDXL size, and
    one with fused projections) and the strength x mask weights are resized in the step. ``scale`` and
    ``region_mask`` are the step's fixed buffers (see ``static_step``).
    """

    scale: torch.Tensor
    num_tokens: int
    region_mask: torch.Tensor | None = None

    @property
    def identities(self) -> int:
        return 1 if self.region_mask is None else int(self.region_mask.shape[1])

    def split_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = context.shape[1] - self.num_tokens * self.identities
        return context[:, :split], context[:, split:]

    def projected(
        self,
        layer: nn.Module,
        what: str,
        tokens: torch.Tensor,
        project: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        return project(tokens)

    def weight_for(self, sequence_length: int, dtype: torch.dtype) -> torch.Tensor:
        return face_weight(self.scale, self.region_mask, sequence_length, dtype)


def _project(context: torch.Tensor, to_k: nn.Module, to_v: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return to_k(context), to_v(context)


def _text_keys_values(attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tokens' K/V: one GEMM through diffusers' fused ``to_kv`` once ``attn.fuse_projections()`` ran."""
    context = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
    if attn.fused_projections:
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return key, value
    return _project(context, attn.to_k, attn.to_v)


def _attend(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``query`` over ``key``/``value`` (all projected)."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class SelfAttnProcessor(nn.Module):
    """diffusers' SDPA processor that accepts (and ignores) the face conditioning kwarg.

    It is an ``nn.Module`` without parameters so that the processor list keeps the published indices
    (``{k}.to_k_ip.weight`` with k counting self- and cross-attention processors alike).
    """

    def __init__(self) -> None:
        super().__init__()
        self._sdpa = AttnProcessor2_0()
        self._fused = FusedAttnProcessor2_0()  # once ``attn.fuse_projections()`` ran: one QKV GEMM

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        face: FaceConditioning | None = None,
    ) -> torch.Tensor:
        processor = self._fused if attn.fused_projections else self._sdpa
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class FaceTokenAttnProcessor(nn.Module):
    """Cross-attention to text plus strength-weighted cross-attention to the trailing face tokens."""

    def __init__(self, hidden_size: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        # to_k_ip and to_v_ip stacked (see fuse_projections); not in the state dict, so the published keys stay.
        self.register_buffer("fused_kv_ip", None, persistent=False)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One (2 x hidden, dim) weight for the face K/V, as diffusers' ``Attention.fuse_projections`` stacks K/V:
        one GEMM instead of two. InstantID's face K/V never take a LoRA, so this copy never goes stale."""
        self.fused_kv_ip = torch.cat([self.to_k_ip.weight, self.to_v_ip.weight])

    def face_keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_kv_ip is not None:
            key, value = F.linear(tokens, self.fused_kv_ip).chunk(2, dim=-1)
            return key, value
        return _project(tokens, self.to_k_ip, self.to_v_ip)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        face: FaceConditioning | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_shape = (batch, channels, height, width)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        face_tokens = None
        if face is not None:
            encoder_hidden_states, face_tokens = face.split_context(encoder_hidden_states)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        def text_keys_values(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _text_keys_values(attn, text)

        if face is None:
            key, value = text_keys_values(encoder_hidden_states)
        else:  # text and face tokens are the same at every step: their K/V are projected once per job
            key, value = face.projected(self, "text", encoder_hidden_states, text_keys_values)
        out = _attend(attn, query, key, value, attention_mask)

        if face is not None and face_tokens is not None:
            if face.identities == 1:
                key, value = face.projected(self, "face", face_tokens, self.face_keys_values)
                face_out = _attend(attn, query, key, value, None)
                out = torch.addcmul(out, face_out, face.weight_for(face_out.shape[1], face_out.dtype))  # one kernel
            else:
                out = out + self.face_term(attn, query, face_tokens, face)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def face_term(
        self, attn: Attention, query: torch.Tensor, face_tokens: torch.Tensor, face: FaceConditioning
    ) -> torch.Tensor:
        """Several identities' face-token attention, (rows, seq, channels): each identity's tokens attended with
        their own softmax, weighted by strength x that identity's region mask, summed.

        Regions do not overlap (and nearest resizing keeps them apart), so at a pixel of identity A's region every
        other identity's weight is exactly 0: its term there is A's alone, whatever the other photos are.
        """
        key, value = face.projected(self, "face", face_tokens, self.face_keys_values)
        weight = face.weight_for(query.shape[1], query.dtype)
        return _attend_identities(attn, query, key, value, face.identities, weight)


def _attend_identities(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, identities: int, weight: torch.Tensor
) -> torch.Tensor:
    """:func:`_attend` for each identity's block of keys/values in one SDPA call (identities folded into the heads),
    then the (rows, k, seq, 1) weights applied and the identities summed."""
    rows, seq, _ = query.shape
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(rows, seq, heads, head_dim).transpose(1, 2)
    k = key.view(rows, identities, -1, heads, head_dim).permute(0, 1, 3, 2, 4)  # rows, k, heads, tokens, dim
    v = value.view(rows, identities, -1, heads, head_dim).permute(0, 1, 3, 2, 4)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    # 4-D for SDPA's fused kernels: (rows x k, heads, seq, dim), the query repeated for each identity.
    q = q[:, None].expand(rows, identities, heads, seq, head_dim).reshape(rows * identities, heads, seq, head_dim)
    k = k.reshape(rows * identities, heads, -1, head_dim)
    v = v.reshape(rows * identities, heads, -1, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.view(rows, identities, heads, seq, head_dim).permute(0, 1, 3, 2, 4)
    out = out.reshape(rows, identities, seq, heads * head_dim).to(query.dtype)
    return (out * weight).sum(dim=1)


def _attention_layers(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    """(processor name, Attention) in ``unet.attn_processors`` order: the order the published keys index."""
    for name in unet.attn_processors:
        yield name, unet.get_submodule(name.removesuffix(".processor"))


def face_attention_layers(unet: nn.Module) -> nn.ModuleList:
    """New face-aware processors for every attention layer of ``unet``, in ``attn_processors`` order.

    The ModuleList's state dict has exactly the published ``ip_adapter`` keys (``{k}.to_k_ip.weight``,
    ``{k}.to_v_ip.weight`` for each cross-attention index k). :func:`attach_face_attention` installs them.
    """
    processors: list[nn.Module] = []
    for _, attn in _attention_layers(unet):
        if attn.is_cross_attention:
            weight = attn.to_k.weight  # create on the UNet's own device and dtype
            processors.append(FaceTokenAttnProcessor(attn.to_k.out_features, attn.to_k.in_features).to(weight))
        else:
            processors.append(SelfAttnProcessor())
    return nn.ModuleList(processors)


def attach_face_attention(unet: nn.Module, layers: nn.ModuleList) -> None:
    """Install ``layers`` (from :func:`face_attention_layers` of a UNet of the same architecture) in ``unet``.

    Several SDXL bases on one replica share one set: the face K/V projections belong to InstantID, not to a base.
    """
    attentions = list(_attention_layers(unet))
    if len(attentions) != len(layers):
        raise WeightsError(
            f"this UNet has {len(attentions)} attention layers; the face layers were made for {len(layers)}"
        )
    for (name, attn), layer in zip(attentions, layers, strict=True):
        if attn.is_cross_attention != isinstance(layer, FaceTokenAttnProcessor) or (
            isinstance(layer, FaceTokenAttnProcessor) and layer.to_k_ip.weight.shape != attn.to_k.weight.shape
        ):
            raise WeightsError(f"the face attention layers do not fit this UNet at {name}")
    unet.set_attn_processor({name: layer for (name, _), layer in zip(attentions, layers, strict=True)})


def install_face_attention(unet: nn.Module) -> nn.ModuleList:
    """Give every attention layer of ``unet`` new face-aware processors; return them as one ModuleList."""
    layers = face_attention_layers(unet)
    attach_face_attention(unet, layers)
    return layers


def load_face_attention(unet: nn.Module, ip_adapter_state: dict[str, torch.Tensor]) -> nn.ModuleList:
    """Install new processors and load ``ip-adapter.bin``'s ``ip_adapter`` part into them strictly."""
    layers = face_attention_layers(unet)
    expected = set(layers.state_dict())
    given = set(ip_adapter_state)
    if expected != given:
        raise WeightsError(
            "ip_adapter weights do not match this UNet's cross-attention layers: "
            f"missing {sorted(expected - given)[:6]}, unexpected {sorted(given - expected)[:6]} "
            f"({len(expected)} expected, {len(given)} given)"
        )
    try:
        layers.load_state_dict(ip_adapter_state, strict=True)
    except RuntimeError as exc:  # size mismatches
        raise WeightsError(f"ip_adapter weights have the wrong sizes for this UNet: {exc}") from exc
    attach_face_attention(unet, layers)
    return layers


def fuse_projections(model: nn.Module) -> int:
    """Fuse the Q/K/V projections of every attention layer of ``model`` (UNet or ControlNet) with diffusers'
    ``Attention.fuse_projections`` (self-attention: one QKV GEMM; cross-attention: one K/V GEMM), and the face
    K/V of the face-token processors. The processors switch to the fused weights by themselves; a ControlNet's
    standard processors are replaced by diffusers' fused one. Returns how many layers were fused.

    The fused weights are copies: when the originals change in place (a LoRA set merged or restored), call
    :func:`refresh_fused_projections`.
    """
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention) and not module.fused_projections:
            module.fuse_projections()
            fused += 1
            if isinstance(module.processor, AttnProcessor2_0):
                module.set_processor(FusedAttnProcessor2_0())
        elif isinstance(module, FaceTokenAttnProcessor) and module.fused_kv_ip is None:
            module.fuse_projections()
    return fused


@torch.no_grad()
def refresh_fused_projections(model: nn.Module) -> None:
    """Copy the current Q/K/V weights into the fused ones of :func:`fuse_projections`, in place (the same
    storage: a recorded CUDA graph and compiled code keep reading it)."""
    for module in model.modules():
        if not (isinstance(module, Attention) and module.fused_projections):
            continue
        names = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
        fused = module.to_kv if module.is_cross_attention else module.to_qkv
        fused.weight.copy_(torch.cat([getattr(module, name).weight for name in names]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([getattr(module, name).bias for name in names]))
