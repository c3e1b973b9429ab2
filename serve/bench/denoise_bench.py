"""``instantid bench denoise``: our InstantID denoiser against diffusers' stock SDXL ControlNet pipeline.

Both run in the same process on the same modules: the same UNet weights (the baseline gets the UNet's
standard attention processors back, ours its face-token processors), the same ControlNet, VAE and text
embeddings, the same scheduler, size, steps and CFG. The stock pipeline differs as published: its
ControlNet sees the 77 text tokens, and it has no resampler and no face K/V (ours: IdentityNet sees the
16 face tokens; the UNet attends to text + face tokens).

Profiles:

- ``sdxl-random``: full-size SDXL base, IdentityNet (``ControlNetModel.from_unet``), resampler, face K/V,
  VAE and both text encoders from their published configurations with RANDOM weights, built directly on
  the GPU in half precision (building 4 B parameters on a CPU takes minutes): same compute as the real
  models, no download. ``--dry-run`` builds them on the meta device and reports parameter counts.
- ``tiny``: the test-size models on the CPU, a smoke test CI can run.

Cold start: the random weights are saved once in the ``instantid weights tiny`` layout (``sdxl/``,
``instantid/ControlNetModel``, ``instantid/ip-adapter.bin``); a fresh process then times
``load_denoiser`` + ``load_prompt_encoder`` up to the first finished image.

Portability: a GPU machine set up for benchmarks may have only torch, transformers, accelerate, safetensors,
onnx and Pillow (no diffusers, Ray or insightface) and no network. This module therefore imports only torch and numpy at
module level, needs neither Ray nor face analysis (``loading`` imports insightface only to load it), draws
the keypoint image with numpy (no OpenCV), and gets diffusers from wheels that travel with the code
(``serve/bench/gpu_wheels.sh``). Run it as ``python -m serve.bench.denoise_bench`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deployments.instantid.params import DEFAULT_PARAMS
from serve.bench import BenchError, add_denoise_arguments, emit, machine_facts, progress

PROMPT = "a portrait of a person in a spacesuit, studio lighting, detailed"
SEED = 1234
REPO_ROOT = Path(__file__).resolve().parents[2]
DENOISE_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow")

# Five keypoints of a frontal face, as fractions of the image side: left eye, right eye, nose, mouth corners.
FACE_KEYPOINTS = np.array([[0.40, 0.40], [0.60, 0.40], [0.50, 0.52], [0.42, 0.64], [0.58, 0.64]], dtype=np.float32)
FACE_BOX = np.array([0.28, 0.22, 0.72, 0.80], dtype=np.float32)  # x1, y1, x2, y2 as fractions


# ------------------------------------------------------------------------------------------ model sizes


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL base's published UNet configuration (stabilityai/stable-diffusion-xl-base-1.0's unet/config.json)."""
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    }


def sdxl_vae_config() -> dict[str, Any]:
    """SDXL base's published VAE: 4 blocks (scale factor 8), scaling 0.13025, fp16-unsafe (force_upcast)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def _clip_config(size: str, vocab_size: int):
    """CLIP-L (encoder 1) or OpenCLIP bigG (encoder 2) text configs at their published sizes.

    The vocabulary keeps its published size (49408) so the embedding tables weigh what they weigh; the
    byte-level tokenizer only emits ids below 514, all inside it.
    """
    from transformers import CLIPTextConfig

    common = {"vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    if size == "clip-l":
        return CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
            pad_token_id=1,
            **common,
        )
    return CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        pad_token_id=1,
        **common,
    )


@dataclass
class Models:
    """Every module both pipelines need, plus the UNet's two processor sets (standard and face-token)."""

    unet: Any
    controlnet: Any
    vae: Any
    resampler: Any
    face_layers: torch.nn.ModuleList
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    standard_processors: dict[str, Any]
    face_processors: dict[str, Any]

    def parameter_counts(self) -> dict[str, int]:
        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        face_kv = count(self.face_layers)
        with self.standard_attention():
            unet = count(self.unet)  # without the face processors, which register as UNet submodules
        counts = {
            "unet": unet,
            "identitynet": count(self.controlnet),
            "resampler": count(self.resampler),
            "face_kv": face_kv,
            "vae": count(self.vae),
            "text_encoder": count(self.text_encoder),
            "text_encoder_2": count(self.text_encoder_2),
        }
        counts["total"] = sum(counts.values())
        return counts

    def pipeline_components(self, **overrides: Any) -> dict[str, Any]:
        """The modules a diffusers SDXL pipeline is built from (a fresh Euler scheduler), with ``overrides``."""
        from diffusers import EulerDiscreteScheduler

        components = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "unet": self.unet,
            "scheduler": EulerDiscreteScheduler.from_config(self.scheduler_config),
        }
        return {**components, **overrides}

    @contextlib.contextmanager
    def standard_attention(self) -> Iterator[None]:
        """The UNet as diffusers builds it (for the baseline and for saving), then face-token attention again."""
        self.unet.set_attn_processor(dict(self.standard_processors))  # diffusers empties the dict it is given
        try:
            yield
        finally:
            self.unet.set_attn_processor(dict(self.face_processors))


@contextlib.contextmanager
def building_on(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no CPU copy, no fp32 detour; meta: no memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_models(profile: str, device: torch.device | str, dtype: torch.dtype) -> Models:
    """Random-weight models of ``profile`` built on ``device``; the VAE stays fp32 (it decodes in fp32)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from deployments.instantid.attention import install_face_attention
    from deployments.instantid.resampler import Resampler, ResamplerConfig
    from deployments.tiny.weights import byte_level_tokenizer, sdxl_scheduler, tiny_text_encoders, tiny_unet, tiny_vae

    tokenizer = byte_level_tokenizer()
    tokenizer_2 = byte_level_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    target = torch.device(device)
    cuda_devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # seeded weights, the caller's RNG state untouched
        torch.manual_seed(SEED)
        with building_on(device, dtype):
            if profile == "sdxl-random":
                unet = UNet2DConditionModel(**sdxl_unet_config())
                controlnet = ControlNetModel.from_unet(unet)
                text_encoder = CLIPTextModel(_clip_config("clip-l", 49408))
                text_encoder_2 = CLIPTextModelWithProjection(_clip_config("bigg", 49408))
                resampler = Resampler(ResamplerConfig())
            else:
                unet = tiny_unet()
                controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
                text_encoder, text_encoder_2 = tiny_text_encoders(len(tokenizer))
                resampler = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=unet.config.cross_attention_dim))
            standard = dict(unet.attn_processors)
            face_layers = install_face_attention(unet)
            face = dict(unet.attn_processors)
        with building_on(device, torch.float32):
            vae = AutoencoderKL(**sdxl_vae_config()) if profile == "sdxl-random" else tiny_vae()
    return Models(
        unet=unet.eval(),
        controlnet=controlnet.eval(),
        vae=vae.eval(),
        resampler=resampler.eval(),
        face_layers=face_layers,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=dict(sdxl_scheduler().config),
        standard_processors=standard,
        face_processors=face,
    )


# ------------------------------------------------------------------------------------------ inputs


def keypoint_image(width: int, height: int) -> np.ndarray:
    """The IdentityNet condition for :data:`FACE_KEYPOINTS`, drawn with numpy (no OpenCV on GPU machines).

    Same colours, limbs, dimming and circle radius as the published drawing; limbs are capsules instead of
    ``cv2.ellipse2Poly`` polygons, a few pixels' difference that changes no cost.
    """
    from deployments.instantid.keypoints import CIRCLE_RADIUS, KEYPOINT_COLOURS, LIMB_DIM, LIMB_HALF_WIDTH, LIMBS

    points = FACE_KEYPOINTS * np.array([width, height], dtype=np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for start, end in LIMBS:
        a, b = points[start], points[end]
        ab = b - a
        t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
        distance = np.hypot(xs - (a[0] + t * ab[0]), ys - (a[1] + t * ab[1]))
        canvas[distance <= LIMB_HALF_WIDTH] = KEYPOINT_COLOURS[start]
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for index, (x, y) in enumerate(points):
        canvas[np.hypot(xs - x, ys - y) <= CIRCLE_RADIUS] = KEYPOINT_COLOURS[index]
    return canvas


def face_embedding(index: int) -> np.ndarray:
    """A raw-ArcFace-like identity vector (norm ~ 25, as glintr100's un-normalised outputs are)."""
    vector = np.random.default_rng(index).standard_normal(512).astype(np.float32)
    return vector * (25.0 / float(np.linalg.norm(vector)))


def make_jobs(
    batch: int, size: int, steps: int, guidance: float, prompt: Any, control: np.ndarray, scheduler: str = "euler"
) -> list:
    """``batch`` single-image requests with their own seeds and identities: what the Denoiser batches."""
    from deployments.instantid.denoiser import DenoiseJob
    from deployments.instantid.params import GenerationParams

    jobs = []
    for i in range(batch):
        params = GenerationParams(
            width=size,
            height=size,
            seed=SEED + i,
            num_inference_steps=steps,
            guidance_scale=guidance,
            identitynet_strength=DEFAULT_PARAMS.identitynet_strength,
            adapter_strength=DEFAULT_PARAMS.adapter_strength,
            scheduler=scheduler,
        )
        keypoints = FACE_KEYPOINTS * size
        box = FACE_BOX * size
        jobs.append(DenoiseJob(params, face_embedding(i), keypoints, box, prompt, control_image=control))
    return jobs


# ------------------------------------------------------------------------------------------ LoRAs and modes


@dataclass
class LoraPlan:
    """What ``--mode`` and ``--lora`` ask for: the scheduler, random LoRA files, and the set to activate."""

    scheduler: str = "euler"
    files: dict[str, Path] = field(default_factory=dict)
    active: tuple[tuple[str, float], ...] = ()
    first_load_s: float | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> LoraPlan:
        return getattr(args, "lora_plan", None) or cls()


def write_random_loras(models: Models, args: argparse.Namespace, folder: Path) -> LoraPlan:
    """Random UNet LoRAs of a realistic rank (64 at full size) in the layouts the files are published in: the
    mode's (LCM-LoRA: PEFT; Lightning, Hyper: kohya) and, with ``--lora LAYOUT``, a style LoRA in that layout."""
    from deployments.instantid.catalogue import PRESET_MODES
    from deployments.tiny.loras import random_lora, save_kohya_lora, save_peft_lora

    plan = LoraPlan()
    generator = torch.Generator().manual_seed(SEED)
    rank = 64 if args.profile == "sdxl-random" else 4
    unet_config = dict(models.unet.config)
    with models.standard_attention(), building_on("cpu", torch.float32):
        wanted: list[tuple[str, str, float]] = []
        if args.mode is not None:
            preset = PRESET_MODES[args.mode]
            plan.scheduler = preset.scheduler
            if preset.lora is not None:
                wanted.append((preset.lora, "peft" if args.mode == "lcm" else "kohya", preset.lora_scale))
        if args.lora is not None:
            wanted.append((f"style-{args.lora}", args.lora, 0.8))
        for name, layout, scale in wanted:
            factors = random_lora(generator, copy.deepcopy(models.unet).to("cpu", torch.float32), rank=rank, std=0.01)
            path = folder / f"{name}.safetensors"
            save_peft_lora(path, factors) if layout == "peft" else save_kohya_lora(path, factors, unet_config)
            plan.files[name] = path
            plan.active += ((name, scale),)
    return plan


@torch.no_grad()
def lora_costs(ours: OursRunner, size: int, prompt: Any, control: np.ndarray, device: torch.device) -> dict:
    """What LoRAs cost our denoiser under both strategies of :class:`LoraAdapters`: one image with the set active
    (unfused: PEFT layers run their LoRA matmuls; fused: merged into the weights), one without any LoRA, and a
    switch (activating the set, then no set: what the serving path does between batch groups)."""
    adapters = ours.adapters
    active = ours.loras.active
    assert adapters is not None
    image = lambda: ours.run(1, size, prompt, control)  # noqa: E731

    def strategy(fuse: bool) -> dict[str, float]:
        adapters.activate(())
        adapters.fuse = fuse
        image()  # warm, with the set active
        switches = [
            timed(lambda: adapters.activate(()), device)[0] + timed(lambda: adapters.activate(active), device)[0]
            for _ in range(3)
        ]
        per_image = statistics.median(timed(image, device)[0] for _ in range(3))
        return {"seconds_per_image": per_image, "switch_s_median": statistics.median(switches)}

    unfused, fused = strategy(False), strategy(True)
    adapters.activate(())
    ours.adapters = None  # the base layers alone
    without = statistics.median(timed(image, device)[0] for _ in range(3))
    ours.adapters = adapters
    return {
        "loras": [{"name": n, "scale": s} for n, s in active],
        "first_load_s": ours.loras.first_load_s,
        "no_lora_seconds_per_image": without,
        "unfused": {**unfused, "over_no_lora": unfused["seconds_per_image"] / without},
        "fused": {**fused, "over_no_lora": fused["seconds_per_image"] / without},
        "note": "switch: the set on, then off, between two loaded states (unfused: adapter flags; fused: merge, "
        "then exact restore of the saved base weights)",
    }


# ------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn`` with the device drained before and after (CUDA work is asynchronous)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> tuple[int | None, int | None]:
    """(allocated now, peak since the last reset) in bytes; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


@dataclass
class Contender:
    """One pipeline under test: ``run(batch)``, ``check()`` on the warm-up's output, and the state it runs in."""

    run: Callable[[int], Any]
    check: Callable[[], bool]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


def _timed_run(contender: Contender, batch: int, device: torch.device) -> tuple[float, int | None]:
    """Seconds of one run inside the contender's context (switching is not timed), and its peak memory."""
    with contender.context():
        reset_peak(device)
        seconds, _ = timed(lambda: contender.run(batch), device)
        return seconds, memory(device)[1]


def measure_interleaved(
    contenders: dict[str, Contender], batch: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """A checked warm-up each, then ``repeats`` rounds that alternate the contenders (ABBA order).

    Interleaving puts clock ramps, heat and neighbours' load on both sides alike; measured one after the
    other, a drift of a few per cent reads as a difference between pipelines. Per-image figures come from
    the median run, peak memory from the largest run.
    """
    names = list(contenders)
    runs: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int | None]] = {name: [] for name in names}
    warm: dict[str, float] = {}
    finite: dict[str, bool] = {}
    resident: dict[str, int | None] = {}
    for name, contender in contenders.items():
        with contender.context():
            resident[name] = memory(device)[0]
        warm[name], peak = _timed_run(contender, batch, device)
        finite[name] = contender.check()
        peaks[name].append(peak)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            seconds, peak = _timed_run(contenders[name], batch, device)
            runs[name].append(seconds)
            peaks[name].append(peak)
    report = {}
    for name in names:
        per_run = statistics.median(runs[name])
        per_image = per_run / batch
        known_peaks = [p for p in peaks[name] if p is not None]
        report[name] = {
            "batch": batch,
            "seconds_per_run": per_run,
            "seconds_per_image": per_image,
            "images_per_min": 60.0 / per_image,
            "runs_s": runs[name],
            "warmup_s": warm[name],
            "peak_memory_gib": max(known_peaks) / 2**30 if known_peaks else None,
            "resident_memory_gib": None if resident[name] is None else resident[name] / 2**30,
            "finite": finite[name],
        }
    return report


MATMUL_OPS = frozenset({"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"})


def count_ops_per_step(
    run: Callable[[int], Any], context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> dict[str, float]:
    """ATen operators dispatched per denoising step: the count at 4 steps minus the count at 2, halved.

    Below autograd, each operator is roughly one kernel launch on a GPU (view-only ones launch none), which
    is what a launch-bound batch of one pays for. The difference removes per-generation work (decode, setup).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0
            self.matmul = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            self.total += 1
            self.matmul += str(func.overloadpacket) in MATMUL_OPS
            return func(*args, **(kwargs or {}))

    counts = []
    for steps in (2, 4):
        with context(), Counter() as counter:
            run(steps)
        counts.append((counter.total, counter.matmul))
    return {"total": (counts[1][0] - counts[0][0]) / 2, "matmul": (counts[1][1] - counts[0][1]) / 2}


@contextlib.contextmanager
def parked(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move modules the current phase does not use off the GPU so its peak memory is its own."""
    if device.type != "cuda":
        yield
        return
    for module in modules:
        module.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for module in modules:
            module.to(device)


# ------------------------------------------------------------------------------------------ pipelines


class OursRunner:
    """InstantIDDenoiser over the shared modules; ``check`` says whether the last warm-up latents were finite."""

    def __init__(self, models: Models, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
        from deployments.instantid.denoiser import InstantIDDenoiser

        self.denoiser = InstantIDDenoiser(
            models.unet,
            models.controlnet,
            models.vae,
            models.resampler,
            models.scheduler_config,
            device=device,
            dtype=dtype,
        )
        self.args = args
        self.loras = LoraPlan.of(args)
        self.adapters = None
        if self.loras.files:
            from deployments.instantid.loras import LoraAdapters

            self.adapters = LoraAdapters(
                {"unet": models.unet}, self.loras.files, capacity=4, unet_config=models.unet.config
            )
            self.loras.first_load_s = timed(lambda: self.adapters.activate(self.loras.active), device)[0]
        self._finite: list[bool] = []
        self._decode = self.denoiser.decode
        self.denoiser.decode = self._checked_decode  # instance attribute: generate() calls self.decode

    def _checked_decode(self, latents: torch.Tensor) -> np.ndarray:
        self._finite.append(bool(torch.isfinite(latents).all()))
        return self._decode(latents)

    def run(
        self, batch: int, size: int, prompt: Any, control: np.ndarray, steps: int | None = None
    ) -> list[np.ndarray]:
        jobs = make_jobs(
            batch, size, steps or self.args.steps, self.args.guidance, prompt, control, self.loras.scheduler
        )
        if self.adapters is not None:
            self.adapters.activate(self.loras.active)  # the baseline's adapter may be the active one
        return self.denoiser.generate(jobs)

    def check(self) -> bool:
        finite, self._finite = all(self._finite) and bool(self._finite), []
        return finite


class BaselineRunner:
    """diffusers' StableDiffusionXLControlNetPipeline over the same modules (standard UNet attention)."""

    def __init__(self, models: Models, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
        from diffusers import StableDiffusionXLControlNetPipeline

        # Stock usage loads the whole pipeline in one dtype; its decode upcasts a float16 VAE to fp32 by itself
        # (force_upcast) and feeds a bfloat16 one bf16 latents. The shared VAE is fp32 (ours decodes in fp32),
        # which the stock decode cannot take half latents into, so the baseline gets its own copy (84 M params).
        self.vae = copy.deepcopy(models.vae).to(dtype)
        self.pipe = StableDiffusionXLControlNetPipeline(
            **models.pipeline_components(vae=self.vae, controlnet=models.controlnet), add_watermarker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.dtype, self.args = device, dtype, args
        self.loras = LoraPlan.of(args)
        from deployments.instantid.schedulers import make_scheduler

        self.pipe.scheduler = make_scheduler(self.loras.scheduler, models.scheduler_config)
        for name, path in self.loras.files.items():
            self.pipe.load_lora_weights(str(path), adapter_name=f"stock-{name}")
        self._last: np.ndarray | None = None

    def run(self, batch: int, size: int, prompt: Any, control: np.ndarray, steps: int | None = None) -> np.ndarray:
        to = {"device": self.device, "dtype": self.dtype}
        embeddings = {
            "prompt_embeds": prompt.embeds[None].to(**to),
            "pooled_prompt_embeds": prompt.pooled[None].to(**to),
        }
        if prompt.negative_embeds is not None and prompt.negative_pooled is not None:
            embeddings["negative_prompt_embeds"] = prompt.negative_embeds[None].to(**to)
            embeddings["negative_pooled_prompt_embeds"] = prompt.negative_pooled[None].to(**to)
        image = torch.from_numpy(control).float().div(255.0).permute(2, 0, 1)[None]
        if self.loras.active:
            self.pipe.set_adapters([f"stock-{n}" for n, _ in self.loras.active], [s for _, s in self.loras.active])
        result = self.pipe(
            **embeddings,
            image=image,
            height=size,
            width=size,
            num_inference_steps=steps or self.args.steps,
            guidance_scale=self.args.guidance,
            controlnet_conditioning_scale=DEFAULT_PARAMS.identitynet_strength,
            num_images_per_prompt=batch,
            generator=torch.Generator(device=self.device).manual_seed(SEED),
            output_type="np",
        )
        self._last = result.images
        return result.images

    def check(self) -> bool:
        return self._last is not None and bool(np.isfinite(self._last).all())


# ------------------------------------------------------------------------------------------ weights on disk


def save_layout(models: Models, root: Path) -> dict[str, Any]:
    """Write the random weights as ``instantid weights tiny`` does: sdxl/, instantid/ControlNetModel, ip-adapter.bin.

    The UNet is saved with its standard processors (the face K/V live in ip-adapter.bin, as published);
    ip-adapter.bin is fp32 like the published file.
    """
    from diffusers import StableDiffusionXLPipeline

    from deployments.instantid.loading import quiet_progress_bars
    from deployments.instantid.weights import CONTROLNET_DIR, IP_ADAPTER_FILE

    quiet_progress_bars()
    start = time.perf_counter()
    with models.standard_attention():
        pipe = StableDiffusionXLPipeline(**models.pipeline_components(), add_watermarker=False)
        pipe.save_pretrained(root / "sdxl", safe_serialization=True)
    models.controlnet.save_pretrained(root / "instantid" / CONTROLNET_DIR, safe_serialization=True)

    def fp32_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}

    torch.save(
        {"image_proj": fp32_cpu(models.resampler), "ip_adapter": fp32_cpu(models.face_layers)},
        root / "instantid" / IP_ADAPTER_FILE,
    )
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - start, "bytes": size, "gib": size / 2**30}


def cold_start_child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: load the saved folder with the serving loaders and finish one image."""
    process_start = time.perf_counter()
    import deployments.instantid.loading as loading
    from deployments.instantid.weights import WeightsLayout

    import_s = time.perf_counter() - process_start
    device = torch.device(args.device)
    layout = WeightsLayout.from_root(args.cold_start_from)
    cuda_init_s = None
    if device.type == "cuda":  # the context is created once per process: its own line, not the loaders'
        cuda_init_s, _ = timed(lambda: torch.cuda.init(), torch.device("cpu"))
    reset_peak(device)
    load_denoiser_s, denoiser = timed(
        lambda: loading.load_denoiser(layout, device=args.device, dtype=args.dtype), device
    )
    load_prompt_s, encoder = timed(
        lambda: loading.load_prompt_encoder(layout, device=args.device, dtype=args.dtype), device
    )

    def first_image() -> list[np.ndarray]:
        prompt = encoder.encode([PROMPT], [None], args.guidance > 1.0)[0]
        control = keypoint_image(args.size, args.size)
        return denoiser.generate(make_jobs(1, args.size, args.steps, args.guidance, prompt, control))

    first_image_s, images = timed(first_image, device)
    _, peak = memory(device)
    return {
        "import_s": import_s,
        "cuda_init_s": cuda_init_s,
        "load_denoiser_s": load_denoiser_s,
        "load_prompt_encoder_s": load_prompt_s,
        "first_image_s": first_image_s,
        "cold_start_s": load_denoiser_s + load_prompt_s + first_image_s,
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "image_shape": list(images[0].shape),
    }


def run_cold_start(root: Path, args: argparse.Namespace, device: torch.device, dtype_name: str) -> dict[str, Any]:
    """Spawn ``python -m serve.bench.denoise_bench --cold-start-from ROOT`` and add its whole-process time."""
    command = [
        sys.executable,
        "-m",
        "serve.bench.denoise_bench",
        "--profile",
        args.profile,
        "--device",
        str(device),
        "--dtype",
        dtype_name,
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--guidance",
        str(args.guidance),
        "--cold-start-from",
        str(root),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"the cold-start process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_s"] = process_s  # interpreter start + imports + CUDA init + load + first image
    report["note"] = "weights were just written: they load from the page cache, not from cold storage"
    return report


# ------------------------------------------------------------------------------------------ main


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    from deployments.instantid.catalogue import PRESET_MODES

    preset = PRESET_MODES[args.mode] if args.mode is not None else None
    if args.steps is None:
        args.steps = preset.num_inference_steps if preset else DEFAULT_PARAMS.num_inference_steps
    if args.guidance is None:
        args.guidance = preset.guidance_scale if preset else DEFAULT_PARAMS.guidance_scale
    if args.device is None:
        args.device = "cuda" if args.profile == "sdxl-random" else "cpu"
    if args.size is None:
        args.size = 1024 if args.profile == "sdxl-random" else 256
    device = torch.device(args.device)
    if device.type == "cuda" and not args.dry_run:
        if not torch.cuda.is_available():
            raise BenchError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
        if (device.index or 0) >= torch.cuda.device_count():
            raise BenchError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", device.index or 0)
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    args.dtype = dtype_name
    return device, dtype, dtype_name


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            f"diffusers is not importable ({exc}); on a GPU machine without it, install the wheels that "
            "serve/bench/gpu_wheels.sh downloads (see README, 'Benchmarks')"
        ) from None


def dry_run(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """Build the profile on the meta device: parameter counts and weight bytes, with no memory or compute."""
    start = time.perf_counter()
    models = build_models(args.profile, "meta", dtype)
    counts = models.parameter_counts()
    half = torch.finfo(dtype).bits // 8
    weight_bytes = (counts["total"] - counts["vae"]) * half + counts["vae"] * 4
    return {
        "benchmark": "denoise",
        "profile": args.profile,
        "dry_run": True,
        "dtype": args.dtype,
        "parameters": counts,
        "weights_gib": weight_bytes / 2**30,
        "build_s": time.perf_counter() - start,
        "machine": machine_facts(DENOISE_PACKAGES),
    }


@torch.no_grad()
def measure_pipelines(
    models: Models, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    """Prompt encoding, then ours and the baseline at every batch size (their modules die with this frame)."""
    from deployments.instantid.text import SDXLPromptEncoder

    encoder = SDXLPromptEncoder(models.tokenizer, models.text_encoder, models.tokenizer_2, models.text_encoder_2)
    cfg = args.guidance > 1.0
    encoder.encode([PROMPT], [None], cfg)  # warm-up
    prompt_runs = [timed(lambda: encoder.encode([PROMPT], [None], cfg), device) for _ in range(args.repeats)]
    prompt = prompt_runs[-1][1][0]
    control = keypoint_image(args.size, args.size)

    ours = OursRunner(models, device, dtype, args)
    runners: dict[str, OursRunner | BaselineRunner] = {"ours": ours}
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {"ours": contextlib.nullcontext}
    if not args.no_baseline:
        runners["baseline"] = BaselineRunner(models, device, dtype, args)

        @contextlib.contextmanager
        def stock_state() -> Iterator[None]:
            # The baseline's own modules only: the face K/V and the resampler leave the GPU meanwhile.
            with models.standard_attention(), parked([models.resampler, models.face_layers], device):
                yield

        contexts["baseline"] = stock_state
    contenders = {
        name: Contender(lambda b, r=runner: r.run(b, args.size, prompt, control), runner.check, contexts[name])
        for name, runner in runners.items()
    }
    results: dict[str, Any] = {"ours": {}, "baseline": {}}
    for batch in args.batch:
        progress(f"batch {batch}: {' and '.join(contenders)} interleaved, {args.steps} steps at {args.size}px")
        for name, report in measure_interleaved(contenders, batch, args.repeats, device).items():
            results[name][f"batch_{batch}"] = report
    if args.count_ops:
        progress("counting the operators each pipeline dispatches per step (batch 1)")
        results["ops_per_step"] = {
            name: count_ops_per_step(lambda s, r=runner: r.run(1, args.size, prompt, control, steps=s), contexts[name])
            for name, runner in runners.items()
        }
    if ours.adapters is not None:
        progress("LoRA costs: a switch, and one image, unfused and fused; one image without LoRA")
        results["lora_costs"] = lora_costs(ours, args.size, prompt, control, device)
    results["prompt_encoding"] = {
        "seconds": statistics.median(t for t, _ in prompt_runs),
        "note": "one prompt + its CFG negative (zeros); outside the denoise timings of both pipelines",
    }
    results["vae_dtype"] = str(ours.denoiser.vae_dtype).removeprefix("torch.")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype, dtype_name = _resolve(args)
    _require_diffusers()
    if args.cold_start_from is not None:
        return cold_start_child(args)
    if args.dry_run:
        return dry_run(args, dtype)

    from deployments.instantid.loading import quiet_progress_bars

    quiet_progress_bars()
    progress(f"building {args.profile} models on {device} ({dtype_name}, random weights)")
    build_s, models = timed(lambda: build_models(args.profile, device, dtype), device)
    counts = models.parameter_counts()
    with contextlib.ExitStack() as loras_dir:
        if args.mode is not None or args.lora is not None:
            folder = Path(loras_dir.enter_context(tempfile.TemporaryDirectory(prefix="instantid-bench-loras-")))
            progress(f"writing random LoRAs ({args.mode or ''} {args.lora or ''}) to {folder}")
            args.lora_plan = write_random_loras(models, args, folder)
        results = measure_pipelines(models, device, dtype, args)
    ratio = {
        key: ours_run["seconds_per_image"] / results["baseline"][key]["seconds_per_image"]
        for key, ours_run in results["ours"].items()
        if key in results["baseline"]
    }
    report: dict[str, Any] = {
        "benchmark": "denoise",
        "profile": args.profile,
        "machine": machine_facts(DENOISE_PACKAGES),
        "settings": {
            "device": str(device),
            "dtype": dtype_name,
            "vae_dtype": results["vae_dtype"],
            "size": args.size,
            "steps": args.steps,
            "guidance": args.guidance,
            "cfg": args.guidance > 1.0,
            "scheduler": f"{LoraPlan.of(args).scheduler} (from the SDXL base config)",
            "mode": args.mode,
            "loras": [{"name": n, "scale": s} for n, s in LoraPlan.of(args).active],
            "identitynet_strength": DEFAULT_PARAMS.identitynet_strength,
            "adapter_strength": DEFAULT_PARAMS.adapter_strength,
            "enhance_face_region": True,
            "batches": list(args.batch),
            "repeats": args.repeats,
            "order": "per batch: one checked warm-up each, then the timed runs alternate ours/baseline (ABBA)",
            "ours_batch": "N single-image requests in one generate() call (how the Denoiser batches)",
            "baseline_batch": "num_images_per_prompt=N, with the same precomputed prompt embeddings as ours",
            "baseline_vae": "its own copy in the model dtype; diffusers upcasts a float16 VAE to fp32 to decode",
        },
        "parameters": counts,
        "build_s": build_s,
        "prompt_encoding": results["prompt_encoding"],
        "ours": results["ours"],
        "baseline": results["baseline"] or None,
        "ours_over_baseline_seconds_per_image": ratio or None,
        "ops_per_step": results.get("ops_per_step"),
        "lora_costs": results.get("lora_costs"),
        "cold_start_s": None,
        "cold_start": None,
    }
    if args.no_cold_start:
        return report
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instantid-bench-weights-")))
        else:
            root = Path(args.workdir)
            root.mkdir(parents=True, exist_ok=True)
        progress(f"saving the random weights to {root} (the instantid weights layout)")
        report["saved_weights"] = save_layout(models, root)
        del models  # the child process needs the GPU memory more than we do
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress("cold start: a fresh process loads them and finishes one image")
        cold = run_cold_start(root, args, device, dtype_name)
    report["cold_start"] = cold
    report["cold_start_s"] = cold["cold_start_s"]
    return report


def main_from_args(args: argparse.Namespace) -> int:
    report = run(args)
    if args.cold_start_from is not None:  # the parent reads one JSON line
        print(json.dumps(report), flush=True)
    else:
        emit(report, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.bench.denoise_bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_denoise_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
