"""The diffusers scheduler behind each scheduler name the API accepts, built from the base model's own config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .options import SchedulerName

_SCHEDULERS: dict[SchedulerName, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    # Few-step samplers: LCM and TCD for consistency-distilled LoRAs, and trailing timesteps (the last step starts
    # at the noisiest timestep) as SDXL-Lightning and Hyper-SD are sampled.
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
    "euler_trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "ddim_trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler instance (schedulers keep per-run state: one per request, never shared)."""
    try:
        cls, overrides = _SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}") from None
    return cls.from_config(dict(base_config), **overrides)
