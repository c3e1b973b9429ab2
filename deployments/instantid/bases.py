"""SDXL bases: a catalogue entry resolved to local files, and the components a replica reads from them.

A base is a diffusers SDXL folder, or a single ``.safetensors`` checkpoint in the original SDXL key layout read by
diffusers' single-file loader. A single file carries no configuration: its architecture comes from a local
diffusers SDXL folder (by default the weights' own ``sdxl/``), so loading never asks a hub for configs. Each
replica reads only what it uses: the prompt encoder the text encoders, the denoiser the UNet, VAE and scheduler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .catalogue import BaseModelSpec
from .construction import constructs_modules
from .errors import WeightsError
from .weights import SDXL_FILES, resolve_hub, resolve_source, sdxl_patterns

# What a single-file base needs from its architecture folder: every config and the tokenizers, no weights.
SDXL_CONFIG_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")),
    *SDXL_FILES["tokenizer"],
    *SDXL_FILES["tokenizer_2"],
)


# Where each component's configuration lives in a diffusers SDXL folder (a single file has none of its own).
_CONFIG_OF = {"scheduler": "scheduler/scheduler_config.json", "tokenizer": "tokenizer/", "tokenizer_2": "tokenizer_2/"}


@dataclass(frozen=True)
class SDXLBase:
    """A base's local files: ``folder`` (diffusers layout), or ``file`` (single checkpoint) + ``config`` folder."""

    name: str
    folder: Path | None = None
    file: Path | None = None
    config: Path | None = None

    @property
    def architecture(self) -> Path:
        """The folder holding the diffusers configs (and tokenizers) of this base."""
        folder = self.config if self.file is not None else self.folder
        assert folder is not None
        return folder

    def scheduler_config(self) -> dict[str, Any]:
        path = self.architecture / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise WeightsError(f"base {self.name}: {path} is missing (the SDXL scheduler config)")
        return json.loads(path.read_text())

    def force_zeros_for_empty_prompt(self) -> bool:
        index = self.architecture / "model_index.json"
        if not index.is_file():
            return True
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))

    def check(self, components: tuple[str, ...]) -> None:
        """The files ``components`` are read from are there (a clear error instead of a loader traceback)."""
        if self.file is not None:
            if not self.file.is_file():
                raise WeightsError(f"base {self.name}: {self.file} is not a file")
            needed = ["model_index.json", *(_CONFIG_OF.get(c, f"{c}/config.json") for c in components)]
        else:
            needed = ["model_index.json", *(f"{c}/" for c in components)]
        missing = [n.rstrip("/") for n in needed if not (self.architecture / n).exists()]
        if missing:
            raise WeightsError(
                f"base {self.name}: {self.architecture} is not a diffusers SDXL folder: missing {', '.join(missing)} "
                f"(expected {', '.join(needed)})"
            )

    def describe(self) -> dict[str, Any]:
        if self.file is not None:
            return {"name": self.name, "file": str(self.file), "config": str(self.config)}
        return {"name": self.name, "folder": str(self.folder)}


def resolve_base(
    name: str,
    spec: BaseModelSpec,
    *,
    config_source: str,
    components: tuple[str, ...],
    cache_dir: str | Path | None = None,
) -> SDXLBase:
    """Local files for base ``name``: for a folder only ``components``' files are copied from S3 or the hub;
    a single file's architecture comes from ``spec.config`` or else ``config_source`` (the weights' sdxl)."""
    what = f"base {name}"
    if not spec.single_file:
        patterns = sdxl_patterns(components)
        if spec.repo is not None:
            folder = resolve_hub(spec.repo, what=what, patterns=patterns)
        else:
            folder = resolve_source(str(spec.source), cache_dir, what=what, patterns=patterns)
        base = SDXLBase(name, folder=folder)
    else:
        if spec.repo is not None:
            file = resolve_hub(spec.repo, spec.file, what=what)
        else:
            file = resolve_source(str(spec.source), cache_dir, what=what)
        config_folder = spec.config or config_source
        config = resolve_source(config_folder, cache_dir, what=f"{what} config", patterns=SDXL_CONFIG_FILES)
        base = SDXLBase(name, file=file, config=config)
    base.check(components)
    return base


@constructs_modules
def load_unet_and_vae(base: SDXLBase, dtype: torch.dtype):
    """``(unet, vae)`` of ``base``; the VAE in fp32 (the denoiser decides its decode precision)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .weights import sdxl_variant

    if base.file is not None:
        source = {"config": str(base.config), "local_files_only": True}
        try:
            unet = UNet2DConditionModel.from_single_file(str(base.file), subfolder="unet", torch_dtype=dtype, **source)
            vae = AutoencoderKL.from_single_file(str(base.file), subfolder="vae", **source)
        except Exception as exc:  # diffusers raises several types for a file that is not an SDXL checkpoint
            raise WeightsError(f"base {base.name}: could not load {base.file} as an SDXL checkpoint: {exc}") from exc
        return unet, vae
    folder = base.folder
    assert folder is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder / "unet", variant=sdxl_variant(folder / "unet"), torch_dtype=dtype
        )
        vae = AutoencoderKL.from_pretrained(folder / "vae", variant=sdxl_variant(folder / "vae"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"base {base.name}: could not load its UNet/VAE: {exc}") from exc
    return unet, vae


@constructs_modules
def load_text_encoders(base: SDXLBase, dtype: torch.dtype):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)`` of ``base``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if base.file is not None:  # the pipeline loader converts the two CLIPs (components passed as None are skipped)
        from diffusers import StableDiffusionXLPipeline

        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(base.file), config=str(base.config), local_files_only=True, torch_dtype=dtype, unet=None, vae=None
            )
        except Exception as exc:
            raise WeightsError(f"base {base.name}: could not load {base.file} as an SDXL checkpoint: {exc}") from exc
        return pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2
    folder = base.folder
    assert folder is not None
    try:
        return (
            CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
            CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype),
        )
    except (OSError, ValueError) as exc:
        raise WeightsError(f"base {base.name}: could not load its text encoders: {exc}") from exc


def resolve_architecture(source: str, cache_dir: str | Path | None = None) -> Path:
    """The configs (and tokenizers) of the SDXL folder ``source``, without its weights."""
    return resolve_source(source, cache_dir, what="SDXL architecture", patterns=SDXL_CONFIG_FILES)
