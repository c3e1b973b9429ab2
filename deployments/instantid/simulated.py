"""SIMULATION ONLY: a denoiser whose network forward is a wait of a modelled length instead of the networks.

Used to measure the batching policies (static against continuous, and the continuous batcher's admission) under a
GPU's cost curve on a machine without that GPU: every step of a batch of ``rows`` UNet rows waits
``launch_s + per_row_s x rows`` seconds, constants fitted from a GPU benchmark report, per output size. Everything
around the forward stays real: each job's setup, scheduler, per-row timesteps, guidance, its ``on_step`` (progress
and cancellation), the batcher's bookkeeping. The latents stay as they are (the noise prediction is zero), so the
images mean nothing; only the timing does.

The VAE decode is not run: a benchmark report of one step count cannot tell the decode from the per-row forward
cost, so the fitted constants already carry it (spread over the steps), and the tiny model's CPU decode would add a
second, CPU-bound decode (about 0.4 s per 256 px image on a busy 2-core machine, four of the modelled forwards)
that stalls every job of the running set. The images handed back are flat grey, of the right shape.

Nothing here is used unless the Denoiser's configuration names a cost model (``DenoiserConfig.cost_model``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from .batch_rows import StepBatch
from .denoiser import DenoiseJob, InstantIDDenoiser
from .errors import InvalidParameterError


class RowCost(Protocol):
    """Seconds of one forward of ``rows`` UNet rows (``deployments.config.ForwardCost`` is one)."""

    def seconds(self, rows: int) -> float: ...


class CostModelDenoiser(InstantIDDenoiser):
    """An :class:`InstantIDDenoiser` over another one's components whose :meth:`predict_noise` only waits.

    A subclass rather than a wrapper so that the static loop (``generate``) and the continuous batcher (``step``)
    both reach the modelled forward through the one real ``step``.
    """

    def __init__(
        self,
        model: InstantIDDenoiser,
        costs: Mapping[tuple[int, int], RowCost],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``costs``: (width, height) of a request -> its forward cost; ``sleep`` is injectable for tests."""
        super().__init__(
            model.unet,
            model.controlnet,
            model.vae,
            model.resampler,
            model.scheduler_config,
            device=model.device,
            dtype=model.dtype,
            vae_batch_size=model.vae_batch_size,
            controlnets=model.controlnets,
        )
        if not costs:
            raise ValueError("a cost model needs the forward cost of at least one size")
        self.costs = dict(costs)
        self._sleep = sleep

    def start(self, job: DenoiseJob) -> None:
        """A job of a size the cost model has no constants for fails alone, before it takes a forward."""
        size = (job.params.width, job.params.height)
        if size not in self.costs:
            known = ", ".join(f"{w}x{h}" for w, h in sorted(self.costs))
            raise InvalidParameterError(f"the simulated denoiser models only sizes {known}, not {size[0]}x{size[1]}")
        super().start(job)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Flat grey images of the latents' size: the decode's cost is in the fitted forward (module docstring)."""
        count, _, height, width = latents.shape
        scale = self.vae_scale_factor
        return np.full((count, height * scale, width * scale, 3), 128, dtype=np.uint8)

    def predict_noise(
        self,
        jobs: Sequence[DenoiseJob],
        batch: StepBatch,
        sample: torch.Tensor,
        t_rows: torch.Tensor,
        unet_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Wait what a forward of ``batch.rows`` rows costs at the jobs' size; predict no noise."""
        params = jobs[0].params
        self._sleep(self.costs[(params.width, params.height)].seconds(batch.rows))
        return torch.zeros_like(sample)
