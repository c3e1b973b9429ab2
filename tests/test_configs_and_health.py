"""The shipped Serve config files are valid Serve configs our builder accepts; health checks detect faults."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from deployments.denoise import DenoiserDeployment
from deployments.face import FaceAnalyzerDeployment
from deployments.instantid.errors import WeightsError
from deployments.prompt import PromptEncoderDeployment
from deployments.storage.results import StorageError
from deployments.storage.s3 import make_client
from deployments.store import ResultStoreDeployment
from serve.app import build_app
from serve.runner import ServeFile

CONFIGS = Path(__file__).resolve().parents[1] / "serve" / "configs"


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_config_files_are_serve_configs_that_build(name):
    serve_file = ServeFile.load(CONFIGS / name)
    ServeDeploySchema.model_validate(serve_file.raw)  # Ray's own schema, as `serve deploy` checks it
    for _, config in serve_file.app_configs():
        assert isinstance(build_app(config), Application)  # binding loads nothing: replicas load on start


def test_local_config_fits_two_cores_and_production_separates_node_types():
    local = ServeFile.load(CONFIGS / "local.yaml").app_configs()[0][1]
    stages = [
        local.ingress,
        local.face.deployment,
        local.prompt.deployment,
        local.denoiser.deployment,
        local.store.deployment,
    ]
    assert sum(s.ray_actor_options.get("num_cpus", 1) for s in stages) <= 2
    assert local.api.auth.required is False and local.storage.embedded_data_dir
    production = ServeFile.load(CONFIGS / "production.yaml").app_configs()[0][1]
    assert production.api.auth.required is True
    assert production.denoiser.deployment.ray_actor_options["num_gpus"] == 1
    assert "large_gpu_pool" in production.denoiser.deployment.ray_actor_options["resources"]
    assert "small_gpu_pool" in production.prompt.deployment.ray_actor_options["resources"]
    for stage in (production.ingress, production.face.deployment, production.store.deployment):
        assert "num_gpus" not in stage.ray_actor_options and "cpu_pool" in stage.ray_actor_options["resources"]
        assert stage.autoscaling_config["max_replicas"] > stage.autoscaling_config["min_replicas"]


def _instance(deployment, *args, **kwargs):
    """The user class behind a Serve deployment, constructed directly (no Ray): its health check is plain code."""
    return deployment.func_or_class(*args, **kwargs)


def test_face_health_check_detects_a_broken_session(tiny_weights):
    face = _instance(FaceAnalyzerDeployment, {"root": str(tiny_weights)}, providers=["CPUExecutionProvider"])
    face.check_health()
    face.analyzer._recognizer.session = None  # a session that went away
    with pytest.raises(WeightsError, match="broken"):
        face.check_health()


def test_model_health_checks_detect_corrupted_weights(tiny_weights):
    weights = {"root": str(tiny_weights)}
    prompt = _instance(PromptEncoderDeployment, weights, device="cpu", dtype="float32")
    denoiser = _instance(DenoiserDeployment, weights, device="cpu", dtype="float32")
    prompt.check_health()
    denoiser.check_health()
    with torch.no_grad():
        next(prompt.encoder.encoders[1].parameters()).fill_(float("nan"))
        next(denoiser.model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN"):
        prompt.check_health()
    with pytest.raises(RuntimeError, match="NaN"):
        denoiser.check_health()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # real SeaweedFS
def test_store_health_check_detects_lost_s3_access(embedded_s3, monkeypatch, tmp_path):
    for name, value in embedded_s3.env().items():
        monkeypatch.setenv(name, value)
    settings = embedded_s3.settings(timeout_s=1, attempts=1).model_dump()
    store = _instance(ResultStoreDeployment, settings)
    store.check_health()
    gone = embedded_s3.settings(timeout_s=1, attempts=1).model_copy(
        update={"endpoint_url": f"http://127.0.0.1:{_closed_port()}"}
    )
    store.writer.client = make_client(gone, session=embedded_s3.session())
    with pytest.raises(StorageError):
        store.check_health()
    spooled = _instance(ResultStoreDeployment, settings, spool_dir=str(tmp_path / "spool"), spool_retry_s=60)
    spooled.writer.client = make_client(gone, session=embedded_s3.session())
    spooled.check_health()  # S3 down but results are kept: the replica is still useful
