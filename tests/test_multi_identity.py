"""Several people in one image, on tiny weights: one identity through the multi path is the single path bit for bit,
each identity's face-token attention stays inside its own region, and k identities run, batch and stay apart."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deployments.instantid.attention import FaceConditioning, FaceTokenAttnProcessor
from deployments.instantid.conditioning import condition_from, identify, locate_pose
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.group import IdentityPhotos, PoseFaces, group_condition
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import face_region_mask
from deployments.instantid.multi_identity import identity_conditioning
from deployments.instantid.params import GenerationParams
from deployments.instantid.regions import PlacedIdentity, identity_masks, place_face, shared_keypoint_image
from deployments.tiny.faces import write_tiny_antelopev2
from tests.support import astronaut_rgb, group_photo_jpeg

pytestmark = pytest.mark.filterwarnings("ignore:.*`estimate` is deprecated:FutureWarning")

BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=3, guidance_scale=5.0)
TWO = dataclasses.replace(BASE, identities=2, width=128)
KPS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)


def embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20


def placed(seed: int, x0: float, width: float = 64.0, height: float = 64.0) -> PlacedIdentity:
    """An identity owning the column [x0, x0 + width) with a face drawn in its upper middle."""
    kps = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32) + np.array([x0, 0])
    box = np.array([12 + x0, 10, 52 + x0, 56], dtype=np.float32)
    return PlacedIdentity(embedding(seed), kps, box, np.array([x0, 0, x0 + width, height], dtype=np.float32))


@pytest.fixture(scope="module")
def prompt(prompt_encoder):
    return prompt_encoder.encode(["two people"], ["blurry"], do_classifier_free_guidance=True)[0]


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    directory: Path = tmp_path_factory.mktemp("faces") / "antelopev2"
    write_tiny_antelopev2(directory, seed=0)
    return FaceAnalyzer(directory, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------- one identity = the single path


@pytest.mark.parametrize("enhance", [True, False])
def test_one_identity_through_the_multi_path_is_the_single_image_bit_for_bit(
    denoiser, prompt, analyzer, enhance: bool
) -> None:
    """The face stage's multi-identity condition for one person with a pose photo, and the denoiser's
    multi-identity job built from it, give exactly the single-identity request's image."""
    astronaut = astronaut_rgb()
    group = decode_image(group_photo_jpeg())
    chosen = identify(analyzer, astronaut)
    single = condition_from([chosen], locate_pose(analyzer, group, 0), width=128, height=96)
    pose = PoseFaces(analyzer.detect(group), group.shape[1], group.shape[0])
    multi = group_condition([IdentityPhotos([chosen])], pose, width=128, height=96)
    assert multi.layout == "pose" and multi.identities is not None and len(multi.identities) == 1
    one = multi.identities[0]
    assert np.array_equal(one.keypoints, single.keypoints) and np.array_equal(one.box, single.box)
    assert np.array_equal(one.region, [0, 0, 128, 96])
    params = dataclasses.replace(BASE, width=128, height=96, enhance_face_region=enhance, face_noise=0.1)
    reference = denoiser.generate([DenoiseJob(params, single.embedding, single.keypoints, single.box, prompt)])[0]
    through_multi = denoiser.generate(
        [DenoiseJob(params, multi.embedding, multi.keypoints, multi.box, prompt, identities=multi.identities)]
    )[0]
    assert np.array_equal(reference, through_multi)


def test_one_identity_conditioning_has_the_single_shapes(denoiser) -> None:
    params = dataclasses.replace(BASE, enhance_face_region=True)
    face_pos, face_neg, keypoints, mask = identity_conditioning(denoiser.resampler, [placed(0, 0)], params)
    assert tuple(face_pos.shape) == (1, 16, denoiser.unet.config.cross_attention_dim)
    assert face_neg is not None and face_neg.shape == face_pos.shape
    assert mask is not None and tuple(mask.shape) == (1, 1, 64, 64)
    assert keypoints.shape == (64, 64, 3)
    _, _, _, none = identity_conditioning(
        denoiser.resampler, [placed(0, 0)], dataclasses.replace(params, enhance_face_region=False)
    )
    assert none is None  # a whole-image region without enhance is no mask at all: the single path


# ------------------------------------------------------------------------------------------------ isolation


def _cross_attention_layers(unet) -> list[tuple[str, torch.nn.Module, FaceTokenAttnProcessor]]:
    layers = []
    for name, processor in unet.attn_processors.items():
        if isinstance(processor, FaceTokenAttnProcessor):
            layers.append((name, unet.get_submodule(name.removesuffix(".processor")), processor))
    return layers


@pytest.mark.parametrize("enhance", [False, True])
def test_face_token_term_inside_a_region_ignores_the_other_identity(denoiser, enhance: bool) -> None:
    """For the same hidden states, at every cross-attention layer and on its own latent grid (the masks resized as
    FaceConditioning resizes them): changing B's face tokens leaves A's region untouched, and vice versa; each
    identity's change does show in its own region; outside every region the term is 0."""
    unet = denoiser.unet
    params = dataclasses.replace(BASE, identities=2, width=128, height=64, enhance_face_region=enhance)
    a, b, b_other, a_other = placed(0, 0), placed(1, 64), placed(2, 64), placed(3, 0)
    # Regions that leave a strip owned by nobody: columns [0, 48) and [64, 112) of 128.
    a = dataclasses.replace(a, region=np.array([0, 0, 48, 64], dtype=np.float32))
    a_other = dataclasses.replace(a_other, region=a.region)
    b, b_other = (dataclasses.replace(x, region=np.array([64, 0, 112, 64], dtype=np.float32)) for x in (b, b_other))
    # Without enhance the boxes must not narrow the mask, so the face boxes stay inside the regions anyway.

    def tokens(identities: list[PlacedIdentity]) -> tuple[torch.Tensor, torch.Tensor]:
        face_pos, _, _, mask = identity_conditioning(denoiser.resampler, identities, params)
        assert mask is not None
        return face_pos, mask

    base_tokens, mask = tokens([a, b])
    other_b, _ = tokens([a, b_other])
    other_a, _ = tokens([a_other, b])
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name, attn, processor in _cross_attention_layers(unet):
        for height, width in ((8, 16), (4, 8), (2, 4)):  # the latent grids of the tiny UNet's attention layers
            hidden = torch.randn(1, height * width, attn.to_q.in_features, generator=generator)
            query = attn.to_q(hidden)
            terms = {}
            for label, face_tokens in (("base", base_tokens), ("b", other_b), ("a", other_a)):
                conditioning = FaceConditioning(torch.tensor([0.8]), denoiser.num_face_tokens, mask)
                context = torch.cat([text, face_tokens], dim=1)
                _, split_tokens = conditioning.split_context(context)
                terms[label] = processor.face_term(attn, query, split_tokens, conditioning)[0]
            weight = FaceConditioning(torch.tensor([1.0]), denoiser.num_face_tokens, mask).weight_for(
                height * width, torch.float32
            )[0, :, :, 0]  # (k, seq): exactly the implementation's resized masks
            in_a, in_b = weight[0] > 0, weight[1] > 0
            nowhere = ~(in_a | in_b)
            assert not (in_a & in_b).any(), name
            assert torch.equal(terms["base"][in_a], terms["b"][in_a]), (name, height)
            assert torch.equal(terms["base"][in_b], terms["a"][in_b]), (name, height)
            assert torch.all(terms["base"][nowhere] == 0)
            if in_b.any():
                assert not torch.equal(terms["base"][in_b], terms["b"][in_b]), (name, height)
                checked += 1
            if in_a.any():
                assert not torch.equal(terms["base"][in_a], terms["a"][in_a]), (name, height)
    assert checked >= 3  # B's region survives the resize on several layers and grids


def test_processor_output_in_a_region_ignores_the_other_identity(denoiser) -> None:
    """The whole cross-attention output (text + face term, then the output projection, position by position) at A's
    pixels is the same whichever photo B has: text attention is unchanged by the face tokens."""
    _, attn, processor = _cross_attention_layers(denoiser.unet)[0]
    params = dataclasses.replace(TWO, enhance_face_region=False)
    a, b, b_other = placed(0, 0), placed(1, 64), placed(2, 64)
    outputs = []
    for second in (b, b_other):
        face_pos, _, _, mask = identity_conditioning(denoiser.resampler, [a, second], params)
        conditioning = FaceConditioning(torch.tensor([0.8]), denoiser.num_face_tokens, mask)
        text = torch.randn(1, 77, denoiser.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(1, 8 * 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
        out = processor(attn, hidden, torch.cat([text, face_pos], dim=1), face=conditioning)
        outputs.append(out[0])
    weight = FaceConditioning(torch.tensor([1.0]), 16, mask).weight_for(8 * 16, torch.float32)[0, :, :, 0]
    in_a, in_b = weight[0] > 0, weight[1] > 0
    assert in_a.sum() == 64 and in_b.sum() == 64
    assert torch.equal(outputs[0][in_a], outputs[1][in_a])
    assert not torch.equal(outputs[0][in_b], outputs[1][in_b])


# -------------------------------------------------------------------------------------------- whole generations


def test_two_identities_generate_and_each_shapes_its_own_side(denoiser, prompt) -> None:
    a, b = placed(0, 0), placed(1, 64)
    params = dataclasses.replace(TWO, enhance_face_region=False)

    def run(identities: list[PlacedIdentity], p: GenerationParams = params) -> np.ndarray:
        first = identities[0]
        job = DenoiseJob(p, first.embedding, first.keypoints, first.box, prompt, identities=identities)
        return denoiser.generate([job])[0].astype(int)

    base = run([a, b])
    assert base.shape == (1, 64, 128, 3)
    assert np.array_equal(base, run([a, b]))  # deterministic
    changed = run([a, placed(5, 64)])
    assert np.abs(changed - base).max() > 4  # B's identity matters
    no_adapter = run([a, b], dataclasses.replace(params, adapter_strength=0.0, identitynet_strength=0.0))
    assert np.abs(no_adapter - base).max() > 4


def test_multi_identity_jobs_batch_together_and_not_with_single_ones(denoiser, prompt, prompt_encoder) -> None:
    other_prompt = prompt_encoder.encode(["a watercolor"], [None], do_classifier_free_guidance=True)[0]
    jobs = [
        DenoiseJob(TWO, embedding(0), KPS, BOX, prompt, identities=[placed(0, 0), placed(1, 64)]),
        DenoiseJob(
            dataclasses.replace(TWO, seed=3, adapter_strength=1.1, num_images=2),
            embedding(2),
            placed(2, 0).keypoints,
            placed(2, 0).box,
            other_prompt,
            identities=[placed(2, 0), placed(3, 64)],
        ),
    ]
    alone = [denoiser.generate([job])[0] for job in jobs]
    together = denoiser.generate(jobs)
    for one, batched in zip(alone, together, strict=True):
        assert one.shape == batched.shape
        assert np.abs(one.astype(int) - batched.astype(int)).max() <= 2
    single = DenoiseJob(dataclasses.replace(TWO, identities=1), embedding(0), KPS, BOX, prompt)
    assert TWO.batch_key() != single.params.batch_key()
    with pytest.raises(ValueError, match="batch_key"):
        denoiser.generate([jobs[0], single])


def test_identity_count_must_match_the_parameters(denoiser, prompt) -> None:
    from deployments.instantid.errors import InvalidParameterError

    one = placed(0, 0)
    with pytest.raises(InvalidParameterError, match="2 identities"):
        denoiser.generate([DenoiseJob(TWO, one.embedding, one.keypoints, one.box, prompt)])
    with pytest.raises(InvalidParameterError, match="1 identities but its parameters say 2"):
        denoiser.generate([DenoiseJob(TWO, one.embedding, one.keypoints, one.box, prompt, identities=[one])])


def test_masks_keep_identities_apart_and_enhance_narrows_to_the_face() -> None:
    a, b = placed(0, 0), placed(1, 64)
    regions = [a.region, b.region]
    masks = identity_masks(regions, [a.box, b.box], 128, 64, enhance_face_region=False)
    assert masks is not None and masks.shape == (2, 64, 128)
    assert masks[0, :, :64].all() and not masks[0, :, 64:].any() and masks[1, :, 64:].all()
    narrowed = identity_masks(regions, [a.box, b.box], 128, 64, enhance_face_region=True)
    assert narrowed is not None and narrowed[0].sum() == 40 * 46 and narrowed[1].sum() == 40 * 46
    assert narrowed[0, 10:56, 12:52].all() and narrowed[1, 10:56, 76:116].all()


def test_multi_identity_jobs_join_a_continuous_batch_mid_way_and_keep_their_image(denoiser, prompt) -> None:
    """Continuous batching: a second two-person job (other people, steps, strengths, window) joins a running one
    at a step boundary; both give the images they give alone, and a one-person job never shares their forwards."""
    from deployments.instantid.continuous import ContinuousBatcher, StepGroup

    a = DenoiseJob(
        dataclasses.replace(TWO, num_inference_steps=5, seed=1),
        embedding(0),
        KPS,
        BOX,
        prompt,
        identities=[placed(0, 0), placed(1, 64)],
    )
    b_params = dataclasses.replace(
        TWO, num_inference_steps=4, seed=2, adapter_strength=1.1, identitynet_strength=0.5, control_guidance_end=0.7
    )
    b = DenoiseJob(b_params, embedding(2), KPS, BOX, prompt, identities=[placed(2, 0), placed(3, 64)])
    expected = {name: denoiser.generate([dataclasses.replace(job, _state={})])[0] for name, job in (("a", a), ("b", b))}
    batcher = ContinuousBatcher(max_rows=64, turn_steps=4, gather_s=0.3)
    try:
        group = StepGroup("g", denoiser, lambda: contextlib.nullcontext(0.0))
        futures = {}

        def a_step(step: int, total: int, latents: object) -> bool:
            if step == 2:
                futures["b"] = batcher.submit(b, group)[0]
            return False

        a.on_step = a_step
        futures["a"] = batcher.submit(a, group)[0]
        outcome_a = futures["a"].result(120)
        outcome_b = futures["b"].result(120)
    finally:
        batcher.close()
    for name, outcome in (("a", outcome_a), ("b", outcome_b)):
        assert outcome.images is not None
        assert int(np.abs(outcome.images.astype(int) - expected[name].astype(int)).max()) <= 2, name
    assert outcome_a.stats.most_jobs == 2  # they did share forwards
    assert TWO.step_key() != dataclasses.replace(TWO, identities=1).step_key()


# ------------------------------------------------------------------ each identity's own tokens and its own region
#
# Two identities in distinct regions of different widths (identity 0: a 64 px column at the left, identity 1: a 96 px
# column at the right, with a strip owned by nobody between them), so a mix-up of whose tokens or whose mask channel
# cannot look like the right answer. The expected values are computed here, identity by identity, from each
# identity's own embedding and region: IdentityNet (diffusers' ControlNetModel) run once per identity with that
# identity's face tokens, its residuals weighted by strength x its region mask (resized bilinearly), summed; the
# face-token attention of each identity attended with its own softmax and weighted by strength x its region mask
# (resized nearest).

OWN_WIDTH, OWN_HEIGHT = 192, 64
OWN_REGIONS = (np.array([0, 0, 64, 64], dtype=np.float32), np.array([96, 0, 192, 64], dtype=np.float32))


def own_region_identities() -> list[PlacedIdentity]:
    """Identity 0 (embedding seed 0) owning [0, 64) and identity 1 (seed 1) owning [96, 192), faces placed inside."""
    identities = []
    for seed, region in enumerate(OWN_REGIONS):
        kps, box = place_face(KPS, BOX, region)
        identities.append(PlacedIdentity(embedding(seed), kps, box, region))
    return identities


def own_tokens(denoiser, identity: PlacedIdentity) -> torch.Tensor:
    """This identity's face tokens for the CFG rows [negative, positive], from its own embedding alone."""
    positive, negative = denoiser.resampler.face_tokens(torch.from_numpy(identity.embedding)[None], with_negative=True)
    assert negative is not None
    return torch.cat([negative, positive])


def own_mask(identity: PlacedIdentity) -> torch.Tensor:
    """(1, 1, H, W): 1 inside this identity's region, 0 elsewhere (no enhance_face_region)."""
    return torch.from_numpy(face_region_mask(identity.region, OWN_WIDTH, OWN_HEIGHT))[None, None]


def test_identity_conditioning_puts_identity_i_in_token_block_i_and_mask_channel_i(denoiser) -> None:
    """Face tokens are concatenated identity by identity and mask channel i is identity i's region, so block i and
    channel i describe the same person."""
    params = dataclasses.replace(BASE, identities=2, width=OWN_WIDTH, height=OWN_HEIGHT, enhance_face_region=False)
    identities = own_region_identities()
    face_pos, face_neg, _, mask = identity_conditioning(denoiser.resampler, identities, params)
    assert face_neg is not None and mask is not None and tuple(mask.shape) == (1, 2, OWN_HEIGHT, OWN_WIDTH)
    tokens = denoiser.num_face_tokens
    for i, identity in enumerate(identities):
        negative, positive = own_tokens(denoiser, identity)
        torch.testing.assert_close(face_pos[0, i * tokens : (i + 1) * tokens], positive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(face_neg[0, i * tokens : (i + 1) * tokens], negative, rtol=1e-5, atol=1e-6)
        assert torch.equal(mask[0, i], own_mask(identity)[0, 0]), i
    assert mask[0, 0, :, :64].all() and not mask[0, 0, :, 64:].any()


def test_each_identitys_identitynet_residuals_come_from_its_own_tokens_and_region(denoiser, prompt) -> None:
    """At every step, the residuals the UNet receives are the sum over identities of IdentityNet run (as diffusers'
    ControlNetModel, conditioning scale 1) with THAT identity's face tokens on the shared keypoint image, times
    identitynet_strength x THAT identity's region mask resized bilinearly to the residual."""
    params = dataclasses.replace(
        BASE,
        identities=2,
        width=OWN_WIDTH,
        height=OWN_HEIGHT,
        num_inference_steps=2,
        identitynet_strength=0.7,
        enhance_face_region=False,
    )
    identities = own_region_identities()
    unet_inputs: list[tuple[tuple, dict]] = []
    hook = denoiser.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: unet_inputs.append((args, kwargs)), with_kwargs=True
    )
    first = identities[0]
    job = DenoiseJob(params, first.embedding, first.keypoints, first.box, prompt, identities=identities)
    try:
        denoiser.generate([job])
    finally:
        hook.remove()
    assert len(unet_inputs) == params.num_inference_steps

    keypoints = shared_keypoint_image([identity.keypoints for identity in identities], OWN_WIDTH, OWN_HEIGHT)
    condition = torch.from_numpy(keypoints).float().div(255.0).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    for args, kwargs in unet_inputs:
        sample, t = args[0], args[1]
        added = kwargs["added_cond_kwargs"]
        expected: list[torch.Tensor] = []  # down residuals then the mid one, summed over identities
        for identity in identities:
            with torch.no_grad():
                down, mid = denoiser.controlnet(
                    sample,
                    t,
                    encoder_hidden_states=own_tokens(denoiser, identity),
                    controlnet_cond=condition,
                    conditioning_scale=1.0,
                    guess_mode=False,
                    added_cond_kwargs={"text_embeds": added["text_embeds"], "time_ids": added["time_ids"]},
                    return_dict=False,
                )
            weighted = [
                residual
                * params.identitynet_strength
                * F.interpolate(own_mask(identity), size=tuple(residual.shape[-2:]), mode="bilinear")
                for residual in [*down, mid]
            ]
            expected = weighted if not expected else [a + b for a, b in zip(expected, weighted, strict=True)]
        given = [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]
        assert len(given) == len(expected)
        for ours, theirs in zip(given, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _reference_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Plain multi-head softmax attention, (rows, seq, channels): softmax(q k^T x attn.scale) v, head by head."""
    rows, seq, channels = query.shape
    head_dim = channels // attn.heads
    q = query.view(rows, seq, attn.heads, head_dim).transpose(1, 2)
    k = key.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    probabilities = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    return (probabilities @ v).transpose(1, 2).reshape(rows, seq, channels)


def test_each_identitys_face_tokens_attend_only_in_its_own_region(denoiser, prompt) -> None:
    """The face-token term of every cross-attention layer, for the conditioning a two-person job's batch hands the
    UNet, is the sum over identities of attention to THAT identity's tokens (its own to_k_ip/to_v_ip softmax) times
    adapter_strength x THAT identity's region mask resized nearest to the layer's grid: identity 0's tokens act
    only inside identity 0's region, identity 1's only inside identity 1's, and none in the strip between."""
    params = dataclasses.replace(
        BASE, identities=2, width=OWN_WIDTH, height=OWN_HEIGHT, adapter_strength=0.6, enhance_face_region=False
    )
    identities = own_region_identities()
    first = identities[0]
    job = DenoiseJob(params, first.embedding, first.keypoints, first.box, prompt, identities=identities)
    denoiser.start(job)
    batch = denoiser.batch([job])
    _, face_tokens = batch.conditioning.split_context(batch.context)
    tokens = [own_tokens(denoiser, identity) for identity in identities]
    generator = torch.Generator().manual_seed(3)
    checked = 0
    for name, attn, processor in _cross_attention_layers(denoiser.unet):
        for height, width in ((8, 24), (4, 12), (2, 6)):
            hidden = torch.randn(batch.rows, height * width, attn.to_q.in_features, generator=generator)
            with torch.no_grad():
                query = attn.to_q(hidden)
                term = processor.face_term(attn, query, face_tokens, batch.conditioning)
                expected = torch.zeros_like(term)
                for identity, own in zip(identities, tokens, strict=True):
                    attended = _reference_attention(attn, query, processor.to_k_ip(own), processor.to_v_ip(own))
                    mask = F.interpolate(own_mask(identity), size=(height, width), mode="nearest").flatten()
                    expected += params.adapter_strength * mask[None, :, None] * attended
            where = f"{name} on a {height}x{width} grid"
            torch.testing.assert_close(term, expected, rtol=1e-4, atol=1e-4, msg=lambda m, where=where: f"{where}: {m}")
            checked += 1
    assert checked >= 3
