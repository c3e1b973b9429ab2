"""The InstantID denoising loop: face tokens -> IdentityNet + SDXL UNet -> VAE decode.

Written for batches of *requests* ("jobs"): one UNet/IdentityNet forward per step serves every latent
of every job, while each job keeps its own scheduler instance, its own seeded generator (drawn exactly as a
single-request diffusers pipeline draws it) and its own strengths, so batching changes a result only
within float tolerance. Differences from stock diffusers SDXL ControlNet pipelines, as published:
IdentityNet receives the 16 face tokens (not the text) as ``encoder_hidden_states``; the UNet's
cross-attention context is text tokens + face tokens; an optional face-region mask scales IdentityNet's
residuals and the face-token attention.

Extra ControlNets (pose, canny, depth) work as in the published full InstantID pipeline: each receives the TEXT
embeddings, its own map, strength and window; the face-region mask weighs IdentityNet only; all residuals are
summed. Image-to-image works as diffusers' SDXL img2img pipelines: the init image is VAE-encoded (sampled with the
job's generator), noised to the first timestep that ``strength`` keeps, and only the remaining steps run. With an
inpainting mask (an edit, ``editing.py``) it works as diffusers' SDXL inpainting pipeline does: for a 4-channel UNet,
after every step the latents outside the mask are replaced by the init image's, re-noised to the next timestep; a
9-channel inpainting UNet reads the mask and the masked image's latents as extra input channels instead (the
ControlNets read the 4 latent channels alone, as in diffusers' ControlNet inpainting pipeline).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from .attention import CONDITIONING_KWARG, refresh_fused_projections
from .batch_rows import JobRows, StepBatch
from .errors import InvalidParameterError
from .identity import negative_identity
from .keypoints import draw_keypoint_image, face_region_mask
from .latent_starts import ImageLatents, image_tensor, init_tensor, keep_known
from .multi_identity import identity_conditioning, per_identity_identitynet
from .params import DEFAULT_VAE_BATCH_SIZE, GenerationParams
from .regions import PlacedIdentity
from .resampler import Resampler
from .schedulers import make_scheduler
from .static_step import StaticStep
from .text import PromptEmbeddings


@dataclass
class DenoiseJob:
    """One request at the denoiser: identity, keypoints in output coordinates, prompt embeddings, params."""

    params: GenerationParams
    face_embedding: np.ndarray  # (512,) raw identity vector, or (N, 512): N resampler input tokens (concat)
    keypoints: np.ndarray  # (5, 2) in output-image pixels
    face_box: np.ndarray  # (4,) x1, y1, x2, y2 in output-image pixels (the enhance-region mask)
    prompt: PromptEmbeddings
    control_image: np.ndarray | None = None  # (H, W, 3) uint8; None: drawn from ``keypoints`` (the normal case)
    control_maps: Mapping[str, np.ndarray] = field(default_factory=dict)  # extra ControlNet -> (H, W, 3) uint8
    # Image-to-image: (H, W, 3) uint8 at the output size, or (num_images, H, W, 3): each image its own start.
    init_image: np.ndarray | None = None
    # Inpainting (with init_image): (H, W) uint8 at the output size, >= 128 repaints; elsewhere the init image is kept.
    inpaint_mask: np.ndarray | None = None
    # Called after each of the job's steps with (step, total, latents); returning True drops the job from the batch
    # at that step boundary (cancellation): the others go on, and ``generate`` gives None for it.
    on_step: Callable[[int, int, torch.Tensor], bool] | None = field(default=None, repr=False)
    # Several people (``params.identities`` of them): each one's vector, face and region; when set, it replaces
    # face_embedding/keypoints/face_box (see multi_identity).
    identities: Sequence[PlacedIdentity] | None = None
    _state: dict = field(default_factory=dict, repr=False)


def control_keep(step: int, num_steps: int, start: float, end: float) -> float:
    """1.0 when IdentityNet is on at ``step`` of ``num_steps`` (diffusers' control_guidance window)."""
    return 1.0 - float(step / num_steps < start or (step + 1) / num_steps > end)


def _summed(residuals: list) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The ControlNets' residuals added up (IdentityNet first, then the extra ones in order), or none."""
    if not residuals:
        return None, None
    down, mid = residuals[0]
    for more_down, more_mid in residuals[1:]:
        down = [a + b for a, b in zip(down, more_down, strict=True)]
        mid = mid + more_mid
    return down, mid


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device`` and cast only when needed (diffusers warns on redundant dtype casts)."""
    params = list(module.parameters())
    if any(p.dtype != dtype for p in params):
        module = module.to(dtype=dtype)
    if any(p.device != device for p in params):
        module = module.to(device=device)
    return module.eval()


def _guided(rows: torch.Tensor, guidance: torch.Tensor | float, rescale: float) -> torch.Tensor:
    """Classifier-free guidance of one job's (unconditional, conditional) rows, with the optional rescale."""
    uncond, cond = rows.chunk(2)
    guided = uncond + guidance * (cond - uncond)
    return rescale_noise_cfg(guided, cond, rescale) if rescale > 0 else guided


class InstantIDDenoiser:
    """IdentityNet + UNet (with face-token attention installed) + VAE + resampler, on one device."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        vae: AutoencoderKL,
        resampler: Resampler,
        scheduler_config: dict,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE,
        controlnets: Mapping[str, ControlNetModel] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.controlnet = _place(controlnet, self.device, dtype)
        self.controlnets = {name: _place(net, self.device, dtype) for name, net in (controlnets or {}).items()}
        # SDXL's VAE overflows in fp16: decode in fp32 unless the VAE says it is safe (e.g. the fp16-fix VAE).
        vae_fp32 = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", True))
        self.vae_dtype = torch.float32 if vae_fp32 else dtype
        self.vae = _place(vae, self.device, self.vae_dtype)
        self.resampler = _place(resampler, self.device, dtype)
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_batch_size = vae_batch_size
        self.num_face_tokens = resampler.config.num_queries
        channels = self.unet.config.in_channels  # 9: an inpainting UNet (+ mask and masked-image latents)
        if channels not in (self.vae.config.latent_channels, self.vae.config.latent_channels * 2 + 1):
            raise ValueError(
                f"a UNet of {channels} input channels does not fit a VAE of {self.vae.config.latent_channels}"
            )
        self.inpainting = channels != self.vae.config.latent_channels
        # Set by acceleration.accelerate (all off: the eager step as written above).
        self.static_step: StaticStep | None = None
        self.compiled = False
        self.fused_projections = False

    # ----------------------------------------------------------------------------------------------------
    def _prepare_job(self, job: DenoiseJob) -> None:
        """Scheduler, generator, initial latents and conditioning of one job (as diffusers orders them)."""
        p = job.params
        if p.width is None or p.height is None:
            raise InvalidParameterError("the output size is not set (GenerationParams.sized)")
        if p.width % self.vae_scale_factor or p.height % self.vae_scale_factor:
            raise InvalidParameterError(f"width and height must be multiples of {self.vae_scale_factor}")
        if (p.strength is None) != (job.init_image is None):
            raise InvalidParameterError("image-to-image needs both an init image and a strength")
        if job.inpaint_mask is not None and (job.init_image is None or job.inpaint_mask.shape != (p.height, p.width)):
            raise InvalidParameterError(f"an inpainting mask needs an init image and the shape ({p.height}, {p.width})")
        if self.inpainting and job.inpaint_mask is None:
            raise InvalidParameterError(
                "this base is an inpainting model (9-channel UNet): it only edits (target_image)"
            )
        if p.strength is not None and p.denoising_steps == 0:
            raise InvalidParameterError(
                f"strength {p.strength} leaves no denoising step of {p.num_inference_steps} (int(steps x strength) "
                "must be at least 1)"
            )
        scheduler = make_scheduler(p.scheduler, self.scheduler_config)
        scheduler.set_timesteps(p.num_inference_steps, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(p.seed)
        timesteps = scheduler.timesteps
        inpaint = unet_extra = None
        if job.init_image is None:
            shape = (
                p.num_images,
                self.vae.config.latent_channels,
                p.height // self.vae_scale_factor,
                p.width // self.vae_scale_factor,
            )
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            first = p.skipped_steps * scheduler.order
            timesteps = timesteps[first:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(first)
            init = init_tensor(job.init_image, p)
            starts = ImageLatents(self.vae, self.device, self.dtype, self.vae_dtype)
            if job.inpaint_mask is None:
                latents = starts.noised(init, p.num_images, scheduler, timesteps[:1], generator)
            else:
                latents, inpaint, unet_extra = starts.inpaint_start(
                    init, job.inpaint_mask, p, scheduler, timesteps, generator, masked_image_input=self.inpainting
                )

        cfg = p.do_classifier_free_guidance
        if job.identities is not None:  # several people: k x 16 face tokens, one mask channel per identity
            face_pos, face_neg, keypoint_image, mask = identity_conditioning(self.resampler, job.identities, p)
        elif p.identities != 1:
            raise InvalidParameterError(f"the job's parameters say {p.identities} identities but it carries one")
        else:
            embedding = torch.tensor(np.asarray(job.face_embedding, dtype=np.float32))[None]
            negative = negative_identity(tuple(embedding.shape), p.face_noise, p.seed) if cfg else None
            face_pos, face_neg = self.resampler.face_tokens(embedding, with_negative=cfg, negative=negative)
            keypoint_image = job.control_image
            if keypoint_image is None:
                keypoint_image = draw_keypoint_image(np.asarray(job.keypoints, dtype=np.float32), p.width, p.height)
            mask = None
            if p.enhance_face_region:
                mask = torch.from_numpy(face_region_mask(np.asarray(job.face_box), p.width, p.height))[None, None]
        if job.control_image is not None:  # a ready-made condition image wins (also over several identities')
            keypoint_image = job.control_image
        control_image = image_tensor(keypoint_image, p, "control_image")
        maps = {}
        for setting in p.active_controlnets:
            if setting.name not in self.controlnets:
                have = ", ".join(self.controlnets) or "none"
                raise InvalidParameterError(f"this denoiser has no {setting.name} ControlNet (it has: {have})")
            if setting.name not in job.control_maps:
                raise InvalidParameterError(f"the {setting.name} ControlNet needs a control map")
            maps[setting.name] = image_tensor(job.control_maps[setting.name], p, f"the {setting.name} map")
        step_kwargs = set(inspect.signature(scheduler.step).parameters)
        job._state = {
            "scheduler": scheduler,
            "timesteps": timesteps,
            "generator": generator,
            "latents": latents,
            "step_kwargs": {"generator": generator} if "generator" in step_kwargs else {},
            "face": {"pos": face_pos, "neg": face_neg},
            "control_image": control_image,
            "maps": maps,
            "mask": mask,
            "inpaint": inpaint,
            "unet_extra": unet_extra,
        }

    def _job_rows(self, job: DenoiseJob) -> JobRows:
        """The job's block of rows, [negatives, positives] with CFG, made once when it starts."""
        p, pr, st = job.params, job.prompt, job._state
        n, cfg = p.num_images, p.do_classifier_free_guidance
        halves = ("neg", "pos") if cfg else ("pos",)
        text, pooled = [], []
        for half in halves:
            if half == "neg":
                assert pr.negative_embeds is not None and pr.negative_pooled is not None
                text.append(pr.negative_embeds[None].expand(n, -1, -1))
                pooled.append(pr.negative_pooled[None].expand(n, -1))
            else:
                text.append(pr.embeds[None].expand(n, -1, -1))
                pooled.append(pr.pooled[None].expand(n, -1))
        count = n * len(halves)
        to = {"device": self.device, "dtype": self.dtype}
        settings = {c.name: c for c in p.active_controlnets}
        time_ids = torch.tensor([[p.height, p.width, 0, 0, p.height, p.width]], dtype=torch.float32)
        return JobRows(
            count=count,
            images=n,
            cfg=cfg,
            guidance=p.guidance_scale,
            text=torch.cat(text).to(**to),
            pooled=torch.cat(pooled).to(**to),
            face=torch.cat([st["face"][half].expand(n, -1, -1) for half in halves]).to(**to),
            control_image=st["control_image"].expand(count, -1, -1, -1).to(**to),
            mask=None if st["mask"] is None else st["mask"].expand(count, -1, -1, -1).to(**to),
            identity_strength=torch.full((count,), p.identitynet_strength).to(**to),
            adapter_strength=torch.full((count,), p.adapter_strength).to(**to),
            time_ids=time_ids.expand(count, -1).to(**to),
            maps={name: st["maps"][name].expand(count, -1, -1, -1).to(**to) for name in settings},
            map_strengths={name: torch.full((count,), settings[name].strength).to(**to) for name in settings},
        )

    @torch.no_grad()
    def start(self, job: DenoiseJob) -> None:
        """Prepare a job to step: scheduler, generator, initial latents, conditioning and its rows (once)."""
        self._prepare_job(job)
        job._state["rows"] = self._job_rows(job)
        job._state["index"] = 0

    def batch(self, jobs: Sequence[DenoiseJob]) -> StepBatch:
        """The rows of started, compatible jobs (equal ``GenerationParams.step_key`` and prompt length), to step
        together until the set changes."""
        keys = {(j.params.step_key(), j.prompt.chunks) for j in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs that step together need one step_key and prompt length, got {keys}")
        return StepBatch([j._state["rows"] for j in jobs], self.num_face_tokens)

    def _identitynet(self, sample: torch.Tensor, t: torch.Tensor, batch: StepBatch, keep: tuple[float, ...]):
        """IdentityNet's residuals for the batch, weighted per row by strength x face-region mask x window."""
        if batch.mask is not None and batch.mask.shape[1] > 1:  # several people: each identity's own pass
            return per_identity_identitynet(
                self.controlnet,
                sample,
                t,
                face=batch.face,
                control_image=batch.control_image,
                pooled=batch.pooled,
                time_ids=batch.time_ids,
                conditioning_scale=1.0,
                weight=lambda size, dtype: batch.identitynet_weight(size, keep, dtype),  # (rows, k, h, w)
            )
        down, mid = self.controlnet(
            sample,
            t,
            encoder_hidden_states=batch.face,
            controlnet_cond=batch.control_image,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
            return_dict=False,
        )

        def weigh(residual: torch.Tensor) -> torch.Tensor:
            return residual * batch.identitynet_weight(tuple(residual.shape[-2:]), keep, residual.dtype)

        return [weigh(r) for r in down], weigh(mid)

    def _extra_controlnet(
        self, name: str, sample: torch.Tensor, t: torch.Tensor, batch: StepBatch, keep: tuple[float, ...]
    ):
        """An extra ControlNet's residuals: it reads the TEXT embeddings and its map; weighted per row by its
        strength x window."""
        down, mid = self.controlnets[name](
            sample,
            t,
            encoder_hidden_states=batch.text,
            controlnet_cond=batch.maps[name],
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
            return_dict=False,
        )
        weight = batch.map_weight(name, keep)
        return [r * weight.to(r.dtype) for r in down], mid * weight.to(mid.dtype)

    @torch.no_grad()
    def step(self, jobs: Sequence[DenoiseJob], batch: StepBatch) -> list[DenoiseJob]:
        """Advance every job of ``batch`` by one of its own steps in one UNet (and ControlNet) forward.

        Each row gets its job's own timestep, window and strengths, and each job's scheduler steps its own
        latents with its own generator, so who else is in the batch changes a result only within float
        tolerance. Returns the jobs that ended at this boundary: finished (``finished(job)``) or dropped by
        their ``on_step``.
        """
        timesteps = [j._state["timesteps"][j._state["index"]] for j in jobs]
        sample_parts, row_timesteps, extra_parts = [], [], []
        for job, t, rows in zip(jobs, timesteps, batch.blocks, strict=True):
            scaled = job._state["scheduler"].scale_model_input(job._state["latents"], t)
            sample_parts.append(torch.cat([scaled, scaled]) if rows.cfg else scaled)
            row_timesteps.append(t.to(device=self.device, dtype=torch.float32).reshape(1).expand(rows.count))
            if (extra := job._state["unet_extra"]) is not None:  # an inpainting UNet's mask and masked image
                extra_parts.append(torch.cat([extra, extra]) if rows.cfg else extra)
        unet_extra = torch.cat(extra_parts) if extra_parts else None
        noise = self.predict_noise(jobs, batch, torch.cat(sample_parts), torch.cat(row_timesteps), unet_extra)
        return self._advance(jobs, batch, timesteps, noise)

    def predict_noise(
        self,
        jobs: Sequence[DenoiseJob],
        batch: StepBatch,
        sample: torch.Tensor,
        t_rows: torch.Tensor,
        unet_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network forward of one step: the ControlNets' residuals, then the UNet's noise prediction per row.

        The only part of a step that runs the networks (everything around it is per-job bookkeeping), so it is
        also the one seam a simulation replaces (``simulated.CostModelDenoiser``). The bucketed, capturable forward
        runs when the batch fits a bucket; otherwise the eager one. ``unet_extra``: an inpainting UNet's extra input
        channels per row, appended to ``sample`` for the UNet only (the ControlNets read the latents alone).
        """
        identity_keep = tuple(
            self._keep(j, j.params.control_guidance_start, j.params.control_guidance_end) for j in jobs
        )
        if self.static_step is not None and unet_extra is None:
            noise = self.static_step.forward(batch, sample, t_rows, identity_keep)
            if noise is not None:
                return noise
        with self._eager():
            return self._eager_forward(jobs, batch, sample, t_rows, identity_keep, unet_extra)

    def _advance(
        self, jobs: Sequence[DenoiseJob], batch: StepBatch, timesteps: list[torch.Tensor], noise: torch.Tensor
    ) -> list[DenoiseJob]:
        """Guidance and each job's own scheduler step on its rows of ``noise``; the jobs that ended here."""
        ended = []
        for job, t, rows, part in zip(jobs, timesteps, batch.blocks, noise.split(batch.counts), strict=True):
            if rows.cfg:
                part = _guided(part, rows.guidance, job.params.guidance_rescale)
            st = job._state
            st["latents"] = st["scheduler"].step(part, t, st["latents"], **st["step_kwargs"], return_dict=False)[0]
            if st.get("inpaint") is not None:
                st["latents"] = keep_known(st, st["index"])
            st["index"] += 1
            total = len(st["timesteps"])
            dropped = job.on_step is not None and job.on_step(st["index"], total, st["latents"])
            if dropped or st["index"] == total:
                st["dropped"] = bool(dropped)
                ended.append(job)
        return ended

    def _eager_forward(
        self,
        jobs: Sequence[DenoiseJob],
        batch: StepBatch,
        sample: torch.Tensor,
        t_rows: torch.Tensor,
        identity_keep: tuple[float, ...],
        unet_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """IdentityNet (when a window is open), the extra ControlNets and the UNet, with the batch's caches."""
        residuals = []
        if any(k != 0 and j.params.identitynet_strength != 0 for k, j in zip(identity_keep, jobs, strict=True)):
            residuals.append(self._identitynet(sample, t_rows, batch, identity_keep))
        for name in batch.maps:
            windows = [{c.name: c for c in j.params.active_controlnets}[name] for j in jobs]
            keep = tuple(self._keep(j, w.start, w.end) for j, w in zip(jobs, windows, strict=True))
            if any(keep):
                residuals.append(self._extra_controlnet(name, sample, t_rows, batch, keep))
        down, mid = _summed(residuals)
        return self.unet(
            sample if unet_extra is None else torch.cat([sample, unet_extra], dim=1),
            t_rows,
            encoder_hidden_states=batch.context,
            cross_attention_kwargs={CONDITIONING_KWARG: batch.conditioning},
            added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def _eager(self) -> contextlib.AbstractContextManager:
        """Compiled blocks run eagerly for the eager step: its lazily filled caches are no program to compile,
        and sizes outside the buckets would each cost a compilation."""
        return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()

    @property
    def needs_fused_loras(self) -> bool:
        """Whether LoRA sets must be merged into the weights (fused projections and recorded graphs read the
        base weights only; a compiled block would recompile at every switch of unfused adapters)."""
        return self.compiled or self.fused_projections or self.static_step is not None

    def weights_changed(self, structural: bool) -> None:
        """Called after the UNet's weights changed in place (a LoRA set merged or restored): fused projections are
        copied again; ``structural`` (adapter modules added or removed): recorded graphs are dropped."""
        if self.fused_projections:
            refresh_fused_projections(self.unet)
        if structural and self.static_step is not None:
            self.static_step.invalidate()

    @staticmethod
    def _keep(job: DenoiseJob, start: float, end: float) -> float:
        return control_keep(job._state["index"], len(job._state["timesteps"]), start, end)

    @staticmethod
    def finished(job: DenoiseJob) -> bool:
        """Whether a started job ran all its steps (rather than being dropped by ``on_step``)."""
        return job._state.get("index") == len(job._state.get("timesteps", ())) and not job._state.get("dropped")

    def finish(self, job: DenoiseJob) -> np.ndarray | None:
        """The job's images once it ended (None when dropped); frees its state."""
        images = self.decode(job._state["latents"]) if self.finished(job) else None
        job._state = {}
        return images

    @torch.no_grad()
    def generate(self, jobs: Sequence[DenoiseJob]) -> list[np.ndarray | None]:
        """Run jobs with equal ``GenerationParams.batch_key()`` from start to end together (static batching);
        returns one uint8 array (num_images, H, W, 3) per job (None for a job its ``on_step`` dropped)."""
        if not jobs:
            return []
        key = jobs[0].params.batch_key()
        if any(j.params.batch_key() != key for j in jobs):
            raise ValueError("generate() needs jobs with equal GenerationParams.batch_key()")
        if len({j.prompt.chunks for j in jobs}) > 1:
            raise ValueError("generate() needs jobs whose prompts take the same number of 77-token chunks")
        for job in jobs:
            self.start(job)
        running = list(jobs)
        batch = self.batch(running)
        while running:
            ended = {id(j) for j in self.step(running, batch)}  # jobs hold arrays: compared by identity
            if ended:  # the others' rows are rebuilt from their own blocks: their results do not change
                running = [j for j in running if id(j) not in ended]
                batch = self.batch(running) if running else batch
        return [self.finish(job) for job in jobs]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 RGB (N, H, W, 3), rounded as diffusers' image processor rounds."""
        config = self.vae.config
        out = []
        for chunk in latents.split(self.vae_batch_size):
            chunk = chunk.to(self.vae_dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(chunk)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(chunk)
                chunk = chunk * std_t / config.scaling_factor + mean_t
            else:
                chunk = chunk / config.scaling_factor
            image = self.vae.decode(chunk, return_dict=False)[0]
            image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            out.append((image * 255).round().astype(np.uint8))
        return np.concatenate(out)
