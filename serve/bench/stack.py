"""What the benchmarks that run a local stack share: the request they send, one POST, and their own cluster with tiny
weights."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from serve.bench import BenchError, progress

PROMPT = "a portrait of an astronaut, studio lighting"
OUTPUT_FORMAT, OUTPUT_QUALITY = "webp", 95  # the API's defaults, used by both sides


def request_body(photo: bytes, size: int, steps: int, seed: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "style": "none",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": seed,
        "output_format": OUTPUT_FORMAT,
        "output_quality": OUTPUT_QUALITY,
        "face_image_b64": base64.b64encode(photo).decode(),
    }


def post_json(url: str, body: dict[str, Any], timeout: float) -> tuple[float, dict[str, Any]]:
    """(client-side seconds, response JSON) of one POST; any non-200 answer is an error."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise BenchError(f"POST {url} answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
    return time.perf_counter() - start, payload


def own_cluster_and_tiny_weights(home: Path | None) -> tuple[Path, bytes]:
    """For a benchmark on a local stack: its own Ray cluster, the tiny weights (made if missing) and the photo.

    local_stack passes RAY_ADDRESS to ray.init, which without one joins the latest cluster started on this machine
    (/tmp/ray/ray_current_cluster) and would then shut down someone else's Serve; "local" always starts a new one.
    """
    from deployments.tiny.weights import tiny_weights_present, write_tiny_weights
    from serve.tools.cli import instantid_home
    from serve.tools.demo import demo_photo_jpeg

    os.environ["RAY_ADDRESS"] = "local"
    weights = (home or instantid_home()).expanduser() / "weights" / "tiny"
    if not tiny_weights_present(weights):
        progress(f"making tiny weights in {weights}")
        write_tiny_weights(weights)
    return weights, demo_photo_jpeg()
