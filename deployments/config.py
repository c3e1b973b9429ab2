"""Settings the model deployments take as typed objects (pydantic, nothing heavy): ``serve/config.py`` composes
them into the application's configuration and the app builder passes them to the deployments as they are.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    admission: Literal["greedy", "marginal"] = Field(
        default="marginal",
        description="continuous: which waiting requests join the running set. greedy: every one that fits max_rows. "
        "marginal: one joins a running set of its group only while the replica's own forwards (the fixed cost of a "
        "forward, in rows, from neighbouring forwards of different rows) say sharing a forward costs its rows at "
        "most (1 - min_row_saving) of what they would cost alone: on launch-bound hardware (a GPU at small batches) "
        "that is greedy, on compute-bound hardware (a CPU) each request runs alone to completion, oldest first.",
    )
    min_row_saving: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="marginal admission: the least fraction of a request's per-row time that sharing a forward must "
        "save for it to join.",
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


class ForwardCost(_Strict):
    """SIMULATION ONLY: one forward of ``rows`` UNet rows costs ``launch_s + per_row_s x rows`` seconds."""

    launch_s: float = Field(ge=0, description="What a forward costs whatever its rows (kernel launches, weights).")
    per_row_s: float = Field(ge=0, description="What each UNet row adds.")

    def seconds(self, rows: int) -> float:
        return self.launch_s + self.per_row_s * rows


_SIZE = re.compile(r"^(\d+)x(\d+)$")


class DenoiserCostModel(_Strict):
    """SIMULATION ONLY -- never in a real deployment: the Denoiser's network forward becomes a wait of the modelled
    length (``deployments/instantid/simulated.py``), to measure batching policies under another device's costs.

    The constants are fitted from a GPU benchmark report (``instantid bench serve --open-loop --cost-model FILE``);
    ``source`` names that report, and every result measured with a cost model says so.
    """

    source: str = Field(min_length=1, description="Where the constants came from (e.g. a denoise-bench report).")
    sizes: dict[str, ForwardCost] = Field(
        min_length=1, description='Request size "WIDTHxHEIGHT" -> its forward cost; other sizes fail.'
    )
    note: str = Field(default="", description="How the constants were obtained (the fit, what they stand for).")

    @field_validator("sizes")
    @classmethod
    def _size_keys(cls, sizes: dict[str, ForwardCost]) -> dict[str, ForwardCost]:
        bad = [key for key in sizes if not _SIZE.match(key)]
        if bad:
            raise ValueError(f'cost model sizes are "WIDTHxHEIGHT", got {bad}')
        return sizes

    def by_size(self) -> dict[tuple[int, int], ForwardCost]:
        """(width, height) -> forward cost."""
        out = {}
        for key, cost in self.sizes.items():
            match = _SIZE.match(key)
            assert match is not None  # checked by the validator
            out[(int(match[1]), int(match[2]))] = cost
        return out
