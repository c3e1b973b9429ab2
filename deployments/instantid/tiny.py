"""Tiny random weights in exactly the published formats, for tests, CI and the local demo.

Only tensor sizes differ from the real files: the SDXL folder is a real diffusers SDXL folder (two CLIP
text encoders with offline byte-level tokenizers, a text_time UNet, a VAE with 8x downsampling, an Euler
scheduler config), the InstantID folder holds ``ControlNetModel/`` and ``ip-adapter.bin`` with the
published key layout, and ``antelopev2/`` the five insightface file names. Deterministic for a seed.
The pictures it makes are meaningless; everything around them is real.
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
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .attention import install_face_attention
from .catalogue import PRESET_LORA_FILES
from .resampler import Resampler, ResamplerConfig
from .sdxl_checkpoint import save_original_sdxl
from .tiny_faces import write_tiny_antelopev2
from .tiny_loras import random_lora, save_kohya_lora, save_peft_lora
from .weights import CONTROLNET_DIR, IP_ADAPTER_FILE

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


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
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


# Sized so that every IdentityNet input visibly moves a 64x64 test image (the keypoint image by tens of levels
# out of 255): with default initialisation the eight small conditioning convolutions shrink the keypoint dots to
# nothing, and no test could see a keypoint bug. A test asserts the sensitivity on seed 0 (the tests' and the
# demo's seed); other seeds vary with the random UNet around IdentityNet.
_CONDITIONING_OUT_GAIN = 8.0  # conv_out of the conditioning embedding, x 1/sqrt(fan_in)
_ZERO_CONV_GAIN = 0.3  # the residual ("zero") convolutions, x 1/sqrt(fan_in)
_INIT_NOISE = 0.1
_FACE_KV_GAIN = 3.0  # the face-token K/V projections, x their default initialisation
_INIT_BIAS = 0.05


def _make_identitynet_visible(controlnet: ControlNetModel, generator: torch.Generator) -> None:
    """Give the tiny IdentityNet's conditioning path and zero convolutions values its inputs can be seen through.

    A trained IdentityNet reacts strongly to its keypoint image; a randomly initialised one does not (its zero
    convolutions are exactly zero and its conditioning convolutions wash the sparse keypoint drawing out). So
    the conditioning convolutions pass their input through (each output channel starts as a copy of one input
    channel at the kernel centre, plus a little noise), the first one mixes the three colour channels at
    random, and the output and residual convolutions are random at the gains above. Only values change:
    names, shapes and formats stay those of ``ControlNetModel.from_unet``.
    """

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            out_channels, in_channels = conv.weight.shape[:2]
            if in_channels == 3:  # the RGB keypoint image: a random colour mix per channel, centre tap only
                weight = torch.zeros_like(conv.weight)
                weight[:, :, 1, 1] = normal(torch.Size((out_channels, in_channels)), 1.0)
            else:
                weight = normal(conv.weight.shape, _INIT_NOISE / conv.weight[0].numel() ** 0.5)
                for channel in range(out_channels):
                    weight[channel, channel % in_channels, 1, 1] += 1.0
            conv.weight.copy_(weight)
            conv.bias.copy_(normal(conv.bias.shape, _INIT_BIAS))
        for conv, gain in (
            (embedding.conv_out, _CONDITIONING_OUT_GAIN),
            *((c, _ZERO_CONV_GAIN) for c in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block)),
        ):
            conv.weight.copy_(normal(conv.weight.shape, gain / conv.weight[0].numel() ** 0.5))
            conv.bias.copy_(normal(conv.bias.shape, _INIT_BIAS))


PARTS = ("sdxl", "instantid", "antelopev2", "bases", "loras")
ALT_BASE = "tiny-alt"  # a second base: a diffusers folder and the single-file checkpoint written from it
STYLE_LORAS = ("style-peft", "style-kohya")  # one random LoRA (UNet + both text encoders) in both layouts


def write_tiny_weights(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny layout under ``directory`` (each part replaced atomically).

    ``sdxl/``, ``instantid/``, ``antelopev2/`` as published; ``bases/tiny-alt/`` and
    ``bases/tiny-alt.safetensors`` (a second base, as a folder and as a single file in the original SDXL
    layout); ``loras/`` with the fast-mode presets' LoRA names and two style LoRAs (PEFT and kohya layouts).
    """
    from .loading import quiet_progress_bars

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
    return directory


def _write_parts(staging: Path, seed: int) -> None:
    """The three folders of the tiny layout, written into ``staging`` (global torch RNG already seeded)."""
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
    _make_identitynet_visible(controlnet, generator)
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


def _write_alternative_base(folder: Path, tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> None:
    """Another random SDXL of the same architecture (so IdentityNet and the face adapter fit it too)."""
    text_encoder, text_encoder_2 = tiny_text_encoders(len(tokenizer))
    components = {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": text_encoder}
    components["text_encoder_2"] = text_encoder_2
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    pipe = StableDiffusionXLPipeline(scheduler=sdxl_scheduler(), **tokenizers, **components)
    pipe.save_pretrained(folder / ALT_BASE, safe_serialization=True)
    save_original_sdxl(folder / f"{ALT_BASE}.safetensors", **components)


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
