"""Cheap low-resolution previews of a job's latents while it denoises (for the live progress stream).

Decoding with the VAE costs about as much as a denoising step at full size; a preview instead maps the four SDXL
latent channels to RGB with a fixed linear projection (the approximation community previewers use for SDXL),
which costs one small matrix product and the only device-to-host copy of the step. It shows composition and
colour, not detail, which is what a progress preview is for.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# SDXL latent channel -> RGB contribution, and the RGB offset (approximate; for previews only).
_SDXL_LATENT_RGB = torch.tensor(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]
)
_SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])
PREVIEW_MAX_SIDE = 128


def latent_preview_rgb(latents: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """The first image of ``latents`` (N, 4, h, w) as an approximate RGB uint8 array, at most ``max_side`` px."""
    if latents.ndim != 4 or latents.shape[1] != _SDXL_LATENT_RGB.shape[0]:
        raise ValueError(f"expected SDXL latents (N, 4, h, w), got {tuple(latents.shape)}")
    first = latents[0].detach().float().cpu()  # (4, h, w): the one host copy a preview needs
    rgb = torch.einsum("chw,cr->hwr", first, _SDXL_LATENT_RGB) + _SDXL_LATENT_RGB_BIAS
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    scale = max_side / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def preview_data_url(latents: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE, quality: int = 60) -> str:
    """A preview as a small WebP ``data:`` URL (a few kB), ready for an ``<img src>``."""
    buffer = io.BytesIO()
    Image.fromarray(latent_preview_rgb(latents, max_side)).save(buffer, format="WEBP", quality=quality)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
