"""The models a deployment offers: SDXL bases, LoRAs and fast-mode presets, each chosen by name per request.

A request names catalogue entries only, never a path or a URL: the operator decides what can be loaded.
Sources follow the weights' rules (a local path, ``s3://bucket/key``, or a Hugging Face repo id); a relative
source is relative to the weights root. Resolving a request's choice against the catalogue
(:meth:`ModelCatalogue.choose`) is the one place where names are checked, with a 422 that lists what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InvalidParameterError
from .licenses import CommercialUse, LicenseTerms
from .options import LORA_SCALE_RANGE, MAX_REQUEST_LORAS, SchedulerName

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
DEFAULT_BASE = "sdxl"  # the weights layout's own SDXL folder
LORAS_DIR = "loras"  # WEIGHTS/loras/*.safetensors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_S = TypeVar("_S", bound="_Sourced")


class _Sourced(_Strict):
    """Where a file or folder comes from: ``source`` (a path, relative to the weights root unless absolute, or
    ``s3://bucket/key``) or ``repo`` (a Hugging Face repo id, from the hub cache; ``HF_HUB_OFFLINE`` is honoured)
    with an optional ``file`` in it."""

    source: str | None = Field(default=None, description="A path (relative to the weights root) or s3:// URI.")
    repo: str | None = Field(default=None, description="A Hugging Face repo id, instead of a source.")
    file: str | None = Field(default=None, description="A file inside the repo.")
    license: str | None = Field(
        default=None, description="Its licence (SPDX id or short name); absent: the weights' own terms, or unknown."
    )
    license_url: str | None = Field(default=None, description="Where its licence is published.")
    commercial_use: CommercialUse | None = Field(default=None, description="true, false or unknown; with license.")

    @model_validator(mode="after")
    def _one_place(self) -> _Sourced:
        if (self.source is None) == (self.repo is None):
            raise ValueError("give exactly one of source and repo")
        if self.file is not None and self.repo is None:
            raise ValueError("file goes with repo (a source names the file itself)")
        if (self.license is None) != (self.commercial_use is None):
            raise ValueError("give license and commercial_use together")
        return self

    @property
    def terms(self) -> LicenseTerms | None:
        """The licence this entry states, or None (then the weights' own terms apply, else it is unknown)."""
        if self.license is None or self.commercial_use is None:
            return None
        return LicenseTerms(license=self.license, url=self.license_url, commercial_use=self.commercial_use)

    @property
    def location(self) -> str:
        return self.source if self.source is not None else f"{self.repo}/{self.file or ''}".rstrip("/")

    def under(self: _S, weights_root: str | None) -> _S:
        """This source with a relative path made absolute under ``weights_root``."""
        source = self.source
        if source is None or weights_root is None or source.startswith(("s3://", "/", "~")):
            return self
        return self.model_copy(update={"source": weights_root.rstrip("/") + "/" + source})

    def resolve(self, cache_dir: str | Path | None, *, what: str, patterns: tuple[str, ...] | None = None) -> Path:
        """A local path: the path itself, a copy from S3 (only ``patterns``), or the hub cache's."""
        from .weights import resolve_hub, resolve_source

        if self.repo is not None:
            return resolve_hub(self.repo, self.file, what=what, patterns=None if self.file else patterns)
        return resolve_source(str(self.source), cache_dir, what=what, patterns=patterns)


class WeightsSource(_Sourced):
    """Weights a deployment loads that no request names: a ControlNet, the depth model."""

    description: str = ""


class BaseModelSpec(_Sourced):
    """One SDXL base: a diffusers folder, or a single-file checkpoint (.safetensors, original SDXL key layout)."""

    config: str | None = Field(
        default=None,
        description="Single-file bases: a local diffusers SDXL folder whose configs describe the architecture "
        "(default: the weights' sdxl folder). Nothing is fetched from a hub when loading.",
    )
    description: str = ""
    inpainting: bool = Field(
        default=False,
        description="A 9-channel SDXL inpainting UNet (it reads the mask and the masked image as extra input "
        "channels): it serves edits (target_image) only. Checked against the UNet when the base loads.",
    )

    @property
    def single_file(self) -> bool:
        return self.location.endswith(".safetensors")


class LoraSpec(_Sourced):
    """One LoRA file (.safetensors, kohya/A1111 or diffusers/PEFT layout) with UNet and/or text-encoder parts."""

    scale: float = Field(default=1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], description="Default scale.")
    description: str = ""


class ModeSpec(_Strict):
    """A preset a request selects with one field: a LoRA plus the sampling it was trained for."""

    lora: str | None = Field(default=None, description="A LoRA catalogue name (does not count toward the limit).")
    lora_scale: float = Field(default=1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1])
    scheduler: SchedulerName
    num_inference_steps: int = Field(ge=1, le=100)
    guidance_scale: float = Field(ge=0.0, le=20.0)
    description: str = ""


# The fast modes users pick InstantID tools for, with the published recipes; their LoRAs live in WEIGHTS/loras/
# under these names (``instantid weights download`` fetches them, ``instantid weights tiny`` writes tiny ones).
PRESET_LORA_FILES: dict[str, str] = {
    "lcm-lora-sdxl": "lcm-lora-sdxl.safetensors",
    "sdxl-lightning-8step": "sdxl-lightning-8step.safetensors",
    "hyper-sdxl-8step-cfg": "hyper-sdxl-8step-cfg.safetensors",
}
PRESET_MODES: dict[str, ModeSpec] = {
    "lcm": ModeSpec(
        lora="lcm-lora-sdxl",
        scheduler="lcm",
        num_inference_steps=10,
        guidance_scale=0.0,
        description="LCM-LoRA SDXL: 10 steps without classifier-free guidance, as the InstantID README runs it.",
    ),
    "lightning": ModeSpec(
        lora="sdxl-lightning-8step",
        scheduler="euler_trailing",
        num_inference_steps=8,
        guidance_scale=0.0,
        description="SDXL-Lightning 8-step LoRA: Euler with trailing timesteps, no guidance.",
    ),
    "hyper": ModeSpec(
        lora="hyper-sdxl-8step-cfg",
        scheduler="ddim_trailing",
        num_inference_steps=8,
        guidance_scale=5.0,
        description="Hyper-SDXL 8-step CFG LoRA: DDIM with trailing timesteps, guidance 5.",
    ),
}
PresetName = Literal["lcm", "lightning", "hyper"]


@dataclass(frozen=True)
class ModelChoice:
    """A request's models, resolved: the base, every active LoRA with its scale (the mode's last), the mode."""

    base: str
    loras: tuple[tuple[str, float], ...] = ()
    mode: str | None = None

    def adapter_key(self) -> tuple[tuple[str, float], ...]:
        """What must match for two jobs to share a forward (the order LoRAs are listed in does not matter)."""
        return tuple(sorted(self.loras))

    def describe(self) -> dict[str, object]:
        return {"base": self.base, "loras": [{"name": n, "scale": s} for n, s in self.loras], "mode": self.mode}


class ModelCatalogue(_Strict):
    """Everything a deployment can load, by name. The weights' own SDXL folder is always the base ``sdxl``."""

    default_base: str = DEFAULT_BASE
    base_models: dict[str, BaseModelSpec] = Field(default_factory=dict)
    loras: dict[str, LoraSpec] = Field(default_factory=dict)
    presets: list[PresetName] = Field(
        default_factory=list, description="Built-in modes to offer; their LoRAs are read from WEIGHTS/loras/."
    )
    modes: dict[str, ModeSpec] = Field(default_factory=dict)
    max_models_per_replica: int = Field(default=2, ge=1, description="Bases one GPU replica keeps loaded (LRU).")
    max_loras_per_replica: int = Field(default=8, ge=1, description="LoRAs one replica keeps loaded per base (LRU).")
    fuse_loras: bool = Field(
        default=True,
        description="Merge a batch's LoRA set into the weights (restored exactly on a switch); false: run the LoRA "
        "layers unfused every step. Merging is faster whenever a set serves more than about one image in a row.",
    )

    @field_validator("base_models", "loras", "modes")
    @classmethod
    def _names(cls, entries: dict) -> dict:
        import re

        bad = [name for name in entries if not re.fullmatch(NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"catalogue names must match {NAME_PATTERN}: {bad}")
        return entries

    @model_validator(mode="after")
    def _consistent(self) -> ModelCatalogue:
        overlap = set(self.presets) & set(self.modes)
        if overlap:
            raise ValueError(f"modes {sorted(overlap)} are presets already; give custom modes other names")
        for name, mode in self.all_modes().items():
            if mode.lora is not None and mode.lora not in self.all_loras():
                raise ValueError(f"mode {name!r} uses LoRA {mode.lora!r}, which is not in the catalogue")
        return self

    def with_layout(self, sdxl_source: str, weights_root: str | None) -> ModelCatalogue:
        """The catalogue with the layout's base, the presets' LoRAs and every relative source made absolute."""

        def absolute(spec: _S) -> _S:
            return spec.under(weights_root)

        bases = {DEFAULT_BASE: BaseModelSpec(source=sdxl_source, description="the weights' SDXL base")}
        bases |= {name: absolute(spec) for name, spec in self.base_models.items()}
        loras = {
            name: absolute(LoraSpec(source=f"{LORAS_DIR}/{PRESET_LORA_FILES[name]}", description="preset LoRA"))
            for preset in self.presets
            if (name := PRESET_MODES[preset].lora) is not None
        }
        loras |= {name: absolute(spec) for name, spec in self.loras.items()}
        return self.model_copy(update={"base_models": bases, "loras": loras})

    def check_sources(self) -> None:
        """Fail, naming the entry, when a local or ``s3://`` source of a base or LoRA does not exist (a replica
        runs this when it starts, so a catalogue typo fails the deploy, not a request)."""
        from .weights import check_source

        for name, base in self.base_models.items():
            if base.source is not None:
                check_source(base.source, what=f"base {name}")
            if base.config is not None:
                check_source(base.config, what=f"base {name} config")
        for name, lora in self.loras.items():
            if lora.source is not None:
                check_source(lora.source, what=f"LoRA {name}")

    def all_loras(self) -> set[str]:
        return set(self.loras) | {m.lora for p in self.presets if (m := PRESET_MODES[p]).lora is not None}

    def all_modes(self) -> dict[str, ModeSpec]:
        return {**{p: PRESET_MODES[p] for p in self.presets}, **self.modes}

    def choose(
        self, base: str | None, loras: list[tuple[str, float | None]], mode: str | None
    ) -> tuple[ModelChoice, ModeSpec | None]:
        """The request's base, LoRAs (scale: the request's, else the catalogue's default) and mode, checked."""
        base = base or self.default_base
        if base not in self.base_models:
            available = ", ".join(sorted(self.base_models))
            raise InvalidParameterError(f"unknown base_model {base!r}; available: {available}")
        modes = self.all_modes()
        preset = None
        if mode is not None:
            if mode not in modes:
                raise InvalidParameterError(f"unknown mode {mode!r}; available: {', '.join(sorted(modes)) or 'none'}")
            preset = modes[mode]
        if len(loras) > MAX_REQUEST_LORAS:
            raise InvalidParameterError(f"at most {MAX_REQUEST_LORAS} loras per request (a mode's LoRA is extra)")
        chosen: list[tuple[str, float]] = []
        for name, scale in loras:
            if name not in self.loras:
                available = ", ".join(sorted(self.loras)) or "none"
                raise InvalidParameterError(f"unknown lora {name!r}; available: {available}")
            if any(name == other for other, _ in chosen):
                raise InvalidParameterError(f"lora {name!r} is listed twice")
            chosen.append((name, self.loras[name].scale if scale is None else float(scale)))
        if preset is not None and preset.lora is not None:
            if any(name == preset.lora for name, _ in chosen):
                raise InvalidParameterError(f"lora {preset.lora!r} is already part of mode {mode!r}")
            chosen.append((preset.lora, preset.lora_scale))
        return ModelChoice(base, tuple(chosen), mode), preset
