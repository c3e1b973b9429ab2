"""``instantid demo``: the whole product on one machine, one real photo, one image in S3."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from serve.tools.runner import ServeFile, free_port, local_stack

DEMO_REQUEST: dict[str, Any] = {
    "prompt": "a portrait of an astronaut, studio lighting",
    "style": "none",
    "width": 512,
    "height": 512,
    "num_inference_steps": 20,
    "seed": 42,
    "output_format": "png",
}


def demo_photo_jpeg() -> bytes:
    """A real portrait bundled with scikit-image (NASA, public domain), as JPEG bytes."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def local_config_path() -> Path:
    return Path(str(resources.files("serve") / "configs" / "local.yaml"))


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the demo request failed with HTTP {exc.code}: {exc.read().decode()[:500]}") from None


def run_demo(home: Path) -> dict[str, Any]:
    """Start everything, send one request over HTTP, check the result is in S3, keep a local copy."""
    serve_file = ServeFile.load(local_config_path(), home=home)  # weights, S3 data and spool under home
    started = time.time()
    with local_stack(serve_file, port=free_port()) as stack:
        print(f"serving on {stack['url']} ({time.time() - started:.1f} s to start)", flush=True)
        body = {**DEMO_REQUEST, "face_image_b64": base64.b64encode(demo_photo_jpeg()).decode()}
        result = _post_json(stack["url"] + "/v1/generate", body, timeout=300)
        image = result["images"][0]
        bucket, key = image["uri"][len("s3://") :].split("/", 1)
        head = stack["s3"].client().head_object(Bucket=bucket, Key=key)  # the object really is there
        out = home / "demo" / f"{result['id']}{Path(key).suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(image["url"], timeout=30) as response:
            out.write_bytes(response.read())
        print(
            f"generation {result['id']} (seed {result['seed']}, {image['width']}x{image['height']}, "
            f"{head['ContentLength']} bytes) in {result['timings']['total']['seconds']:.1f} s"
        )
        print(f"S3 object:  {image['uri']}")
        print(f"local copy: {out}")
        print("(tiny random weights: the picture is meaningless; see README 'Real weights')")
    return result
