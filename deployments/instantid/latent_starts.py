"""Where an image-to-image or inpainting job starts, and how an inpainting job keeps its known region.

Both follow diffusers' SDXL pipelines draw for draw, so a job with a seed gives their image: the init image's VAE
posterior is sampled with the job's generator and duplicated per image, then the noise is drawn and added at the
first timestep. An inpainting job (an edit) on a 4-channel UNet also keeps what it needs to put the unmasked region
back after every step, re-noised to the next timestep (the blend of diffusers' inpainting pipelines); on a 9-channel
inpainting UNet it gets the mask and the masked image's latents instead, which the UNet reads at every step as its
extra input channels (and nothing is blended), as diffusers' pipelines feed such a UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from .errors import InvalidParameterError
from .params import GenerationParams


def image_tensor(image: np.ndarray, p: GenerationParams, what: str) -> torch.Tensor:
    """An (H, W, 3) uint8 image at the output size as (1, 3, H, W) float in [0, 1] (diffusers' conversion)."""
    if image.shape != (p.height, p.width, 3) or image.dtype != np.uint8:
        raise InvalidParameterError(f"{what} must be uint8 ({p.height}, {p.width}, 3), got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255.0).permute(2, 0, 1)[None]


def init_tensor(image: np.ndarray, p: GenerationParams) -> torch.Tensor:
    """A job's init image as pixels in [-1, 1]: one (H, W, 3) image, (1, 3, H, W), that every image of the job
    starts from, or one per image, (num_images, H, W, 3) -> (num_images, 3, H, W) (a hires pass refines each
    first-pass image from itself)."""
    if image.ndim == 4 and image.shape[0] == p.num_images:
        return torch.cat([image_tensor(one, p, f"init image {i}") for i, one in enumerate(image)]) * 2.0 - 1.0
    return image_tensor(image, p, "the init image") * 2.0 - 1.0


@dataclass(frozen=True)
class ImageLatents:
    """The VAE and the precisions a denoiser runs it in: what turns init images into starting latents."""

    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype

    def encode(self, pixels: torch.Tensor, num_images: int, generator: torch.Generator) -> torch.Tensor:
        """The init image's latents (the VAE's posterior sampled with the job's generator, scaled as the VAE's
        config says), duplicated per image; init images given per image are encoded in one batch, one posterior
        draw for all (diffusers' order for a batch of images with one generator)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype).to(self.vae_dtype)
        encoded = self.vae.encode(pixels).latent_dist.sample(generator).to(self.dtype)
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(encoded)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(encoded)
            encoded = (encoded - mean_t) * config.scaling_factor / std_t
        else:
            encoded = config.scaling_factor * encoded
        return encoded if encoded.shape[0] == num_images else torch.cat([encoded] * num_images)

    def noised(
        self,
        pixels: torch.Tensor,
        num_images: int,
        scheduler: Any,
        first_timestep: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The init image's latents noised to ``first_timestep``, in diffusers' SDXL img2img order: the VAE's
        posterior is sampled with the job's generator, duplicated per image, then the noise is drawn."""
        encoded = self.encode(pixels, num_images, generator)
        noise = randn_tensor(encoded.shape, generator=generator, device=self.device, dtype=self.dtype)
        return scheduler.add_noise(encoded, noise, first_timestep.repeat(num_images))

    def inpaint_start(
        self,
        pixels: torch.Tensor,
        mask_image: np.ndarray,
        p: GenerationParams,
        scheduler: Any,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        masked_image_input: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """The first latents of an inpainting job, then either what keeps its known region (a 4-channel UNet: the
        init image's latents, the noise they are re-noised with at every step, and the mask at latent size,
        binarised at 0.5 and resized nearest, as diffusers' inpainting pipelines do) or, with
        ``masked_image_input`` (a 9-channel inpainting UNet), the UNet's extra input channels: that mask and the
        latents of the init image with the masked pixels zeroed, (num_images, 5, h, w). At strength 1 the start is
        pure noise, as there."""
        # The init image's latents: what a 4-channel UNet's blend keeps, and the start below strength 1 (a 9-channel
        # UNet from pure noise needs neither, and diffusers then encodes nothing, so no draw is made here either).
        encoded = None
        if not masked_image_input or p.strength != 1.0:
            encoded = self.encode(pixels, p.num_images, generator)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (p.num_images, self.vae.config.latent_channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if encoded is None or p.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(encoded, noise, timesteps[:1].repeat(p.num_images))
        repaint = torch.from_numpy((np.asarray(mask_image) >= 128).astype(np.float32))[None, None]
        mask = torch.nn.functional.interpolate(repaint, size=shape[-2:])
        mask = mask.to(device=self.device, dtype=self.dtype)
        # diffusers' pipeline then VAE-encodes the masked image with the same generator, for every UNet: a 4-channel
        # one never reads it, so only its posterior sample's one latent-shaped draw is made, and a stochastic
        # scheduler's later draws are the same.
        if not masked_image_input:
            assert encoded is not None
            randn_tensor((1, *shape[1:]), generator=generator, device=self.device, dtype=self.vae_dtype)
            return latents, {"known": encoded, "noise": noise, "mask": mask}, None
        masked = self.encode(pixels * (repaint < 0.5), p.num_images, generator)
        return latents, None, torch.cat([mask.expand(p.num_images, -1, -1, -1), masked], dim=1)


def keep_known(state: dict[str, Any], step: int) -> torch.Tensor:
    """After step ``step`` of an inpainting job (its ``state``): the latents inside the mask as the scheduler left
    them, outside it the init image's latents noised to the next timestep (unnoised after the last step)."""
    inpaint, timesteps = state["inpaint"], state["timesteps"]
    known = inpaint["known"]
    if step < len(timesteps) - 1:
        known = state["scheduler"].add_noise(known, inpaint["noise"], timesteps[step + 1].reshape(1))
    return (1 - inpaint["mask"]) * known + inpaint["mask"] * state["latents"]
