"""Model choice in process: LoRAs (both layouts, text-encoder parts), fast modes and single-file bases, each
against diffusers' own pipeline (stock ``StableDiffusionXLPipeline`` with ``load_lora_weights``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline

from deployments.generation.local import InstantIDPipeline
from deployments.instantid.bases import SDXLBase, load_text_encoders, load_unet_and_vae
from deployments.instantid.catalogue import PRESET_LORA_FILES, PRESET_MODES, ModelCatalogue
from deployments.instantid.errors import InvalidParameterError, WeightsError
from deployments.instantid.images import decode_image
from deployments.instantid.loras import architecture_skeletons, check_loras
from deployments.instantid.options import GenerationOptions
from deployments.instantid.params import GenerationParams
from deployments.tiny.weights import ALT_BASE, STYLE_LORAS
from tests.support import astronaut_jpeg, generate_with_params

PROMPT, NEGATIVE, SEED = "a portrait photo", "blurry", 5
# InstantID's own paths off: what remains is SDXL, which the stock pipeline computes too.
SDXL_ONLY = GenerationParams(
    width=64, height=64, seed=SEED, num_inference_steps=3, identitynet_strength=0.0, adapter_strength=0.0
)


def lora_files(weights: Path) -> dict[str, Path]:
    return {path.stem: path for path in (weights / "loras").glob("*.safetensors")}


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return decode_image(astronaut_jpeg())


@pytest.fixture(scope="module")
def pipeline(tiny_layout, tiny_weights) -> InstantIDPipeline:
    return InstantIDPipeline.from_layout(
        tiny_layout, device="cpu", dtype="float32", lora_files=lora_files(tiny_weights)
    )


def ours(pipeline, face, params=SDXL_ONLY, loras=()) -> np.ndarray:
    return generate_with_params(pipeline, face, PROMPT, NEGATIVE, params=params, style="none", loras=loras).images


def stock(weights: Path, params: GenerationParams, lora: str | None = None, scale: float = 1.0, scheduler=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(weights / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora_files(weights)[lora]), adapter_name="chosen")
        pipe.set_adapters(["chosen"], [scale])
    images = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("lora", STYLE_LORAS)
def test_a_lora_equals_diffusers_loading_the_same_file(pipeline, face, tiny_weights, lora) -> None:
    """Both published layouts, with UNet and text-encoder parts, at a non-trivial scale."""
    got = ours(pipeline, face, loras=((lora, 0.7),))
    assert max_difference(got, stock(tiny_weights, SDXL_ONLY, lora, 0.7)) <= 1
    assert max_difference(got, ours(pipeline, face)) > 10  # the LoRA really changed the image


def test_lora_scale_zero_and_no_lora_are_the_base_bit_for_bit(pipeline, face) -> None:
    base = ours(pipeline, face)
    assert np.array_equal(ours(pipeline, face, loras=(("style-peft", 0.0),)), base)
    ours(pipeline, face, loras=(("style-kohya", 1.0), ("lcm-lora-sdxl", 0.5)))  # loaded, then switched off
    assert np.array_equal(ours(pipeline, face), base)


def test_lcm_mode_equals_diffusers_with_the_lcm_lora_and_scheduler(pipeline, face, tiny_weights) -> None:
    preset = PRESET_MODES["lcm"]
    params = GenerationParams.from_options(GenerationOptions(prompt=PROMPT, mode="lcm"), SEED, preset)
    params = dataclasses.replace(params, width=64, height=64, identitynet_strength=0.0, adapter_strength=0.0)
    assert (params.scheduler, params.num_inference_steps, params.guidance_scale) == ("lcm", 10, 0.0)
    assert not params.do_classifier_free_guidance  # guidance 0: no negative pass at all
    got = ours(pipeline, face, params, loras=((preset.lora, preset.lora_scale),))
    expected = stock(tiny_weights, params, preset.lora, preset.lora_scale, scheduler=LCMScheduler)
    assert max_difference(got, expected) <= 1


def test_explicit_fields_override_a_mode_and_defaults_do_not() -> None:
    preset = PRESET_MODES["lightning"]
    defaults = GenerationParams.from_options(GenerationOptions(prompt="x", mode="lightning"), 1, preset)
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.scheduler) == (8, 0.0, "euler_trailing")
    given = GenerationOptions(prompt="x", mode="lightning", num_inference_steps=4, scheduler="euler")
    params = GenerationParams.from_options(given, 1, preset)
    assert (params.num_inference_steps, params.guidance_scale, params.scheduler) == (4, 0.0, "euler")
    # Explicitly setting a default value still counts as explicit.
    assert (
        GenerationParams.from_options(GenerationOptions(prompt="x", guidance_scale=5.0), 1, preset).guidance_scale
        == 5.0
    )


def test_single_file_base_loads_the_tensors_of_its_folder_and_gives_the_same_image(tiny_layout, tiny_weights, face):
    folder = SDXLBase(ALT_BASE, folder=tiny_weights / "bases" / ALT_BASE)
    single = SDXLBase(ALT_BASE, file=tiny_weights / "bases" / f"{ALT_BASE}.safetensors", config=tiny_weights / "sdxl")
    pairs = [*zip(load_unet_and_vae(folder, torch.float32), load_unet_and_vae(single, torch.float32), strict=True)]
    text = zip(load_text_encoders(folder, torch.float32), load_text_encoders(single, torch.float32), strict=True)
    pairs += [(a, b) for a, b in text if isinstance(a, torch.nn.Module)]
    for from_folder, from_file in pairs:
        a, b = from_folder.state_dict(), from_file.state_dict()
        assert set(a) == set(b) and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), type(from_folder).__name__
    images = [
        generate_with_params(
            InstantIDPipeline.from_layout(tiny_layout, device="cpu", dtype="float32", base=base),
            face,
            PROMPT,
            NEGATIVE,
            params=dataclasses.replace(SDXL_ONLY, identitynet_strength=0.8, adapter_strength=0.8),
        ).images
        for base in (folder, single)
    ]
    assert np.array_equal(*images)


def test_catalogue_names_are_checked_with_the_available_ones_listed(tiny_weights) -> None:
    catalogue = ModelCatalogue(presets=["lcm"], loras={"a": {"source": "loras/style-peft.safetensors"}})
    catalogue = catalogue.with_layout(str(tiny_weights / "sdxl"), str(tiny_weights))
    choice, preset = catalogue.choose(None, [("a", None)], "lcm")
    assert (
        choice.base == "sdxl" and choice.loras == (("a", 1.0), ("lcm-lora-sdxl", 1.0)) and preset is PRESET_MODES["lcm"]
    )
    for args, message in (
        (("nope", [], None), "unknown base_model 'nope'; available: sdxl"),
        ((None, [("b", None)], None), "unknown lora 'b'; available: a, lcm-lora-sdxl"),
        ((None, [], "turbo"), "unknown mode 'turbo'; available: lcm"),
        ((None, [("a", None)] * 2, None), "listed twice"),
        ((None, [(f"x{i}", None) for i in range(5)], None), "at most 4"),
    ):
        with pytest.raises(InvalidParameterError, match=message):
            catalogue.choose(*args)
    assert (tiny_weights / "loras" / PRESET_LORA_FILES["lcm-lora-sdxl"]).is_file()


def test_a_lora_for_another_architecture_is_refused_naming_its_file(tiny_weights, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_weights / "loras" / "style-peft.safetensors")
    foreign = tmp_path / "sd15-style.safetensors"
    save_file({k.replace("down_blocks.1", "down_blocks.3"): v for k, v in state.items()}, str(foreign))
    skeletons = architecture_skeletons(tiny_weights / "sdxl", ("unet",))
    with pytest.raises(WeightsError, match=r"LoRA sd15-style \(.*sd15-style\.safetensors\).*not in this model"):
        check_loras({"sd15-style": foreign}, skeletons)
    check_loras(lora_files(tiny_weights), skeletons)  # the shipped ones fit


def test_fused_and_unfused_loras_agree(pipeline, tiny_layout, tiny_weights, face) -> None:
    """Merging the set into the weights (the default) computes what the unfused LoRA layers compute."""
    unfused = InstantIDPipeline.from_layout(
        tiny_layout, device="cpu", dtype="float32", lora_files=lora_files(tiny_weights), fuse_loras=False
    )
    chosen = (("style-peft", 0.7), ("lcm-lora-sdxl", 0.5))
    fused_image, unfused_image = ours(pipeline, face, loras=chosen), ours(unfused, face, loras=chosen)
    assert max_difference(fused_image, unfused_image) <= 1
    assert max_difference(fused_image, ours(pipeline, face)) > 10
    assert np.array_equal(ours(pipeline, face), ours(unfused, face))  # both back to the base, bit for bit
