"""The shipped Serve config files are valid Serve configs our builder accepts; health checks detect faults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from deployments.denoiser import DenoiserDeployment
from deployments.face_analyzer import FaceAnalyzerDeployment
from deployments.instantid.errors import WeightsError
from deployments.prompt_encoder import PromptEncoderDeployment
from deployments.result_store import ResultStoreDeployment
from deployments.storage.generations import StorageError
from deployments.storage.s3 import make_client
from serve.app import build_app, stage_arguments
from serve.config import AppConfig
from serve.tools.runner import ServeFile
from tests.serve_fixtures import local_app_config
from tests.support import free_port

CONFIGS = Path(__file__).resolve().parents[1] / "serve" / "configs"


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_config_files_are_serve_configs_that_build(name):
    serve_file = ServeFile.load(CONFIGS / name)
    ServeDeploySchema.model_validate(serve_file.raw)  # Ray's own schema, as `serve deploy` checks it
    for _, config in serve_file.app_configs():
        assert isinstance(build_app(config), Application)  # binding loads nothing: replicas load on start


def test_denoiser_batching_is_one_row_limit_and_the_old_latent_setting_is_refused_with_its_migration():
    from pydantic import ValidationError

    from serve.config import DenoiserBatching

    assert DenoiserBatching().mode == "continuous" and DenoiserBatching().max_rows == 32
    for name in ("local.yaml", "production.yaml"):
        (_, config), *_ = ServeFile.load(CONFIGS / name).app_configs()
        assert config.denoiser.batching.mode == "continuous" and config.denoiser.batching.max_rows == 16, name
    assert DenoiserBatching(mode="static", max_rows=16).mode == "static"
    with pytest.raises(ValidationError, match="replaced by max_rows"):
        DenoiserBatching.model_validate({"max_batch_size": 8})
    with pytest.raises(ValidationError, match="greater than or equal to 16"):
        DenoiserBatching(max_rows=8)  # one 8-image request with guidance must fit
    with pytest.raises(ValidationError, match="static"):
        DenoiserBatching.model_validate({"mode": "dynamic"})


def test_local_config_fits_two_cores_and_production_separates_node_types():
    local = ServeFile.load(CONFIGS / "local.yaml").app_configs()[0][1]
    stages = [
        local.ingress.deployment,
        local.face.deployment,
        local.prompt.deployment,
        local.denoiser.deployment,
        local.control_maps.deployment,
        local.store.deployment,
        local.safety.deployment,
    ]
    assert sum(s.ray_actor_options.get("num_cpus", 1) for s in stages) <= 2
    assert local.api.auth.required is False and local.storage.embedded_data_dir
    production = ServeFile.load(CONFIGS / "production.yaml").app_configs()[0][1]
    assert production.api.auth.required is True
    assert production.denoiser.deployment.ray_actor_options["num_gpus"] == 1
    assert "large_gpu_pool" in production.denoiser.deployment.ray_actor_options["resources"]
    assert "small_gpu_pool" in production.prompt.deployment.ray_actor_options["resources"]
    for stage in (production.ingress.deployment, production.face.deployment, production.store.deployment):
        assert "num_gpus" not in stage.ray_actor_options and "cpu_pool" in stage.ray_actor_options["resources"]
        assert stage.autoscaling_config["max_replicas"] > stage.autoscaling_config["min_replicas"]


def _instance(deployment, stage: str, config: AppConfig, **overrides):
    """The user class behind a Serve deployment, constructed directly (no Ray) with the arguments the app
    builder binds for ``stage``: its health check is plain code. (Async constructors are run to completion.)"""
    cls = deployment.func_or_class
    instance = cls.__new__(cls)
    result = instance.__init__(**{**stage_arguments(config)[stage], **overrides})
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    return instance


@pytest.fixture
def without_serve_multiplexing(monkeypatch):
    """Outside a Serve replica, ``@serve.multiplexed`` cannot run: the GPU stages then load bases directly."""
    import ray.serve

    monkeypatch.setattr(ray.serve, "multiplexed", lambda **_: lambda load: load)


def test_face_health_check_detects_a_broken_session(tiny_weights):
    face = _instance(FaceAnalyzerDeployment, "face", local_app_config(tiny_weights, "unused"))
    face.check_health()
    face.analyzer._recognizer.session = None  # a session that went away
    with pytest.raises(WeightsError, match="broken"):
        face.check_health()


def test_model_health_checks_detect_corrupted_weights(tiny_weights, without_serve_multiplexing):
    config = local_app_config(tiny_weights, "unused")
    prompt = _instance(PromptEncoderDeployment, "prompt", config)
    denoiser = _instance(DenoiserDeployment, "denoiser", config)
    prompt.check_health()
    denoiser.check_health()
    (prompt_slot,), (denoiser_slot,) = prompt.bases.slots(), denoiser.bases.slots()  # the default base, warm
    with torch.no_grad():
        next(prompt_slot.model.encoders[1].parameters()).fill_(float("nan"))
        next(denoiser_slot.model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN"):
        prompt.check_health()
    with pytest.raises(RuntimeError, match="NaN"):
        denoiser.check_health()


@pytest.mark.slow  # real SeaweedFS
def test_store_health_check_detects_lost_s3_access(embedded_s3, tiny_weights, monkeypatch, tmp_path):
    for name, value in embedded_s3.env().items():
        monkeypatch.setenv(name, value)
    settings = embedded_s3.settings(timeout_s=1, attempts=1).model_dump()
    config = local_app_config(tiny_weights, embedded_s3.bucket)
    store = _instance(ResultStoreDeployment, "store", config, s3=settings, spool_dir=None)
    store.check_health()
    gone = embedded_s3.settings(timeout_s=1, attempts=1).model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{free_port()}"}
    )
    store.generations.client = make_client(gone, session=embedded_s3.session())
    with pytest.raises(StorageError):
        store.check_health()
    spooled = _instance(
        ResultStoreDeployment, "store", config, s3=settings, spool_dir=str(tmp_path / "spool"), spool_retry_s=60
    )
    spooled.generations.client = make_client(gone, session=embedded_s3.session())
    spooled.check_health()  # S3 down but results are kept: the replica is still useful
