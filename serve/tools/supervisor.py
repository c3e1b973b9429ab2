"""Keep the embedded S3 alive while the local stack runs: a watcher thread restarts ``weed`` when it dies.

Why: every deployment reaches S3 through the endpoint and keys handed to Ray's workers at start-up. A dead
``weed`` would make every request fail with a 503 while every deployment still reports healthy, and nothing
would say why. The watcher logs the exit (code and log path), restarts it on the same ports, data folder and
credentials (so the workers' environment stays valid), and gives up, with an error logged, when it keeps
crashing: a restart loop would only hide the cause.
"""

from __future__ import annotations

import logging
import threading
import time

from serve.tools.seaweed import EmbeddedS3

__all__ = ["S3Supervisor"]

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the watcher looks up from waiting on weed to check for close()
BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0)  # before the 1st, 2nd, ... restart in a row of quick crashes
STABLE_S = 60.0  # a weed that ran this long was healthy: its crash starts a new row
MAX_QUICK_CRASHES = 5  # in a row, then the watcher gives up


class S3Supervisor:
    """Watches one started :class:`EmbeddedS3` from a daemon thread and restarts it when it exits.

    A crash is *quick* when weed ran less than ``stable_s`` since its last start; quick crashes in a row wait
    ``backoff_s[n]`` before the next restart, and after ``max_quick_crashes`` of them the watcher logs an
    error and stops. A failed restart counts as a quick crash. :meth:`close` stops watching (it waits for a
    restart in progress) and leaves stopping the store to its owner.
    """

    def __init__(
        self,
        store: EmbeddedS3,
        *,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        stable_s: float = STABLE_S,
        max_quick_crashes: int = MAX_QUICK_CRASHES,
        restart_timeout_s: float = 30.0,
    ) -> None:
        if not backoff_s or max_quick_crashes < 1:
            raise ValueError("backoff_s must not be empty and max_quick_crashes must be >= 1")
        self.store = store
        self.backoff_s = backoff_s
        self.stable_s = stable_s
        self.max_quick_crashes = max_quick_crashes
        self.restart_timeout_s = restart_timeout_s
        self.restarts = 0  # successful ones, for callers and tests
        self._closing = threading.Event()
        self._restart_lock = threading.Lock()  # held while weed is down and being restarted
        self._thread: threading.Thread | None = None

    def start(self) -> S3Supervisor:
        """Start the watcher thread (a daemon: it must never keep the process alive) and return ``self``."""
        if not self.store.running:
            raise RuntimeError("the embedded S3 must be running before it is supervised")
        self._thread = threading.Thread(target=self._watch, name="embedded-s3-supervisor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching; a restart in progress finishes first, so the store is in a definite state after."""
        self._closing.set()
        with self._restart_lock:
            pass

    @property
    def watching(self) -> bool:
        """Whether the watcher thread still runs (False after :meth:`close` or once it gave up)."""
        return self._thread is not None and self._thread.is_alive()

    def _watch(self) -> None:
        """The watcher thread: wait on weed in ``POLL_S`` slices (so that :meth:`close` is seen), restart it."""
        quick_crashes = 0
        started_at = time.monotonic()
        restart_failed = False
        while not self._closing.is_set():
            if restart_failed:
                what = "could not be restarted"
            else:
                pid = self.store.pid
                if pid is None:  # stopped by its owner without close(): nothing to watch until it is back
                    self._closing.wait(POLL_S)
                    continue
                code = self.store.wait(POLL_S)
                if code is None or self._closing.is_set():
                    continue  # still running, or stopping on purpose
                what = f"(weed pid {pid}) exited with code {code}"
            quick_crashes = quick_crashes + 1 if time.monotonic() - started_at < self.stable_s else 1
            if quick_crashes > self.max_quick_crashes:
                log.error(
                    "embedded S3 %s, %d times in a row within %.0f s of starting; giving up: S3 requests fail "
                    "until the service is restarted (see %s)",
                    what,
                    quick_crashes,
                    self.stable_s,
                    self.store.log_path,
                )
                return
            delay = self.backoff_s[min(quick_crashes - 1, len(self.backoff_s) - 1)]
            log.warning(
                "embedded S3 %s; restarting it in %.0f s on the same ports and data (see %s)",
                what,
                delay,
                self.store.log_path,
            )
            if self._closing.wait(delay):
                return
            started_at = time.monotonic()
            with self._restart_lock:
                if self._closing.is_set():
                    return
                try:
                    self.store.restart(self.restart_timeout_s, parent_death_signal=True)
                except Exception as exc:  # counted as a quick crash: the loop decides what next
                    log.error("embedded S3 restart failed: %s", exc)
                    restart_failed = True
                    continue
            restart_failed = False
            self.restarts += 1
            log.warning("embedded S3 restarted (weed pid %s) on %s", self.store.pid, self.store.endpoint_url)
