"""The denoiser's speed switches on tiny weights: each gives the eager step's images within float tolerance.

The bucketed step (fixed buffers, rows padded to a bucket: what a CUDA graph records) is checked here without the
capture, which needs a GPU (``instantid bench gpu`` checks the graphs' images there): its buffers follow the running
set, padding rows never reach real rows, and what fits no bucket steps eagerly. Compilation runs inductor on the
CPU (C++ through gcc), so those tests are slow; their programs are cached in pytest's cache folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.instantid.denoiser import DenoiseJob, InstantIDDenoiser
from deployments.instantid.errors import WeightsError
from deployments.instantid.loading import load_denoiser, load_vae
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.params import GenerationParams
from deployments.instantid.speed import SpeedOptions
from deployments.instantid.static_step import StaticStep
from deployments.tiny.weights import STYLE_LORAS
from tests.support import skip_unless_required

KEYPOINTS = np.array([[22, 24], [42, 24], [32, 34], [24, 46], [40, 46]], dtype=np.float32)
BOX = np.array([12, 10, 52, 56], dtype=np.float32)
BASE = GenerationParams(width=64, height=64, seed=7, num_inference_steps=2, guidance_scale=5.0)
BUCKETS = {"bucket_sizes": [(64, 64)], "bucket_rows": [2, 4, 8]}
TOLERANCE = 2  # out of 255, as for batching: float reassociation across row counts stays far below it


@pytest.fixture(scope="module")
def prompts(prompt_encoder):
    return [
        prompt_encoder.encode(["a portrait photo"], ["blurry"], do_classifier_free_guidance=True)[0],
        prompt_encoder.encode(["a watercolor of a sailor"], [None], do_classifier_free_guidance=True)[0],
    ]


def make_job(prompts, seed: int, **changes) -> DenoiseJob:
    embedding = np.random.default_rng(seed).normal(size=512).astype(np.float32) * 20
    params = dataclasses.replace(BASE, seed=seed, **changes)
    return DenoiseJob(params, embedding, KEYPOINTS, BOX, prompts[seed % len(prompts)])


def mixed_jobs(prompts) -> list[DenoiseJob]:
    """Two requests that differ in everything a row carries: prompt, identity, strengths, mask, images."""
    return [
        make_job(prompts, 0, num_images=2),
        make_job(prompts, 1, identitynet_strength=0.3, adapter_strength=1.2, enhance_face_region=False),
    ]


def fresh(jobs: list[DenoiseJob]) -> list[DenoiseJob]:
    return [dataclasses.replace(job, _state={}) for job in jobs]


def difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def accelerated(tiny_layout, **options) -> InstantIDDenoiser:
    return load_denoiser(tiny_layout, device="cpu", dtype="float32", speed=SpeedOptions(**options))


def run_continuously(model: InstantIDDenoiser, jobs: list[DenoiseJob]) -> list[np.ndarray]:
    """Jobs of different lengths stepping together: the running set shrinks as each one ends (as the continuous
    batcher runs them), so the bucket's rows are refilled at every change."""
    for job in jobs:
        model.start(job)
    running = list(jobs)
    batch = model.batch(running)
    while running:
        ended = {id(j) for j in model.step(running, batch)}
        if ended:
            running = [j for j in running if id(j) not in ended]
            batch = model.batch(running) if running else batch
    return [model.finish(job) for job in jobs]


# ------------------------------------------------------------------------------------------ bucketed step


@pytest.mark.parametrize(
    "options",
    [{}, {"fuse_qkv": True}, {"channels_last": True}],
    ids=["static", "static+fused-qkv", "static+channels-last"],
)
def test_the_bucketed_step_gives_the_eager_images(tiny_layout, denoiser, prompts, options) -> None:
    jobs = mixed_jobs(prompts)
    expected = denoiser.generate(fresh(jobs))
    model = accelerated(tiny_layout, static_step=True, **BUCKETS, **options)
    got = model.generate(fresh(jobs))
    assert difference(got, expected) <= TOLERANCE
    assert model.static_step is not None
    assert model.static_step.static_forwards == BASE.num_inference_steps and model.static_step.eager_forwards == 0


def test_buffers_follow_the_running_set(tiny_layout, denoiser, prompts) -> None:
    """One bucket of 8 rows serves three running sets in turn (3 jobs, then 2, then 1): each change refills the
    rows, so every job gets the image it gets alone."""
    jobs = [make_job(prompts, i, num_inference_steps=steps) for i, steps in enumerate((2, 3, 4))]
    jobs[1] = dataclasses.replace(jobs[1], params=dataclasses.replace(jobs[1].params, adapter_strength=0.2))
    alone = [denoiser.generate([job])[0] for job in fresh(jobs)]
    model = accelerated(tiny_layout, static_step=True, bucket_sizes=[(64, 64)], bucket_rows=[8])
    together = run_continuously(model, fresh(jobs))
    assert model.static_step.static_forwards == 4 and model.static_step.eager_forwards == 0
    assert difference(together, alone) <= TOLERANCE


def test_padding_rows_never_reach_real_rows(tiny_layout, denoiser, prompts, monkeypatch) -> None:
    """A job of 2 rows in a bucket of 8: the 6 padding rows are filled with large random values (as stale rows of
    an earlier, larger set could be), and the job's image stays the eager one."""
    job = make_job(prompts, 0)
    expected = denoiser.generate(fresh([job]))
    fill = StaticStep._fill
    generator = torch.Generator().manual_seed(0)

    def poisoned(self, buffers, batch) -> None:
        fill(self, buffers, batch)
        for name in ("sample", "t", "context", "pooled", "time_ids", "control_image", "mask", "adapter_strength"):
            tensor = getattr(buffers, name)
            noise = torch.randn(tensor[batch.rows :].shape, generator=generator) * 50
            tensor[batch.rows :] = noise.abs() if name == "t" else noise
        buffers.identity_strength[batch.rows :] = 3.0

    monkeypatch.setattr(StaticStep, "_fill", poisoned)
    model = accelerated(tiny_layout, static_step=True, bucket_sizes=[(64, 64)], bucket_rows=[8])
    assert difference(model.generate(fresh([job])), expected) <= TOLERANCE
    assert model.static_step.static_forwards == BASE.num_inference_steps


def test_what_fits_no_bucket_steps_eagerly(tiny_layout, denoiser, prompts) -> None:
    model = accelerated(tiny_layout, static_step=True, bucket_sizes=[(64, 64)], bucket_rows=[2, 4])
    other_size = [make_job(prompts, 0, height=48)]  # no 64x48 bucket
    too_many = [make_job(prompts, 1, num_images=3)]  # 6 rows > the largest bucket
    for jobs in (other_size, too_many):
        assert difference(model.generate(fresh(jobs)), denoiser.generate(fresh(jobs))) <= TOLERANCE
    assert model.static_step.static_forwards == 0
    assert model.static_step.eager_forwards == 2 * BASE.num_inference_steps


def test_cuda_graphs_need_a_cuda_device(tiny_layout) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        accelerated(tiny_layout, cuda_graphs=True, **BUCKETS)


# ------------------------------------------------------------------------------------------ compiled step


@pytest.fixture(scope="module")
def compile_cache(request: pytest.FixtureRequest) -> Path:
    """Inductor's programs for these tests, kept between runs (a cold compile of the tiny blocks takes a minute)."""
    return Path(request.config.cache.mkdir("instantid-torch-compile"))


def lora_files(weights: Path) -> dict[str, Path]:
    return {path.stem: path for path in (weights / "loras").glob("*.safetensors")}


def adapters_of(model: InstantIDDenoiser, weights: Path) -> LoraAdapters:
    """The UNet's LoRA adapters as the Denoiser deployment wires them (merged; the model told of every switch)."""
    adapters = LoraAdapters({"unet": model.unet}, lora_files(weights), capacity=2, unet_config=model.unet.config)
    adapters.fuse = True
    adapters.on_change = model.weights_changed
    return adapters


@pytest.mark.slow
def test_compiled_step_and_its_lora_switches_give_the_eager_images(
    tiny_layout, tiny_weights, prompts, compile_cache
) -> None:
    """Regional compilation (inductor) + fused projections + the bucketed step, through LoRA switches (none, one
    set, another set, none): each image equals the eager denoiser's with the same set merged."""
    eager = load_denoiser(tiny_layout, device="cpu", dtype="float32")  # its own UNet: LoRAs get merged into it
    fast = load_denoiser(
        tiny_layout,
        device="cpu",
        dtype="float32",
        speed=SpeedOptions(compile=True, fuse_qkv=True, **BUCKETS),
        cache_dir=compile_cache,
    )
    eager_adapters, fast_adapters = adapters_of(eager, tiny_weights), adapters_of(fast, tiny_weights)
    jobs = mixed_jobs(prompts)
    first, second = STYLE_LORAS[:2]
    images = {}
    for loras in ((), ((first, 0.8),), ((second, 0.3),), ()):
        eager_adapters.activate(loras)
        fast_adapters.activate(loras)
        expected = eager.generate(fresh(jobs))
        assert difference(fast.generate(fresh(jobs)), expected) <= TOLERANCE, loras
        images[loras] = expected
    assert fast.compiled and fast.static_step.eager_forwards == 0
    no_lora = images[()]
    one, other = images[((first, 0.8),)], images[((second, 0.3),)]
    assert difference(one, no_lora) > 4 and difference(other, one) > 4  # each switch changed the image


@pytest.mark.slow
def test_compiled_blocks_run_eagerly_outside_the_buckets(tiny_layout, denoiser, prompts, compile_cache) -> None:
    """A size without a bucket steps eagerly through the compiled blocks without compiling them for it."""
    from torch._dynamo.utils import counters

    model = load_denoiser(tiny_layout, device="cpu", dtype="float32", speed=SpeedOptions(compile=True, **BUCKETS))
    jobs = [make_job(prompts, 0, height=48)]
    before = dict(counters["stats"])
    assert difference(model.generate(fresh(jobs)), denoiser.generate(fresh(jobs))) <= TOLERANCE
    assert dict(counters["stats"]) == before  # dynamo saw no frame: nothing traced, nothing compiled
    assert model.static_step.eager_forwards == BASE.num_inference_steps


# ------------------------------------------------------------------------------------------ fp8 and the VAE


def test_fp8_weight_only_runs_or_names_what_it_needs(tiny_layout, denoiser, prompts) -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(WeightsError, match="torchao"):
            accelerated(tiny_layout, fp8="weight_only")
        skip_unless_required("torchao", "torchao is not installed (the fp8 extra)")
    model = accelerated(tiny_layout, fp8="weight_only")
    assert type(model.unet.down_blocks[1].attentions[0].proj_in.weight).__name__ == "Float8Tensor"
    jobs = [make_job(prompts, 0)]
    got, expected = model.generate(fresh(jobs)), denoiser.generate(fresh(jobs))
    assert got[0].shape == expected[0].shape and 0 < difference(got, expected) < 64  # quantized: close, not equal


def test_fp8_dynamic_names_the_gpu_it_needs(tiny_layout) -> None:
    pytest.importorskip("torchao")
    with pytest.raises(WeightsError, match=r"compute capability 8\.9"):
        accelerated(tiny_layout, fp8="dynamic")


def test_bf16_vae_decode_stays_close_to_fp32(tiny_layout, denoiser, prompts) -> None:
    model = accelerated(tiny_layout, vae_dtype="bfloat16")
    assert model.vae_dtype == torch.bfloat16 and next(model.vae.parameters()).dtype == torch.bfloat16
    jobs = [make_job(prompts, 0)]
    assert difference(model.generate(fresh(jobs)), denoiser.generate(fresh(jobs))) <= 8


def test_an_fp16_fixed_vae_folder_replaces_the_base_vae_and_decodes_in_fp16(tiny_layout, tiny_weights, tmp_path):
    """The fp16-fix VAE's config says it does not overflow in fp16 (force_upcast false): a float16 denoiser then
    decodes in float16 instead of upcasting to float32."""
    vae = load_vae(tiny_weights / "sdxl" / "vae")
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "vae-fp16-fix")
    from deployments.instantid.bases import SDXLBase
    from deployments.instantid.loading import build_denoiser, load_instantid_parts

    parts = load_instantid_parts(tiny_layout, dtype=torch.float16)
    base = SDXLBase("sdxl", folder=tiny_layout.sdxl)
    stock = build_denoiser(parts, base, device=torch.device("cpu"), dtype=torch.float16)
    fixed = build_denoiser(
        parts, base, device=torch.device("cpu"), dtype=torch.float16, vae_folder=tmp_path / "vae-fp16-fix"
    )
    assert stock.vae_dtype == torch.float32 and fixed.vae_dtype == torch.float16
    with pytest.raises(WeightsError, match=r"no config\.json"):
        load_vae(tmp_path)


def test_the_compile_cache_lives_in_the_weights_cache(tmp_path, monkeypatch) -> None:
    from deployments.instantid.acceleration import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache(tmp_path) == tmp_path / "torch-compile"
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))  # the environment's choice wins
    assert use_compile_cache(tmp_path / "other") == tmp_path / "chosen"
