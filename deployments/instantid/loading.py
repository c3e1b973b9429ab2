"""Build the model components from a :class:`WeightsLayout`, real or tiny, with the same code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from .acceleration import accelerate
from .attention import attach_face_attention, load_face_attention
from .bases import SDXLBase, load_text_encoders, load_unet_and_vae
from .catalogue import DEFAULT_BASE
from .construction import constructs_modules
from .denoiser import InstantIDDenoiser
from .errors import WeightsError
from .params import DEFAULT_VAE_BATCH_SIZE
from .resampler import Resampler
from .speed import SpeedOptions
from .text import SDXLPromptEncoder
from .weights import DENOISER_COMPONENTS, PROMPT_COMPONENTS, WeightsLayout, load_ip_adapter, sdxl_variant

if TYPE_CHECKING:
    from .faces import FaceAnalyzer

CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model*.safetensors*")  # what an S3/hub ControlNet copy reads
VAE_FILES = CONTROLNET_FILES  # a diffusers AutoencoderKL folder has the same two files
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


@dataclass
class InstantIDParts:
    """IdentityNet, the resampler and the face-token attention layers: InstantID's own weights.

    One copy per replica, shared by every SDXL base it loads (they belong to InstantID, not to a base).
    """

    controlnet: ControlNetModel
    resampler: Resampler
    face_attention: dict[str, torch.Tensor]  # the published ``ip_adapter`` part, loaded into the first UNet's layers
    controlnets: dict[str, ControlNetModel] = field(default_factory=dict)  # extra ControlNets (pose, canny, depth)
    _layers: torch.nn.ModuleList | None = None

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Install the face-token attention in ``unet`` (new layers the first time, the same ones afterwards)."""
        if self.resampler.config.output_dim != unet.config.cross_attention_dim:
            raise WeightsError(
                f"the resampler makes {self.resampler.config.output_dim}-d face tokens but the UNet cross-attention "
                f"expects {unet.config.cross_attention_dim}: ip-adapter.bin and the SDXL base do not belong together"
            )
        for name, net in self.controlnets.items():
            if net.config.cross_attention_dim != unet.config.cross_attention_dim:
                raise WeightsError(
                    f"the {name} ControlNet reads {net.config.cross_attention_dim}-d text embeddings but the UNet "
                    f"cross-attention is {unet.config.cross_attention_dim}-d: it is not an SDXL ControlNet of this base"
                )
        if self._layers is None:
            self._layers = load_face_attention(unet, self.face_attention)
            self.face_attention = {}  # the layers hold the tensors now
        else:
            attach_face_attention(unet, self._layers)


@constructs_modules
def load_instantid_parts(
    layout: WeightsLayout, *, dtype: torch.dtype, controlnets: Mapping[str, Path] | None = None
) -> InstantIDParts:
    """IdentityNet + resampler + face K/V from the InstantID folder, and the extra ``controlnets`` (name -> local
    diffusers ControlNet folder); placed on a device by the denoiser."""
    layout.check_instantid()
    quiet_progress_bars()
    try:
        controlnet = ControlNetModel.from_pretrained(layout.controlnet, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not load IdentityNet weights: {exc}") from exc
    image_proj, ip_adapter = load_ip_adapter(layout.ip_adapter)
    extra = {name: load_controlnet(folder, name, dtype=dtype) for name, folder in (controlnets or {}).items()}
    return InstantIDParts(controlnet, Resampler.from_state_dict(image_proj), ip_adapter, extra)


@constructs_modules
def load_controlnet(folder: Path, name: str, *, dtype: torch.dtype) -> ControlNetModel:
    """An extra SDXL ControlNet from a diffusers folder (``config.json`` + safetensors weights, fp16 variant too)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise WeightsError(
            f"the {name} ControlNet folder {folder} has no config.json (expected a diffusers ControlNet folder: "
            f"config.json + diffusion_pytorch_model.safetensors; found: {', '.join(found) or 'nothing'})"
        )
    try:
        return ControlNetModel.from_pretrained(folder, torch_dtype=dtype, variant=sdxl_variant(folder))
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"could not load the {name} ControlNet from {folder}: {exc}") from exc


@constructs_modules
def build_denoiser(
    parts: InstantIDParts,
    base: SDXLBase,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE,
    speed: SpeedOptions | None = None,
    vae_folder: Path | None = None,
    cache_dir: str | Path | None = None,
) -> InstantIDDenoiser:
    """One base's UNet + VAE with InstantID's shared parts, on ``device``; ``vae_folder`` replaces the base's VAE
    (e.g. the fp16-fix VAE); ``speed`` switches on what :func:`acceleration.accelerate` offers (compile cache
    under ``cache_dir``)."""
    base.check(DENOISER_COMPONENTS)
    quiet_progress_bars()
    unet, vae = load_unet_and_vae(base, dtype)
    if vae_folder is not None:
        vae = load_vae(vae_folder)
    parts.attach(unet)
    denoiser = InstantIDDenoiser(
        unet,
        parts.controlnet,
        vae,
        parts.resampler,
        base.scheduler_config(),
        device=device,
        dtype=dtype,
        vae_batch_size=vae_batch_size,
        controlnets=parts.controlnets,
    )
    if speed is not None:
        accelerate(denoiser, speed, cache_dir)
    return denoiser


@constructs_modules
def load_vae(folder: Path) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder (fp32: the denoiser chooses its decode precision)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"the VAE folder {folder} has no config.json (expected a diffusers AutoencoderKL folder)")
    try:
        return AutoencoderKL.from_pretrained(folder, variant=sdxl_variant(folder))
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"could not load the VAE from {folder}: {exc}") from exc


def load_denoiser(
    layout: WeightsLayout,
    *,
    device: str = "auto",
    dtype: str = "auto",
    vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE,
    base: SDXLBase | None = None,
    controlnets: Mapping[str, Path] | None = None,
    speed: SpeedOptions | None = None,
    cache_dir: str | Path | None = None,
) -> InstantIDDenoiser:
    """UNet + VAE from ``base`` (default: the layout's SDXL folder), IdentityNet + resampler + face K/V from the
    InstantID folder, and the extra ``controlnets`` (name -> folder); ``speed``: see :func:`build_denoiser`."""
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    base = base if base is not None else SDXLBase(DEFAULT_BASE, folder=layout.sdxl)
    base.check(DENOISER_COMPONENTS)
    parts = load_instantid_parts(layout, dtype=torch_dtype, controlnets=controlnets)
    return build_denoiser(
        parts, base, device=dev, dtype=torch_dtype, vae_batch_size=vae_batch_size, speed=speed, cache_dir=cache_dir
    )


@constructs_modules
def load_prompt_encoder(
    layout: WeightsLayout | None = None, *, device: str = "auto", dtype: str = "auto", base: SDXLBase | None = None
) -> SDXLPromptEncoder:
    """The two text encoders of ``base`` (default: the layout's SDXL folder)."""
    if base is None:
        if layout is None:
            raise ValueError("give a weights layout or a base")
        base = SDXLBase(DEFAULT_BASE, folder=layout.sdxl)
    base.check(PROMPT_COMPONENTS)
    quiet_progress_bars()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = load_text_encoders(base, torch_dtype)
    return SDXLPromptEncoder(
        tokenizer,
        text_encoder.to(dev),
        tokenizer_2,
        text_encoder_2.to(dev),
        force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt(),
    )


def load_face_analyzer(layout: WeightsLayout, *, providers: Sequence[str] | None = None) -> FaceAnalyzer:
    """The antelopev2 detector + recognizer. insightface/onnxruntime are imported here, not at module level:
    the GPU loaders above must work where face analysis is not installed (a denoise-only machine)."""
    from .faces import FaceAnalyzer

    return FaceAnalyzer(layout.antelopev2, providers=providers)
