"""The Ray that ``instantid serve`` and ``instantid demo`` start (or join), and its quick, quiet teardown.

Ray 2.60 offers none of the following as one setting; each is done here, once, with the reason beside it:

* **loopback**: a Ray started here is a single-machine cluster whose node address is 127.0.0.1, so every
  process of it (GCS, raylet, workers, agents, metrics) listens on loopback only (:func:`single_machine_mode`);
* **its token file** (``~/.ray/auth_token``) is readable by this user only (:func:`private_auth_token`);
* **metrics**: Prometheus on a port of the caller's choice, on loopback (``metrics_port``);
* **teardown**: the applications are deleted (Serve drains their requests), then Ray stops, instead of
  ``serve.shutdown`` (see :meth:`LocalRay.stop`).

With ``RAY_ADDRESS`` set the cluster is joined, not started: none of that applies and ``serve.shutdown`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from serve.tools import CliError

__all__ = ["LOOPBACK", "LocalRay", "private_auth_token", "single_machine_mode"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DRAIN_TIMEOUT_S = 60.0  # Serve's own limit for deleting applications


@contextlib.contextmanager
def single_machine_mode() -> Iterator[None]:
    """While inside, a Ray that ``ray.init`` starts takes 127.0.0.1 as its node address, so it listens only there.

    Ray 2.60 has no bind-address setting: its servers listen on the node's address when that is loopback
    (the GCS's, raylet's and every worker's gRPC servers, the dashboard and runtime-env agents, the metrics
    exporter, the autoscaler's and dashboard's metrics) and on every interface otherwise. The node's address
    comes from ``ray.util.get_node_ip_address()``, and ``ray.init(_node_ip_address="127.0.0.1")`` cannot set
    it: Ray replaces a loopback address with the machine's own (``services.resolve_ip_for_localhost``). It is
    127.0.0.1 only in Ray's single-machine mode, its default on macOS and Windows, switched on elsewhere by
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Ray reads that variable once, at import, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, and Ray is imported by then (the config file is
    checked against Ray's schema), so both are set; the variable also reaches Ray's processes. Both are
    restored on exit. Other machines cannot join such a cluster: ``instantid serve`` starts it for itself.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(SINGLE_MACHINE_ENV)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def private_auth_token(*, create: bool) -> Path | None:
    """Ray's token file, readable by this user only: tightened to 0600 when found open to others, and, with
    ``create``, written with mode 0600 when Ray is about to create it.

    Why: the token is the one credential of a local Ray cluster (``ray.init`` turns token authentication on
    for the clusters it starts); whoever reads it can run code in the cluster as this user. Ray 2.60 writes
    ``~/.ray/auth_token`` with a plain ``open(path, "w")``: mode 0644 under the usual umask, readable by every
    local user. Ray's processes all run as this user, so 0600 costs nothing. Written here first, with Ray's
    own format (256 random bits in hex), Ray finds it and keeps it, and it is never readable by others.

    Returns the token file, or None: the token comes from ``RAY_AUTH_TOKEN``, or there is no file (token
    authentication disabled, nothing to create, or a ``RAY_AUTH_TOKEN_PATH`` that Ray will complain about).
    """
    if os.environ.get(TOKEN_ENV):
        return None
    configured = os.environ.get(TOKEN_PATH_ENV)
    path = Path(configured).expanduser() if configured else Path.home() / ".ray" / "auth_token"
    if not path.exists():
        token_auth = os.environ.get(AUTH_MODE_ENV, "token").lower() == "token"  # unset: on, for a new cluster
        if not (create and token_auth) or configured:
            return None
        _write_token(path)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 and info.st_uid == os.getuid():
        log.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
        path.chmod(0o600)
    return path


def _write_token(path: Path) -> None:
    """A new token at ``path`` (0600), unless another process wrote one meanwhile: that one is kept."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32))
        os.link(tmp, path)  # never replaces a file: a cluster started meanwhile keeps its token
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _local_ray_node_died() -> bool:
    """Whether the raylet or GCS that ``ray.init`` started in this process has exited (never for a joined cluster)."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return node is not None and any(kind in ("raylet", "gcs_server") for kind, _ in node.dead_processes())
    except Exception:  # a private API: should it change, take the orderly path
        return False


class LocalRay:
    """The Ray connection of the local stack: started here on loopback, or joined when ``RAY_ADDRESS`` is set.

    ``metrics_port`` (only for a Ray started here): the port of the node's Prometheus endpoint; without it
    Ray picks a free one. :attr:`metrics_url` is known once started.
    """

    def __init__(self, *, metrics_port: int | None = None) -> None:
        self.address = os.environ.get("RAY_ADDRESS") or "local"  # never join a stray local cluster by accident
        self.owned = self.address == "local"
        if metrics_port is not None and not self.owned:
            raise CliError(
                f"--metrics-port applies to a Ray that instantid starts, but RAY_ADDRESS={self.address} joins one: "
                "give that cluster's `ray start --head` a --metrics-export-port instead"
            )
        self.metrics_port = metrics_port
        self.metrics_url: str | None = None
        self._mode: contextlib.ExitStack = contextlib.ExitStack()

    def start(self) -> None:
        """``ray.init``: a new loopback-only Ray with a private token file, or the cluster of ``RAY_ADDRESS``.

        The token file is made (or tightened) before ``ray.init``, which would otherwise write it with mode
        0644; single-machine mode stays on until :meth:`stop`, as Ray's processes and Serve's controller read it
        while they start. A node address off loopback (a Ray that no longer honours that mode) is logged.
        """
        import ray

        options: dict[str, Any] = {}
        if self.owned:
            private_auth_token(create=True)  # before ray.init, which would write it readable by all
            self._mode.enter_context(single_machine_mode())
            if self.metrics_port is not None:
                options["_metrics_export_port"] = self.metrics_port
        else:
            private_auth_token(create=False)
        ray.init(
            address=self.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            **options,
        )
        if self.owned:
            node_ip = ray.util.get_node_ip_address()
            if not ipaddress.ip_address(node_ip).is_loopback:
                log.warning("Ray took %s as its address: its ports listen on every interface", node_ip)
            self.metrics_url = f"http://{LOOPBACK}:{self._metrics_export_port()}/metrics"

    @property
    def gcs_address(self) -> str:
        """The GCS address (``host:port``) of the connected cluster: what ``RAY_ADDRESS`` must be to join it."""
        import ray

        return ray.get_runtime_context().gcs_address

    def client_env(self) -> dict[str, str]:
        """The environment another process on this machine needs to join this Ray (``ray.init()``).

        A Ray client replaces a loopback address with the machine's own before connecting
        (``services.canonicalize_bootstrap_address``), where a Ray started here does not listen: the client
        must run in single-machine mode as well. Token authentication is on for the clusters Ray starts.
        """
        env = {"RAY_ADDRESS": self.gcs_address}
        if self.owned:
            env[SINGLE_MACHINE_ENV] = "0"
            if os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
                env[AUTH_MODE_ENV] = "token"
        return env

    def _metrics_export_port(self) -> int:
        """The port this node exports Prometheus metrics on: ``metrics_port``, or the free one Ray picked."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        return next(int(n["MetricsExportPort"]) for n in ray.nodes() if n["NodeID"] == node_id)

    def stop(self, app_names: Sequence[str]) -> None:
        """Stop Serve's applications and Ray (a Ray started here), or leave a joined cluster as Serve left it.

        For a Ray started here, the applications are deleted (each replica finishes its in-flight requests,
        as on ``serve.shutdown``) and Ray then stops every process, Serve's controller and proxy included.
        ``serve.shutdown`` would add nothing but noise: it asks the controller to shut itself down, the
        controller kills itself under that call, and the call (an actor task with unlimited retries) fails
        "with retries remaining": Ray prints "Task ServeController.graceful_shutdown failed ... will be
        retried", or "Failed to push error to driver" when the raylet is already gone. A joined cluster is
        shared, so Serve is shut down there as before. Safe to call when ``start`` failed part-way.
        """
        import ray

        try:
            if ray.is_initialized():  # else serve's calls would start a Ray just to look for Serve in it
                with contextlib.suppress(Exception):
                    if self.owned:
                        _delete_apps(app_names)
                    else:
                        _shutdown_serve()
                with contextlib.suppress(Exception):
                    ray.shutdown()
        finally:
            self._mode.close()


def _delete_apps(names: Sequence[str], timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Delete Serve applications and wait until they are gone; given up as soon as the local Ray node dies.

    A SIGTERM sent to the whole process group (``timeout``, a shell's job control) or cgroup (systemd's
    default ``KillMode``) reaches the raylet and GCS together with us: waiting for the controller would then
    take Serve's full 60 s for nothing. The deletion runs in a daemon thread (``serve.delete`` blocks) so
    that this thread can stop waiting.
    """
    from ray import serve as ray_serve

    done = threading.Event()

    def delete() -> None:
        try:
            for name in names:
                ray_serve.delete(name)
        except Exception as exc:  # the node died, or Serve was never started: Ray stops what is left
            log.debug("deleting Serve applications %s failed: %s", list(names), exc)
        finally:
            done.set()

    threading.Thread(target=delete, name="serve-delete-apps", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.2):
        if _local_ray_node_died() or time.monotonic() > deadline:
            return


def _shutdown_serve() -> None:
    """Serve's shutdown on a joined cluster, given up as soon as the local Ray node dies (see :func:`_delete_apps`)."""
    from ray import serve as ray_serve

    async def shutdown() -> None:
        task = asyncio.ensure_future(ray_serve.shutdown_async())
        while not task.done() and not _local_ray_node_died():
            await asyncio.wait({task}, timeout=0.2)
        task.cancel()  # nothing when done
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    asyncio.run(shutdown())
