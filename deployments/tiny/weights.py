"""Tiny random weights in exactly the published formats, for tests, CI and the local demo.

Only tensor sizes differ from the real files: the SDXL folder is a real diffusers SDXL folder (two CLIP
text encoders with offline byte-level tokenizers, a text_time UNet, a VAE with 8x downsampling, an Euler
scheduler config), the InstantID folder holds ``ControlNetModel/`` and ``ip-adapter.bin`` with the
published key layout, and ``antelopev2/`` the five insightface file names; ``controlnets/{pose,canny,depth}/``
are diffusers ControlNet folders made from the tiny UNet and ``depth/`` a transformers Depth Anything folder
(see tiny_controls.py). Deterministic for a seed. The pictures it makes are meaningless; everything around
them is real.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from deployments.instantid.attention import install_face_attention
from deployments.instantid.catalogue import PRESET_LORA_FILES
from deployments.instantid.licenses import TINY, layout_entries, write_manifest
from deployments.instantid.resampler import Resampler, ResamplerConfig
from deployments.instantid.sdxl_checkpoint import save_original_sdxl
from deployments.instantid.weights import CONTROLNET_DIR, IP_ADAPTER_FILE

from .controls import make_controlnet_visible, write_tiny_controlnets, write_tiny_depth_model
from .faces import write_tiny_antelopev2
from .loras import random_lora, save_kohya_lora, save_peft_lora

# The two text encoders have different widths, as CLIP-L (768) and OpenCLIP bigG (1280) do: diffusers' single-file
# loader tells them apart by width. The UNet's cross-attention width is their sum, as 768 + 1280 = 2048.
TEXT_HIDDEN = 32  # CLIP-L's place
TEXT_HIDDEN_2 = 48  # bigG's place (its pooled projection has the same width, as bigG's has)
CROSS_ATTENTION_DIM = TEXT_HIDDEN + TEXT_HIDDEN_2
TIME_EMBED = 8


def byte_level_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges over all 256 bytes (and their word-final forms).

    Any text tokenizes, with no download: the real vocabulary is a 49408-entry file we cannot fetch here.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def tiny_text_config(vocab_size: int, act: str, hidden: int, **extra: Any) -> CLIPTextConfig:
    """A tiny CLIP text encoder config (SDXL's two encoders differ in width, activation and projection)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def tiny_text_encoders(vocab_size: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP-L's and bigG's tiny stand-ins (random weights from the global torch RNG)."""
    return (
        CLIPTextModel(tiny_text_config(vocab_size, "quick_gelu", TEXT_HIDDEN)),
        CLIPTextModelWithProjection(tiny_text_config(vocab_size, "gelu", TEXT_HIDDEN_2, projection_dim=TEXT_HIDDEN_2)),
    )


def tiny_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """The tiny SDXL UNet; ``in_channels`` 9: an inpainting UNet (latents + mask + masked-image latents)."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_HIDDEN_2 + 6 * TIME_EMBED,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's published scheduler settings."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


_FACE_KV_GAIN = 3.0  # the face-token K/V projections, x their default initialisation


PARTS = ("sdxl", "instantid", "antelopev2", "bases", "loras", "controlnets", "depth")
TINY_ORIGIN = "instantid weights tiny"  # licenses.json names it as every part's origin
ALT_BASE = "tiny-alt"  # a second base: a diffusers folder and the single-file checkpoint written from it
INPAINT_BASE = "tiny-inpaint"  # an inpainting base: a 9-channel UNet with sdxl/'s VAE and text encoders
STYLE_LORAS = ("style-peft", "style-kohya")  # one random LoRA (UNet + both text encoders) in both layouts


def write_tiny_weights(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny layout under ``directory`` (each part replaced atomically).

    ``sdxl/``, ``instantid/``, ``antelopev2/`` as published; ``bases/tiny-alt/`` and
    ``bases/tiny-alt.safetensors`` (a second base, as a folder and as a single file in the original SDXL
    layout); ``loras/`` with the fast-mode presets' LoRA names and two style LoRAs (PEFT and kohya layouts);
    ``controlnets/pose/``, ``controlnets/canny/``, ``controlnets/depth/`` (the extra ControlNets, fitting
    ``sdxl/``'s UNet), ``depth/`` (the depth model that makes the depth ControlNet's maps) and
    ``bases/tiny-inpaint/`` (an inpainting base: a 9-channel UNet with ``sdxl/``'s other parts). The extra parts
    are written last from their own seeds, so the others have the same bytes as before they existed. ``licenses.json``
    says what each part is: this project's random weights (Apache-2.0).
    """
    from deployments.instantid.loading import quiet_progress_bars

    quiet_progress_bars()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory))
    try:
        # Seeded from ``seed`` alone, and the caller's global RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _write_parts(staging, seed)

        for part in PARTS:
            target = directory / part
            if target.exists():
                shutil.rmtree(target)
            (staging / part).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_manifest(directory, {path: (TINY_ORIGIN, TINY) for path in layout_entries(directory)})
    return directory


def _write_parts(staging: Path, seed: int) -> None:
    """The folders of the tiny layout (:data:`PARTS`), written into ``staging`` (global torch RNG already seeded)."""
    tokenizer = byte_level_tokenizer()
    tokenizer_2 = byte_level_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder, text_encoder_2 = tiny_text_encoders(len(tokenizer))
    unet = tiny_unet()
    vae = tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(staging / "sdxl", safe_serialization=True)

    generator = torch.Generator().manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    make_controlnet_visible(controlnet, generator)
    controlnet.save_pretrained(staging / "instantid" / CONTROLNET_DIR, safe_serialization=True)

    resampler = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=unet.config.cross_attention_dim))
    face_layers = install_face_attention(unet)
    with torch.no_grad():  # default Linear initialisation leaves the face-token term too faint to test
        for parameter in face_layers.parameters():
            parameter.mul_(_FACE_KV_GAIN)
    torch.save(
        {"image_proj": resampler.state_dict(), "ip_adapter": face_layers.state_dict()},
        staging / "instantid" / IP_ADAPTER_FILE,
    )
    write_tiny_antelopev2(staging / "antelopev2", seed=seed)
    _write_alternative_base(staging / "bases", tokenizer, tokenizer_2)
    _write_loras(staging / "loras", unet, (text_encoder, text_encoder_2), torch.Generator().manual_seed(seed + 2))
    # Last, and from their own generator and seed: the parts above keep the bytes they had before these existed.
    unet.set_attn_processor(AttnProcessor2_0())  # back to the plain UNet of sdxl/ (no face-token layers)
    write_tiny_controlnets(staging / "controlnets", unet, torch.Generator().manual_seed(seed + 3))
    write_tiny_depth_model(staging / "depth", seed + 4)
    torch.manual_seed(seed + 5)
    _write_inpainting_base(staging / "bases" / INPAINT_BASE, pipe)


def _write_alternative_base(folder: Path, tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> None:
    """Another random SDXL of the same architecture (so IdentityNet and the face adapter fit it too)."""
    text_encoder, text_encoder_2 = tiny_text_encoders(len(tokenizer))
    components = {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": text_encoder}
    components["text_encoder_2"] = text_encoder_2
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    pipe = StableDiffusionXLPipeline(scheduler=sdxl_scheduler(), **tokenizers, **components)
    pipe.save_pretrained(folder / ALT_BASE, safe_serialization=True)
    save_original_sdxl(folder / f"{ALT_BASE}.safetensors", **components)


def _write_inpainting_base(folder: Path, sdxl: StableDiffusionXLPipeline) -> None:
    """An SDXL inpainting base as published (diffusers' StableDiffusionXLInpaintPipeline folder): a random UNet with
    9 input channels beside ``sdxl``'s VAE, text encoders and tokenizers, as the real one shares SDXL's."""
    parts = {
        name: getattr(sdxl, name) for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    pipe = StableDiffusionXLInpaintPipeline(unet=tiny_unet(in_channels=9), scheduler=sdxl_scheduler(), **parts)
    pipe.save_pretrained(folder, safe_serialization=True)


def _write_loras(
    folder: Path,
    unet: UNet2DConditionModel,
    text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    generator: torch.Generator,
) -> None:
    """The presets' LoRAs (UNet only, as published: LCM-LoRA in the PEFT layout, the others kohya) and one style
    LoRA with text-encoder parts, written in both layouts from the same factors."""
    folder.mkdir(parents=True)
    unet_config = dict(unet.config)
    for name, file in PRESET_LORA_FILES.items():
        factors = random_lora(generator, unet)
        if name == "lcm-lora-sdxl":
            save_peft_lora(folder / file, factors)
        else:
            save_kohya_lora(folder / file, factors, unet_config)
    style = random_lora(generator, unet, text_encoders)
    save_peft_lora(folder / f"{STYLE_LORAS[0]}.safetensors", style)
    save_kohya_lora(folder / f"{STYLE_LORAS[1]}.safetensors", style, unet_config)


def tiny_weights_present(directory: str | Path) -> bool:
    directory = Path(directory)
    return all((directory / p).is_dir() for p in PARTS)
