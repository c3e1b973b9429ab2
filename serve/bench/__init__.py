"""``instantid bench``: serving, face-analysis and denoising benchmarks, each beside a baseline in the same run.

Speed is what users pick a serving stack for, so every number here comes with the thing it should be
compared to, measured in the same process on the same machine: Serve against the in-process pipeline,
our face analysis against insightface's default app, our denoiser against diffusers' stock SDXL ControlNet
pipeline. Results are JSON on stdout (and ``--out``); progress goes to stderr.

This package module holds only argparse definitions and small helpers that import nothing heavy, because
``python -m serve.bench.denoise_bench`` must start on a GPU machine that has neither Ray nor insightface
nor OpenCV: the benchmark modules import their dependencies themselves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from deployments.instantid.errors import InstantIDError  # plain exceptions, no imports behind them
from deployments.instantid.params import DEFAULT_PARAMS  # a plain dataclass, no imports behind it
from serve.bench.chaos.arguments import add_chaos_arguments  # argparse definitions only

BENCH_MODULES = {
    "serve": "serve_bench",
    "face": "face_bench",
    "denoise": "denoise_bench",
    "events": "events_bench",
    "safety": "safety_bench",
    "gpu": "gpu_bench",
    "chaos": "chaos.run",
}


class BenchError(InstantIDError):
    """A one-line reason a benchmark cannot run (no such device, a missing package or photo).

    An InstantIDError so that ``instantid``'s main prints it as one ``error:`` line and exits 2.
    """

    code = "bench_error"


# ------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method) without needing numpy; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0): a report's "x over y" figures."""
    return None if a is None or not b else a / b


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50.0)


def rounded(value: Any, digits: int = 5) -> Any:
    """Round floats (recursively) to ``digits`` significant digits so the JSON stays readable.

    Significant digits, not decimal places: a 0.0453 s step and a 1324 images/min rate both keep the same
    relative precision (1e-5), so ratios recomputed from the report agree with the ones in it.
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ------------------------------------------------------------------------------------------ reporting


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed distribution versions (None when absent), read from metadata so nothing gets imported."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_facts(packages: Sequence[str] = ("torch", "diffusers", "transformers")) -> dict[str, Any]:
    """What a reader needs to judge a number: CPU count, load, Python, package versions, date, GPU if any.

    The load average is included because a benchmark on a shared machine is only as good as its quiet.
    """
    facts: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": package_versions(packages),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            facts["gpu"] = {
                "name": torch.cuda.get_device_name(index),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": list(torch.cuda.get_device_capability(index)),
                "count": torch.cuda.device_count(),
            }
        else:
            facts["gpu"] = None
    return facts


def emit(result: dict[str, Any], out: Path | None) -> None:
    """The result as JSON on stdout (the only thing written there) and, when asked, into ``out``."""
    text = json.dumps(rounded(result), indent=2, sort_keys=False)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    """Human progress on stderr, so stdout stays pure JSON for pipes."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ arguments


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> int:
    value = _positive(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE's scale factor), got {value}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=_positive, default=16, help="timed requests per phase (default 16)")
    p.add_argument("--concurrency", type=_positive, default=8, help="clients in the throughput phase (default 8)")
    p.add_argument("--steps", type=_positive, default=20, help="denoising steps per request (default 20)")
    p.add_argument("--size", type=_size, default=256, help="output width and height (default 256)")
    _add_home_argument(p)
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop issuing requests after this (default 900)")
    p.add_argument(
        "--in-process-threads",
        type=_positive,
        default=None,
        help="torch threads of the in-process side (default: what Ray gives the served Denoiser replica)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    load = p.add_argument_group("--open-loop: static vs continuous batching under Poisson arrivals (--size applies)")
    load.add_argument(
        "--open-loop",
        action="store_true",
        help="instead of serve vs in-process: saturation throughput and open-loop latency of both batching modes",
    )
    load.add_argument("--mix-steps", type=_positive, nargs="+", default=[4, 8, 30], help="step counts drawn from")
    load.add_argument("--mix-images", type=_positive, nargs="+", default=[1, 2], help="image counts drawn from")
    load.add_argument("--clients", type=_positive, default=8, help="closed-loop clients at saturation (default 8)")
    load.add_argument("--saturation-requests", type=_positive, default=36, help="requests per saturation phase")
    load.add_argument("--load-requests", type=_positive, default=48, help="requests per open-loop phase")
    load.add_argument(
        "--load-fraction", type=float, default=0.7, help="open-loop rate as a fraction of static's capacity"
    )
    load.add_argument("--seed", type=int, default=0, help="seeds the mix and the arrival times (default 0)")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    load.add_argument(
        "--admission",
        choices=("greedy", "marginal"),
        nargs="+",
        default=None,
        help="continuous batching once per admission policy, in this order (default: the config's)",
    )
    load.add_argument(
        "--cost-model",
        type=Path,
        default=None,
        metavar="REPORT",
        help="SIMULATION: the Denoiser's forwards wait launch + per-row x rows seconds, fitted from this GPU "
        "denoise-bench report (e.g. serve/bench/results/h200-2026-11-26/run2-float16-interleaved.json)",
    )


def add_face_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=_positive, default=200, help="timed images per configuration (default 200)")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="an antelopev2 folder (or a weights root holding antelopev2/); default: tiny weights in a temp dir",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated onnxruntime providers for both (default: CUDA first when available, then CPU)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def add_denoise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        choices=("sdxl-random", "tiny"),
        default="sdxl-random",
        help="sdxl-random: full-size SDXL + IdentityNet with random weights (GPU); tiny: the test-size models",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda for sdxl-random, cpu for tiny)")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="model precision (default: float16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help=f"denoising steps (default {DEFAULT_PARAMS.num_inference_steps}, the published demo's; a mode's own)",
    )
    p.add_argument("--size", type=_size, default=None, help="width = height (default 1024; tiny: 256)")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1, 2], help="batch sizes to measure (default 1 2)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed runs per pipeline and batch (default 3)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale (default {DEFAULT_PARAMS.guidance_scale:g}, the published demo's; a mode's own)",
    )
    p.add_argument(
        "--mode",
        choices=("lcm", "lightning", "hyper"),
        default=None,
        help="a fast mode: its scheduler, steps and guidance, and a random LoRA of its published layout",
    )
    p.add_argument(
        "--lora",
        choices=("peft", "kohya"),
        default=None,
        help="also a random style LoRA in this layout; reports the LoRA switch and per-image costs",
    )
    p.add_argument("--no-baseline", action="store_true", help="measure only our denoiser")
    p.add_argument("--no-cold-start", action="store_true", help="skip saving the weights and the cold start")
    p.add_argument("--workdir", type=Path, default=None, help="where the cold-start weights are saved (temp dir)")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="also count the ATen operators each pipeline dispatches per denoising step (~ kernel launches)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the models on the meta device and report parameter counts only (no memory, no compute)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    # Internal: the cold-start child process loads from this folder and reports on stdout.
    p.add_argument("--cold-start-from", type=Path, default=None, help=argparse.SUPPRESS)


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``bench {serve,face,denoise,events,chaos}`` on an ``add_subparsers`` object; the chosen one is ``bench_command``.

    serve/cli.py sets the command function; :func:`run_bench` imports the benchmark module it needs.
    """
    bench = sub.add_parser("bench", help="benchmarks, each beside a baseline in the same run; JSON on stdout")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_arguments(
        bsub.add_parser("serve", help="HTTP latency/throughput through a local Ray Serve vs in-process (CPU)")
    )
    add_face_arguments(bsub.add_parser("face", help="face analysis images/s: ours vs insightface's FaceAnalysis"))
    add_denoise_arguments(
        bsub.add_parser("denoise", help="denoiser s/image vs diffusers' StableDiffusionXLControlNetPipeline")
    )
    add_events_arguments(
        bsub.add_parser("events", help="do job event-stream subscribers slow generation? (local Ray Serve, CPU)")
    )
    add_safety_arguments(bsub.add_parser("safety", help="the safety check's CPU cost per image vs encoding it"))
    add_gpu_arguments(
        bsub.add_parser("gpu", help="every GPU figure in one run of <= 8 min (each section time-boxed; cpu: dry run)")
    )
    add_chaos_arguments(
        bsub.add_parser("chaos", help="a soak under faults; checks nothing is lost, duplicated or stuck (local, CPU)")
    )
    return bench


def add_safety_arguments(p: argparse.ArgumentParser) -> None:
    """``bench safety``: the classifier per image (and batched) beside the store's encoding of the same images."""
    p.add_argument("--size", type=_size, default=1024, help="images are the bundled photos at this size (1024)")
    p.add_argument("--repeats", type=_positive, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--threads", type=_positive, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--batch", type=_positive, default=4, help="images per batched call (default 4)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (full size, random weights) or cpu (dry run, tiny models)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None, help="default: fp16 on CUDA")
    p.add_argument("--size", type=int, default=None, help="width = height (default 1024; cpu: 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; cpu: 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per contender and comparison (default 2)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help="a subset of the sections (default: all, in priority order; see gpu_bench)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="the whole run's seconds (default 480; cpu: 2400)")
    p.add_argument("--workdir", type=Path, default=None, help="saved weights, compile caches, logs (default: temp)")
    p.add_argument("--out", type=Path, default=None, help="the report (default WORKDIR/gpu-bench.json)")
    # Internal: one section in this process.
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--box-s", type=float, default=None, help=argparse.SUPPRESS)


def add_events_arguments(p: argparse.ArgumentParser) -> None:
    """``bench events``: the same jobs without and with N event-stream subscribers each, on one local stack."""
    p.add_argument("--jobs", type=_positive, default=6, help="jobs per phase, one after another (default 6)")
    p.add_argument("--subscribers", type=_positive, default=50, help="event streams per loaded job (default 50)")
    p.add_argument("--steps", type=_positive, default=10, help="denoising steps per job (default 10)")
    p.add_argument("--size", type=_size, default=256, help="output width and height (default 256)")
    _add_home_argument(p)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def _add_home_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="where tiny weights are kept/made (default $INSTANTID_HOME or ~/.instantid); S3 data goes to a temp dir",
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run ``args.bench_command``, importing only that benchmark's module (and so only its dependencies)."""
    import importlib

    name = BENCH_MODULES[args.bench_command]
    if args.bench_command == "serve" and args.open_loop:
        name = "batching_bench"  # static vs continuous batching under open-loop arrivals
    module = importlib.import_module(f"serve.bench.{name}")
    return module.main_from_args(args)
