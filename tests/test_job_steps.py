"""The denoiser's per-step hook for async jobs (in one process): every step reported in order, a job dropped at a
step boundary without changing the others' images, and the cheap latent previews."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.params import GenerationParams
from deployments.instantid.previews import latent_preview_rgb, preview_data_url

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
PARAMS = GenerationParams(width=64, height=64, seed=3, num_inference_steps=6, guidance_scale=5.0)


@pytest.fixture(scope="module")
def prompt(prompt_encoder):
    return prompt_encoder.encode(["a portrait photo"], ["blurry"], do_classifier_free_guidance=True)[0]


def job(prompt, seed: int, on_step=None) -> DenoiseJob:
    embedding = np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20
    return DenoiseJob(dataclasses.replace(PARAMS, seed=seed), embedding, KEYPOINTS, BOX, prompt, on_step=on_step)


def test_every_step_is_reported_and_a_dropped_job_leaves_the_others_unchanged(denoiser, prompt) -> None:
    alone = denoiser.generate([job(prompt, 1)])[0]
    reported: dict[str, list[tuple[int, int, tuple]]] = {"kept": [], "dropped": []}

    def recorder(name: str, stop_at: int | None):
        def on_step(step: int, total: int, latents: torch.Tensor) -> bool:
            reported[name].append((step, total, tuple(latents.shape)))
            return stop_at is not None and step >= stop_at

        return on_step

    kept, dropped = denoiser.generate([job(prompt, 1, recorder("kept", None)), job(prompt, 2, recorder("dropped", 2))])
    assert dropped is None
    assert [r[:2] for r in reported["kept"]] == [(s, 6) for s in range(1, 7)]
    assert [r[:2] for r in reported["dropped"]] == [(1, 6), (2, 6)]  # nothing after the step that dropped it
    assert reported["kept"][0][2] == (1, 4, 8, 8)
    # Batched for two steps, then alone: the image is the one the job gives alone (batching's float noise only).
    assert np.abs(kept.astype(int) - alone.astype(int)).max() <= 2


def test_latent_previews_are_small_webp_data_urls() -> None:
    latents = torch.randn(2, 4, 96, 64, generator=torch.Generator().manual_seed(0))
    rgb = latent_preview_rgb(latents)
    assert rgb.dtype == np.uint8 and rgb.shape == (128, 85, 3)  # long side 128, aspect kept
    assert rgb.std() > 5  # random latents are not a flat picture
    url = preview_data_url(latents)
    assert url.startswith("data:image/webp;base64,") and len(url) < 20_000
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "WEBP" and decoded.size == (85, 128)
    with pytest.raises(ValueError, match="SDXL latents"):
        latent_preview_rgb(torch.zeros(1, 3, 8, 8))
