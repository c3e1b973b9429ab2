"""Editing a photo: the masked latent blend against diffusers' own inpainting pipeline, and the mask, crop, colour
match and paste-back around it.

With IdentityNet and the face adapter at strength 0 our loop is plain SDXL, so an inpainting job must equal diffusers'
stock ``StableDiffusionXLInpaintPipeline`` (4-channel UNet) on the same tiny files, crop, mask, strength and seed,
within 1/255.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from PIL import Image

from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.editing import (
    PreparedEdit,
    colour_matched,
    colour_ring,
    edit_region,
    face_mask,
    feathered,
    uploaded_mask,
)
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.images import decode_image
from deployments.instantid.params import GenerationParams
from deployments.instantid.schedulers import make_scheduler
from tests.support import astronaut_jpeg, encode_image, group_photo_jpeg, sample_init_image

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
PROMPT, NEGATIVE = "a portrait photo", "blurry"
SIZE = 64
PLAIN_SDXL = GenerationParams(
    width=SIZE, height=SIZE, seed=7, num_inference_steps=5, guidance_scale=5.0, identitynet_strength=0.0,
    adapter_strength=0.0, strength=0.9,
)  # fmt: skip


def centre_mask(size: int = SIZE) -> np.ndarray:
    """A repaint mask (uint8, white repaints) over the middle, not aligned to the 8-pixel latent grid."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[13:45, 19:50] = 255
    return mask


@pytest.fixture(scope="module")
def text(prompt_encoder):
    return {
        True: prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0],
        False: prompt_encoder.encode([PROMPT], [None], do_classifier_free_guidance=False)[0],
    }


def run_inpaint(denoiser, text, params: GenerationParams, init: np.ndarray, mask: np.ndarray) -> np.ndarray:
    embedding = np.random.default_rng(0).normal(size=512).astype(np.float32) * 20
    prompt = text[params.do_classifier_free_guidance]
    job = DenoiseJob(params, embedding, KEYPOINTS, BOX, prompt, init_image=init, inpaint_mask=mask)
    return denoiser.generate([job])[0]


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


INPAINT_CASES = {
    "euler": dict(scheduler="euler"),
    "euler_a-stochastic-two-images": dict(scheduler="euler_a", strength=0.75, num_images=2),
    "dpmpp_2m_karras-full-strength": dict(scheduler="dpmpp_2m_karras", strength=1.0),
    "lcm-no-cfg": dict(scheduler="lcm", strength=0.7, guidance_scale=1.0, num_inference_steps=4),
}


def diffusers_inpaint(folder, params: GenerationParams, init: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """diffusers' own ``StableDiffusionXLInpaintPipeline`` on the SDXL folder ``folder``: uint8 images."""
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    pipe.scheduler = make_scheduler(params.scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        negative_prompt=NEGATIVE if params.guidance_scale > 1 else None,
        image=Image.fromarray(init),
        mask_image=Image.fromarray(mask),
        height=SIZE,
        width=SIZE,
        strength=params.strength,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    ).images
    expected = (expected * 255).round().astype(np.uint8)
    return expected


@pytest.mark.parametrize("case", INPAINT_CASES.values(), ids=INPAINT_CASES.keys())
def test_inpainting_equals_diffusers_sdxl_inpaint_pipeline(controlled_denoiser, text, tiny_weights, case) -> None:
    params = dataclasses.replace(PLAIN_SDXL, **case)
    init, mask = sample_init_image(SIZE), centre_mask()
    ours = run_inpaint(controlled_denoiser, text, params, init, mask)
    expected = diffusers_inpaint(tiny_weights / "sdxl", params, init, mask)
    assert max_difference(ours, expected) <= 1


@pytest.fixture(scope="module")
def inpainting_denoiser(tiny_layout, tiny_weights):
    """The tiny denoiser on the 9-channel inpainting base (IdentityNet and the face adapter as on any base)."""
    from deployments.instantid.bases import SDXLBase
    from deployments.instantid.loading import load_denoiser
    from deployments.tiny.weights import INPAINT_BASE

    base = SDXLBase(INPAINT_BASE, folder=tiny_weights / "bases" / INPAINT_BASE)
    return load_denoiser(tiny_layout, device="cpu", dtype="float32", base=base)


@pytest.mark.parametrize("case", INPAINT_CASES.values(), ids=INPAINT_CASES.keys())
def test_a_9_channel_inpainting_base_equals_diffusers_sdxl_inpaint_pipeline(
    inpainting_denoiser, text, tiny_weights, case
) -> None:
    """The UNet reads the mask and the masked image's latents as its extra channels at every step, and nothing is
    blended: diffusers' pipeline on the same folder, crop, mask, strength and seed, within 1/255."""
    from deployments.tiny.weights import INPAINT_BASE

    assert inpainting_denoiser.inpainting and inpainting_denoiser.unet.config.in_channels == 9
    params = dataclasses.replace(PLAIN_SDXL, **case)
    init, mask = sample_init_image(SIZE), centre_mask()
    ours = run_inpaint(inpainting_denoiser, text, params, init, mask)
    expected = diffusers_inpaint(tiny_weights / "bases" / INPAINT_BASE, params, init, mask)
    assert max_difference(ours, expected) <= 1


def test_a_9_channel_inpainting_base_only_edits(inpainting_denoiser, text) -> None:
    job = DenoiseJob(
        PLAIN_SDXL, np.zeros(512, np.float32), KEYPOINTS, BOX, text[True], init_image=sample_init_image(SIZE)
    )
    with pytest.raises(InvalidParameterError, match="inpainting model"):
        inpainting_denoiser.generate([job])


def test_the_blend_keeps_the_known_region_and_repaints_the_mask(controlled_denoiser, text) -> None:
    """Outside the mask the decoded crop stays near the init image (the VAE round trip aside); inside it departs."""
    init, mask = sample_init_image(SIZE), centre_mask()
    ours = run_inpaint(controlled_denoiser, text, PLAIN_SDXL, init, mask)[0].astype(int)
    plain = dataclasses.replace(PLAIN_SDXL)
    job = DenoiseJob(plain, np.zeros(512, np.float32), KEYPOINTS, BOX, text[True], init_image=init)
    img2img = controlled_denoiser.generate([job])[0][0].astype(int)
    outside = centre_mask() == 0
    assert np.abs(ours - img2img)[~outside].mean() < np.abs(ours - img2img)[outside].mean() * 4  # the mask is free
    assert np.abs(ours - init.astype(int))[outside].mean() < np.abs(img2img - init.astype(int))[outside].mean()


def test_an_inpainting_mask_needs_an_init_image_of_its_size(controlled_denoiser, text) -> None:
    with pytest.raises(InvalidParameterError, match="inpainting mask"):
        run_inpaint(controlled_denoiser, text, PLAIN_SDXL, sample_init_image(SIZE), centre_mask()[:32])


# --------------------------------------------------------------------------------------- mask, crop, paste-back


def test_face_mask_grows_the_box_by_the_padding_and_clips_to_the_image() -> None:
    mask = face_mask(np.array([40, 20, 60, 60]), 100, 80, 0.5)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (30, 70, 0, 80)


def test_an_uploaded_mask_must_be_the_targets_size_and_white_repaints() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10:20, 5:15] = 255
    rgb[30:, 50:] = 127  # below the 0.5 threshold: kept
    mask = uploaded_mask(rgb, 60, 40)
    assert mask.sum() == 100 and mask[10:20, 5:15].all()
    with pytest.raises(InvalidParameterError, match="must match"):
        uploaded_mask(rgb, 61, 40)
    with pytest.raises(InvalidParameterError, match="no white"):
        uploaded_mask(np.zeros((40, 60, 3), np.uint8), 60, 40)


def test_the_feather_lies_inside_the_mask() -> None:
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True
    alpha = feathered(mask, 5)
    assert (alpha[~mask] == 0).all() and alpha[25, 25] == 1.0 and 0 < alpha[10, 25] < 0.5


def test_the_crop_holds_the_mask_with_context_at_the_requested_resolution() -> None:
    mask = np.zeros((600, 900), bool)
    mask[200:300, 400:480] = True
    region = edit_region(mask, 1024)
    left, top, right, bottom = region.box
    assert left < 400 and top < 200 and right > 480 and bottom > 300
    assert max(region.width, region.height) == 1024 and region.width % 8 == 0 and region.height % 8 == 0
    points = region.transform().apply_points(np.array([[left, top], [right, bottom]], np.float32))
    assert np.allclose(points, [[0, 0], [region.width, region.height]])


def test_colour_match_gives_the_generated_ring_the_targets_mean_and_spread() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(60, 200, size=(40, 40, 3)).astype(np.uint8)
    generated = target.astype(np.float32) * 0.5 + np.array([40.0, -10.0, 5.0])  # a VAE-like tint and contrast loss
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    ring = colour_ring(mask, 6)
    matched = colour_matched(generated, target, ring)
    for c in range(3):
        assert matched[..., c][ring].mean() == pytest.approx(target[..., c][ring].mean(), abs=1e-3)
        assert matched[..., c][ring].std() == pytest.approx(target[..., c][ring].std(), abs=1e-3)
    assert np.abs(matched - target)[mask].max() < 1e-3  # the tint was the whole difference: undone inside too


def test_paste_back_keeps_every_pixel_outside_the_mask_and_repaints_inside() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, size=(120, 160, 3)).astype(np.uint8)
    mask = face_mask(np.array([60, 40, 100, 90]), 160, 120, 0.2)
    edit = PreparedEdit.make(target, mask, blur_px=4, resolution=128)
    assert edit.init_image.shape == (edit.region.height, edit.region.width, 3)
    assert set(np.unique(edit.mask_image)) == {0, 255}
    generated = np.full_like(edit.init_image, 255)
    generated[..., 1] = 0
    out = edit.paste(generated)
    assert out.shape == target.shape
    assert np.array_equal(out[~mask], target[~mask])  # bit for bit
    core = feathered(mask, 4) == 1.0
    assert np.abs(out[core].astype(int) - target[core].astype(int)).mean() > 20


# ------------------------------------------------------------------------------------- through the local pipeline

EDIT_OPTIONS = {"prompt": "an astronaut", "num_inference_steps": 2, "style": "none", "seed": 3, "edit_resolution": 256}


@pytest.fixture(scope="module")
def pipeline(tiny_weights):
    from deployments.generation.local import InstantIDPipeline
    from deployments.instantid.weights import WeightsLayout

    return InstantIDPipeline.from_layout(WeightsLayout.from_root(tiny_weights), device="cpu", dtype="float32")


def edit(pipeline, target: bytes, mask: bytes | None = None, **options):
    from deployments.generation.plan import GenerationInputs
    from deployments.instantid.options import GenerationOptions

    inputs = GenerationInputs(faces=(astronaut_jpeg(),), target=target, mask=mask)
    return pipeline(GenerationOptions(**{**EDIT_OPTIONS, **options}), inputs)


def group_photo_rgb() -> np.ndarray:
    return decode_image(group_photo_jpeg())


def test_an_edit_returns_the_target_with_only_the_face_region_changed(pipeline) -> None:
    target_bytes = encode_image(group_photo_rgb(), "PNG")
    target = decode_image(target_bytes)
    out = edit(pipeline, target_bytes, mask_blur=6)
    assert out.images.shape == (1, *target.shape)
    assert (out.params.width, out.params.height) == (target.shape[1], target.shape[0])
    face = pipeline.face.analyzer.detect(target)[0]
    mask = face_mask(face.bbox, target.shape[1], target.shape[0], 0.35)
    assert np.array_equal(out.images[0][~mask], target[~mask])
    assert np.abs(out.images[0][mask].astype(int) - target[mask].astype(int)).mean() > 2
    assert out.result.faces[-1].source == "target"


def test_an_uploaded_mask_chooses_what_is_repainted(pipeline) -> None:
    target = decode_image(encode_image(group_photo_rgb(), "PNG"))
    mask = np.zeros_like(target)
    mask[40:120, 60:200] = 255
    out = edit(pipeline, encode_image(target, "PNG"), encode_image(mask, "PNG"))
    inside = mask[..., 0] > 0
    assert np.array_equal(out.images[0][~inside], target[~inside])
    assert np.abs(out.images[0][inside].astype(int) - target[inside].astype(int)).mean() > 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "blank"}, "no face detected in the target image"),
        ({"target_face_index": 40}, "target_face_index 40 is out of range"),
        ({"mask": "small"}, "must match"),
    ],
)
def test_edits_that_cannot_run_are_refused(pipeline, change, message) -> None:
    from deployments.instantid.errors import InstantIDError

    change = dict(change)
    target = encode_image(group_photo_rgb(), "PNG")
    if change.pop("target", None) == "blank":
        target = encode_image(np.full((200, 300, 3), 128, np.uint8), "PNG")
    mask = encode_image(np.full((10, 10, 3), 255, np.uint8), "PNG") if change.pop("mask", None) else None
    with pytest.raises(InstantIDError, match=message) as caught:
        edit(pipeline, target, mask, **change)
    assert caught.value.status == 422


def test_edit_fields_need_a_target_and_an_edit_takes_no_size_or_init_image() -> None:
    from deployments.generation.plan import InputsGiven, check_inputs
    from deployments.instantid.options import GenerationOptions

    with pytest.raises(InvalidParameterError, match="are for editing"):
        check_inputs(GenerationOptions(prompt="x", edit_strength=0.5), InputsGiven(face_photos=1))
    with pytest.raises(InvalidParameterError, match="mask_image is for editing"):
        check_inputs(GenerationOptions(prompt="x"), InputsGiven(face_photos=1, mask=True))
    with pytest.raises(InvalidParameterError, match="target's size"):
        check_inputs(GenerationOptions(prompt="x", width=512, height=512), InputsGiven(face_photos=1, target=True))
    with pytest.raises(InvalidParameterError, match="not both"):
        check_inputs(GenerationOptions(prompt="x"), InputsGiven(face_photos=1, target=True, init=True))


def test_a_plan_on_an_inpainting_base_needs_a_target() -> None:
    from deployments.generation.plan import InputsGiven, plan_generation
    from deployments.instantid.catalogue import BaseModelSpec, ModelCatalogue
    from deployments.instantid.options import GenerationOptions

    catalogue = ModelCatalogue(
        base_models={"sdxl": BaseModelSpec(source="a"), "fill": BaseModelSpec(source="b", inpainting=True)}
    )
    options = GenerationOptions(prompt="x", base_model="fill")
    with pytest.raises(InvalidParameterError, match="'fill' is an inpainting model"):
        plan_generation(options, InputsGiven(face_photos=1), catalogue, [])
    assert plan_generation(options, InputsGiven(face_photos=1, target=True), catalogue, []).model.base == "fill"
