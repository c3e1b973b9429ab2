"""Tiny LoRA files in the two layouts LoRAs are distributed in, for tests, CI and the local demo.

- diffusers/PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B``, ``text_encoder.*``, ``text_encoder_2.*`` (what
  ``StableDiffusionXLPipeline.save_lora_weights`` writes; LCM-LoRA is published this way);
- kohya/A1111: ``lora_unet_<original module path with underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``,
  ``lora_te1_*`` (CLIP-L) and ``lora_te2_*`` (bigG) in Hugging Face names (most community SDXL LoRAs).

The same random factors can be written in both layouts, so a test can show that both load to the same model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from deployments.instantid.sdxl_checkpoint import unet_block_paths, unet_key_to_original

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LoraFactors = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # part -> module path -> (down A, up B)


def random_lora(
    generator: torch.Generator,
    unet: UNet2DConditionModel,
    text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection] | None = None,
    *,
    rank: int = 4,
    std: float = 0.2,
) -> LoraFactors:
    """Random LoRA factors (A: rank x in, B: out x rank) for the attention projections of the UNet and, when
    given, of both text encoders. Module paths are the models' own (diffusers/transformers names)."""
    parts: dict[str, tuple[torch.nn.Module, tuple[str, ...]]] = {"unet": (unet, UNET_TARGETS)}
    if text_encoders is not None:
        parts |= {"text_encoder": (text_encoders[0], TEXT_TARGETS), "text_encoder_2": (text_encoders[1], TEXT_TARGETS)}
    factors: LoraFactors = {}
    for part, (model, targets) in parts.items():
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
        shapes = get_peft_model_state_dict(inject_adapter_in_model(config, copy.deepcopy(model)))
        modules = sorted({key.rsplit(".lora_", 1)[0] for key in shapes})
        factors[part] = {
            m: (
                torch.randn(shapes[f"{m}.lora_A.weight"].shape, generator=generator) * std,
                torch.randn(shapes[f"{m}.lora_B.weight"].shape, generator=generator) * std,
            )
            for m in modules
        }
    return factors


def save_peft_lora(path: Path, factors: LoraFactors) -> Path:
    """The diffusers/PEFT layout, written by diffusers itself (alpha = rank: scale 1 per unit weight)."""
    layers = {
        f"{part}_lora_layers": {
            f"{module}.lora_{ab}.weight": tensor
            for module, pair in modules.items()
            for ab, tensor in zip("AB", pair, strict=True)
        }
        for part, modules in factors.items()
    }
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def save_kohya_lora(path: Path, factors: LoraFactors, unet_config: dict) -> Path:
    """The kohya/A1111 layout: original SDXL UNet module names, ``lora_down``/``lora_up`` and an ``alpha`` each."""
    block_paths = unet_block_paths(unet_config)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    state: dict[str, torch.Tensor] = {}
    for part, modules in factors.items():
        for module, (down, up) in modules.items():
            if part == "unet":
                name = unet_key_to_original(module, block_paths)
            else:  # published text-encoder LoRAs name CLIP modules with their text_model level
                name = module if module.startswith("text_model.") else "text_model." + module
            key = f"{prefixes[part]}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(state, str(path))
    return path
