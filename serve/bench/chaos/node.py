"""The second Ray node: ``ray start --block`` joining the service's cluster on loopback, as a process of its own.

Why its own process on the same machine: losing a node must be a real loss (its raylet dies, and with it every
replica it hosted, which Serve must then place on the head node), and a soak on one machine has no other machine
to lose. Every port the node would otherwise take from a fixed default (the dashboard agent's, the metrics
exporter's, the runtime-env agent's) is a free one, so it never collides with another Ray on the same machine.
Never ``ray stop``: that stops every Ray on the machine, other people's included; this node's processes are
found from the ``ray start`` process it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serve.bench import BenchError, progress
from serve.tools.runner import free_port

LOOPBACK = "127.0.0.1"
_NODE_ID = re.compile(r"--node[-_]id=([0-9a-f]+)")
STARTED = "Ray runtime started"  # what `ray start` prints once the node has registered


def ray_command() -> list[str]:
    """``ray`` as the second node runs it: Ray's own CLI with the node's address pinned to loopback, like the
    head's (:mod:`serve.bench.chaos.loopback_node`)."""
    return [sys.executable, "-m", "serve.bench.chaos.loopback_node"]


class WorkerNode:
    """One second node at a time; ``start`` again after a loss joins a fresh one (possibly to a new cluster)."""

    def __init__(self, log_path: Path, env: dict[str, str], num_cpus: int = 2) -> None:
        self.log_path = log_path
        self.env = env
        self.num_cpus = num_cpus
        self._proc: subprocess.Popen[bytes] | None = None
        self.gcs_address: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def command(self, gcs_address: str) -> list[str]:
        return [
            *ray_command(),
            "start",
            f"--address={gcs_address}",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats",
            "--block",
        ]

    def start(
        self,
        gcs_address: str,
        extra_env: dict[str, str] | None = None,
        attempts: int = 5,
        attempt_timeout_s: float = 120.0,
    ) -> str:
        """Join ``gcs_address`` (``extra_env`` added to the node's environment, which its workers inherit) and wait
        (bounded) until ``ray start`` says the node runs; its node id. ``ray start`` gives a new raylet 30 s to
        register with the GCS and exits after that, and on a loaded 2-core machine a new raylet can also abort
        while its agents start (Ray 2.60: ``node_manager.cc:3588 Check failed``, the agent's ``RpcError: Timed out
        while waiting for Raylet``; seen twice in a row after a node loss): it is tried ``attempts`` times, each
        bounded by ``attempt_timeout_s``, every leftover of a failed try stopped first."""
        self.gcs_address = gcs_address
        for attempt in range(1, attempts + 1):
            self.stop()
            offset = self._launch(gcs_address, extra_env or {})
            node_id = self._wait_started(offset, attempt_timeout_s)
            if node_id is not None:
                return node_id
            why = "exited" if self._proc is not None and self._proc.poll() is not None else "timed out"
            progress(f"the second Ray node did not start (try {attempt} of {attempts}: {why}); see {self.log_path}")
        self.stop()
        raise BenchError(f"the second Ray node did not start in {attempts} tries; see {self.log_path}")

    def _launch(self, gcs_address: str, extra_env: dict[str, str]) -> int:
        """Start ``ray start``; the offset in the log where its output begins."""
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- bench: ray start {time.strftime('%H:%M:%S')} -> {gcs_address} ---\n".encode())
            log.flush()
            offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(gcs_address),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **extra_env},
                start_new_session=True,
            )
        return offset

    def _wait_started(self, offset: int, timeout_s: float) -> str | None:
        """The node id once ``ray start`` printed that the node runs and its raylet is seen; None if ``ray start``
        exited or either took longer than ``timeout_s``."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            started = started_in(self.log_path, offset)
            if self._proc.poll() is not None:
                return None
            if started:
                node_id = self.node_id()
                if node_id is not None:
                    return node_id
            time.sleep(0.5)
        return None

    def processes(self) -> list[psutil.Process]:
        """``ray start`` and everything below it (raylet, its workers: the replicas on this node, its agents)."""
        if self.pid is None:
            return []
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def session(self) -> list[psutil.Process]:
        """Every process in the session of the ``ray start`` we started (its own: ``start_new_session``), even
        those it left behind when it exited (a raylet of a failed try); Linux reuses no pid a session still has."""
        if self._proc is None:
            return []
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self._proc.pid:
                    found.append(proc)
        return found

    def raylet(self) -> psutil.Process | None:
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if Path(proc.cmdline()[0]).name == "raylet":
                    return proc
        return None

    def node_id(self) -> str | None:
        raylet = self.raylet()
        if raylet is None:
            return None
        with contextlib.suppress(psutil.Error):
            match = _NODE_ID.search(" ".join(raylet.cmdline()))
            return match.group(1) if match else None
        return None

    def kill_raylet(self) -> int:
        """SIGKILL the raylet (a node crash); ``ray start --block`` notices and stops the rest. Its pid."""
        raylet = self.raylet()
        if raylet is None:
            raise BenchError("the second node has no raylet to kill")
        raylet.kill()
        return raylet.pid

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop this node's processes (only ours: the tree under the ``ray start`` process we started)."""
        proc = self._proc
        if proc is None:
            return
        tree = list({*self.processes(), *self.session()})  # with what an exited `ray start` left behind
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for leftover in alive:
            with contextlib.suppress(psutil.Error):
                leftover.kill()  # psutil refuses a pid reused by another process
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self._proc = None


def started_in(log_path: Path, offset: int) -> bool:
    """Whether ``ray start`` said, in its output from ``offset`` on, that the node runs."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            return STARTED in log.read().decode(errors="replace")
    except OSError:
        return False
