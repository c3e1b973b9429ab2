"""InstantID's wiring at non-zero strengths, against a reference loop built from diffusers' own classes.

The reference below states the published method in the open, one diffusers piece at a time:

- text: the stock ``StableDiffusionXLPipeline.encode_prompt``;
- face tokens and face-token attention: diffusers' IP-Adapter machinery (``load_ip_adapter`` reads our
  ``ip-adapter.bin`` into an ``IPAdapterPlusImageProjection`` and ``IPAdapterAttnProcessor2_0`` layers), the
  negative tokens made from a ZERO embedding, rows ordered negatives then positives;
- IdentityNet: a stock ``ControlNetModel`` called with the face tokens (not the text) as
  ``encoder_hidden_states``, the keypoint image in [0, 1], its strength as ``conditioning_scale`` and the
  control window as diffusers' SDXL ControlNet pipeline applies it;
- "enhance non-face region": every IdentityNet residual times the face-box mask resized (bilinear) to the
  residual, and the face-token attention term times the mask resized (nearest) to each attention grid;
- extra ControlNets (pose, canny, depth) as the published full pipeline runs them: stock ``ControlNetModel``s
  given the TEXT embeddings and their own map, each with its strength x its own control window as
  ``conditioning_scale``; the face-region mask weighs IdentityNet only; all residuals summed;
- image-to-image: diffusers' own ``StableDiffusionXLImg2ImgPipeline.get_timesteps`` and ``prepare_latents`` (the
  init image VAE-encoded and noised to the first kept timestep), the control windows counted over the steps that
  run, as the published img2img pipeline counts them;
- inpainting (an edit's crop): diffusers' own ``StableDiffusionXLInpaintPipeline`` pieces (``get_timesteps``,
  ``prepare_latents``, the mask processor and ``prepare_mask_latents``) and, after every step, its blend for a
  4-channel UNet: the latents outside the mask replaced by the init image's, re-noised to the next timestep;
- explicit classifier-free guidance, the scheduler built from the SDXL folder, the VAE decode and rounding of
  diffusers' image processor.

Ours must give the same pixels within 1/255. A second test pins what IdentityNet and the UNet receive per batch
row with forward hooks, and a third that the tiny weights make every InstantID input visible in the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from deployments.generation.local import InstantIDPipeline
from deployments.instantid.denoiser import DenoiseJob
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import CropTransform, draw_keypoint_image
from deployments.instantid.params import ControlSetting, GenerationParams
from deployments.instantid.schedulers import make_scheduler
from tests.support import (
    astronaut_jpeg,
    generate_with_params,
    group_photo_jpeg,
    sample_control_maps,
    sample_init_image,
)

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
OTHER_KEYPOINTS = np.array([[12, 30], [30, 28], [20, 40], [14, 52], [28, 52]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
PROMPT, NEGATIVE = "a portrait photo", "blurry"


def identity(seed: int) -> np.ndarray:
    """A raw (un-normalised) 512-d identity vector of a real embedding's size."""
    return np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20


@dataclass
class Reference:
    """The stock pieces, loaded from the same tiny files ours loads."""

    pipe: StableDiffusionXLPipeline
    controlnet: ControlNetModel
    processors: dict[str, IPAdapterAttnProcessor2_0]


class RegionMaskedFaceAttention:
    """diffusers' IP-Adapter processor with InstantID's face-region mask written out.

    The face-token term is multiplied by the mask resized (nearest) to the layer's grid. The processor's output
    projection is affine, so ``to_out(text + m * face) = to_out(text) + m * (to_out(text + face) - to_out(text))``:
    the processor is run with its scale and with scale 0, and the two results are mixed by the mask.
    """

    def __init__(self, inner: IPAdapterAttnProcessor2_0) -> None:
        self.inner = inner
        self.mask: torch.Tensor | None = None  # (rows, 1, H, W) at image resolution

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        full = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.mask is None:
            return full
        scale = self.inner.scale
        self.inner.scale = [0.0] * len(scale)
        text_only = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.inner.scale = scale
        height, width = self.mask.shape[-2:]
        factor = (height * width / hidden_states.shape[1]) ** 0.5
        grid = F.interpolate(self.mask, size=(round(height / factor), round(width / factor)), mode="nearest")
        return text_only + grid.flatten(1)[:, :, None] * (full - text_only)


def load_reference(tiny_weights: Path) -> Reference:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_weights / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(tiny_weights / "instantid"), subfolder="", weight_name="ip-adapter.bin", image_encoder_folder=None
    )
    processors = dict(pipe.unet.attn_processors)
    wrapped = {
        name: RegionMaskedFaceAttention(p) if isinstance(p, IPAdapterAttnProcessor2_0) else p
        for name, p in processors.items()
    }
    pipe.unet.set_attn_processor(dict(wrapped))
    masked = {name: p for name, p in wrapped.items() if isinstance(p, RegionMaskedFaceAttention)}
    assert set(masked) == {
        name for name in processors if name.endswith("attn2.processor")
    }  # every UNet cross-attention
    controlnet = ControlNetModel.from_pretrained(tiny_weights / "instantid" / "ControlNetModel").eval()
    return Reference(pipe, controlnet, masked)


@pytest.fixture(scope="module")
def reference(tiny_weights: Path) -> Reference:
    return load_reference(tiny_weights)


def control_window_keep(step: int, steps: int, start: float, end: float) -> float:
    """diffusers' SDXL ControlNet pipeline: the ControlNet is off at step i when i/N < start or (i+1)/N > end."""
    return 0.0 if (step / steps < start or (step + 1) / steps > end) else 1.0


def face_box_mask(box: np.ndarray, width: int, height: int) -> torch.Tensor:
    """1 inside the face box of the keypoint source (rows int(y1):int(y2), columns int(x1):int(x2)), (1, 1, H, W)."""
    mask = torch.zeros(1, 1, height, width)
    x1, y1, x2, y2 = (int(max(0.0, float(v))) for v in box)
    mask[..., y1:y2, x1:x2] = 1.0
    return mask


@torch.no_grad()
def reference_images(
    ref: Reference,
    params: GenerationParams,
    embedding: np.ndarray,
    keypoint_image: np.ndarray,
    box: np.ndarray,
    negative_prompt: str | None = NEGATIVE,
    extra: dict[str, tuple[ControlNetModel, np.ndarray]] | None = None,
    init_image: np.ndarray | None = None,
    inpaint_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``extra``: name -> (stock ControlNet, map) for each of ``params.controlnets``. ``inpaint_mask`` (with
    ``init_image``; white repaints): the start and the per-step blend of diffusers' SDXL inpainting pipeline for a
    4-channel UNet, by that pipeline's own methods."""
    pipe, controlnet = ref.pipe, ref.controlnet
    n, height, width = params.num_images, params.height, params.width
    assert params.guidance_scale > 1.0  # these references always run classifier-free guidance

    # Text (stock SDXL), rows: n negatives then n positives.
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, negative_prompt=negative_prompt, num_images_per_prompt=n, do_classifier_free_guidance=True
    )
    text = torch.cat([negative_embeds, embeds])
    text_pooled = torch.cat([negative_pooled, pooled])
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(2 * n, 1)
    added = {"text_embeds": text_pooled, "time_ids": time_ids}

    # Identity: the raw embedding for positive rows, a zero embedding for negative rows, through diffusers'
    # IPAdapterPlusImageProjection (the published resampler), once for IdentityNet and inside the UNet.
    raw = torch.tensor(np.asarray(embedding, dtype=np.float32))[None, None, None].repeat(
        n, 1, 1, 1
    )  # (n, 1 image, 1 token, 512)
    image_embeds = [torch.cat([torch.zeros_like(raw), raw])]
    face_tokens = pipe.unet.encoder_hid_proj(image_embeds)[0][:, 0]  # (2n, 16, 2048)

    keypoints = torch.from_numpy(keypoint_image).float().div(255).permute(2, 0, 1)[None].repeat(2 * n, 1, 1, 1)
    mask = face_box_mask(box, width, height).repeat(2 * n, 1, 1, 1) if params.enhance_face_region else None
    for processor in ref.processors.values():  # (pipe.set_ip_adapter_scale does not see through the wrapper)
        processor.inner.scale = [params.adapter_strength]
        processor.mask = mask

    extra_inputs = [(*extra[c.name], c) for c in params.controlnets] if extra else []
    scheduler = make_scheduler(params.scheduler, dict(pipe.scheduler.config))
    scheduler.set_timesteps(params.num_inference_steps)
    generator = torch.Generator().manual_seed(params.seed)
    blend = None
    if init_image is None:
        timesteps = scheduler.timesteps
        latents = randn_tensor((n, 4, height // 8, width // 8), generator=generator, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
    elif inpaint_mask is not None:
        inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
        inpaint.scheduler = scheduler
        timesteps, _ = inpaint.get_timesteps(params.num_inference_steps, params.strength, "cpu")
        pixels = inpaint.image_processor.preprocess(Image.fromarray(init_image))
        latents, noise, known = inpaint.prepare_latents(
            n, 4, height, width, torch.float32, "cpu", generator, image=pixels, timestep=timesteps[:1].repeat(n),
            is_strength_max=params.strength == 1.0, return_noise=True, return_image_latents=True,
        )  # fmt: skip
        repaint = inpaint.mask_processor.preprocess(Image.fromarray(inpaint_mask))
        repaint_latents, _ = inpaint.prepare_mask_latents(
            repaint, pixels * (repaint < 0.5), n, height, width, torch.float32, "cpu", generator, False
        )
        blend = (known, noise, repaint_latents)
    else:
        img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
        img2img.scheduler = scheduler
        timesteps, _ = img2img.get_timesteps(params.num_inference_steps, params.strength, "cpu")
        pixels = img2img.image_processor.preprocess(Image.fromarray(init_image))
        latents = img2img.prepare_latents(pixels, timesteps[:1].repeat(n), 1, n, torch.float32, "cpu", generator)
    step_kwargs = {"generator": generator} if params.scheduler == "euler_a" else {}

    for i, t in enumerate(timesteps):
        sample = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        keep = control_window_keep(i, len(timesteps), params.control_guidance_start, params.control_guidance_end)
        down, mid = controlnet(
            sample,
            t,
            encoder_hidden_states=face_tokens,
            controlnet_cond=keypoints,
            conditioning_scale=params.identitynet_strength * keep,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if mask is not None:
            down = [r * F.interpolate(mask, size=r.shape[-2:], mode="bilinear") for r in down]
            mid = mid * F.interpolate(mask, size=mid.shape[-2:], mode="bilinear")
        every_down, every_mid = [down], [mid]
        for net, control_map, setting in extra_inputs:
            image = torch.from_numpy(control_map).float().div(255).permute(2, 0, 1)[None].repeat(2 * n, 1, 1, 1)
            net_keep = control_window_keep(i, len(timesteps), setting.start, setting.end)
            net_down, net_mid = net(
                sample,
                t,
                encoder_hidden_states=text,
                controlnet_cond=image,
                conditioning_scale=setting.strength * net_keep,
                added_cond_kwargs=added,
                return_dict=False,
            )
            every_down.append(net_down)
            every_mid.append(net_mid)
        down = [torch.stack(parts).sum(dim=0) for parts in zip(*every_down, strict=True)]
        mid = torch.stack(every_mid).sum(dim=0)
        noise = pipe.unet(
            sample,
            t,
            encoder_hidden_states=text,
            added_cond_kwargs={**added, "image_embeds": image_embeds},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        uncond, cond = noise.chunk(2)
        noise = uncond + params.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        if blend is not None:  # the known region, re-noised to the next timestep (the inpainting pipeline's blend)
            known, start_noise, repaint_latents = blend
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(known, start_noise, timesteps[i + 1 : i + 2])
            latents = (1 - repaint_latents) * known + repaint_latents * latents

    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    return (images * 255).round().astype(np.uint8)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=4, guidance_scale=5.0)
CASES = {
    "published-defaults": BASE,
    "no-face-region-mask": dataclasses.replace(BASE, enhance_face_region=False),
    "other-strengths-two-images": dataclasses.replace(
        BASE, identitynet_strength=0.45, adapter_strength=1.3, num_images=2, seed=3
    ),
    "control-window-ancestral": dataclasses.replace(
        BASE, control_guidance_start=0.25, control_guidance_end=0.75, scheduler="euler_a", width=80, seed=11
    ),
}


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_denoiser_equals_the_reference_loop(reference, denoiser, prompt_encoder, params: GenerationParams) -> None:
    embedding = identity(0)
    prompt = prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0]
    ours = denoiser.generate([DenoiseJob(params, embedding, KEYPOINTS, BOX, prompt)])[0]
    keypoint_image = draw_keypoint_image(KEYPOINTS, params.width, params.height)
    expected = reference_images(reference, params, embedding, keypoint_image, BOX)
    assert max_difference(ours, expected) <= 1


CONTROL_CASES = {
    "identitynet-canny-depth-window": dataclasses.replace(
        BASE, controlnets=(ControlSetting("canny", 0.5), ControlSetting("depth", 0.4, start=0.0, end=0.6))
    ),
    "img2img-identitynet-pose-no-mask": dataclasses.replace(
        BASE,
        strength=0.7,
        num_inference_steps=6,
        enhance_face_region=False,
        scheduler="dpmpp_2m",
        controlnets=(ControlSetting("pose", 0.7),),
        control_guidance_start=0.2,
    ),
    "img2img-all-three-two-images": dataclasses.replace(
        BASE,
        strength=0.5,
        num_images=2,
        controlnets=tuple(ControlSetting(n, s) for n, s in (("pose", 0.3), ("canny", 0.6), ("depth", 0.9))),
    ),
}


@pytest.mark.parametrize("params", CONTROL_CASES.values(), ids=CONTROL_CASES.keys())
def test_extra_controlnets_and_img2img_equal_the_reference_loop(
    reference, controlled_denoiser, prompt_encoder, tiny_weights, params: GenerationParams
) -> None:
    embedding = identity(0)
    maps, init = sample_control_maps(64), (sample_init_image(64) if params.strength is not None else None)
    prompt = prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0]
    job = DenoiseJob(params, embedding, KEYPOINTS, BOX, prompt, control_maps=maps, init_image=init)
    ours = controlled_denoiser.generate([job])[0]
    extra = {
        c.name: (ControlNetModel.from_pretrained(tiny_weights / "controlnets" / c.name).eval(), maps[c.name])
        for c in params.controlnets
    }
    keypoint_image = draw_keypoint_image(KEYPOINTS, params.width, params.height)
    expected = reference_images(reference, params, embedding, keypoint_image, BOX, extra=extra, init_image=init)
    assert max_difference(ours, expected) <= 1


EDIT_CASES = {
    "published-defaults": dataclasses.replace(BASE, strength=0.9),
    "strengths-window-two-images": dataclasses.replace(
        BASE, strength=0.75, identitynet_strength=0.6, adapter_strength=1.2, control_guidance_end=0.7, num_images=2
    ),
    "full-strength-ancestral": dataclasses.replace(BASE, strength=1.0, scheduler="euler_a", seed=5),
}


@pytest.mark.parametrize("params", EDIT_CASES.values(), ids=EDIT_CASES.keys())
def test_an_edit_equals_the_reference_loop_with_the_inpainting_blend(
    reference, denoiser, prompt_encoder, params: GenerationParams
) -> None:
    """IdentityNet and the face tokens on: the loop above with the start and per-step blend of diffusers' SDXL
    inpainting pipeline (its own methods) equals an inpainting job."""
    embedding = identity(0)
    init = sample_init_image(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 14:52] = 255  # around the face box, off the 8-pixel latent grid
    prompt = prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0]
    job = DenoiseJob(params, embedding, KEYPOINTS, BOX, prompt, init_image=init, inpaint_mask=mask)
    ours = denoiser.generate([job])[0]
    keypoint_image = draw_keypoint_image(KEYPOINTS, params.width, params.height)
    expected = reference_images(reference, params, embedding, keypoint_image, BOX, init_image=init, inpaint_mask=mask)
    assert max_difference(ours, expected) <= 1


def test_pose_photo_generation_equals_the_reference_loop(reference, tiny_layout) -> None:
    """Identity from the face photo, keypoints, face box and size from the pose photo's largest face."""
    pipeline = InstantIDPipeline.from_layout(tiny_layout, device="cpu", dtype="float32")
    face_rgb, pose_rgb = decode_image(astronaut_jpeg()), decode_image(group_photo_jpeg())
    params = dataclasses.replace(BASE, width=96, height=64, identitynet_strength=0.9, adapter_strength=0.6)
    output = generate_with_params(pipeline, face_rgb, PROMPT, NEGATIVE, params=params, pose_rgb=pose_rgb)

    without_pose = generate_with_params(pipeline, face_rgb, PROMPT, NEGATIVE, params=params)
    assert max_difference(output.images, without_pose.images) > 20  # the pose photo really steers the image

    analyzer = pipeline.face.analyzer
    embedding = analyzer.analyze(face_rgb).embedding
    pose_face = analyzer.detect(pose_rgb)[0]  # largest first
    crop = CropTransform.cover(pose_rgb.shape[1], pose_rgb.shape[0], 96, 64)
    keypoint_image = draw_keypoint_image(crop.apply_points(pose_face.kps), 96, 64)
    expected = reference_images(reference, params, embedding, keypoint_image, crop.apply_box(pose_face.bbox))
    assert max_difference(output.images, expected) <= 1


# ----------------------------------------------------------------------------------- per-row wiring (hooks)


@dataclass
class Captured:
    identitynet_in: list[dict]
    identitynet_out: list[tuple]
    unet_in: list[dict]


@pytest.fixture
def captured(denoiser):
    record = Captured([], [], [])
    hooks = [
        denoiser.controlnet.register_forward_pre_hook(
            lambda _m, _a, kwargs: record.identitynet_in.append(kwargs), with_kwargs=True
        ),
        denoiser.controlnet.register_forward_hook(
            lambda _m, _a, _k, out: record.identitynet_out.append(out), with_kwargs=True
        ),
        denoiser.unet.register_forward_pre_hook(lambda _m, _a, kwargs: record.unet_in.append(kwargs), with_kwargs=True),
    ]
    yield record
    for hook in hooks:
        hook.remove()


def test_identitynet_and_unet_receive_each_row_s_own_inputs(denoiser, prompt_encoder, captured: Captured) -> None:
    """Two jobs in one batch: each job is one block of rows, [negatives of A (x2), positives of A (x2), negative of B,
    positive of B]."""
    prompts = prompt_encoder.encode([PROMPT, "a watercolor"], [NEGATIVE, None], do_classifier_free_guidance=True)
    job_a = DenoiseJob(dataclasses.replace(BASE, num_images=2, seed=1), identity(0), KEYPOINTS, BOX, prompts[0])
    b_params = dataclasses.replace(
        BASE, seed=2, identitynet_strength=0.5, adapter_strength=1.1, enhance_face_region=False
    )
    job_b = DenoiseJob(b_params, identity(1), OTHER_KEYPOINTS, BOX, prompts[1])
    denoiser.generate([job_a, job_b])
    assert len(captured.identitynet_in) == len(captured.unet_in) == BASE.num_inference_steps

    zero_tokens, tokens_a = denoiser.resampler.face_tokens(torch.from_numpy(identity(0))[None], with_negative=True)[
        ::-1
    ]
    tokens_b = denoiser.resampler.face_tokens(torch.from_numpy(identity(1))[None], with_negative=False)[0]
    faces = torch.cat([zero_tokens, zero_tokens, tokens_a, tokens_a, zero_tokens, tokens_b])
    image_a = torch.from_numpy(draw_keypoint_image(KEYPOINTS, 64, 64)).float().div(255).permute(2, 0, 1)
    image_b = torch.from_numpy(draw_keypoint_image(OTHER_KEYPOINTS, 64, 64)).float().div(255).permute(2, 0, 1)
    images = torch.stack([image_a] * 4 + [image_b] * 2)
    mask_a = face_box_mask(BOX, 64, 64)[0]
    masks = torch.stack([mask_a] * 4 + [torch.ones_like(mask_a)] * 2)
    strengths = torch.tensor([0.8] * 4 + [0.5] * 2).view(-1, 1, 1, 1)
    adapter = torch.tensor([0.8] * 4 + [1.1] * 2)
    texts = torch.stack(
        [prompts[0].negative_embeds] * 2 + [prompts[0].embeds] * 2 + [prompts[1].negative_embeds, prompts[1].embeds]
    )

    for given, residuals, unet in zip(captured.identitynet_in, captured.identitynet_out, captured.unet_in, strict=True):
        torch.testing.assert_close(given["encoder_hidden_states"], faces, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(given["controlnet_cond"], images, rtol=0, atol=0)
        assert given["conditioning_scale"] == 1.0  # the whole window: strength is applied per row afterwards
        down, mid = residuals
        given_down, given_mid = unet["down_block_additional_residuals"], unet["mid_block_additional_residual"]
        for raw, weighted in zip([*down, mid], [*given_down, given_mid], strict=True):
            weight = strengths * F.interpolate(masks, size=raw.shape[-2:], mode="bilinear")
            torch.testing.assert_close(weighted, raw * weight, rtol=1e-5, atol=1e-6)
        context = unet["encoder_hidden_states"]
        torch.testing.assert_close(context[:, :77], texts, rtol=0, atol=0)
        torch.testing.assert_close(context[:, 77:], faces, rtol=1e-5, atol=1e-5)
        conditioning = unet["cross_attention_kwargs"]["face"]
        torch.testing.assert_close(conditioning.scale, adapter)
        torch.testing.assert_close(conditioning.region_mask, masks)


# ------------------------------------------------------------------------------------ sensitivity of the weights


def test_every_instantid_input_visibly_moves_the_tiny_image(denoiser, prompt_encoder) -> None:
    """The tiny weights must keep each path far above float tolerance, or the tests above could not fail."""
    prompt = prompt_encoder.encode([PROMPT], [NEGATIVE], do_classifier_free_guidance=True)[0]

    def image(params=BASE, keypoints=KEYPOINTS, embedding_seed=0, control_image=None) -> np.ndarray:
        job = DenoiseJob(params, identity(embedding_seed), keypoints, BOX, prompt, control_image=control_image)
        return denoiser.generate([job])[0]

    base = image()
    moved = {
        "another pose": image(keypoints=OTHER_KEYPOINTS),
        "a blank keypoint image": image(control_image=np.zeros((64, 64, 3), np.uint8)),
        "another identity": image(embedding_seed=1),
        "IdentityNet strength 0.8 -> 0.64": image(dataclasses.replace(BASE, identitynet_strength=0.64)),
        "adapter strength 0.8 -> 0.64": image(dataclasses.replace(BASE, adapter_strength=0.64)),
        "no face-region mask": image(dataclasses.replace(BASE, enhance_face_region=False)),
    }
    differences = {what: max_difference(base, other) for what, other in moved.items()}
    at_least = {"another pose": 20, "a blank keypoint image": 20, "another identity": 10, "no face-region mask": 20}
    for what, difference in differences.items():
        assert difference > at_least.get(what, 4), differences
