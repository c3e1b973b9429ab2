"""Diffusers SDXL components -> one state dict in the original SDXL single-file key layout.

Finetuned SDXL bases are distributed as one ``.safetensors`` file in the layout Stability's code saves
(``model.diffusion_model.*`` for the UNet, ``first_stage_model.*`` for the VAE,
``conditioner.embedders.0.transformer.*`` for CLIP-L in Hugging Face naming and
``conditioner.embedders.1.model.*`` for OpenCLIP bigG in OpenCLIP naming); diffusers' single-file loader reads
them. This module writes that layout from diffusers components, so that the tiny test base can be a real
single-file checkpoint and the whole loading path is exercised. Every mapping below is the inverse of what
the loader does; a test checks the round trip tensor for tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0"}
_RESNET |= {"conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_block_paths(config: dict) -> dict[str, str]:
    """Diffusers UNet module paths -> original paths, for every block of a UNet with this config.

    The original UNet numbers its blocks in one sequence each: ``input_blocks`` (conv_in, then per down block
    ``layers_per_block`` resnet[+attention] pairs and a downsampler), ``middle_block`` (resnet, attention,
    resnet) and ``output_blocks`` (per up block ``layers_per_block + 1`` pairs, the last one with the upsampler).
    """
    layers = int(config["layers_per_block"])
    paths = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            paths[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if kind.startswith("CrossAttn"):
                paths[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < len(config["down_block_types"]) - 1:
            paths[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            paths[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                paths[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < len(config["up_block_types"]) - 1:
            last = i * (layers + 1) + layers
            paths[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return paths


def unet_key_to_original(key: str, block_paths: dict[str, str]) -> str:
    """One diffusers UNet parameter (or module) name in the original layout, without the ``model.`` prefix."""
    for diffusers_path in sorted(block_paths, key=len, reverse=True):  # longest first: resnets.1 before resnets.1x
        if key == diffusers_path or key.startswith(diffusers_path + "."):
            rest = key[len(diffusers_path) :]
            original = block_paths[diffusers_path]
            if ".resnets." in diffusers_path:
                for new, old in _RESNET.items():
                    if rest.startswith("." + new + "."):
                        rest = "." + old + rest[len(new) + 1 :]
                        break
            return original + rest
    raise KeyError(f"no original SDXL name for UNet parameter {key!r}")


def _unet(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    paths = unet_block_paths(dict(unet.config))
    return {UNET_PREFIX + unet_key_to_original(k, paths): v for k, v in unet.state_dict().items()}


def _vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out")
        for part in ("encoder", "decoder"):
            name = name.replace(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
            name = name.replace(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        if ".mid_block.attentions.0." in name:  # the original attention is 1x1 convolutions
            name = name.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for new, old in _VAE_ATTENTION.items():
                name = name.replace(f".attn_1.{new}.", f".attn_1.{old}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        for i in range(blocks):
            name = name.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            name = name.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            # the decoder's up blocks are numbered from the bottom in the original
            name = name.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            name = name.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        out[VAE_PREFIX + name.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def _clip_l(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """CLIP-L keeps Hugging Face names, always with the ``text_model.`` level the published files have."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_L_PREFIX + name] = value
    return out


def _open_clip(text_encoder: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG: fused q/k/v (``in_proj``), ``resblocks``, ``c_fc``/``c_proj``, a transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    state.pop("embeddings.position_ids", None)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{source}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{target}attn.out_proj.{kind}"] = state.pop(f"{source}self_attn.out_proj.{kind}")
            out[f"{target}ln_1.{kind}"] = state.pop(f"{source}layer_norm1.{kind}")
            out[f"{target}ln_2.{kind}"] = state.pop(f"{source}layer_norm2.{kind}")
            out[f"{target}mlp.c_fc.{kind}"] = state.pop(f"{source}mlp.fc1.{kind}")
            out[f"{target}mlp.c_proj.{kind}"] = state.pop(f"{source}mlp.fc2.{kind}")
    if state:
        raise KeyError(f"text_encoder_2 parameters without an OpenCLIP name: {sorted(state)[:6]}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def original_sdxl_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> dict[str, torch.Tensor]:
    """All four components in the original single-file layout (contiguous tensors, ready for safetensors)."""
    state = {**_unet(unet), **_vae(vae), **_clip_l(text_encoder), **_open_clip(text_encoder_2)}
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_original_sdxl(path: str | Path, **components: torch.nn.Module) -> Path:
    """Write ``original_sdxl_state_dict(**components)`` as one ``.safetensors`` file."""
    path = Path(path)
    save_file(original_sdxl_state_dict(**components), str(path))  # type: ignore[arg-type]
    return path
