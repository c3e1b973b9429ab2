"""The sections of ``instantid bench gpu`` (see ``gpu_bench``): each runs in its own process and records as it goes.

Every comparison is made in one process on models built from one seed (a switch that changes modules in place gets
its own identical copy), interleaved ABBA after a checked warm-up each (``denoise_bench.measure_interleaved``);
a switch's image is compared with the eager denoiser's image of the same requests (max pixel difference, PSNR).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.bench import BenchError, progress
from serve.bench.denoise_bench import (
    FACE_BOX,
    FACE_KEYPOINTS,
    PROMPT,
    SEED,
    BaselineRunner,
    Contender,
    LoraPlan,
    Models,
    OursRunner,
    build_models,
    face_embedding,
    keypoint_image,
    make_jobs,
    measure_interleaved,
    memory,
    parked,
    reset_peak,
    save_layout,
    timed,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Rows per bucket: batch 1, 2, 4 (and 8) with classifier-free guidance.
BUCKET_ROWS = [2, 4, 8, 16]


@dataclass
class Context:
    """What every section shares: the device, precision, size, steps and where files go."""

    device: torch.device
    dtype: torch.dtype
    profile: str
    size: int
    steps: int
    guidance: float
    repeats: int
    workdir: Path

    @classmethod
    def of(cls, args: argparse.Namespace) -> Context:
        gpu = args.device != "cpu"
        if gpu and not torch.cuda.is_available():
            raise BenchError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
            args.dtype or ("float16" if gpu else "float32")
        ]
        return cls(
            device=torch.device(args.device),
            dtype=dtype,
            profile="sdxl-random" if gpu else "tiny",
            size=args.size or (1024 if gpu else 64),
            steps=args.steps or (30 if gpu else 2),
            guidance=5.0,
            repeats=args.repeats,
            workdir=Path(args.workdir),
        )

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def args(self, **extra: Any) -> argparse.Namespace:
        """The namespace denoise_bench's runners read."""
        values = {"steps": self.steps, "guidance": self.guidance, "mode": None, "lora": None, "lora_plan": None}
        return argparse.Namespace(**{**values, **extra})

    def speed(self, **switches: Any):
        from deployments.instantid.speed import SpeedOptions

        backend = "inductor" if self.gpu else "aot_eager"  # the dry run checks the path, not inductor's C++ build
        return SpeedOptions(
            bucket_sizes=[(self.size, self.size)], bucket_rows=BUCKET_ROWS, compile_backend=backend, **switches
        )

    @property
    def compile_cache(self) -> Path:
        return self.workdir / "compile-cache"


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "device": str(ctx.device),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "profile": ctx.profile,
        "size": ctx.size,
        "steps": ctx.steps,
        "guidance": ctx.guidance,
        "repeats": ctx.repeats,
    }


# ------------------------------------------------------------------------------------------ helpers


def free() -> None:
    """Return what the caller just deleted (``del``) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(ctx: Context) -> Models:
    return build_models(ctx.profile, ctx.device, ctx.dtype)


def prompt_of(models: Models, cfg: bool = True) -> Any:
    from deployments.instantid.text import SDXLPromptEncoder

    encoder = SDXLPromptEncoder(models.tokenizer, models.text_encoder, models.tokenizer_2, models.text_encoder_2)
    return encoder.encode([PROMPT], [None], cfg)[0]


def pixel_difference(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Max absolute difference (of 255) and PSNR (dB; None when identical) between two runs' images."""
    x = np.concatenate([i.astype(np.float64) for i in a])
    y = np.concatenate([i.astype(np.float64) for i in b])
    mse = float(np.mean((x - y) ** 2))
    return {"max_abs": float(np.abs(x - y).max()), "psnr_db": None if mse == 0 else 10 * math.log10(255**2 / mse)}


class Kept:
    """A runner's ``run`` that keeps its last images (to compare contenders after timing them)."""

    def __init__(self, run: Callable[[int], Any]) -> None:
        self._run, self.images = run, None

    def __call__(self, batch: int) -> Any:
        self.images = self._run(batch)
        return self.images


def ours_contender(runner: OursRunner, ctx: Context, prompt: Any, control: np.ndarray) -> tuple[Contender, Kept]:
    kept = Kept(lambda b: runner.run(b, ctx.size, prompt, control))
    return Contender(kept, runner.check), kept


def accelerated_runner(ctx: Context, switches: dict[str, Any], args: argparse.Namespace | None = None):
    """A fresh copy of the models (same seed: same weights) under ``switches``; returns (models, runner, seconds)."""
    from deployments.instantid.acceleration import accelerate

    models = build(ctx)
    runner = OursRunner(models, ctx.device, ctx.dtype, args or ctx.args())
    seconds, _ = timed(lambda: accelerate(runner.denoiser, ctx.speed(**switches), ctx.compile_cache), ctx.device)
    return models, runner, seconds


def versus_eager(
    ctx: Context,
    rec,
    name: str,
    switches: dict[str, Any],
    eager: tuple[Contender, Kept],
    prompt: Any,
    control: np.ndarray,
    batches: list[int],
) -> dict[str, Any]:
    """One switch against the eager denoiser at ``batches``: ABBA timings, warm-up (compile, capture), images."""
    models, runner, apply_s = accelerated_runner(ctx, switches)
    contender, kept = ours_contender(runner, ctx, prompt, control)
    result: dict[str, Any] = {"switches": switches, "apply_s": apply_s}
    for batch in batches:
        if batch != batches[0] and not rec.has_time(
            result["last_run_s"] * (2 + 2 * ctx.repeats), f"{name} batch {batch}"
        ):
            break
        timings = measure_interleaved({"eager": eager[0], name: contender}, batch, ctx.repeats, ctx.device)
        mine = timings[name]
        result[f"batch_{batch}"] = {
            **mine,
            "eager_seconds_per_image": timings["eager"]["seconds_per_image"],
            "over_eager": mine["seconds_per_image"] / timings["eager"]["seconds_per_image"],
            "eager_peak_memory_gib": timings["eager"]["peak_memory_gib"],
            "images_vs_eager": pixel_difference(kept.images, eager[1].images),
        }
        result["last_run_s"] = mine["seconds_per_run"] * 2
    static = runner.denoiser.static_step
    if static is not None:
        result["static_forwards"], result["eager_forwards"] = static.static_forwards, static.eager_forwards
        result["graph_captures"] = static.captures
    del models, runner, contender, kept, static
    free()
    return result


# ------------------------------------------------------------------------------------------ sections


def section_pipelines(ctx: Context, rec) -> None:
    models = build(ctx)
    prompt, control = prompt_of(models), keypoint_image(ctx.size, ctx.size)
    ours = OursRunner(models, ctx.device, ctx.dtype, ctx.args())
    stock = BaselineRunner(models, ctx.device, ctx.dtype, ctx.args())

    def stock_state():
        import contextlib

        @contextlib.contextmanager
        def state():
            with models.standard_attention(), parked([models.resampler, models.face_layers], ctx.device):
                yield

        return state()

    contenders = {
        "ours": Contender(lambda b: ours.run(b, ctx.size, prompt, control), ours.check),
        "stock": Contender(lambda b: stock.run(b, ctx.size, prompt, control), stock.check, stock_state),
    }
    results: dict[str, Any] = {}
    last = 0.0
    for batch in (1, 2, 4):
        if last and not rec.has_time(last * 1.6 * (2 + 2 * ctx.repeats), f"batch {batch}"):
            break
        timings = measure_interleaved(contenders, batch, ctx.repeats, ctx.device)
        timings["ours_over_stock"] = timings["ours"]["seconds_per_image"] / timings["stock"]["seconds_per_image"]
        results[f"batch_{batch}"] = timings
        rec["batches"] = results
        last = max(timings["ours"]["seconds_per_run"], timings["stock"]["seconds_per_run"])


SWITCHES: dict[str, dict[str, Any]] = {
    "fuse_qkv": {"fuse_qkv": True},
    "channels_last": {"channels_last": True},
    "vae_bf16": {"vae_dtype": "bfloat16"},
    "fp8": {"fp8": "dynamic"},  # weight_only in the CPU dry run (dynamic needs capability >= 8.9)
    "static_step": {"static_step": True},
    # Every switch off, through ``accelerate``: must give the eager images bit for bit (last: a check, not a speed).
    "off": {},
}


def _eager(ctx: Context):
    models = build(ctx)
    prompt, control = prompt_of(models), keypoint_image(ctx.size, ctx.size)
    runner = OursRunner(models, ctx.device, ctx.dtype, ctx.args())
    return models, runner, ours_contender(runner, ctx, prompt, control), prompt, control


def _switch_runs(ctx: Context, rec, switches: dict[str, dict[str, Any]], batches: list[int], estimate_s: float):
    models, runner, eager, prompt, control = _eager(ctx)
    results: dict[str, Any] = {}
    for name, options in switches.items():
        if not rec.has_time(estimate_s, name):
            continue
        progress(f"{name}: {options}")
        try:
            results[name] = versus_eager(ctx, rec, name, options, eager, prompt, control, batches)
        except Exception as exc:  # one switch failing (fp8 on an older GPU) leaves the others measured
            results[name] = {"switches": options, "error": f"{type(exc).__name__}: {exc}"[:1000]}
            free()
        rec["switches"] = results
    del models, runner, eager
    free()


def section_switches(ctx: Context, rec) -> None:
    switches = dict(SWITCHES)
    if not ctx.gpu:
        switches["fp8"] = {"fp8": "weight_only"}
    _switch_runs(ctx, rec, switches, [1], estimate_s=20.0 if ctx.gpu else 3.0)


def section_graphs(ctx: Context, rec) -> None:
    if not ctx.gpu:
        rec["note"] = "CPU dry run: the bucketed step without capture (CUDA graphs need a CUDA device)"
    switches = {"cuda_graphs": {"static_step": True, "cuda_graphs": ctx.gpu}}
    _switch_runs(ctx, rec, switches, [1, 2], estimate_s=20.0 if ctx.gpu else 3.0)


def section_compile(ctx: Context, rec) -> None:
    rec["compile_cache"] = str(ctx.compile_cache)
    switches = {
        "compile": {"compile": True},
        "all": {"compile": True, "cuda_graphs": ctx.gpu, "fuse_qkv": True, "channels_last": True},
    }
    _switch_runs(ctx, rec, switches, [1], estimate_s=60.0 if ctx.gpu else 5.0)


def write_random_lora(models: Models, folder: Path, name: str, rank: int) -> Path:
    """A random LoRA of ``rank`` on every UNet attention projection, in the diffusers/PEFT layout, made from the
    layers' shapes alone (no copy of the UNet).

    The factors are scaled so that the update's entries have a quarter of a default-initialised layer's spread
    (std ``0.25 / sqrt(in_features)``) at any rank and size: large enough to change the image visibly (the
    ``lora_switch`` section checks that the switch matters before comparing paths), small enough to stay finite.
    """
    from deployments.tiny.loras import UNET_TARGETS, save_peft_lora

    generator = torch.Generator().manual_seed(SEED)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with models.standard_attention():
        for path, module in models.unet.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(tuple(f".{t}" for t in UNET_TARGETS)):
                # entries of up @ down have std sqrt(rank) * scale**2
                scale = math.sqrt(0.25 / (math.sqrt(rank) * math.sqrt(module.in_features)))
                down = torch.randn((rank, module.in_features), generator=generator) * scale
                up = torch.randn((module.out_features, rank), generator=generator) * scale
                factors[path] = (down, up)
    folder.mkdir(parents=True, exist_ok=True)
    return save_peft_lora(folder / f"{name}.safetensors", {"unet": factors})


def section_lora_switch(ctx: Context, rec) -> None:
    from deployments.instantid.loras import LoraAdapters

    models, runner, eager, prompt, control = _eager(ctx)
    rank = 64 if ctx.gpu else 4
    files = {"bench-lora": write_random_lora(models, ctx.workdir / "loras", "bench-lora", rank)}
    chosen = (("bench-lora", 0.8),)

    def adapters_for(model) -> LoraAdapters:
        adapters = LoraAdapters({"unet": model.unet}, files, capacity=2, unet_config=model.unet.config, fuse=True)
        adapters.on_change = model.weights_changed
        return adapters

    def switch_costs(adapters: LoraAdapters) -> dict[str, Any]:
        first, _ = timed(lambda: adapters.activate(chosen), ctx.device)
        off = [timed(lambda: adapters.activate(()), ctx.device)[0] for _ in range(3)]
        on = [timed(lambda: adapters.activate(chosen), ctx.device)[0] for _ in range(3)]
        return {"first_load_s": first, "off_s_median": statistics.median(off), "on_s_median": statistics.median(on)}

    eager_adapters = adapters_for(runner.denoiser)
    eager_run = eager[1]
    eager_run(1)
    no_lora = eager_run.images
    rec["eager"] = switch_costs(eager_adapters)  # ends with the set merged
    eager_run(1)
    with_lora = eager_run.images
    rec["lora_changes_the_image"] = pixel_difference(with_lora, no_lora)
    if not rec.has_time(40.0 if ctx.gpu else 5.0, "the switch under CUDA graphs"):
        return
    switches = {"static_step": True, "cuda_graphs": ctx.gpu, "fuse_qkv": True}
    _fast_models, fast, apply_s = accelerated_runner(ctx, switches)  # the models must live while fast runs
    fast_run = Kept(lambda b: fast.run(b, ctx.size, prompt, control))
    fast_run(1)  # warm: the graphs are recorded
    adapters = adapters_for(fast.denoiser)
    costs = switch_costs(adapters)  # the first load adds modules: the graphs are recorded again at the next run
    seconds, _ = timed(lambda: fast_run(1), ctx.device)
    costs["first_run_after_load_s"] = seconds
    costs["images_vs_eager_with_lora"] = pixel_difference(fast_run.images, with_lora)
    adapters.activate(())
    seconds, _ = timed(lambda: fast_run(1), ctx.device)
    costs["run_after_switch_off_s"] = seconds
    costs["images_vs_eager_without_lora"] = pixel_difference(fast_run.images, no_lora)
    costs["graph_captures"] = fast.denoiser.static_step.captures if fast.denoiser.static_step else None
    rec["accelerated"] = {"switches": switches, "apply_s": apply_s, **costs}


def section_identities(ctx: Context, rec) -> None:
    import dataclasses

    import deployments.instantid.multi_identity as multi_identity
    from deployments.instantid.denoiser import DenoiseJob
    from deployments.instantid.regions import PlacedIdentity

    _models, runner, _, prompt, control = _eager(ctx)
    # The shared keypoint image is drawn with OpenCV, which benchmark machines may lack: the cost is the same with
    # the numpy drawing of one face.
    multi_identity.shared_keypoint_image = lambda keypoints, width, height: keypoint_image(width, height)
    size = ctx.size

    def two_people() -> list:
        job = make_jobs(1, size, ctx.steps, ctx.guidance, prompt, control)[0]
        halves = []
        for i, left in enumerate((0.0, 0.5)):
            scale = np.array([0.5, 1.0], dtype=np.float32)
            offset = np.array([left, 0.0], dtype=np.float32)
            keypoints = (FACE_KEYPOINTS * scale + offset) * size
            box = np.concatenate([FACE_BOX[:2] * scale + offset, FACE_BOX[2:] * scale + offset]) * size
            region = np.array([left, 0.0, left + 0.5, 1.0], dtype=np.float32) * size
            halves.append(PlacedIdentity(face_embedding(i), keypoints, box, region))
        params = dataclasses.replace(job.params, identities=2)
        return [DenoiseJob(params, job.face_embedding, job.keypoints, job.face_box, prompt, identities=halves)]

    contenders = {
        "one": Contender(lambda b: runner.run(b, size, prompt, control), runner.check),
        "two": Contender(lambda b: runner.denoiser.generate(two_people()), runner.check),
    }
    timings = measure_interleaved(contenders, 1, ctx.repeats, ctx.device)
    timings["two_over_one"] = timings["two"]["seconds_per_image"] / timings["one"]["seconds_per_image"]
    rec["batch_1"] = timings


def section_lcm(ctx: Context, rec) -> None:
    from deployments.instantid.catalogue import PRESET_MODES

    preset = PRESET_MODES["lcm"]
    models = build(ctx)
    path = write_random_lora(models, ctx.workdir / "loras", preset.lora, 64 if ctx.gpu else 4)
    plan = LoraPlan(scheduler=preset.scheduler, files={preset.lora: path}, active=((preset.lora, preset.lora_scale),))
    steps = preset.num_inference_steps if ctx.gpu else ctx.steps
    args = ctx.args(steps=steps, guidance=preset.guidance_scale, mode="lcm", lora_plan=plan)
    prompt = prompt_of(models, cfg=False)
    control = keypoint_image(ctx.size, ctx.size)
    ours = OursRunner(models, ctx.device, ctx.dtype, args)
    assert ours.adapters is not None
    ours.adapters.activate(())
    ours.adapters.fuse = True  # as served (catalogue fuse_loras: true)
    stock = BaselineRunner(models, ctx.device, ctx.dtype, args)

    def stock_state():
        import contextlib

        @contextlib.contextmanager
        def state():
            ours.adapters.activate(())  # the stock pipeline runs its own (unfused) copy of the adapter
            with models.standard_attention(), parked([models.resampler, models.face_layers], ctx.device):
                yield

        return state()

    contenders = {
        "ours": Contender(lambda b: ours.run(b, ctx.size, prompt, control), ours.check),
        "stock": Contender(lambda b: stock.run(b, ctx.size, prompt, control), stock.check, stock_state),
    }
    rank = 64 if ctx.gpu else 4
    rec["lcm"] = {"steps": steps, "guidance": preset.guidance_scale, "scheduler": preset.scheduler, "lora_rank": rank}
    timings = measure_interleaved(contenders, 1, ctx.repeats, ctx.device)
    timings["ours_over_stock"] = timings["ours"]["seconds_per_image"] / timings["stock"]["seconds_per_image"]
    rec["batch_1"] = timings


def section_cold_start(ctx: Context, rec) -> None:
    """Saved weights, then fresh processes: eager; compiled with an empty compile cache; again with it warm."""
    import shutil

    root = ctx.workdir / "weights"
    if not (root / "instantid").is_dir():
        models = build(ctx)
        rec["saved_weights"] = save_layout(models, root)
        del models
        free()
    cache = ctx.workdir / "cold-start-compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    all_on = {"compile": True, "cuda_graphs": ctx.gpu, "fuse_qkv": True, "channels_last": True}
    runs = {
        "eager": None,
        "compiled_cold_cache": all_on,
        "compiled_warm_cache": all_on,
    }
    results: dict[str, Any] = {}
    for name, switches in runs.items():
        if results and not rec.has_time(20.0 if ctx.gpu else 5.0, name):
            break
        speed = None if switches is None else ctx.speed(**switches).model_dump_json()
        results[name] = cold_start_process(ctx, root, speed, cache, timeout=max(rec.left(), 1.0))
        rec["runs"] = results


def cold_start_process(ctx: Context, root: Path, speed: str | None, cache: Path, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "serve.bench.gpu_sections", "--cold-start-from", str(root)]
    command += ["--device", str(ctx.device), "--dtype", str(ctx.dtype).removeprefix("torch.")]
    command += ["--size", str(ctx.size), "--steps", str(ctx.steps), "--compile-cache", str(cache)]
    if speed is not None:
        command += ["--speed", speed]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:]}
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["process_s"] = time.perf_counter() - started
    return report


def cold_start_child(argv: list[str]) -> int:
    """In a fresh process: load the saved layout with the serving loaders (and speed switches), two images."""
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    for flag in ("--cold-start-from", "--device", "--dtype", "--compile-cache", "--speed"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    import deployments.instantid.loading as loading
    from deployments.instantid.speed import SpeedOptions
    from deployments.instantid.weights import WeightsLayout

    import_s = time.perf_counter() - started
    device = torch.device(args.device)
    layout = WeightsLayout.from_root(args.cold_start_from)
    speed = None if args.speed is None else SpeedOptions.model_validate_json(args.speed)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache)  # this run's cache, empty or warm
    reset_peak(device)
    load_s, denoiser = timed(
        lambda: loading.load_denoiser(layout, device=args.device, dtype=args.dtype, speed=speed), device
    )
    encoder = loading.load_prompt_encoder(layout, device=args.device, dtype=args.dtype)
    prompt = encoder.encode([PROMPT], [None], True)[0]
    control = keypoint_image(args.size, args.size)

    def image() -> list[np.ndarray]:
        return denoiser.generate(make_jobs(1, args.size, args.steps, 5.0, prompt, control))

    first_s, _ = timed(image, device)
    second_s, _ = timed(image, device)
    print(
        json.dumps(
            {
                "import_s": import_s,
                "load_denoiser_s": load_s,
                "first_image_s": first_s,
                "second_image_s": second_s,
                "to_first_image_s": import_s + load_s + first_s,
                "peak_memory_gib": None if memory(device)[1] is None else memory(device)[1] / 2**30,
                "compile_cache_files": sum(1 for p in Path(args.compile_cache).rglob("*") if p.is_file())
                if Path(args.compile_cache).is_dir()
                else 0,
            }
        ),
        flush=True,
    )
    return 0


# ------------------------------------------------------------------------------------------ serve


def section_serve(ctx: Context, rec) -> None:
    from serve.bench.gpu_serve import serve_comparison

    serve_comparison(ctx, rec)


SECTION_FUNCTIONS: dict[str, Callable[[Context, Any], None]] = {
    "pipelines": section_pipelines,
    "switches": section_switches,
    "graphs": section_graphs,
    "compile": section_compile,
    "lora_switch": section_lora_switch,
    "identities": section_identities,
    "lcm": section_lcm,
    "cold_start": section_cold_start,
    "serve": section_serve,
}


def run(name: str, ctx: Context, rec) -> None:
    from deployments.instantid.loading import quiet_progress_bars

    quiet_progress_bars()
    rec["settings"] = settings(ctx)
    started = time.perf_counter()
    SECTION_FUNCTIONS[name](ctx, rec)
    rec["measured_s"] = time.perf_counter() - started
    if ctx.gpu:
        rec["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30


if __name__ == "__main__":
    sys.exit(cold_start_child(sys.argv[1:]))
