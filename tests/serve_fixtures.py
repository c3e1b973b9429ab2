"""A real local Ray cluster running the whole app on tiny weights, with the session's SeaweedFS."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.config import AppConfig
from tests.support import free_port, free_port_pair

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "serve" / "configs" / "local.yaml"


# For the apps a test deploys beside the session's to try something else (batching, routing, scaling): no
# SafetyChecker replica to start (it is tested on the session's app and in test_safety_serving).
NO_SAFETY_CHECK = {"policy": "off"}


def local_app_config(weights_root: Path, bucket: str, **overrides: Any) -> AppConfig:
    """local.yaml's app args with the test's weights and S3 (endpoint and keys come from the environment); a dict
    override merges into its section."""
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    args["weights"] = {"root": str(weights_root)}
    args["storage"] = {"s3": {"bucket": bucket, "prefix": "generations", "create_bucket": True}}
    args["api"]["body_idle_timeout_s"] = 10.0  # a stalled upload is answered (408) without a minute's wait
    for key, value in overrides.items():
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    return AppConfig.model_validate(args)


@dataclass
class ServeStack:
    url: str
    app_name: str
    s3: Any  # EmbeddedS3
    config: AppConfig
    metrics_url: str  # Ray's Prometheus endpoint on this node (application and Serve metrics)


# Set while the session's Ray (``serve_stack``) is meant to be running; see ``session_ray_survives``.
_SESSION_RAY = {"up": False}


@pytest.fixture(autouse=True)
def session_ray_survives() -> Iterator[None]:
    """Fail the test that shut down the session's Ray, by name.

    Without this, a test that stops Ray in-process (a ``ray.shutdown()`` reached through code under test) makes
    every later Serve test start a fresh Ray on Serve's default port and fail far from the cause.
    """
    yield
    if _SESSION_RAY["up"]:
        import ray

        if not ray.is_initialized():
            _SESSION_RAY["up"] = False
            pytest.fail("this test shut down the session's Ray (serve_stack): later Serve tests would all fail")


@pytest.fixture(scope="session")
def serve_stack(tiny_weights: Path, embedded_s3) -> Iterator[ServeStack]:
    import ray
    from ray import serve as ray_serve

    from serve.app import build_app

    os.environ.update(embedded_s3.env())  # Ray workers inherit it: the standard credential chain
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    metrics_port = free_port()
    ray.init(  # logical CPUs: several apps on 2 cores; the metrics agent runs without the dashboard
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    config = local_app_config(tiny_weights, embedded_s3.bucket)
    ray_serve.run(build_app(config), name="instantid", route_prefix="/")
    _SESSION_RAY["up"] = True
    try:
        yield ServeStack(
            f"http://127.0.0.1:{port}", "instantid", embedded_s3, config, f"http://127.0.0.1:{metrics_port}/metrics"
        )
    finally:
        _SESSION_RAY["up"] = False
        ray_serve.shutdown()
        ray.shutdown()


API_KEYS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef01"}


@dataclass
class SecureStack:
    """An app with API keys required, a small admission limit and a spool, beside the main one."""

    url: str
    keys_file: Path
    spool_dir: Path
    s3: Any
    max_in_flight: int


@pytest.fixture(scope="session")
def secure_stack(serve_stack: ServeStack, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve as ray_serve

    from serve.app import build_app

    folder = tmp_path_factory.mktemp("secure")
    keys_file = folder / "api-keys"
    keys_file.write_text("".join(f"{name}:{token}\n" for name, token in API_KEYS.items()))
    config = local_app_config(
        tiny_weights,
        serve_stack.s3.bucket,
        api={
            "max_in_flight": 2,
            "request_timeout_s": 120,
            "auth": {"required": True, "keys_file": str(keys_file)},
            # Job callbacks to a receiver on this machine (loopback and plain http allowed for the test only).
            "webhooks": {
                "allowed_hosts": ["127.0.0.1"],
                "allow_private_addresses": True,
                "allow_http": True,
                "backoff_s": 0.05,
                "max_attempts": 3,
            },
        },
    )
    config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"spool_dir": str(folder / "spool")})}
    )
    ray_serve.run(build_app(config), name="secure", route_prefix="/secure")
    yield SecureStack(f"{serve_stack.url}/secure", keys_file, folder / "spool", serve_stack.s3, 2)
    ray_serve.delete("secure")


@dataclass
class FaultStack:
    """An app whose results go to its own SeaweedFS (same keys, fixed port) that tests may stop and restart."""

    url: str
    s3: Any  # EmbeddedS3, restartable on the same endpoint
    spool_dir: Path


@pytest.fixture(scope="session")
def fault_stack(serve_stack: ServeStack, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    import shutil

    from ray import serve as ray_serve

    from serve.app import build_app
    from serve.tools.seaweed import EmbeddedS3

    folder = tmp_path_factory.mktemp("faults")
    data_dir = folder / "s3"
    data_dir.mkdir(mode=0o700)
    # The same credentials as the session store: Ray workers know only one set (the environment's).
    shutil.copy(serve_stack.s3.data_dir / "credentials.json", data_dir / "credentials.json")
    flaky = EmbeddedS3(data_dir, port=free_port_pair(), bucket="flaky")
    flaky.start(timeout_s=60)
    config = local_app_config(tiny_weights, "flaky")
    s3 = {
        "bucket": "flaky",
        "prefix": "generations",
        "create_bucket": True,
        "endpoint_url": flaky.endpoint_url,
        "connect_timeout_s": 0.5,
        "read_timeout_s": 3,
        "max_attempts": 2,
    }
    storage = {"s3": s3, "spool_dir": str(folder / "spool"), "spool_retry_s": 1.0}
    config = config.model_validate({**config.model_dump(), "storage": storage})
    ray_serve.run(build_app(config), name="faults", route_prefix="/faults")
    try:
        yield FaultStack(f"{serve_stack.url}/faults", flaky, folder / "spool")
    finally:
        ray_serve.delete("faults")
        flaky.stop()
