"""Denoiser deployment (large GPU): face condition + prompt embeddings -> images, per base and LoRA set.

Bases are loaded through Serve's model multiplexing (the ingress routes by base name) and share one copy of
InstantID's own weights (IdentityNet, resampler, face K/V). Two batching modes (``batching.mode``):

- continuous (default): a :class:`ContinuousBatcher` advances the replica's jobs one step at a time; jobs with the
  same base, LoRA set, size, prompt length, extra ControlNets and number of identities share each forward whatever
  their steps,
  scheduler, guidance, strengths and windows, joining and leaving at step boundaries; at most ``max_rows`` UNet
  rows are admitted, oldest first, and ``batching.admission`` decides whether a request joins a running set at all
  (marginal: only while the replica's measured forwards say sharing saves its rows time).
- static: Serve's ``@serve.batch`` collects requests for ``batch_wait_timeout_s``; within a batch, jobs with equal
  base, LoRA set and ``GenerationParams.batch_key()`` run every step together, groups one after another.

Either way each job keeps its own seeded generator, strengths and maps, and a job without extra ControlNets never
runs them. Serve's ``max_ongoing_requests``/``max_queued_requests`` bound what reaches a replica.

SIMULATION ONLY: with a ``cost_model`` every base's network forward is a wait of the modelled length (see
``deployments/instantid/simulated.py``); the replica logs it, and ``batching_stats`` names the cost model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import serve as ray_serve

from deployments import metrics
from deployments.base_slots import BaseSlot, BaseSlots, ReplicaModels, run_locked
from deployments.config import DenoiserBatching, DenoiserCostModel
from deployments.generation.denoise_stage import denoise_job, denoise_result
from deployments.generation.detail_stage import DETAIL_STAGE, detail_inputs, detail_result
from deployments.generation.hires_stage import HIRES_STAGE, hires_inputs, hires_result
from deployments.generation.messages import (
    ControlMapsResult,
    DenoiseBatch,
    DenoiseResult,
    FaceResult,
    JobTicket,
    PromptResult,
    StageTiming,
    Timings,
    timed,
)
from deployments.instantid.admission import AdmissionPolicy, GreedyAdmission, MarginalAdmission
from deployments.instantid.catalogue import ModelChoice, WeightsSource
from deployments.instantid.continuous import ContinuousBatcher, Outcome, StepGroup
from deployments.instantid.denoiser import DenoiseJob, InstantIDDenoiser
from deployments.instantid.errors import DeviceOutOfMemoryError, GenerationCancelled, WeightsError
from deployments.instantid.face_detail import FaceDetailPass, SmallFace
from deployments.instantid.hires import HiresPass
from deployments.instantid.loading import (
    CONTROLNET_FILES,
    VAE_FILES,
    build_denoiser,
    load_instantid_parts,
    pick_device,
    pick_dtype,
)
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.params import GenerationParams
from deployments.instantid.simulated import CostModelDenoiser
from deployments.instantid.speed import SpeedOptions
from deployments.instantid.weights import DENOISER_COMPONENTS, WeightsLayout
from deployments.job_events import StepReporter, checked_publish, job_events
from deployments.replica import replica_id

logger = logging.getLogger("ray.serve")


@dataclass
class _Item:
    params: GenerationParams  # sized
    model: ModelChoice
    face: FaceResult
    prompt: PromptResult
    slot: BaseSlot[InstantIDDenoiser]
    controls: ControlMapsResult | None = None
    reporter: StepReporter | None = None  # an async job's: steps to the event channel, cancellation back
    arrived: float = field(default_factory=time.time)  # when generate() was called: the queue wait starts


def _latents(items: list[_Item]) -> int:
    return sum(item.params.num_images for item in items)


def _rows(items: list[_Item]) -> int:
    """UNet rows: what ``max_rows`` counts (an image is one row, two with classifier-free guidance)."""
    return sum(item.params.unet_rows for item in items)


class _StepCount:
    """Wraps a job's ``on_step`` to remember how many forwards it ran (the static mode's batch record)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.total = 0

    def __call__(self, step: int, total: int, latents: torch.Tensor) -> bool:
        self.total = total
        return bool(self.inner(step, total, latents)) if self.inner is not None else False


def _span(end: float, seconds: float) -> StageTiming:
    return StageTiming(start=end - seconds, end=end, seconds=seconds)


def admission_policy(batching: DenoiserBatching) -> AdmissionPolicy:
    """The continuous batcher's admission policy named by the config."""
    if batching.admission == "marginal":
        return MarginalAdmission(batching.min_row_saving)
    return GreedyAdmission()


@ray_serve.deployment(name="Denoiser", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class DenoiserDeployment:
    async def __init__(
        self,
        weights: dict[str, Any],
        *,
        models: dict[str, Any],
        device: str,
        dtype: str,
        vae_batch_size: int,
        batching: DenoiserBatching,
        controlnets: dict[str, dict[str, Any]],
        preview_every: int = 5,
        cost_model: DenoiserCostModel | None = None,
        speed: SpeedOptions | None = None,
    ) -> None:
        self.models = ReplicaModels.prepare(models, weights.get("cache_dir"), ("unet",))
        self.speed, self.vae_folder = self._speed(speed, weights.get("cache_dir"))
        layout = WeightsLayout.resolve(**weights, parts=("instantid",))
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.vae_batch_size = vae_batch_size
        self.preview_every = preview_every
        folders = {
            name: WeightsSource.model_validate(spec).resolve(
                weights.get("cache_dir"), what=f"{name} ControlNet", patterns=CONTROLNET_FILES
            )
            for name, spec in controlnets.items()
        }
        self.parts = load_instantid_parts(layout, dtype=self.dtype, controlnets=folders)
        self.instantid = {"identitynet_config": layout.describe()["identitynet_config"]}  # a config hash, no path
        self.cost_model = cost_model
        if cost_model is not None:
            logger.warning(
                "SIMULATED Denoiser: forwards wait as modelled by %s, %s", cost_model.source, cost_model.sizes
            )
        self._batches = 0
        self._forwards = self._rows_stepped = 0  # static mode's counters (the batcher keeps its own)
        self.mode = batching.mode
        self.replica = replica_id()
        self._batch.set_max_batch_size(batching.max_rows)
        self._batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.batcher: ContinuousBatcher | None = None
        if self.mode == "continuous":
            self.batcher = ContinuousBatcher(
                max_rows=batching.max_rows,
                turn_steps=batching.turn_steps,
                gather_s=batching.batch_wait_timeout_s,
                run_prefix=self.replica,
                on_forward=lambda jobs, rows, seconds: metrics.record_denoise_batch(jobs, rows, 1, seconds),
                admission=admission_policy(batching),
            )
        self.bases = BaseSlots(self._build, self.models.catalogue.max_models_per_replica)
        slot, _ = await self.bases.acquire(self.models.catalogue.default_base)  # the default base is warm at start
        slot.release()

    def _speed(self, speed: SpeedOptions | None, cache_dir: str | None) -> tuple[SpeedOptions, Path | None]:
        """The speed switches, checked against the catalogue, and the local folder of their VAE (if any)."""
        speed = speed if speed is not None else SpeedOptions()
        if speed.fp8 != "off" and self.models.lora_files:
            raise WeightsError(
                f"speed.fp8 {speed.fp8} cannot serve LoRAs (a LoRA set is merged into the weights, which fp8 "
                f"quantizes): remove fp8 or the catalogue's LoRAs ({', '.join(sorted(self.models.lora_files))})"
            )
        folder = None
        if speed.vae is not None:
            folder = speed.vae.resolve(cache_dir, what="VAE", patterns=VAE_FILES)
        return speed, folder

    def _build(self, name: str) -> tuple[InstantIDDenoiser, LoraAdapters]:
        base = self.models.base(name, DENOISER_COMPONENTS)
        model = build_denoiser(
            self.parts,
            base,
            device=self.device,
            dtype=self.dtype,
            vae_batch_size=self.vae_batch_size,
            speed=self.speed,
            vae_folder=self.vae_folder,
            cache_dir=self.models.cache_dir,
        )
        if model.inpainting != self.models.catalogue.base_models[name].inpainting:
            raise WeightsError(
                f"base {name}: its UNet has {model.unet.config.in_channels} input channels, but the catalogue says "
                f"inpainting: {str(not model.inpainting).lower()}"
            )
        if self.cost_model is not None:
            model = CostModelDenoiser(model, self.cost_model.by_size())
        adapters = self.models.adapters({"unet": model.unet}, model.unet.config)
        if model.needs_fused_loras:  # fused projections, compiled blocks and graphs read the merged weights
            adapters.fuse = True
        adapters.on_change = model.weights_changed
        return model, adapters

    async def generate(
        self,
        params: GenerationParams,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: ControlMapsResult | None = None,
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """``face``, ``prompt`` and ``controls`` (maps and init image, when the request has any) arrive as upstream
        responses resolved by Serve (no await in the caller). ``job``: an async job, whose steps are reported
        to the event channel and which is dropped at the next step once cancelled or superseded by a takeover."""
        entered = time.time()
        condition = face.condition
        size = (condition.width, condition.height)
        if controls is not None and (controls.inputs.width, controls.inputs.height) != size:
            raise RuntimeError(  # both stages apply one rule to one photo: a mismatch is a bug, not a bad request
                f"control maps are {controls.inputs.width}x{controls.inputs.height} but the face stage chose "
                f"{condition.width}x{condition.height}"
            )
        if job is not None:
            job_events().publish.remote(job.id, "stage", {"stage": "prepare", "phase": "end"}, attempt=job.attempt)
        return await self._denoise(params, model, face, prompt, controls, job, "denoise", entered)

    async def refine(
        self,
        hires: HiresPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: ControlMapsResult | None,
        first: DenoiseResult,
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """The hires pass: ``first`` (the first pass's result, resolved by Serve, so this starts once it finished)
        upscaled and refined image-to-image as its own job, reported to an async job as the ``hires`` stage."""
        entered = time.time()
        params, scaled, inputs = await asyncio.to_thread(hires_inputs, hires, first, face, controls)
        second = await self._denoise(params, model, scaled, prompt, inputs, job, HIRES_STAGE, entered)
        return hires_result(first, second)

    async def detail(
        self,
        detail: FaceDetailPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        first: DenoiseResult,
        found: list[SmallFace],
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """The face detail pass: ``first`` (resolved by Serve once the earlier pass finished) and the faces the face
        stage found on it; one edit job per face, in order, reported to an async job as the ``detail`` stage."""
        images, passes = first.images.copy(), []
        for small in found:
            entered = time.time()
            params, cropped = await asyncio.to_thread(
                detail_inputs, detail, images[small.image], small, face, first.params
            )
            result = await self._denoise(params, model, cropped, prompt, None, job, DETAIL_STAGE, entered)
            images[small.image] = result.images[0]
            passes.append(result)
        return detail_result(first, images, passes, found)

    async def _denoise(
        self,
        params: GenerationParams,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: ControlMapsResult | None,
        job: JobTicket | None,
        stage: str,
        entered: float,
    ) -> DenoiseResult:
        """One denoising job through the replica's batching, its start and end published as ``stage``."""
        condition = face.condition
        reporter = None
        if job is not None:
            answer = await asyncio.to_thread(checked_publish, job, "stage", {"stage": stage, "phase": "start"})
            if answer is not None and answer.cancelled:
                raise GenerationCancelled(f"job {job.id} was cancelled or taken over")
            if answer is not None:  # without the channel, the job runs without progress events
                reporter = StepReporter(job_events(), job.id, answer, self.preview_every, job.attempt)
        slot, waited = await self.bases.acquire(model.base)
        try:
            sized = params.sized(condition.width, condition.height)
            item = _Item(sized, model, face, prompt, slot, controls, reporter, arrived=entered)
            result = await (self._continuous(item) if self.batcher is not None else self._batch(item))
        finally:
            slot.release()
        if reporter is not None:
            reporter.channel.publish.remote(job.id, "stage", {"stage": stage, "phase": "end"}, attempt=job.attempt)
        if isinstance(result, Exception):  # a failed group's error, returned per item by _batch
            raise result
        if waited is not None:
            result.timings["denoise_model_load"] = waited
        metrics.record_queue_wait(model.base, result.timings["denoise_queue"].seconds)
        return result

    async def _continuous(self, item: _Item) -> DenoiseResult | Exception:
        """Submit the job to the step-level batcher and wait for it; a cancelled caller drops it at the next step."""
        assert self.batcher is not None
        slot = item.slot
        loras = item.model.loras
        key = (id(slot), item.model.adapter_key(), item.params.step_key(), item.prompt.embeddings.chunks)

        @contextmanager
        def enter() -> Iterator[float]:
            with slot.lock:  # one step at a time uses the base; switching its LoRA set happens under the same lock
                seconds = slot.adapters.activate(loras)
                if seconds:
                    metrics.record_model_load("lora", slot.name, seconds)
                yield seconds

        assert slot.model is not None
        cost_key = (slot.name, item.params.step_key())  # forwards cost alike whatever the LoRA set or prompt length
        future, cancel = self.batcher.submit(self._job(item), StepGroup(key, slot.model, enter, cost_key))
        try:
            outcome: Outcome = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel()
            raise
        except torch.OutOfMemoryError as exc:
            return self._out_of_memory(exc, _rows([item]))
        except Exception as exc:
            return exc
        stats = outcome.stats
        timings: Timings = {"denoise": _span(outcome.ended, outcome.ended - outcome.started)}
        if stats.switch_s:
            timings["denoise_lora_load"] = _span(outcome.started + stats.switch_s, stats.switch_s)
        batch = DenoiseBatch(
            stats.run, stats.most_jobs, stats.most_images, "continuous", stats.forwards, round(stats.mean_rows, 3)
        )
        return self._result(item, outcome.images, timings, batch)

    def _job(self, item: _Item) -> DenoiseJob:
        return denoise_job(item.params, item.face, item.prompt, item.controls, item.reporter)

    @staticmethod
    def _out_of_memory(exc: BaseException, rows: int) -> DeviceOutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("out of memory on a batch of %d rows", rows)
        error = DeviceOutOfMemoryError("the GPU is out of memory for this request; retry later")
        error.__cause__ = exc
        return error

    @ray_serve.batch(batch_size_fn=_rows)  # max_rows comes from the config (set in __init__); split by base
    async def _batch(self, items: list[_Item]) -> list[DenoiseResult | Exception]:
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            # Long prompts give longer text embeddings: rows of one forward need the same context length.
            key = (id(item.slot), item.params.batch_key(), item.model.adapter_key(), item.prompt.embeddings.chunks)
            groups.setdefault(key, []).append(index)
        results: list[DenoiseResult | Exception | None] = [None] * len(items)
        for indices in groups.values():
            group = [items[i] for i in indices]
            try:
                outputs = await run_locked(group[0].slot, lambda g=group: self._run(g))
            except Exception as exc:  # one group failing must not fail the others
                outputs = [exc] * len(group)
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    def _run(self, group: list[_Item]) -> list[DenoiseResult | Exception]:
        slot = group[0].slot
        model = slot.model
        assert model is not None
        jobs = [self._job(item) for item in group]
        counters = [_StepCount(job.on_step) for job in jobs]
        for job, counter in zip(jobs, counters, strict=True):
            job.on_step = counter
        timings: Timings = {}
        try:
            lora_seconds = slot.adapters.activate(group[0].model.loras)
            with timed(timings, "denoise"):
                images = model.generate(jobs)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, _rows(group)) from exc
        if lora_seconds:
            timings["denoise_lora_load"] = _span(timings["denoise"].start, lora_seconds)
            metrics.record_model_load("lora", group[0].model.base, lora_seconds)
        self._batches += 1
        rows = _rows(group)
        forwards = max(counter.total for counter in counters)
        metrics.record_denoise_batch(len(group), rows, forwards, timings["denoise"].seconds)
        self._forwards += forwards
        self._rows_stepped += forwards * rows
        batch = DenoiseBatch(f"{self.replica}-{self._batches}", len(group), _latents(group), "static", forwards, rows)
        return [self._result(item, imgs, timings, batch) for item, imgs in zip(group, images, strict=True)]

    def _result(
        self, item: _Item, images: Any, timings: Timings, batch: DenoiseBatch
    ) -> DenoiseResult | GenerationCancelled:
        """The job's result, or GenerationCancelled when its async job was cancelled at a step boundary."""
        if images is None:
            job_id = item.reporter.job_id if item.reporter is not None else "?"
            last = item.reporter.last_step if item.reporter is not None else 0
            return GenerationCancelled(f"job {job_id} was cancelled at step {last}")
        return denoise_result(
            item.params,
            item.model,
            item.face,
            item.prompt,
            item.controls,
            images,
            timings,
            arrived=item.arrived,
            batch=batch,
            replica=self.replica,
        )

    def batching_stats(self) -> dict[str, Any]:
        """Forwards run and UNet rows stepped since this ``replica`` started (rows / forwards = rows per forward; the
        replica's id tells a replaced replica's fresh counters from its predecessor's); in continuous mode also
        ``load`` (the jobs waiting and running and the rows admitted now) and ``admission`` (the policy and the
        forward costs it has fitted); with a cost model, ``simulated``: its source and sizes."""
        stats: dict[str, Any] = {"mode": self.mode, "replica": self.replica}
        if self.batcher is not None:
            stats |= {"forwards": self.batcher.forwards, "rows": self.batcher.rows_stepped}
            stats |= {"load": self.batcher.load(), "admission": self.batcher.admission.describe()}
        else:
            stats |= {"forwards": self._forwards, "rows": self._rows_stepped}
        if self.cost_model is not None:
            stats["simulated"] = self.cost_model.model_dump()
        return stats

    def model_info(self) -> dict[str, Any]:
        """What this replica serves now: InstantID's weights, the bases it holds warm, the LoRAs each has loaded."""
        return {
            **self.instantid,
            "controlnets": sorted(self.parts.controlnets),
            "loaded_bases": {slot.name: slot.adapters.loaded for slot in self.bases.slots()},
        }

    def check_health(self) -> None:
        if self.batcher is not None and not self.batcher.alive:
            raise RuntimeError("the continuous batcher's worker thread stopped")
        for slot in self.bases.slots():
            model = slot.model
            if model is not None and next(model.unet.parameters()).isnan().any():
                raise RuntimeError(f"UNet weights of base {slot.name} are corrupted (NaN)")
