"""Speed switches of the denoiser: regional compilation, a bucketed capturable step, CUDA graphs, fused projections,
channels-last, fp8 linear layers, the VAE's decode precision.

Every switch is off by default: each one must first show a gain on a GPU (``instantid bench gpu`` measures them one
by one against the eager denoiser, with the pixel difference each makes). They are applied once, when a base's
denoiser is built, by :func:`accelerate`:

- ``fuse_qkv``: diffusers' ``Attention.fuse_projections`` in the UNet and IdentityNet, the face K/V stacked too;
  the face-token processors use the fused weights. LoRA sets then have to be merged into the weights, and the fused
  copies are refreshed in place after every switch (``InstantIDDenoiser.weights_changed``).
- ``channels_last``: the UNet, IdentityNet and VAE convolutions in NHWC.
- ``fp8``: torchao's float8 ``Linear`` layers in the UNet and IdentityNet (``dynamic``: fp8 activations and weights,
  CUDA compute capability 8.9 or newer; ``weight_only``: fp8 storage, computed in the model dtype, any device).
  Quantized weights cannot take a LoRA merge: the deployment refuses fp8 with a catalogue that has LoRAs.
- ``compile``: diffusers' regional compilation (``compile_repeated_blocks``: each transformer block of the UNet and
  IdentityNet goes through ``torch.compile``; blocks of one shape share one compiled program). The compile cache
  is kept under the weights cache (``<cache_dir>/torch-compile``), so a replica that starts on a node where one
  compiled before reads the programs instead of compiling them.
- ``static_step`` (implied by ``compile`` and ``cuda_graphs``): the bucketed step of ``static_step``; ``cuda_graphs``
  records it once per bucket and replays it.

The compiled blocks and graphs run only in the bucketed step; the eager step (sizes and batches outside the buckets,
several identities, extra ControlNets, long prompts) runs the same blocks uncompiled.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .attention import fuse_projections
from .errors import WeightsError
from .speed import SpeedOptions
from .static_step import StaticStep

if TYPE_CHECKING:
    from .denoiser import InstantIDDenoiser

logger = logging.getLogger(__name__)

COMPILE_CACHE_FOLDER = "torch-compile"
# Distinct block shapes one process may compile: (UNet, IdentityNet) x (two widths) x buckets, plus LoRA layouts.
RECOMPILE_LIMIT = 64
VAE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
__all__ = ["SpeedOptions", "accelerate"]


def compile_cache_dir(cache_dir: str | Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir).expanduser() / COMPILE_CACHE_FOLDER


def use_compile_cache(cache_dir: str | Path | None) -> Path | None:
    """Point inductor's (and so Triton's) on-disk caches into the node-local weights cache, unless the process
    environment chose a folder already. Read by inductor whenever it looks for a cached program."""
    folder = compile_cache_dir(cache_dir)
    if folder is None or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) if "TORCHINDUCTOR_CACHE_DIR" in os.environ else None
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def quantize_fp8(module: torch.nn.Module, mode: str, device: torch.device) -> None:
    """torchao's float8 Linear layers in ``module``; a WeightsError naming what is missing when it cannot."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as exc:
        raise WeightsError(
            f"fp8 {mode} needs torchao (pip install 'instantid-serve[fp8]'; not importable here: {exc})"
        ) from None
    if mode == "dynamic":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            have = f"compute capability {capability[0]}.{capability[1]}" if capability else f"a {device.type} device"
            raise WeightsError(
                "fp8 dynamic (float8 activations and weights) needs a CUDA GPU of compute capability 8.9 or newer "
                f"(L4, H100, H200, ...); this denoiser has {have}. fp8 weight_only runs anywhere."
            )
        config = Float8DynamicActivationFloat8WeightConfig()
    else:
        config = Float8WeightOnlyConfig()

    def large_linear(layer: torch.nn.Module, _: str) -> bool:  # fp8 GEMMs want dimensions in multiples of 16
        return isinstance(layer, torch.nn.Linear) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0

    quantize_(module, config, filter_fn=large_linear)


def accelerate(denoiser: InstantIDDenoiser, options: SpeedOptions, cache_dir: str | Path | None = None) -> None:
    """Apply ``options`` to ``denoiser`` (once, right after it was built; see the module docstring)."""
    models = [denoiser.unet, denoiser.controlnet]
    if options.vae_dtype != "auto":
        denoiser.vae_dtype = VAE_DTYPES[options.vae_dtype]
        denoiser.vae = denoiser.vae.to(dtype=denoiser.vae_dtype)
    if options.channels_last:
        for module in [*models, denoiser.vae]:
            module.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        for module in models:
            fuse_projections(module)
        denoiser.fused_projections = True
    if options.fp8 != "off":
        for module in models:
            if not getattr(module, "_fp8_quantized", False):  # IdentityNet is shared by a replica's bases
                quantize_fp8(module, options.fp8, denoiser.device)
                module._fp8_quantized = True
    if options.compile:
        folder = use_compile_cache(cache_dir)
        logger.info("regional torch.compile of the UNet and IdentityNet blocks (cache: %s)", folder or "default")
        dynamo = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit_name, max(getattr(dynamo, limit_name), RECOMPILE_LIMIT))
        kwargs = {"fullgraph": False, "dynamic": False, "backend": options.compile_backend}
        if options.compile_mode is not None:
            kwargs["mode"] = options.compile_mode
        denoiser.unet.compile_repeated_blocks(**kwargs)
        # IdentityNet is made from the UNet (ControlNetModel.from_unet): the same transformer blocks.
        denoiser.controlnet._repeated_blocks = list(denoiser.unet._repeated_blocks)
        denoiser.controlnet.compile_repeated_blocks(**kwargs)
        denoiser.compiled = True
    if options.bucketed and not denoiser.inpainting:  # a 9-channel UNet's extra channels run the eager step
        denoiser.static_step = StaticStep(
            denoiser, options.bucket_rows, options.bucket_sizes, capture=options.cuda_graphs
        )
