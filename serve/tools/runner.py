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
from types import FrameType
from typing import Any

import yaml

from serve.config import AppConfig
from serve.tools import instantid_home

logger = logging.getLogger(__name__)
APP_IMPORT_PATH = "serve.app:build_app"
HOME_PLACEHOLDER = "${INSTANTID_HOME}"


def expand_home(value: Any, home: Path) -> Any:
    """``value`` (a config's ``args``) with ``${INSTANTID_HOME}`` replaced by ``home`` in every string.

    Only that one name: a general ``$VAR`` expansion would also rewrite values that merely contain a ``$``.
    """
    if isinstance(value, str):
        return value.replace(HOME_PLACEHOLDER, str(home))
    if isinstance(value, dict):
        return {key: expand_home(item, home) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_home(item, home) for item in value]
    return value


@dataclass
class ServeFile:
    """A parsed, validated Serve config file whose applications use our builder."""

    raw: dict[str, Any]
    apps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, *, home: Path | None = None) -> ServeFile:
        """Read, expand and validate ``path``.

        ``${INSTANTID_HOME}`` in an application's ``args`` becomes ``home`` (default: ``INSTANTID_HOME``, else
        ``~/.instantid``), so that the state folder of ``local.yaml`` (weights, S3 data, spool) moves with it.
        The expanded file is what Ray's ``ServeDeploySchema`` and our ``AppConfig`` check and what runs.
        """
        from ray.serve.schema import ServeDeploySchema

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read Serve config {path}: {exc}") from exc
        home = instantid_home() if home is None else Path(home).expanduser().absolute()
        for app in (raw or {}).get("applications") or []:
            if isinstance(app, dict) and "args" in app:
                app["args"] = expand_home(app["args"], home)
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


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _install_sigterm(handler: Any) -> None:
    """Make ``handler`` (a ``signal.getsignal`` result) this process's SIGTERM handler, in Python *and* in C.

    Ray changes SIGTERM under our feet: ``ray.init`` sets a Python handler of its own (``sys.exit(15)``),
    and the core worker it creates installs absl's C++ failure-signal handler on SIGTERM with ``sigaction``,
    beneath Python: a SIGTERM then never reaches Python; absl prints a native stack trace and aborts the
    process (exit 134), skipping every ``finally`` and ``atexit``, so Serve, Ray's processes and SeaweedFS
    are left running. ``ray.shutdown`` then resets SIGTERM to SIG_DFL in C while Python still lists the old
    handler. ``signal.signal`` always installs Python's C handler again, whatever Python believed.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and ray.init sets none then)
    signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def local_stack(
    serve_file: ServeFile, *, port: int | None = None, metrics_port: int | None = None
) -> Iterator[dict[str, Any]]:
    """Embedded S3 (when configured, supervised) + tiny weights (when asked) + local Ray + Serve with every app.

    Yields ``{"url": ..., "ray_address": GCS address, "ray_client_env": what another process needs to join
    that Ray, "metrics_url": Prometheus URL | None, "s3": EmbeddedS3 | None}``; tears everything down on exit.
    Ray is started on loopback unless ``RAY_ADDRESS`` joins a cluster (see ``local_ray``); ``metrics_port``
    fixes its Prometheus port. While Ray runs, SIGTERM keeps the handler the caller had, and a default one
    raises KeyboardInterrupt (so that ``docker stop``, systemd or Kubernetes tear the stack down as Ctrl-C
    does); it is restored after.
    """
    from ray import serve as ray_serve

    from deployments.tiny.weights import tiny_weights_present, write_tiny_weights
    from serve.app import build_app
    from serve.tools.local_ray import LocalRay
    from serve.tools.seaweed import EmbeddedS3
    from serve.tools.supervisor import S3Supervisor

    embedded: EmbeddedS3 | None = None
    supervisor: S3Supervisor | None = None
    cluster = LocalRay(metrics_port=metrics_port)
    app_names = [app.get("name", "instantid") for app in serve_file.apps]
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    sigterm = _raise_keyboard_interrupt if caller_sigterm in (None, signal.SIG_DFL) else caller_sigterm
    try:
        for _, config in serve_file.app_configs():
            if config.storage.embedded_data_dir and embedded is None:
                embedded = EmbeddedS3(
                    Path(config.storage.embedded_data_dir).expanduser(), bucket=config.storage.s3.bucket
                )
                embedded.start()
                os.environ.update(embedded.env())  # Ray workers inherit it: the standard credential chain
                supervisor = S3Supervisor(embedded).start()
            root = config.weights.root
            if config.weights.make_tiny_if_missing and root and not tiny_weights_present(Path(root).expanduser()):
                print(f"making tiny weights in {root} ...", flush=True)
                write_tiny_weights(Path(root).expanduser())
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            cluster.start()
        finally:
            _install_sigterm(sigterm)  # ray.init replaced it (see _install_sigterm)
        http = dict(serve_file.raw.get("http_options") or {})
        http.setdefault("host", "127.0.0.1")
        if port is not None:
            http["port"] = port
        ray_serve.start(http_options=http, logging_config=serve_file.raw.get("logging_config"))
        for app, config in serve_file.app_configs():
            ray_serve.run(
                build_app(config), name=app.get("name", "instantid"), route_prefix=app.get("route_prefix", "/")
            )
        yield {
            "url": f"http://{http['host']}:{http.get('port', 8000)}",
            "ray_address": cluster.gcs_address,
            "ray_client_env": cluster.client_env(),
            "metrics_url": cluster.metrics_url,
            "s3": embedded,
        }
    finally:
        cluster.stop(app_names)
        _install_sigterm(sigterm)  # ray.shutdown left SIG_DFL in C: a second SIGTERM would kill us right here
        try:
            if supervisor is not None:
                supervisor.close()  # before the stop below, which it would otherwise take for a crash
            if embedded is not None:
                embedded.stop()
        finally:
            _install_sigterm(caller_sigterm)


class _StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM during start-up: unwinds it (stopping what was started) like Ctrl-C would."""


def run_config(path: Path, *, port: int | None = None, metrics_port: int | None = None) -> None:
    """``instantid serve CONFIG``: run until SIGINT or SIGTERM, then stop everything and return.

    SIGINT (Ctrl-C) and SIGTERM (``docker stop``, systemd, Kubernetes) are handled alike: the first one stops
    Serve, Ray and the embedded S3 in order and this returns (exit status 0), during start-up too (it is
    interrupted); later ones are ignored so that they cannot cut the shutdown short.
    """
    serve_file = ServeFile.load(path)
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not serving.is_set():
            raise _StopRequested

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        with local_stack(serve_file, port=port, metrics_port=metrics_port) as stack:
            serving.set()
            if stack["metrics_url"]:
                print(f"metrics (Prometheus) at {stack['metrics_url']}", flush=True)
            join = " ".join(f"{name}={value}" for name, value in stack["ray_client_env"].items())
            print(f"to use this Ray from another process on this machine: {join} python ...", flush=True)
            print(
                f"serving on {stack['url']} (OpenAPI at {stack['url']}/docs, Ray at {stack['ray_address']});"
                " Ctrl-C to stop",
                flush=True,
            )
            stop.wait()
    except _StopRequested:
        pass  # local_stack stopped what it had started
