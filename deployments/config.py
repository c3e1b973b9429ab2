"""Settings the model deployments take as typed objects (pydantic, nothing heavy): ``serve/config.py`` composes
them into the application's configuration and the app builder passes them to the deployments as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchOptions(_Strict):
    max_batch_size: int = Field(default=8, ge=1, description="Prompts encoded in one batch.")
    batch_wait_timeout_s: float = Field(default=0.02, ge=0)


class DenoiserBatching(_Strict):
    """How the Denoiser shares UNet/ControlNet forwards between requests."""

    mode: Literal["static", "continuous"] = Field(
        default="continuous",
        description="continuous: jobs join and leave the running set at every step boundary (any step counts, "
        "schedulers, guidance and windows share a forward); static: requests that arrive within "
        "batch_wait_timeout_s and have equal steps, scheduler and windows run from start to end together.",
    )
    max_rows: int = Field(
        default=32,
        ge=16,
        description="UNet rows in flight per replica: an image is one row, two with classifier-free guidance. Beyond "
        "it requests wait, oldest first. At least 16: one request of 8 images with guidance.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.02, ge=0, description="How long the first request to an idle Denoiser waits for others to start with."
    )
    turn_steps: int = Field(
        default=8,
        ge=1,
        description="continuous: steps a group of requests that cannot share a forward (another size, base or LoRA "
        "set) runs before the turn passes to the group with the oldest request.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_batch_size" in data:
            raise ValueError(
                "denoiser batching.max_batch_size (latents) is replaced by max_rows, which counts UNet rows: an image "
                "is one row, two with classifier-free guidance (max_batch_size: 8 with guidance is max_rows: 16)"
            )
        return data
