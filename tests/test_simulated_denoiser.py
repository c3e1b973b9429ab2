"""SIMULATION ONLY: the cost-model denoiser waits the modelled forward instead of running the networks, and nothing
else about a step changes (per-job schedulers, step counts, cancellation, the static loop and the batcher)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.config import DenoiserCostModel, ForwardCost
from deployments.instantid.continuous import ContinuousBatcher, StepGroup
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.params import GenerationParams
from deployments.instantid.simulated import CostModelDenoiser

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=3, guidance_scale=5.0)
COST = ForwardCost(launch_s=0.05, per_row_s=0.02)


@pytest.fixture(scope="module")
def text(prompt_encoder):
    return prompt_encoder.encode(["a portrait photo"], ["blurry"], do_classifier_free_guidance=True)[0]


@pytest.fixture
def simulated(denoiser):
    """The tiny denoiser's components behind the cost model; the networks raise if anything calls them."""
    waits: list[float] = []
    model = CostModelDenoiser(denoiser, {(64, 64): COST}, sleep=waits.append)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a simulated step ran a network")

    nets = (denoiser.unet, denoiser.controlnet, denoiser.vae.decoder)
    hooks = [net.register_forward_pre_hook(refuse) for net in nets]
    try:
        yield model, waits
    finally:
        for hook in hooks:
            hook.remove()


def job(text, params: GenerationParams, seed: int = 0, **extra) -> DenoiseJob:
    embedding = np.random.default_rng(seed).normal(size=512).astype(np.float32)
    return DenoiseJob(params, embedding, KEYPOINTS, BOX, text, **extra)


def test_each_forward_waits_launch_plus_rows_and_the_static_loop_still_ends_every_job(simulated, text) -> None:
    model, waits = simulated
    one = job(text, BASE)
    two = job(text, dataclasses.replace(BASE, num_images=2, seed=8), seed=1)
    images = model.generate([one, two])
    assert waits == pytest.approx([COST.seconds(2 + 4)] * 3)  # three steps of 6 rows (CFG doubles each image)
    assert [i.shape for i in images] == [(1, 64, 64, 3), (2, 64, 64, 3)]
    assert all((i == 128).all() for i in images)  # not decoded: the fitted forward carries the decode's cost


def test_jobs_join_and_leave_the_batcher_and_a_dropped_job_stops_as_it_would(simulated, text) -> None:
    model, waits = simulated
    batcher = ContinuousBatcher(max_rows=16, turn_steps=8, gather_s=0.2)
    group = StepGroup("g", model, lambda: nullcontext(0.0))
    try:
        short = job(text, dataclasses.replace(BASE, num_inference_steps=2))
        dropped = job(text, dataclasses.replace(BASE, num_inference_steps=5), on_step=lambda step, *_: step == 1)
        long = job(text, dataclasses.replace(BASE, num_inference_steps=4, scheduler="dpmpp_2m"))
        futures = [batcher.submit(j, group)[0] for j in (short, dropped, long)]
        outcomes = [f.result(60) for f in futures]
    finally:
        batcher.close()
    assert outcomes[1].images is None and outcomes[0].images is not None and outcomes[2].images is not None
    assert [o.stats.forwards for o in outcomes] == [2, 1, 4]  # each job's own schedule
    assert waits == pytest.approx([COST.seconds(6), COST.seconds(4), COST.seconds(2), COST.seconds(2)])


def test_a_size_without_constants_fails_that_job_before_it_waits(simulated, text) -> None:
    model, waits = simulated
    with pytest.raises(InvalidParameterError, match="models only sizes 64x64, not 96x64"):
        model.start(job(text, dataclasses.replace(BASE, width=96)))
    assert waits == []


def test_the_cost_model_config_names_sizes_and_refuses_what_it_cannot_use() -> None:
    config = DenoiserCostModel(source="h200.json", sizes={"1024x768": COST})
    assert config.by_size() == {(1024, 768): COST}
    with pytest.raises(ValidationError, match="WIDTHxHEIGHT"):
        DenoiserCostModel(source="h200.json", sizes={"1024": COST})
    with pytest.raises(ValidationError):
        DenoiserCostModel(source="h200.json", sizes={})
    with pytest.raises(ValidationError):
        ForwardCost(launch_s=-0.1, per_row_s=0.02)
