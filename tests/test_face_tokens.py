"""Resampler and decoupled face-token attention: published layout, parity with diffusers' own modules."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from deployments.instantid.attention import (
    FaceConditioning,
    FaceTokenAttnProcessor,
    SelfAttnProcessor,
    install_face_attention,
    load_face_attention,
)
from deployments.instantid.errors import WeightsError
from deployments.instantid.resampler import Resampler, ResamplerConfig
from deployments.tiny.weights import tiny_unet
from tests.support import published_image_proj_keys


def test_resampler_state_dict_has_the_published_keys_and_shapes():
    model = Resampler(ResamplerConfig())  # the real sizes
    state = model.state_dict()
    assert set(state) == published_image_proj_keys()
    assert state["latents"].shape == (1, 16, 1280)
    assert state["proj_in.weight"].shape == (1280, 512)
    assert state["layers.0.0.to_kv.weight"].shape == (2560, 1280)
    assert state["layers.3.1.1.weight"].shape == (5120, 1280)
    assert state["proj_out.weight"].shape == (2048, 1280)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(82e6, rel=0.05)  # "Resampler 82M"


def test_resampler_config_is_read_from_the_state_dict():
    config = ResamplerConfig(dim=128, depth=3, heads=2, output_dim=64)
    state = Resampler(config).state_dict()
    assert ResamplerConfig.from_state_dict(state) == config
    assert ResamplerConfig.from_state_dict(Resampler(ResamplerConfig()).state_dict()) == ResamplerConfig()


def test_resampler_load_is_strict():
    state = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=64)).state_dict()
    state["layers.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="unexpected"):
        Resampler.from_state_dict(state)


def test_resampler_tensor_of_an_inconsistent_size_is_a_weights_error():
    state = Resampler(ResamplerConfig(dim=128, depth=2, heads=2, output_dim=64)).state_dict()
    state["layers.1.0.to_kv.weight"] = torch.zeros(7, 128)  # layer 0 gives the sizes; layer 1 disagrees
    with pytest.raises(WeightsError, match=r"inconsistent sizes(.|\n)*layers\.1\.0\.to_kv\.weight"):
        Resampler.from_state_dict(state)


def test_resampler_matches_diffusers_ip_adapter_plus_projection():
    torch.manual_seed(0)
    ours = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=64))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms too
    theirs = tiny_unet()._convert_ip_adapter_image_proj_to_diffusers(ours.state_dict(), low_cpu_mem_usage=False)
    embedding = torch.randn(3, 1, 512) * 10
    torch.testing.assert_close(ours(embedding), theirs(embedding), rtol=1e-5, atol=1e-5)


def test_negative_face_tokens_come_from_a_zero_embedding():
    torch.manual_seed(0)
    model = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=64))
    embedding = torch.randn(1, 512)
    positive, negative = model.face_tokens(embedding, with_negative=True)
    assert positive.shape == negative.shape == (1, 16, 64)
    torch.testing.assert_close(negative, model(torch.zeros(1, 1, 512)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(positive, model(embedding[:, None]), rtol=1e-4, atol=1e-5)
    assert negative.abs().sum() > 0  # not zero tokens
    only_positive, none = model.face_tokens(embedding, with_negative=False)
    assert none is None
    torch.testing.assert_close(only_positive, positive, rtol=1e-4, atol=1e-5)


def _attention(dim: int = 64, heads: int = 4) -> Attention:
    return Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads)


def test_face_attention_equals_diffusers_ip_adapter_attention():
    torch.manual_seed(0)
    attn = _attention()
    ours = FaceTokenAttnProcessor(64, 64)
    theirs = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=64, num_tokens=(16,), scale=0.7)
    theirs.to_k_ip[0].load_state_dict(ours.to_k_ip.state_dict())
    theirs.to_v_ip[0].load_state_dict(ours.to_v_ip.state_dict())
    hidden = torch.randn(2, 24, 64)
    text, face = torch.randn(2, 77, 64), torch.randn(2, 16, 64)

    expected = theirs(attn, hidden, encoder_hidden_states=(text, [face]))
    got = ours(attn, hidden, torch.cat([text, face], dim=1), face=FaceConditioning(torch.full((2,), 0.7), 16))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_face_attention_strength_is_per_row_and_zero_strength_is_text_only():
    torch.manual_seed(0)
    attn = _attention()
    proc = FaceTokenAttnProcessor(64, 64)
    hidden, context = torch.randn(2, 24, 64), torch.randn(2, 93, 64)
    batched = proc(attn, hidden, context, face=FaceConditioning(torch.tensor([0.0, 1.2]), 16))
    row0 = proc(attn, hidden[:1], context[:1], face=FaceConditioning(torch.tensor([0.0]), 16))
    row1 = proc(attn, hidden[1:], context[1:], face=FaceConditioning(torch.tensor([1.2]), 16))
    torch.testing.assert_close(batched, torch.cat([row0, row1]), rtol=1e-5, atol=1e-6)
    text_only = SelfAttnProcessor()._sdpa(attn, hidden[:1], context[:1, :77])
    torch.testing.assert_close(row0, text_only, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(row1, proc(attn, hidden[1:], context[1:], face=FaceConditioning(torch.tensor([0.0]), 16)))


def test_text_and_face_keys_values_are_projected_once_per_context():
    """Steps share a FaceConditioning: the K/V of the unchanging tokens are computed at the first step only,
    a new context is projected afresh, and the cached path gives the uncached result."""
    torch.manual_seed(0)
    attn = _attention()
    proc = FaceTokenAttnProcessor(64, 64)
    calls = {"to_k": 0, "to_k_ip": 0}
    attn.to_k.register_forward_hook(lambda *_: calls.__setitem__("to_k", calls["to_k"] + 1))
    proc.to_k_ip.register_forward_hook(lambda *_: calls.__setitem__("to_k_ip", calls["to_k_ip"] + 1))
    context = torch.randn(2, 93, 64)
    conditioning = FaceConditioning(torch.tensor([0.5, 1.0]), 16)
    steps = [proc(attn, torch.randn(2, 24, 64), context, face=conditioning) for _ in range(3)]
    assert calls == {"to_k": 1, "to_k_ip": 1}
    hidden = torch.randn(2, 24, 64)
    fresh = proc(attn, hidden, context, face=FaceConditioning(torch.tensor([0.5, 1.0]), 16))
    torch.testing.assert_close(proc(attn, hidden, context, face=conditioning), fresh, rtol=0, atol=0)
    other = torch.randn(2, 93, 64)
    proc(attn, hidden, other, face=conditioning)
    assert calls == {"to_k": 3, "to_k_ip": 3}  # one for ``fresh``, one for the new context
    assert not torch.allclose(steps[0], steps[1])  # different queries still give different outputs


def test_face_region_mask_limits_the_face_attention_to_the_region():
    torch.manual_seed(0)
    attn = _attention()
    proc = FaceTokenAttnProcessor(64, 64)
    hidden, context = torch.randn(1, 16, 64), torch.randn(1, 93, 64)  # a 4x4 attention map
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1.0  # top half of the image
    masked = proc(attn, hidden, context, face=FaceConditioning(torch.tensor([1.0]), 16, mask))
    full = proc(attn, hidden, context, face=FaceConditioning(torch.tensor([1.0]), 16))
    none = proc(attn, hidden, context, face=FaceConditioning(torch.tensor([0.0]), 16))
    torch.testing.assert_close(masked[:, :8], full[:, :8])  # rows 0-1 of the 4x4 map: inside
    torch.testing.assert_close(masked[:, 8:], none[:, 8:])  # rows 2-3: outside, text only


def test_ip_adapter_keys_follow_the_published_rule():
    unet = tiny_unet()
    layers = install_face_attention(unet)
    names = list(unet.attn_processors)
    cross = [i for i, name in enumerate(names) if name.endswith("attn2.processor")]
    assert cross == list(range(1, len(names), 2))  # self and cross alternate: odd indices
    expected = {f"{k}.to_k_ip.weight" for k in cross} | {f"{k}.to_v_ip.weight" for k in cross}
    assert set(layers.state_dict()) == expected
    # order: down blocks, then up blocks, then the mid block
    blocks = [name.split(".")[0] for name in names]
    assert blocks == sorted(blocks, key=["down_blocks", "up_blocks", "mid_block"].index)


def test_full_size_sdxl_has_70_face_attention_layers():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        layers = install_face_attention(unet)
    keys = layers.state_dict()
    assert len(keys) == 140
    assert min(int(k.split(".")[0]) for k in keys) == 1 and max(int(k.split(".")[0]) for k in keys) == 139
    assert keys["1.to_k_ip.weight"].shape == (640, 2048)  # first cross-attention: down block 1
    assert sum(v.numel() for v in keys.values()) == pytest.approx(341e6, rel=0.05)  # "face K/V 341M"


def test_load_face_attention_is_strict():
    unet = tiny_unet()
    state = install_face_attention(tiny_unet()).state_dict()
    load_face_attention(unet, state)  # exact key set loads
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(WeightsError, match="missing"):
        load_face_attention(tiny_unet(), missing)
    extra = {**state, "999.to_k_ip.weight": torch.zeros(64, 64)}
    with pytest.raises(WeightsError, match="unexpected"):
        load_face_attention(tiny_unet(), extra)
    wrong = {k: v[:, :8] for k, v in state.items()}
    with pytest.raises(WeightsError, match="wrong sizes"):
        load_face_attention(tiny_unet(), wrong)
