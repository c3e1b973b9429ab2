"""The whole app on a real local Ray cluster with SeaweedFS: HTTP, handles, S3 objects, parity, batching."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.generation.local import InstantIDPipeline
from deployments.generation.plan import GenerationInputs
from deployments.instantid.options import GenerationOptions
from deployments.instantid.weights import WeightsLayout
from serve.schemas import GenerateRequest, GenerateResponse
from tests.support import FAST_OPTIONS, astronaut_jpeg, encode_image, group_photo_jpeg

pytestmark = pytest.mark.slow

FAST = FAST_OPTIONS
ASTRONAUT = astronaut_jpeg()


def _keys(stack) -> set[str]:
    client = stack.s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.s3.bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _object(stack, uri: str) -> bytes:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return stack.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _post_multipart(stack, fields: dict, image: bytes = ASTRONAUT, timeout: float = 120) -> httpx.Response:
    files = {"face_image": ("face.jpg", image, "image/jpeg")}
    form = {k: str(v) for k, v in fields.items()}
    return httpx.post(f"{stack.url}/v1/generate", data=form, files=files, timeout=timeout)


def _post_json(stack, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/generate", json=body, timeout=timeout)


def test_http_multipart_generation_is_stored_in_s3_with_metadata(serve_stack):
    response = _post_multipart(serve_stack, {"prompt": "an astronaut", "seed": 5, "num_images": 2, **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    assert body["seed"] == 5 and len(body["images"]) == 2
    for index, image in enumerate(body["images"]):
        assert image["uri"].endswith(f"/{body['id']}/image-{index}.png")
        stored = _object(serve_stack, image["uri"])
        assert len(stored) == image["bytes"]
        assert Image.open(io.BytesIO(stored)).size == (256, 256)
        assert httpx.get(image["url"], timeout=10).content == stored  # the presigned URL serves it
    meta_uri = body["images"][0]["uri"].rsplit("/", 1)[0] + "/meta.json"
    meta = json.loads(_object(serve_stack, meta_uri))
    assert meta["id"] == body["id"] and meta["request_id"] == body["request_id"]
    assert meta["parameters"]["seed"] == 5 and meta["parameters"]["width"] == 256
    assert meta["face"]["bbox"] == body["face"]["box"]
    for stage in ("face", "prompt", "denoise", "store"):
        timing = meta["timings"][stage]
        assert timing["start"] <= timing["end"], stage
    assert meta["timings"]["face"]["start"] < meta["timings"]["denoise"]["start"]
    assert meta["timings"]["denoise"]["end"] <= meta["timings"]["store"]["start"] + 1e-3
    assert {"face", "prompt", "denoise", "store", "total"} <= set(body["timings"])


def test_handle_call_with_the_same_request_model(serve_stack):
    from ray import serve as ray_serve

    handle = ray_serve.get_app_handle(serve_stack.app_name)
    request = GenerateRequest(
        prompt="an astronaut", seed=11, face_image_b64=base64.b64encode(ASTRONAUT).decode(), **FAST
    )
    result = handle.generate.remote(request).result(timeout_s=120)
    assert isinstance(result, GenerateResponse)
    assert result.seed == 11 and result.parameters["num_inference_steps"] == FAST["num_inference_steps"]
    assert _object(serve_stack, result.images[0].uri)[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_is_drawn_and_returned_when_absent(serve_stack):
    body = {"prompt": "x", "face_image_b64": base64.b64encode(ASTRONAUT).decode(), **FAST, "num_inference_steps": 1}
    first, second = _post_json(serve_stack, body).json(), _post_json(serve_stack, body).json()
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
    assert first["parameters"]["seed"] == first["seed"]


def test_serve_matches_in_process_generation(serve_stack, tiny_weights: Path):
    """The same seed through Serve and through `instantid generate`'s code path gives the same image."""
    fields = {
        "prompt": "a watercolor astronaut",
        "negative_prompt": "blurry",
        "style": "watercolor",
        "seed": 1234,
        "num_inference_steps": 4,
        "width": 320,
        "height": 256,
        "identitynet_strength": 0.9,
        "adapter_strength": 0.7,
        "scheduler": "dpmpp_2m_karras",
        "output_format": "png",
    }
    response = _post_multipart(serve_stack, fields)
    assert response.status_code == 200, response.text
    served = np.asarray(Image.open(io.BytesIO(_object(serve_stack, response.json()["images"][0]["uri"]))))

    pipeline = InstantIDPipeline.from_layout(WeightsLayout.from_root(tiny_weights), device="cpu", dtype="float32")
    options = GenerationOptions(**{k: v for k, v in fields.items() if k != "face_image"})
    local = pipeline(options, GenerationInputs(faces=(ASTRONAUT,)))  # the same JPEG bytes as the upload
    assert served.shape == local.images[0].shape == (256, 320, 3)
    assert np.abs(served.astype(int) - local.images[0].astype(int)).max() <= 2


def test_generation_can_be_fetched_again_with_fresh_urls(serve_stack):
    body = _post_multipart(serve_stack, {"prompt": "an astronaut", "seed": 3, **FAST}).json()
    fetched = httpx.get(f"{serve_stack.url}/v1/generations/{body['id']}", timeout=30)
    assert fetched.status_code == 200
    meta = fetched.json()
    assert meta["id"] == body["id"] and meta["images"][0]["uri"] == body["images"][0]["uri"]
    assert httpx.get(meta["images"][0]["url"], timeout=10).status_code == 200
    missing = httpx.get(f"{serve_stack.url}/v1/generations/20200101T000000Z-0000000000000000", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bogus = httpx.get(f"{serve_stack.url}/v1/generations/..%2F..%2Fetc", timeout=30)
    assert bogus.status_code == 404


def test_faces_endpoint_lists_faces_and_the_chosen_one(serve_stack):
    group = group_photo_jpeg()
    response = httpx.post(
        f"{serve_stack.url}/v1/faces",
        files={"image": ("t1.jpg", group, "image/jpeg")},
        data={"include_keypoint_image": "true"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["faces"]) >= 2 and body["chosen"] == 0
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in body["faces"]]
    assert areas[0] == max(areas)
    keypoint_png = Image.open(io.BytesIO(base64.b64decode(body["keypoint_image_png_b64"])))
    assert keypoint_png.mode == "RGB" and max(keypoint_png.size) == 512  # local.yaml's long side


def test_faces_endpoint_takes_the_photo_under_the_generate_field_names(serve_stack):
    """``face_image`` (multipart) and ``face_image_b64`` (JSON) work as on /v1/generate, ``image`` still does."""
    url = f"{serve_stack.url}/v1/faces"
    answers = [
        httpx.post(url, files={"face_image": ("a.jpg", ASTRONAUT, "image/jpeg")}, timeout=60),
        httpx.post(url, files={"image": ("a.jpg", ASTRONAUT, "image/jpeg")}, timeout=60),
        httpx.post(url, json={"face_image_b64": base64.b64encode(ASTRONAUT).decode()}, timeout=60),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert bodies[0]["faces"] and all(b["faces"] == bodies[0]["faces"] for b in bodies)
    both = httpx.post(
        url,
        files=[("face_image", ("a.jpg", ASTRONAUT, "image/jpeg")), ("image", ("b.jpg", ASTRONAUT, "image/jpeg"))],
        timeout=60,
    )
    assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_parameter"


def test_no_face_is_a_422_from_downstream_and_leaves_nothing(serve_stack):
    before = _keys(serve_stack)
    blank = encode_image(np.full((300, 300, 3), 128, np.uint8))
    response = _post_multipart(serve_stack, {"prompt": "x", **FAST}, image=blank)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "no_face" and error["request_id"] == response.headers["x-request-id"]
    assert _keys(serve_stack) == before


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"prompt": "x", "num_inference_steps": 0}, 422, "invalid_parameter"),
        ({"prompt": "x", "width": 250, "height": 256}, 422, "invalid_parameter"),
        ({"prompt": "x", "width": 256}, 422, "invalid_parameter"),
        ({"prompt": "x", "control_guidance_start": 0.8, "control_guidance_end": 0.2}, 422, "invalid_parameter"),
        ({"prompt": "x", "scheduler": "nope"}, 422, "invalid_parameter"),
        ({"prompt": "x" * 2001}, 422, "invalid_parameter"),
        ({"prompt": "x", "unknown_field": 1}, 422, "invalid_parameter"),
        ({"prompt": "x", "seed": -1}, 422, "invalid_parameter"),
    ],
)
def test_invalid_parameters_are_422_json_and_leave_nothing(serve_stack, fields, status, code):
    before = _keys(serve_stack)
    response = _post_multipart(serve_stack, fields)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert _keys(serve_stack) == before


def test_unreadable_and_wrong_type_inputs(serve_stack):
    before = _keys(serve_stack)
    text = _post_multipart(serve_stack, {"prompt": "x", **FAST}, image=b"hello, not an image")
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
    truncated = _post_multipart(serve_stack, {"prompt": "x", **FAST}, image=ASTRONAUT[:2000])
    assert truncated.status_code == 400 and truncated.json()["error"]["code"] == "invalid_image"
    bad_b64 = _post_json(serve_stack, {"prompt": "x", "face_image_b64": "@@@not base64@@@"})
    assert bad_b64.status_code == 400
    no_image = _post_json(serve_stack, {"prompt": "x"})
    assert no_image.status_code == 422
    plain = httpx.post(
        f"{serve_stack.url}/v1/generate", content=b"prompt=x", timeout=30, headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    not_json = httpx.post(
        f"{serve_stack.url}/v1/generate", content=b"{oops", timeout=30, headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    foreign = _post_json(serve_stack, {"prompt": "x", "face_image_uri": "s3://someone-elses-bucket/face.jpg"})
    assert foreign.status_code == 422
    url = _post_json(serve_stack, {"prompt": "x", "face_image_uri": "https://example.com/face.jpg"})
    assert url.status_code == 422
    assert _keys(serve_stack) == before


def test_health_models_and_openapi(serve_stack):
    assert httpx.get(f"{serve_stack.url}/healthz", timeout=10).json() == {"status": "ok"}
    for path in ("/", "/healthz"):  # probes send HEAD: GET's answer without a body, through Serve's proxy too
        head = httpx.head(f"{serve_stack.url}{path}", timeout=10)
        assert head.status_code == 200 and head.content == b"", path
    response = httpx.get(f"{serve_stack.url}/v1/models", timeout=30)
    models = response.json()
    assert models["api_version"] == "1" and models["default_base"] == "sdxl"
    bases = models["base_models"]
    assert bases == {
        "sdxl": {"description": "the weights' SDXL base", "single_file": False, "inpainting": False},
        "tiny-alt": {"description": bases["tiny-alt"]["description"], "single_file": True, "inpainting": False},
        "tiny-inpaint": {"description": bases["tiny-inpaint"]["description"], "single_file": False, "inpainting": True},
    }
    assert set(models["loras"]) == {
        "lcm-lora-sdxl",
        "sdxl-lightning-8step",
        "hyper-sdxl-8step-cfg",
        "style-peft",
        "style-kohya",
    }
    assert models["loras"]["style-peft"]["scale"] == 0.8
    assert models["modes"]["lcm"] | {"description": ""} == {
        "lora": "lcm-lora-sdxl",
        "lora_scale": 1.0,
        "scheduler": "lcm",
        "num_inference_steps": 10,
        "guidance_scale": 0.0,
        "description": "",
    }
    assert {"lightning", "hyper"} <= set(models["modes"])
    assert "sdxl" in models["denoiser"]["loaded_bases"] and models["denoiser"]["identitynet_config"]
    assert str(serve_stack.config.weights.root) not in response.text  # where the files are is not published
    spec = httpx.get(f"{serve_stack.url}/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/faces", "/v1/generations", "/v1/generations/{generation_id}", "/healthz"} <= set(
        spec["paths"]
    )


HEAVY_LIBRARIES = ("torch", "onnxruntime", "cv2", "opencv")  # parts of the native libraries' file names


def test_the_ingress_replica_loads_no_model_stack(serve_stack):
    """Every autoscaled ingress replica pays for what the ingress imports: no torch, onnxruntime or OpenCV library is
    mapped into its process, and it stays under 250 MiB."""
    import psutil
    import ray

    httpx.get(f"{serve_stack.url}/healthz", timeout=30).raise_for_status()
    # This cluster's replicas only (another Ray on the machine may run an app of the same name): the workers below
    # the raylet that ray.init started here.
    node = ray._private.worker._global_node
    raylets = {info.process.pid for info in node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET]}
    replicas = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "ServeReplica:instantid:Ingress" in " ".join(proc.info["cmdline"] or [])
        and any(parent.pid in raylets for parent in proc.parents())
    ]
    assert replicas, "no Ingress replica process found"
    for proc in replicas:
        libraries = {Path(m.path).name for m in proc.memory_maps()}
        heavy = sorted(name for name in libraries if any(lib in name for lib in HEAVY_LIBRARIES))
        assert heavy == [], heavy
        assert proc.memory_info().rss < 250 * 2**20, proc.memory_info().rss
