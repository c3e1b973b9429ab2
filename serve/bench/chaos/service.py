"""The service under test as its own process: ``python -m serve.tools.cli serve CONFIG``, started, SIGTERMed and
started again by the soak.

Why a subprocess and not ``local_stack`` in the bench's own process: a restart must be what an operator's restart
is (the process, its Ray head and its embedded S3 all stop; a new process starts on the same S3 data), and the
bench must outlive it. The service prints ``serving on URL (..., Ray at GCS_ADDRESS)`` when it is ready; that line
is how the bench learns the Ray address a second node joins.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from serve.bench import BenchError, progress

_READY = re.compile(r"serving on (?P<url>http://\S+) \(.*Ray at (?P<gcs>[^)\s]+)\)")
_GCS_ARG = re.compile(r"--gcs[-_]address=(\S+)")


@dataclass
class Serving:
    """What a started service told us: where it answers and where its Ray head is."""

    url: str
    gcs_address: str
    pid: int


class ServiceProcess:
    """One ``instantid serve`` process at a time, its output appended to ``log_path``."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self.serving: Serving | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 420.0, on_ray: Callable[[str], None] | None = None) -> Serving:
        """Start the service and wait (bounded) for its ready line; raise BenchError with its output's tail if not.

        ``on_ray(gcs_address)`` is called as soon as the service's Ray head runs, before its applications deploy:
        a second node that joins then gets its share of the replicas from Serve's spreading placement (replicas
        placed before it joined stay where they are).
        """
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- bench: starting the service {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            offset = log.tell()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "serve.tools.cli", "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: a stuck shutdown can be ended as a whole
            )
        deadline = time.monotonic() + timeout_s
        told = on_ray is None
        while time.monotonic() < deadline:
            if not told:
                gcs = self.gcs_address_of_head()
                if gcs is not None:
                    told = True
                    on_ray(gcs)
            text = self._log_since(offset)
            match = _READY.search(text)
            if match:
                self.serving = Serving(match["url"], match["gcs"], self._proc.pid)
                return self.serving
            if self._proc.poll() is not None:
                raise BenchError(f"the service exited ({self._proc.returncode}) while starting:\n{text[-3000:]}")
            time.sleep(0.5)
        self.stop()
        raise BenchError(f"the service was not ready within {timeout_s:.0f} s:\n{self._log_since(offset)[-3000:]}")

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def gcs_address_of_head(self) -> str | None:
        """The GCS address its Ray head's processes were started with (their ``--gcs-address`` argument)."""
        for proc in self.descendants():
            with contextlib.suppress(psutil.Error):
                match = _GCS_ARG.search(" ".join(proc.cmdline()))
                if match:
                    return match.group(1)
        return None

    def descendants(self) -> list[psutil.Process]:
        """The service's process tree below it (its Ray head's processes, the embedded S3)."""
        if self.pid is None:
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 120.0) -> float:
        """SIGTERM (the service then stops Serve, Ray and its S3 in order); after ``timeout_s`` its whole process
        group and whatever it left gets SIGKILL. Returns the seconds it took."""
        proc = self._proc
        if proc is None:
            return 0.0
        started = time.monotonic()
        tree = self.descendants()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                progress(f"the service ignored SIGTERM for {timeout_s:.0f} s; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=15)
        for leftover in alive:  # ours: started by this service process
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        self._proc = None
        self.serving = None
        return time.monotonic() - started
