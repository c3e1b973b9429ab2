"""The hires pass: each first-pass image upscaled (Lanczos) and refined image-to-image at the larger size.

The second pass must equal the reference loop of test_instantid_reference.py (built from diffusers' own pieces,
IdentityNet and face tokens on) run on the Lanczos-upscaled first image, with the keypoint image redrawn from the
scaled keypoints, within 1/255 in fp32. Per-image init images (one hires job for several images) must equal
diffusers' ``StableDiffusionXLImg2ImgPipeline`` given a batch of images. The rest pins sizes, strengths, what is
reported and what is refused.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image
from pydantic import ValidationError

from deployments.generation.messages import FaceResult, PromptRequest
from deployments.generation.plan import GenerationInputs, InputsGiven, PersonGiven, check_inputs
from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.errors import InstantIDError
from deployments.instantid.hires import HiresPass, hires_size
from deployments.instantid.keypoints import draw_keypoint_image
from deployments.instantid.options import GenerationOptions
from deployments.instantid.params import GenerationParams
from deployments.instantid.schedulers import make_scheduler
from tests.support import astronaut_jpeg, astronaut_rgb, generate_with_params, sample_init_image
from tests.test_instantid_reference import NEGATIVE, PROMPT, load_reference, reference_images

FIRST = GenerationParams(width=64, height=64, seed=7, num_inference_steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipeline(tiny_layout):
    from deployments.generation.local import InstantIDPipeline

    return InstantIDPipeline.from_layout(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_weights):
    return load_reference(tiny_weights)


def lanczos(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The test's own upscale: Pillow's Lanczos, as the hires pass promises."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def two_passes(pipeline, params: GenerationParams, hires: HiresPass):
    """The first pass through the pipeline's stages at ``params`` (any size: model-level), then the hires pass over
    it: (first result, face result, hires result)."""
    first = generate_with_params(pipeline, astronaut_rgb(), PROMPT, NEGATIVE, params=params)
    model = ModelChoice(pipeline.catalogue.default_base, ())
    prompt = pipeline.prompt.encode(PromptRequest(PROMPT, NEGATIVE, params.do_classifier_free_guidance, model))
    face = FaceResult(first.condition, {})
    return first.result, face, pipeline.denoise.refine(hires, model, face, prompt, None, first.result)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------------------------------------- the size


def test_the_scaled_size_is_rounded_to_multiples_of_8_and_refused_over_the_limit() -> None:
    assert hires_size(1024, 768, 1.5) == (1536, 1152)
    assert hires_size(264, 256, 1.3) == (344, 336)  # 343.2 and 332.8, to the nearest multiple of 8
    assert hires_size(1024, 1024, 2.0) == (2048, 2048)  # exactly the limit
    for width, height, scale in ((1280, 960, 2.0), (2048, 256, 1.1)):  # too many pixels; a side over 2048
        with pytest.raises(InstantIDError, match="over the size limit") as caught:
            hires_size(width, height, scale)
        assert caught.value.status == 422


# -------------------------------------------------------------------------------------------- model level


@pytest.mark.parametrize(
    "hires", [HiresPass(1.5, 0.6, 5), HiresPass(1.25, 0.8, 4)], ids=["1.5x-strength-0.6", "1.25x-strength-0.8"]
)
def test_the_hires_pass_equals_the_reference_loop_on_the_upscaled_first_image(pipeline, reference, hires) -> None:
    first, face, out = two_passes(pipeline, FIRST, hires)
    width, height = hires.size(64, 64)
    assert out.images.shape == (1, height, width, 3) and (out.params.width, out.params.height) == (width, height)

    condition = face.condition
    scale = np.array([width / 64, height / 64], dtype=np.float32)
    keypoint_image = draw_keypoint_image(condition.keypoints * scale, width, height)
    second = dataclasses.replace(FIRST, width=width, height=height, num_inference_steps=hires.steps)
    expected = reference_images(
        reference,
        dataclasses.replace(second, strength=hires.strength),
        condition.embedding,
        keypoint_image,
        condition.box * np.tile(scale, 2),
        init_image=lanczos(first.images[0], width, height),
    )
    assert max_difference(out.images, expected) <= 1
    assert {"denoise", "denoise_queue", "denoise_hires", "denoise_hires_queue"} <= set(out.timings)
    assert out.timings["denoise_hires"].start >= out.timings["denoise"].end  # one pass after the other


def test_a_small_strength_stays_close_to_the_upscaled_first_pass_and_a_larger_one_departs(pipeline, monkeypatch):
    """Measured on the latents the hires pass decodes, against the VAE encoding (posterior mean) of the upscaled
    first-pass images: the tiny random VAE keeps almost nothing of an image (its latents' mean magnitude is about
    0.04, its posterior's standard deviation about 0.12), so pixel distances say nothing here. Strength 0.1 ends
    within the posterior's own noise of the start; 0.5 and 1.0 depart roughly 10x and 70x as far (measured 0.10,
    1.04 and 7.3)."""
    denoiser = pipeline.denoise.denoiser
    decoded: list[torch.Tensor] = []
    decode = denoiser.decode
    monkeypatch.setattr(denoiser, "decode", lambda latents: decoded.append(latents.clone()) or decode(latents))
    params = dataclasses.replace(FIRST, num_inference_steps=10, num_images=2)
    distance = {}
    for strength in (0.1, 0.5, 1.0):
        first, _, out = two_passes(pipeline, params, HiresPass(1.5, strength, 10))
        assert out.images.shape == (2, 96, 96, 3)
        upscaled = np.stack([lanczos(image, 96, 96) for image in first.images])
        pixels = torch.from_numpy(upscaled).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)
        with torch.no_grad():
            posterior = denoiser.vae.encode(pixels).latent_dist
        start, noise = (t * denoiser.vae.config.scaling_factor for t in (posterior.mean, posterior.std))
        distance[strength] = float((decoded[-1] - start).abs().mean())
        if strength == 0.1:
            assert distance[strength] < 1.5 * float(noise.mean()), (distance, float(noise.mean()))
    print("mean |hires latents - upscaled first pass's latents| by strength:", distance)
    assert distance[0.5] > 5 * distance[0.1] and distance[1.0] > 5 * distance[0.5], distance


def test_each_image_gets_its_own_upscaled_first_pass_image_as_its_start(pipeline) -> None:
    """One hires job for two images: its init images are the two first-pass images, each upscaled (Lanczos); that
    the denoiser starts each image from its own is pinned against diffusers below."""
    from deployments.generation.hires_stage import hires_inputs

    params = dataclasses.replace(FIRST, num_images=2)
    first = generate_with_params(pipeline, astronaut_rgb(), PROMPT, NEGATIVE, params=params)
    assert max_difference(first.images[0], first.images[1]) > 20  # the first pass's two images differ
    hires = HiresPass(1.5, 0.3, 10)
    second, face, controls = hires_inputs(hires, first.result, FaceResult(first.condition, {}), None)
    assert (second.width, second.height, second.num_images, second.strength) == (96, 96, 2, 0.3)
    init = controls.inputs.init_image
    assert init.shape == (2, 96, 96, 3)
    for i in range(2):
        assert np.array_equal(init[i], lanczos(first.images[i], 96, 96))
    assert np.allclose(face.condition.keypoints, first.condition.keypoints * 1.5)
    assert np.array_equal(face.condition.embedding, first.condition.embedding)  # the same identity


def test_per_image_init_images_equal_diffusers_img2img_given_a_batch_of_images(denoiser, prompt_encoder, tiny_weights):
    """Plain SDXL (IdentityNet and face tokens at 0): one job whose two images start from their own init images
    equals the stock pipeline given the two images (and the prompt twice) with one generator."""
    params = GenerationParams(
        width=64, height=64, seed=5, num_inference_steps=5, guidance_scale=5.0, identitynet_strength=0.0,
        adapter_strength=0.0, strength=0.6, num_images=2,
    )  # fmt: skip
    inits = np.stack([sample_init_image(64), np.ascontiguousarray(sample_init_image(64)[::-1])])
    prompt = prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0]
    keypoints = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
    job = DenoiseJob(params, np.zeros(512, np.float32), keypoints, np.array([12, 10, 52, 56]), prompt, init_image=inits)
    ours = denoiser.generate([job])[0]

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_weights / "sdxl")
    pipe.scheduler = make_scheduler(params.scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        [PROMPT] * 2,
        negative_prompt=[NEGATIVE] * 2,
        image=[Image.fromarray(image) for image in inits],
        strength=params.strength,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    ).images
    assert max_difference(ours, (stock * 255).round().astype(np.uint8)) <= 1


# ------------------------------------------------------------------------------------------ request level

REQUEST = {"prompt": "an astronaut", "style": "none", "seed": 3, "num_inference_steps": 2}


def test_a_request_with_hires_returns_the_scaled_size_and_reports_the_pass(pipeline) -> None:
    options = GenerationOptions(**REQUEST, width=256, height=256, hires={"scale": 1.25, "strength": 0.5})
    output = pipeline(options, GenerationInputs(faces=(astronaut_jpeg(),)))
    assert output.images.shape == (1, 320, 320, 3)
    assert (output.params.width, output.params.height) == (320, 320)
    assert output.plan.effective_parameters()["hires"] == {
        "scale": 1.25,
        "strength": 0.5,
        "steps": 2,  # the request's num_inference_steps
        "denoising_steps": 1,
    }
    timings = output.result.timings
    assert timings["denoise_hires"].start >= timings["denoise"].end
    assert output.result.replicas.keys() >= {"denoiser", "denoiser_hires"}


def test_the_face_stage_refuses_a_scale_that_takes_its_chosen_size_over_the_limit(pipeline, monkeypatch) -> None:
    """Without width/height the face stage picks the size (long side 1280 here): 2x would be 2560, refused before
    the first pass runs."""

    def never(*args, **kwargs):
        raise AssertionError("the denoiser ran")

    monkeypatch.setattr(pipeline.denoise.denoiser, "generate", never)
    with pytest.raises(InstantIDError, match="over the size limit") as caught:
        options = GenerationOptions(**REQUEST, hires={"scale": 2.0, "strength": 0.5})
        pipeline(options, GenerationInputs(faces=(astronaut_jpeg(),)))
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("hires", "message"),
    [({"scale": 2.5}, "less than or equal to 2"), ({"scale": 0.9}, "greater than or equal to 1"), ({}, "scale")],
)
def test_a_scale_out_of_range_is_refused_by_the_schema(hires, message) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationOptions(prompt="x", hires=hires)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 2048, "height": 2048, "hires": {"scale": 1.5}}, "over the size limit"),
        ({"hires": {"scale": 1.5, "strength": 0.05}, "num_inference_steps": 5}, "leaves no denoising step"),
    ],
)
def test_the_plan_refuses_a_hires_pass_over_the_limit_or_without_a_step(pipeline, fields, message) -> None:
    with pytest.raises(InstantIDError, match=message) as caught:
        pipeline.plan(GenerationOptions(prompt="x", **fields), GenerationInputs(faces=(astronaut_jpeg(),)))
    assert caught.value.status == 422


def test_hires_is_refused_with_an_edit_or_several_people() -> None:
    options = GenerationOptions(prompt="x", hires={"scale": 1.5})
    with pytest.raises(InstantIDError, match="not available with target_image") as caught:
        check_inputs(options, InputsGiven(face_photos=1, target=True))
    assert caught.value.status == 422
    people = (PersonGiven(1), PersonGiven(1))
    with pytest.raises(InstantIDError, match="not available with identities"):
        check_inputs(options, InputsGiven(people=people))


def test_a_multipart_form_carries_hires_as_json() -> None:
    assert GenerationOptions.model_validate({"prompt": "x", "hires": '{"scale": 1.5}'}).hires.scale == 1.5
    with pytest.raises(ValidationError, match="hires must be a JSON object"):
        GenerationOptions.model_validate({"prompt": "x", "hires": "scale=1.5"})


def test_the_cli_flag_is_scale_and_optional_strength(tmp_path) -> None:
    from serve.tools import CliError
    from serve.tools.generate import add_generate_parser, hires_item
    from serve.tools.remote import request_body

    assert hires_item("1.5") == {"scale": 1.5}
    assert hires_item("1.5:0.4") == {"scale": 1.5, "strength": 0.4}
    with pytest.raises(CliError, match="SCALE"):
        hires_item("big")
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers())
    face = tmp_path / "face.jpg"
    face.write_bytes(astronaut_jpeg())
    args = parser.parse_args(
        ["generate", "--url", "http://x", "--face", str(face), "--prompt", "p", "--hires", "1.5:0.3", "--out", "o.png"]
    )
    assert request_body(args)["hires"] == {"scale": 1.5, "strength": 0.3}


# ------------------------------------------------------------------------------------------------ served


@pytest.mark.slow
def test_a_hires_job_over_http_stores_the_scaled_image_and_reports_the_hires_stage(serve_stack) -> None:
    import httpx

    from tests.support import stored_pixels
    from tests.test_jobs import events, submit

    accepted = submit(serve_stack.url, hires={"scale": 1.5, "strength": 0.5}, num_inference_steps=4)
    stream = events(serve_stack.url, accepted["id"])
    assert stream[-1][1] == "succeeded", stream[-1]
    stages = [(data["stage"], data["phase"]) for _, kind, data in stream if kind == "stage"]
    assert stages.index(("denoise", "end")) < stages.index(("hires", "start")) < stages.index(("hires", "end"))
    result = stream[-1][2]["result"]
    assert stored_pixels(serve_stack.s3.client(), result["images"][0]["uri"]).shape == (384, 384, 3)
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (384, 384)
    assert result["parameters"]["hires"] == {"scale": 1.5, "strength": 0.5, "steps": 4, "denoising_steps": 2}
    assert result["timings"]["denoise_hires"]["start"] >= result["timings"]["denoise"]["end"]
    meta = httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}", timeout=30).json()
    assert meta["parameters"]["hires"] == result["parameters"]["hires"]
