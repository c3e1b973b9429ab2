"""Build the model components from a :class:`WeightsLayout`, real or tiny, with the same code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from .attention import load_face_attention
from .denoiser import DEFAULT_VAE_BATCH_SIZE, InstantIDDenoiser
from .errors import WeightsError
from .resampler import Resampler
from .text import SDXLPromptEncoder
from .weights import (
    DENOISER_COMPONENTS,
    PROMPT_COMPONENTS,
    WeightsLayout,
    load_ip_adapter,
    read_scheduler_config,
    sdxl_variant,
)

if TYPE_CHECKING:
    from .faces import FaceAnalyzer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_progress_bars() -> None:
    """Loading bars are noise in server logs and CLI output (they are process-wide switches)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (half precision is slow and inexact there), fp16 on CUDA."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}") from None


def load_denoiser(
    layout: WeightsLayout, *, device: str = "auto", dtype: str = "auto", vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE
) -> InstantIDDenoiser:
    """UNet + VAE from the SDXL folder, IdentityNet + resampler + face K/V from the InstantID folder."""
    layout.check_sdxl(DENOISER_COMPONENTS)
    layout.check_instantid()
    quiet_progress_bars()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            layout.sdxl / "unet", variant=sdxl_variant(layout.sdxl / "unet"), torch_dtype=torch_dtype
        )
        vae = AutoencoderKL.from_pretrained(layout.sdxl / "vae", variant=sdxl_variant(layout.sdxl / "vae"))
        controlnet = ControlNetModel.from_pretrained(layout.controlnet, torch_dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not load SDXL/IdentityNet weights: {exc}") from exc
    image_proj, ip_adapter = load_ip_adapter(layout.ip_adapter)
    resampler = Resampler.from_state_dict(image_proj)
    if resampler.config.output_dim != unet.config.cross_attention_dim:
        raise WeightsError(
            f"the resampler makes {resampler.config.output_dim}-d face tokens but the UNet cross-attention "
            f"expects {unet.config.cross_attention_dim}: ip-adapter.bin and the SDXL base do not belong together"
        )
    load_face_attention(unet, ip_adapter)
    return InstantIDDenoiser(
        unet,
        controlnet,
        vae,
        resampler,
        read_scheduler_config(layout.sdxl),
        device=dev,
        dtype=torch_dtype,
        vae_batch_size=vae_batch_size,
    )


def load_prompt_encoder(layout: WeightsLayout, *, device: str = "auto", dtype: str = "auto") -> SDXLPromptEncoder:
    layout.check_sdxl(PROMPT_COMPONENTS)
    quiet_progress_bars()
    dev = pick_device(device)
    return SDXLPromptEncoder.from_pretrained(layout.sdxl, device=dev, dtype=pick_dtype(dtype, dev))


def load_face_analyzer(layout: WeightsLayout, *, providers: Sequence[str] | None = None) -> FaceAnalyzer:
    """The antelopev2 detector + recognizer. insightface/onnxruntime are imported here, not at module level:
    the GPU loaders above must work where face analysis is not installed (a denoise-only machine)."""
    from .faces import FaceAnalyzer

    return FaceAnalyzer(layout.antelopev2, providers=providers)
