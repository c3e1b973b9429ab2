"""Resident memory of every replica process of the soak's own cluster, sampled on a timer in a thread.

Replica processes are found by the title Ray gives them (``ray::ServeReplica:<app>:<Deployment>``) among the
descendants of the bench's own process roots (the service, the second node), never machine-wide: other Ray
clusters on the same machine run replicas with the same titles.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil

from .records import RssSample

REPLICA_TITLE = "ray::ServeReplica:"
CHANNEL_TITLE = "ray::JobEventsActor"


def replica_processes(processes: list[psutil.Process], app: str) -> dict[int, str]:
    """pid -> deployment (or ``JobEventsActor``) of each replica process among ``processes``."""
    found = {}
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            title = (proc.cmdline() or [""])[0]
            if title.startswith(f"{REPLICA_TITLE}{app}:"):
                rest = title[len(f"{REPLICA_TITLE}{app}:") :]
                found[proc.pid] = (rest.split() or [""])[0].split(".")[0]  # the title may go on: ".handle_request..."
            elif title.startswith(CHANNEL_TITLE):
                found[proc.pid] = "JobEventsActor"
    return found


class RssSampler:
    """Every ``interval_s``: the RSS of each replica process under ``roots()``."""

    def __init__(self, roots: Callable[[], list[psutil.Process]], app: str, interval_s: float = 5.0) -> None:
        self.roots = roots
        self.app = app
        self.interval_s = interval_s
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[RssSample]:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        return list(self.samples)

    def sample_once(self) -> None:
        now = time.time()
        for pid, deployment in replica_processes(self.roots(), self.app).items():
            with contextlib.suppress(psutil.Error):
                self.samples.append(
                    RssSample(t=now, pid=pid, deployment=deployment, rss=psutil.Process(pid).memory_info().rss)
                )

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a process tree that changes under us is the norm here
                self.sample_once()
            self._stop.wait(self.interval_s)
