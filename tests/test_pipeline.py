"""The denoising loop on tiny weights: determinism, stock-diffusers parity, strengths, batching, schedulers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from deployments.instantid.denoiser import DenoiseJob, control_keep
from deployments.instantid.params import GenerationParams
from deployments.instantid.schedulers import SCHEDULER_NAMES

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)


def job(prompt, params: GenerationParams, embedding_seed: int = 0) -> DenoiseJob:
    embedding = np.random.default_rng(embedding_seed).normal(size=512).astype(np.float32) * 20
    return DenoiseJob(params, embedding, KEYPOINTS, BOX, prompt)


@pytest.fixture(scope="module")
def prompt(prompt_encoder):
    return prompt_encoder.encode(["a portrait photo"], ["blurry"], do_classifier_free_guidance=True)[0]


BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=4, guidance_scale=5.0)


def test_same_seed_is_bit_identical_and_another_seed_differs(denoiser, prompt):
    first = denoiser.generate([job(prompt, BASE)])[0]
    second = denoiser.generate([job(prompt, BASE)])[0]
    other = denoiser.generate([job(prompt, dataclasses.replace(BASE, seed=8))])[0]
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 10


def test_zero_strengths_equal_a_stock_diffusers_sdxl_pipeline(tiny_weights, denoiser, prompt_encoder):
    """With both InstantID strengths at 0 our loop is SDXL: same latents from the seed, same result."""
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_weights / "sdxl")
    stock.set_progress_bar_config(disable=True)
    params = dataclasses.replace(BASE, identitynet_strength=0.0, adapter_strength=0.0, num_images=2)
    for negative in (None, "ugly"):
        embeddings = prompt_encoder.encode(["a portrait photo"], [negative], do_classifier_free_guidance=True)[0]
        ours = denoiser.generate([job(embeddings, params)])[0]
        expected = stock(
            "a portrait photo",
            negative_prompt=negative,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
        ).images
        expected = (expected * 255).round().astype(np.uint8)
        assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


def test_guidance_rescale_equals_diffusers_sdxl_pipeline(tiny_weights, denoiser, prompt_encoder):
    """``guidance_rescale`` is diffusers' SDXL rescale of the guided prediction (Lin et al. 2023): with both InstantID
    strengths at 0 our loop gives the stock pipeline's image at the same rescale, and the rescale moves it."""
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_weights / "sdxl")
    stock.set_progress_bar_config(disable=True)
    embeddings = prompt_encoder.encode(["a portrait photo"], ["ugly"], do_classifier_free_guidance=True)[0]
    plain = dataclasses.replace(BASE, identitynet_strength=0.0, adapter_strength=0.0, guidance_scale=9.0)
    rescaled = dataclasses.replace(plain, guidance_rescale=0.7)
    ours = denoiser.generate([job(embeddings, rescaled)])[0]
    expected = stock(
        "a portrait photo",
        negative_prompt="ugly",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=9.0,
        guidance_rescale=0.7,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    unrescaled = denoiser.generate([job(embeddings, plain)])[0]
    assert np.abs(ours.astype(int) - unrescaled.astype(int)).max() > 3


def test_each_strength_changes_the_image(denoiser, prompt):
    base = denoiser.generate([job(prompt, BASE)])[0].astype(int)
    for change in (
        {"identitynet_strength": 0.0},
        {"adapter_strength": 0.0},
        {"enhance_face_region": False},
        {"control_guidance_start": 0.5},
        {"guidance_scale": 1.0},
    ):
        other = denoiser.generate([job(prompt, dataclasses.replace(BASE, **change))])[0].astype(int)
        assert np.abs(base - other).max() > 4, change  # far beyond float tolerance (1/255)
    other_face = denoiser.generate([job(prompt, BASE, embedding_seed=1)])[0].astype(int)
    assert np.abs(base - other_face).max() > 4


def test_batched_jobs_match_their_single_runs(denoiser, prompt, prompt_encoder):
    other_prompt = prompt_encoder.encode(["a watercolor"], [None], do_classifier_free_guidance=True)[0]
    jobs = [
        job(prompt, dataclasses.replace(BASE, seed=1, num_images=2)),
        job(
            other_prompt,
            dataclasses.replace(
                BASE,
                seed=2,
                identitynet_strength=0.3,
                adapter_strength=1.2,
                guidance_scale=3.0,
                enhance_face_region=False,
            ),
            embedding_seed=3,
        ),
    ]
    single = [denoiser.generate([j])[0] for j in jobs]
    batched = denoiser.generate(jobs)
    for one, many in zip(single, batched, strict=True):
        assert one.shape == many.shape
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 2


def test_incompatible_jobs_are_refused(denoiser, prompt):
    with pytest.raises(ValueError, match="batch_key"):
        denoiser.generate([job(prompt, BASE), job(prompt, dataclasses.replace(BASE, num_inference_steps=5))])


def test_num_images_draws_one_latent_batch_from_one_generator(denoiser, prompt):
    two = denoiser.generate([job(prompt, dataclasses.replace(BASE, num_images=2))])[0]
    one = denoiser.generate([job(prompt, BASE)])[0]
    assert two.shape == (2, 64, 64, 3)
    assert np.abs(two[0].astype(int) - one[0].astype(int)).max() <= 1  # first latent is the same draw
    assert np.abs(two[0].astype(int) - two[1].astype(int)).max() > 10


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_runs_deterministically(denoiser, prompt, name):
    params = dataclasses.replace(BASE, scheduler=name, num_inference_steps=3, width=64, height=48)
    first = denoiser.generate([job(prompt, params)])[0]
    second = denoiser.generate([job(prompt, params)])[0]
    assert first.shape == (1, 48, 64, 3)
    assert np.array_equal(first, second)


def test_control_window_matches_diffusers_rule():
    assert [control_keep(i, 10, 0.0, 1.0) for i in range(10)] == [1.0] * 10
    assert [control_keep(i, 10, 0.2, 0.8) for i in range(10)] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert [control_keep(i, 4, 0.5, 1.0) for i in range(4)] == [0, 0, 1, 1]
