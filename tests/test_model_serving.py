"""Model choice through the served graph: request fields, errors, LoRA-set batching, multiplexed routing by base,
eviction of idle bases, and catalogue failures at deploy and at load time (real local Ray + SeaweedFS)."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.config import AppConfig
from tests.serve_fixtures import NO_SAFETY_CHECK, local_app_config
from tests.support import FAST_REQUEST, astronaut_b64

pytestmark = pytest.mark.slow


def generate(url: str, timeout: float = 180, **fields) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/generate", json={**FAST_REQUEST, "face_image_b64": astronaut_b64(), **fields}, timeout=timeout
    )


def image_of(stack, body: dict) -> np.ndarray:
    bucket, key = body["images"][0]["uri"][len("s3://") :].split("/", 1)
    data = stack.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(data)))


def meta_of(stack, body: dict) -> dict:
    bucket, key = body["images"][0]["uri"][len("s3://") :].rsplit("/", 1)[0].split("/", 1)
    return json.loads(stack.s3.client().get_object(Bucket=bucket, Key=f"{key}/meta.json")["Body"].read())


def test_mode_and_loras_are_applied_and_recorded(serve_stack) -> None:
    response = generate(serve_stack.url, seed=4, mode="lcm", loras=[{"name": "style-peft"}])
    assert response.status_code == 200, response.text
    body = response.json()
    expected = {
        "base": "sdxl",
        "loras": [{"name": "style-peft", "scale": 0.8}, {"name": "lcm-lora-sdxl", "scale": 1.0}],
        "mode": "lcm",
    }
    assert body["model"] == expected
    # the preset's sampling, except the steps this request set itself (FAST_REQUEST has 2)
    assert {k: body["parameters"][k] for k in ("scheduler", "guidance_scale", "num_inference_steps")} == {
        "scheduler": "lcm",
        "guidance_scale": 0.0,
        "num_inference_steps": 2,
    }
    meta = meta_of(serve_stack, body)
    assert meta["model"] == expected and meta["parameters"]["scheduler"] == "lcm"
    stages = {"face", "prompt", "denoiser", "store"} | (
        {"safety"} if serve_stack.config.safety.policy != "off" else set()
    )
    assert meta["replicas"]["denoiser"] == body["replicas"]["denoiser"] and set(body["replicas"]) == stages
    plain = generate(serve_stack.url, seed=4, mode="lcm").json()
    assert np.abs(image_of(serve_stack, plain).astype(int) - image_of(serve_stack, body).astype(int)).max() > 10


def test_loras_as_a_multipart_form_field(serve_stack) -> None:
    fields = {k: str(v) for k, v in {**FAST_REQUEST, "seed": 9}.items()}
    fields["loras"] = json.dumps([{"name": "style-kohya", "scale": 0.5}])
    files = {"face_image": ("face.jpg", __import__("base64").b64decode(astronaut_b64()), "image/jpeg")}
    response = httpx.post(f"{serve_stack.url}/v1/generate", data=fields, files=files, timeout=180)
    assert response.status_code == 200, response.text
    assert response.json()["model"]["loras"] == [{"name": "style-kohya", "scale": 0.5}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base_model": "sdxl-turbo"}, "unknown base_model 'sdxl-turbo'; available: sdxl, tiny-alt, tiny-inpaint"),
        ({"loras": [{"name": "../etc/passwd"}]}, "unknown lora '../etc/passwd'; available: hyper-sdxl-8step-cfg, "),
        ({"mode": "turbo"}, "unknown mode 'turbo'; available: hyper, lcm, lightning"),
        ({"loras": [{"name": "style-peft", "scale": 2.5}]}, "less than or equal to 2"),
        ({"loras": [{"name": f"l{i}"} for i in range(5)]}, "at most 4"),
        ({"loras": "not json"}, "loras must be a JSON list"),
    ],
)
def test_unknown_or_invalid_model_fields_are_422_listing_what_exists(serve_stack, fields, message) -> None:
    response = generate(serve_stack.url, **fields)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter" and message in error["message"], error


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_different_lora_or_controlnet_sets_never_share_a_forward_and_equal_sets_do(
    serve_stack, tiny_weights, mode
) -> None:
    """On a Denoiser that waits up to a second for more requests when idle, concurrent requests start together; the
    batch records say which shared a forward (the same LoRA set, or the same extra ControlNets at any strengths),
    in both batching modes."""
    from ray import serve as ray_serve

    from serve.app import build_app

    config = local_app_config(tiny_weights, serve_stack.s3.bucket, safety=NO_SAFETY_CHECK)
    batching = config.denoiser.batching.model_copy(update={"batch_wait_timeout_s": 1.0, "mode": mode})
    config = config.model_copy(update={"denoiser": config.denoiser.model_copy(update={"batching": batching})})
    ray_serve.run(build_app(config), name="batching", route_prefix="/batching")
    url = f"{serve_stack.url}/batching"
    try:
        requests = [
            {"seed": 31, "loras": [{"name": "style-peft", "scale": 0.7}]},
            {"seed": 32, "loras": [{"name": "style-peft", "scale": 0.7}]},
            {"seed": 33, "loras": [{"name": "style-kohya", "scale": 1.2}]},
            {"seed": 34},
            {"seed": 35, "controlnets": [{"name": "canny", "strength": 0.5}]},
            {"seed": 36, "controlnets": [{"name": "canny", "strength": 0.9}]},
        ]
        alone = [generate(url, **r).json() for r in requests]
        assert all(body["batch"]["jobs"] == 1 for body in alone)
        with ThreadPoolExecutor(len(requests)) as pool:
            together = [r.json() for r in pool.map(lambda r: generate(url, **r), requests)]
        for body, single in zip(together, alone, strict=True):
            difference = np.abs(image_of(serve_stack, body).astype(int) - image_of(serve_stack, single).astype(int))
            assert difference.max() <= 2
        batch = [body["batch"] for body in together]
        assert batch[0] == batch[1] and batch[0]["jobs"] == 2, batch  # the same LoRA set: one forward
        assert batch[4] == batch[5] and batch[4]["jobs"] == 2, batch  # the same ControlNet set: one forward
        assert batch[2]["jobs"] == 1 and batch[3]["jobs"] == 1 and len({b["id"] for b in batch}) == 4, batch
        assert {b["mode"] for b in batch} == {mode} and all(
            b["forwards"] == FAST_REQUEST["num_inference_steps"] for b in batch
        )
    finally:
        ray_serve.delete("batching")


def test_single_file_base_through_serve_equals_the_in_process_pipeline(serve_stack, tiny_weights: Path) -> None:
    from deployments.generation.local import InstantIDPipeline
    from deployments.generation.plan import GenerationInputs
    from deployments.instantid.bases import SDXLBase
    from deployments.instantid.options import GenerationOptions
    from deployments.instantid.weights import WeightsLayout

    fields = {**FAST_REQUEST, "seed": 77, "base_model": "tiny-alt", "num_inference_steps": 3}
    body = generate(serve_stack.url, **fields).json()
    assert body["model"]["base"] == "tiny-alt", body
    base = SDXLBase("tiny-alt", file=tiny_weights / "bases" / "tiny-alt.safetensors", config=tiny_weights / "sdxl")
    pipeline = InstantIDPipeline.from_layout(
        WeightsLayout.from_root(tiny_weights), device="cpu", dtype="float32", base=base
    )
    options = GenerationOptions(**fields)  # the in-process catalogue's one base is the loaded tiny-alt
    local = pipeline(options, GenerationInputs(faces=(base64.b64decode(astronaut_b64()),)))
    assert np.abs(image_of(serve_stack, body).astype(int) - local.images[0].astype(int)).max() <= 2


# ------------------------------------------------------------------------------ multiplexing and catalogue faults


def _routing_app(tiny_weights: Path, bucket: str, **models) -> AppConfig:
    """local.yaml with two Denoiser replicas that each hold one base."""
    config = local_app_config(tiny_weights, bucket, safety=NO_SAFETY_CHECK)
    update = {
        "models": config.models.model_copy(update={"max_models_per_replica": 1, **models}),
        "denoiser": config.denoiser.model_copy(
            update={"deployment": config.denoiser.deployment.model_copy(update={"num_replicas": 2})}
        ),
    }
    return config.model_copy(update=update)


def _replica_bases(app: str) -> dict[str, list[str]]:
    """Which bases each Denoiser replica has reported to the Serve controller (what routing uses)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    import ray

    replicas = ray.get(controller._dump_replica_states_for_testing.remote(DeploymentID("Denoiser", app)))
    return {r.replica_id.unique_id: sorted(r.multiplexed_model_ids) for r in replicas.get()}


def _wait(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_requests_go_to_the_replica_holding_their_base_and_idle_bases_are_evicted(serve_stack, tiny_weights) -> None:
    from ray import serve as ray_serve

    from serve.app import build_app

    ray_serve.run(build_app(_routing_app(tiny_weights, serve_stack.s3.bucket)), name="routing", route_prefix="/routing")
    url = f"{serve_stack.url}/routing"
    try:
        # Both replicas start with the default base warm and report it.
        _wait(lambda: [v for v in _replica_bases("routing").values()] == [["sdxl"], ["sdxl"]], what="two sdxl replicas")
        first = generate(url, seed=1, base_model="tiny-alt").json()
        holder = first["replicas"]["denoiser"]
        assert "denoise_model_load" in first["timings"]  # this request waited for the cold load, and says so
        # One base per replica: loading tiny-alt evicted that replica's idle sdxl. Wait until the controller (and
        # so every router) knows, instead of racing Serve's asynchronous propagation.
        _wait(lambda: _replica_bases("routing").get(holder) == ["tiny-alt"], what="the eviction to be reported")
        other = next(r for r in _replica_bases("routing") if r != holder)
        time.sleep(1.0)  # routers receive the controller's update by long poll
        for seed in range(2, 6):
            assert generate(url, seed=seed, base_model="tiny-alt").json()["replicas"]["denoiser"] == holder
            body = generate(url, seed=seed).json()
            assert body["replicas"]["denoiser"] == other and "denoise_model_load" not in body["timings"]
        assert _replica_bases("routing") == {holder: ["tiny-alt"], other: ["sdxl"]}  # no thrashing
    finally:
        ray_serve.delete("routing")


def test_a_base_past_the_replica_capacity_evicts_the_least_recently_used_idle_one(serve_stack, tiny_weights) -> None:
    """One replica, room for two bases, three in the catalogue (the tiny-alt folder is a third base)."""
    from ray import serve as ray_serve

    from deployments.instantid.catalogue import BaseModelSpec
    from serve.app import build_app

    config = _routing_app(tiny_weights, serve_stack.s3.bucket, max_models_per_replica=2)
    bases = {**config.models.base_models, "tiny-alt-folder": BaseModelSpec(source="bases/tiny-alt")}
    single = config.denoiser.deployment.model_copy(update={"num_replicas": 1})
    config = config.model_copy(
        update={
            "models": config.models.model_copy(update={"base_models": bases}),
            "denoiser": config.denoiser.model_copy(update={"deployment": single}),
        }
    )
    ray_serve.run(build_app(config), name="lru", route_prefix="/lru")
    url = f"{serve_stack.url}/lru"

    def use(base: str, then_loaded: list[str]) -> None:
        body = generate(url, seed=3, base_model=base).json()
        assert body["model"]["base"] == base, body
        _wait(lambda: list(_replica_bases("lru").values()) == [then_loaded], what=f"{then_loaded} to be reported")

    try:
        use("tiny-alt", ["sdxl", "tiny-alt"])
        use("sdxl", ["sdxl", "tiny-alt"])  # sdxl is now the more recently used
        use("tiny-alt-folder", ["sdxl", "tiny-alt-folder"])
        use("tiny-alt", ["tiny-alt", "tiny-alt-folder"])  # sdxl had become the least recently used
    finally:
        ray_serve.delete("lru")


def test_a_missing_catalogue_source_fails_the_deploy_naming_it(serve_stack, tiny_weights) -> None:
    from ray import serve as ray_serve

    from serve.app import build_app

    config = local_app_config(tiny_weights, serve_stack.s3.bucket, safety=NO_SAFETY_CHECK).model_dump()
    config["models"]["loras"]["gone"] = {"source": "loras/gone.safetensors"}
    broken = AppConfig.model_validate(config)
    with pytest.raises(RuntimeError, match="failed"):
        ray_serve.run(build_app(broken), name="broken", route_prefix="/broken")
    try:
        status = ray_serve.status().applications["broken"]
        messages = " ".join(d.message for d in status.deployments.values())
        assert "LoRA gone" in messages and "gone.safetensors does not exist" in messages, messages
    finally:
        ray_serve.delete("broken")


def test_a_base_that_fails_to_load_is_a_503_naming_it_and_the_others_still_serve(
    serve_stack, tiny_weights, tmp_path
) -> None:
    from ray import serve as ray_serve

    from serve.app import build_app

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}broken")  # exists (the deploy check passes), unloadable
    config = local_app_config(tiny_weights, serve_stack.s3.bucket, safety=NO_SAFETY_CHECK)
    # this project's own test file: its licence is stated, so the licence check at start-up lets it through
    corrupt_base = {"source": str(corrupt), "license": "Apache-2.0", "commercial_use": True}
    bases = {**config.models.base_models, "corrupt": corrupt_base}
    config = AppConfig.model_validate(
        {**config.model_dump(), "models": {**config.models.model_dump(), "base_models": bases}}
    )
    ray_serve.run(build_app(config), name="corrupt", route_prefix="/corrupt")
    url = f"{serve_stack.url}/corrupt"
    try:
        failed = generate(url, base_model="corrupt")
        assert failed.status_code == 503, failed.text
        error = failed.json()["error"]
        assert error["code"] == "model_unavailable" and "base corrupt" in error["message"]
        assert int(failed.headers["retry-after"]) > 0
        assert generate(url, seed=3).status_code == 200  # the default base still serves
        assert ray_serve.status().applications["corrupt"].status == "RUNNING"
    finally:
        ray_serve.delete("corrupt")


def test_a_base_in_use_is_unloaded_only_after_its_jobs_finish(serve_stack, tiny_weights) -> None:
    """One replica, room for one base: a request for another base waits for the running job, then loads."""
    from ray import serve as ray_serve

    from serve.app import build_app

    config = _routing_app(tiny_weights, serve_stack.s3.bucket)
    single = config.denoiser.deployment.model_copy(update={"num_replicas": 1})
    config = config.model_copy(update={"denoiser": config.denoiser.model_copy(update={"deployment": single})})
    ray_serve.run(build_app(config), name="evict", route_prefix="/evict")
    url = f"{serve_stack.url}/evict"
    try:
        with ThreadPoolExecutor(2) as pool:
            long_job = pool.submit(generate, url, seed=5, num_inference_steps=80)
            time.sleep(1.5)  # the long job (several seconds) is denoising on sdxl
            other = pool.submit(generate, url, seed=6, base_model="tiny-alt")
            first, second = long_job.result(), other.result()
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
        denoised, loaded = first.json()["timings"]["denoise"], second.json()["timings"]["denoise_model_load"]
        assert loaded["start"] < denoised["end"], (loaded, denoised)  # it asked for tiny-alt while sdxl was busy
        assert loaded["end"] >= denoised["end"]  # tiny-alt was loaded only once sdxl's job had released it
        alone = image_of(serve_stack, generate(url, seed=5, num_inference_steps=80).json())
        assert np.abs(image_of(serve_stack, first.json()).astype(int) - alone.astype(int)).max() <= 2
    finally:
        ray_serve.delete("evict")
