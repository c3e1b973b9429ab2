"""Run Serve config files on a local Ray (the embedded S3 and tiny weights started/made when asked)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve.config import AppConfig

logger = logging.getLogger(__name__)
APP_IMPORT_PATH = "serve.app:build_app"


@dataclass
class ServeFile:
    """A parsed, validated Serve config file whose applications use our builder."""

    raw: dict[str, Any]
    apps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ServeFile:
        from ray.serve.schema import ServeDeploySchema

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read Serve config {path}: {exc}") from exc
        ServeDeploySchema.model_validate(raw)
        apps = raw.get("applications", [])
        for app in apps:
            if app.get("import_path") != APP_IMPORT_PATH:
                raise ValueError(f"application {app.get('name')!r} does not use {APP_IMPORT_PATH}")
            AppConfig.model_validate(app.get("args", {}))
        return cls(raw, apps)

    def app_configs(self) -> list[tuple[dict[str, Any], AppConfig]]:
        return [(app, AppConfig.model_validate(app.get("args", {}))) for app in self.apps]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_stack(serve_file: ServeFile, *, port: int | None = None) -> Iterator[dict[str, Any]]:
    """Embedded S3 (when configured) + tiny weights (when asked) + local Ray + Serve with every app.

    Yields ``{"url": ..., "s3": EmbeddedS3 | None}``; tears everything down on exit.
    """
    import ray
    from ray import serve

    from deployments.instantid.tiny import tiny_weights_present, write_tiny_weights
    from serve.app import build_app
    from serve.seaweed import EmbeddedS3

    embedded: EmbeddedS3 | None = None
    try:
        for _, config in serve_file.app_configs():
            if config.storage.embedded_data_dir and embedded is None:
                embedded = EmbeddedS3(
                    Path(config.storage.embedded_data_dir).expanduser(), bucket=config.storage.s3.bucket
                )
                embedded.start()
                os.environ.update(embedded.env())  # Ray workers inherit it: the standard credential chain
            root = config.weights.root
            if config.weights.make_tiny_if_missing and root and not tiny_weights_present(Path(root).expanduser()):
                print(f"making tiny weights in {root} ...", flush=True)
                write_tiny_weights(Path(root).expanduser())
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",  # never join a stray local cluster
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        http = dict(serve_file.raw.get("http_options") or {})
        http.setdefault("host", "127.0.0.1")
        if port is not None:
            http["port"] = port
        serve.start(http_options=http, logging_config=serve_file.raw.get("logging_config"))
        for app, config in serve_file.app_configs():
            serve.run(build_app(config), name=app.get("name", "instantid"), route_prefix=app.get("route_prefix", "/"))
        yield {"url": f"http://{http['host']}:{http.get('port', 8000)}", "s3": embedded}
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if embedded is not None:
            embedded.stop()


def run_config(path: Path, *, port: int | None = None) -> None:
    """``instantid serve CONFIG``: run until SIGINT/SIGTERM."""
    serve_file = ServeFile.load(path)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with local_stack(serve_file, port=port) as stack:
        print(f"serving on {stack['url']} (OpenAPI at {stack['url']}/docs); Ctrl-C to stop", flush=True)
        stop.wait()
