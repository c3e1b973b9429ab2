"""Extra ControlNets (pose, canny, depth) and image-to-image in the denoising loop, against diffusers' own pipelines.

With IdentityNet and the face adapter at strength 0 our loop is plain SDXL, so it must equal diffusers' stock
``StableDiffusionXLControlNetPipeline`` (an extra ControlNet), ``StableDiffusionXLImg2ImgPipeline`` (an init
image) and ``StableDiffusionXLControlNetImg2ImgPipeline`` (both) on the same tiny files, seed and inputs, within
1/255. The semantics with IdentityNet on are pinned against a reference loop in test_instantid_reference.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.options import CONTROLNET_NAMES
from deployments.instantid.params import ControlSetting, GenerationParams
from deployments.instantid.schedulers import make_scheduler
from tests.support import sample_control_maps, sample_init_image

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
PROMPT, NEGATIVE = "a portrait photo", "blurry"
SIZE = 64
PLAIN_SDXL = GenerationParams(
    width=SIZE, height=SIZE, seed=7, num_inference_steps=5, guidance_scale=5.0, identitynet_strength=0.0,
    adapter_strength=0.0,
)  # fmt: skip


def identity(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20


@pytest.fixture(scope="module")
def maps() -> dict[str, np.ndarray]:
    return sample_control_maps(SIZE)


@pytest.fixture(scope="module")
def init_image() -> np.ndarray:
    return sample_init_image(SIZE)


@pytest.fixture(scope="module")
def controlled(controlled_denoiser):
    return controlled_denoiser


@pytest.fixture(scope="module")
def text(prompt_encoder):
    return {
        True: prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0],
        False: prompt_encoder.encode([PROMPT], [None], do_classifier_free_guidance=False)[0],
    }


def run(denoiser, text, params: GenerationParams, maps=None, init=None, embedding_seed: int = 0) -> np.ndarray:
    prompt = text[params.do_classifier_free_guidance]
    job = DenoiseJob(params, identity(embedding_seed), KEYPOINTS, BOX, prompt, control_maps=maps or {}, init_image=init)
    return denoiser.generate([job])[0]


def stock_images(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        negative_prompt=NEGATIVE if kwargs.get("guidance_scale", 5.0) > 1 else None,
        output_type="np",
        **kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def stock_controlnet(tiny_weights: Path, name: str) -> ControlNetModel:
    return ControlNetModel.from_pretrained(tiny_weights / "controlnets" / name).eval()


# ------------------------------------------------------------------------------------------- extra ControlNets


def test_extra_controlnets_at_strength_zero_leave_the_image_bit_identical(controlled, text, maps) -> None:
    params = dataclasses.replace(PLAIN_SDXL, identitynet_strength=0.8, adapter_strength=0.8)
    alone = run(controlled, text, params)
    zero = tuple(ControlSetting(name, strength=0.0) for name in CONTROLNET_NAMES)
    with_zeros = run(controlled, text, dataclasses.replace(params, controlnets=zero), maps)
    assert np.array_equal(alone, with_zeros)
    assert dataclasses.replace(params, controlnets=zero).batch_key() == params.batch_key()  # they batch together


def test_each_extra_controlnet_visibly_moves_the_image(controlled, text, maps) -> None:
    """The tiny ControlNets must be strong enough for the parity tests below to see a wiring mistake."""
    alone = run(controlled, text, PLAIN_SDXL)
    for name in CONTROLNET_NAMES:
        params = dataclasses.replace(PLAIN_SDXL, controlnets=(ControlSetting(name, 0.8),))
        with_net = run(controlled, text, params, maps)
        assert max_difference(alone, with_net) > 20, name


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("canny", ControlSetting("canny", strength=0.7)),
        ("depth", ControlSetting("depth", strength=1.1, start=0.2, end=0.8)),
    ],
    ids=["canny", "depth-window"],
)
def test_an_extra_controlnet_equals_diffusers_sdxl_controlnet_pipeline(
    controlled, text, maps, tiny_weights, name, setting
) -> None:
    params = dataclasses.replace(PLAIN_SDXL, controlnets=(setting,), num_images=2)
    ours = run(controlled, text, params, maps)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_weights / "sdxl", controlnet=stock_controlnet(tiny_weights, name)
    )
    expected = stock_images(
        pipe,
        image=Image.fromarray(maps[name]),
        height=SIZE,
        width=SIZE,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=2,
        controlnet_conditioning_scale=setting.strength,
        control_guidance_start=setting.start,
        control_guidance_end=setting.end,
        generator=torch.Generator().manual_seed(params.seed),
    )
    assert max_difference(ours, expected) <= 1


def test_jobs_with_the_same_controlnets_batch_and_keep_their_own_maps_and_strengths(controlled, text, maps) -> None:
    first = dataclasses.replace(PLAIN_SDXL, identitynet_strength=0.8, controlnets=(ControlSetting("canny", 0.3),))
    second = dataclasses.replace(first, seed=9, controlnets=(ControlSetting("canny", 0.9),))
    other_map = {"canny": np.ascontiguousarray(maps["canny"][::-1])}
    jobs = [
        DenoiseJob(first, identity(0), KEYPOINTS, BOX, text[True], control_maps=maps),
        DenoiseJob(second, identity(1), KEYPOINTS, BOX, text[True], control_maps=other_map),
    ]
    assert first.batch_key() == second.batch_key()
    together = controlled.generate(jobs)
    assert max_difference(together[0], run(controlled, text, first, maps, embedding_seed=0)) <= 1
    assert max_difference(together[1], run(controlled, text, second, other_map, embedding_seed=1)) <= 1


def test_jobs_with_different_controlnet_sets_never_share_a_forward(controlled, text, maps) -> None:
    canny = dataclasses.replace(PLAIN_SDXL, controlnets=(ControlSetting("canny"),))
    assert canny.batch_key() != PLAIN_SDXL.batch_key()
    assert canny.batch_key() != dataclasses.replace(PLAIN_SDXL, controlnets=(ControlSetting("depth"),)).batch_key()
    windowed = dataclasses.replace(PLAIN_SDXL, controlnets=(ControlSetting("canny", start=0.5),))
    assert canny.batch_key() != windowed.batch_key()
    jobs = [DenoiseJob(p, identity(), KEYPOINTS, BOX, text[True], control_maps=maps) for p in (canny, PLAIN_SDXL)]
    with pytest.raises(ValueError, match="batch_key"):
        controlled.generate(jobs)


def test_a_missing_controlnet_or_map_is_a_clear_error(denoiser, controlled, text, maps) -> None:
    params = dataclasses.replace(PLAIN_SDXL, controlnets=(ControlSetting("canny"),))
    with pytest.raises(InvalidParameterError, match="no canny ControlNet"):
        run(denoiser, text, params, maps)  # the shared tiny denoiser has no extra ControlNets
    with pytest.raises(InvalidParameterError, match="needs a control map"):
        run(controlled, text, params, {})
    with pytest.raises(InvalidParameterError, match=r"must be uint8 \(64, 64, 3\)"):
        run(controlled, text, params, {"canny": maps["canny"][:32]})


# --------------------------------------------------------------------------------------------- image-to-image

IMG2IMG_CASES = {
    "euler": dict(scheduler="euler", strength=0.6),
    "dpmpp_2m_karras-two-images": dict(scheduler="dpmpp_2m_karras", strength=0.45, num_images=2),
    "euler_a-full-strength": dict(scheduler="euler_a", strength=1.0),
    "heun-second-order": dict(scheduler="heun", strength=0.5),
    "lcm-no-cfg": dict(scheduler="lcm", strength=0.7, guidance_scale=1.0, num_inference_steps=4),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES.values(), ids=IMG2IMG_CASES.keys())
def test_img2img_equals_diffusers_sdxl_img2img_pipeline(controlled, text, init_image, tiny_weights, case) -> None:
    params = dataclasses.replace(PLAIN_SDXL, **case)
    ours = run(controlled, text, params, init=init_image)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_weights / "sdxl")
    pipe.scheduler = make_scheduler(params.scheduler, dict(pipe.scheduler.config))
    expected = stock_images(
        pipe,
        image=Image.fromarray(init_image),
        strength=params.strength,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator().manual_seed(params.seed),
    )
    assert max_difference(ours, expected) <= 1


def test_img2img_with_an_extra_controlnet_equals_diffusers_controlnet_img2img_pipeline(
    controlled, text, maps, init_image, tiny_weights
) -> None:
    params = dataclasses.replace(PLAIN_SDXL, strength=0.7, controlnets=(ControlSetting("canny", 0.8, end=0.7),))
    ours = run(controlled, text, params, maps, init=init_image)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        tiny_weights / "sdxl", controlnet=stock_controlnet(tiny_weights, "canny")
    )
    expected = stock_images(
        pipe,
        image=Image.fromarray(init_image),
        control_image=Image.fromarray(maps["canny"]),
        strength=params.strength,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        controlnet_conditioning_scale=0.8,
        control_guidance_end=0.7,
        generator=torch.Generator().manual_seed(params.seed),
    )
    assert max_difference(ours, expected) <= 1


def test_img2img_keeps_the_init_image_and_strength_sets_how_much(controlled, text, init_image) -> None:
    """Low strength stays close to the init image, high strength departs from it; txt2img ignores it entirely."""
    params = dataclasses.replace(PLAIN_SDXL, identitynet_strength=0.8, adapter_strength=0.8, num_inference_steps=10)
    distance = {
        strength: np.abs(run(controlled, text, dataclasses.replace(params, strength=strength), init=init_image)[0]
                         .astype(int) - init_image.astype(int)).mean()
        for strength in (0.1, 0.5, 1.0)
    }  # fmt: skip
    assert distance[0.1] < distance[0.5] < distance[1.0], distance


def test_a_strength_that_leaves_no_step_or_an_init_image_without_strength_is_refused(controlled, text, init_image):
    with pytest.raises(InvalidParameterError, match="leaves no denoising step"):
        run(controlled, text, dataclasses.replace(PLAIN_SDXL, strength=0.19), init=init_image)  # int(5 x 0.19) = 0
    assert dataclasses.replace(PLAIN_SDXL, strength=0.2).denoising_steps == 1
    with pytest.raises(InvalidParameterError, match="both an init image and a strength"):
        run(controlled, text, PLAIN_SDXL, init=init_image)
    with pytest.raises(InvalidParameterError, match="both an init image and a strength"):
        run(controlled, text, dataclasses.replace(PLAIN_SDXL, strength=0.5))


def test_img2img_jobs_batch_only_with_the_same_remaining_steps() -> None:
    a = dataclasses.replace(PLAIN_SDXL, strength=0.6)
    assert a.batch_key() == dataclasses.replace(a, strength=0.65).batch_key()  # int(5 x 0.6) == int(5 x 0.65) == 3
    assert a.batch_key() != dataclasses.replace(a, strength=0.8).batch_key()
    assert a.batch_key() != PLAIN_SDXL.batch_key() != dataclasses.replace(PLAIN_SDXL, strength=1.0).batch_key()
