"""A real local Ray cluster running the whole app on tiny weights, with the session's SeaweedFS."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.config import AppConfig

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "serve" / "configs" / "local.yaml"


def local_app_config(weights_root: Path, bucket: str, **overrides: Any) -> AppConfig:
    """local.yaml's app args with the test's weights and S3 (endpoint and keys come from the environment)."""
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    args["weights"] = {"root": str(weights_root)}
    args["storage"] = {"s3": {"bucket": bucket, "prefix": "generations", "create_bucket": True}}
    for key, value in overrides.items():
        args[key] = value
    return AppConfig.model_validate(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeStack:
    url: str
    app_name: str
    s3: Any  # EmbeddedS3
    config: AppConfig


@pytest.fixture(scope="session")
def serve_stack(tiny_weights: Path, embedded_s3) -> Iterator[ServeStack]:
    import ray
    from ray import serve

    from serve.app import build_app

    os.environ.update(embedded_s3.env())  # Ray workers inherit it: the standard credential chain
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical CPUs: several apps on 2 cores
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    config = local_app_config(tiny_weights, embedded_s3.bucket)
    serve.run(build_app(config), name="instantid", route_prefix="/")
    try:
        yield ServeStack(f"http://127.0.0.1:{port}", "instantid", embedded_s3, config)
    finally:
        serve.shutdown()
        ray.shutdown()
