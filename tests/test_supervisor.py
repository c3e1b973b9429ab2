"""The embedded S3's supervisor: restarts a store that exits, backs off, gives up after quick crashes in a row.

Fast: the store is a stand-in with the same surface as ``EmbeddedS3`` (``pid``, ``wait``, ``restart``,
``log_path``, ``endpoint_url``); the real weed being killed and restarted under ``instantid serve`` is in
``test_serve_command``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from serve.tools.supervisor import S3Supervisor


class CrashingStore:
    """A store whose process exits ``crashes`` times (each restart succeeds), then runs until told to stop."""

    def __init__(self, crashes: int, *, failing_restarts: int = 0) -> None:
        self.crashes_left = crashes
        self.failing_restarts = failing_restarts
        self.pid: int | None = 100
        self.restart_calls: list[float] = []
        self.stopped = threading.Event()
        self.log_path = Path("/nonexistent/weed.out")
        self.endpoint_url = "http://127.0.0.1:1"

    @property
    def running(self) -> bool:
        return self.pid is not None

    def wait(self, timeout_s: float | None = None) -> int | None:
        if self.pid is None:
            return None
        if self.crashes_left > 0:
            self.crashes_left -= 1
            return 1
        self.stopped.wait(timeout_s)
        return None

    def restart(self, timeout_s: float = 30, *, parent_death_signal: bool = False) -> None:
        assert parent_death_signal  # the supervisor's thread outlives the weed it starts
        self.restart_calls.append(time.monotonic())
        if self.failing_restarts:
            self.failing_restarts -= 1
            self.pid = None
            raise RuntimeError("address already in use")
        self.pid = (self.pid or 100) + 1


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_an_exited_store_is_restarted_and_each_step_is_logged(caplog: pytest.LogCaptureFixture):
    store = CrashingStore(crashes=1)
    supervisor = S3Supervisor(store, backoff_s=(0.0,)).start()  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="serve.tools.supervisor"):
            wait_until(lambda: supervisor.restarts == 1)
            wait_until(lambda: "restarted" in caplog.text)
    finally:
        supervisor.close()
        store.stopped.set()
    assert "exited with code 1" in caplog.text and str(store.log_path) in caplog.text
    assert "weed pid 101" in caplog.text  # the new process


def test_quick_crashes_back_off_and_the_supervisor_gives_up_with_an_error(caplog: pytest.LogCaptureFixture):
    store = CrashingStore(crashes=10)
    supervisor = S3Supervisor(store, backoff_s=(0.0, 0.2, 0.4), max_quick_crashes=3)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="serve.tools.supervisor"):
        supervisor.start()
        wait_until(lambda: not supervisor.watching)
    store.stopped.set()
    assert len(store.restart_calls) == 3  # then the 4th quick crash ends it
    gaps = [b - a for a, b in zip(store.restart_calls, store.restart_calls[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # backed off
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "giving up" in errors[0].getMessage()


def test_a_failed_restart_counts_as_a_crash_and_is_tried_again(caplog: pytest.LogCaptureFixture):
    store = CrashingStore(crashes=1, failing_restarts=1)
    supervisor = S3Supervisor(store, backoff_s=(0.0, 0.1)).start()  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="serve.tools.supervisor"):
            wait_until(lambda: supervisor.restarts == 1)
    finally:
        supervisor.close()
        store.stopped.set()
    assert len(store.restart_calls) == 2 and "restart failed: address already in use" in caplog.text


def test_close_stops_watching_without_restarting():
    store = CrashingStore(crashes=0)
    supervisor = S3Supervisor(store).start()  # type: ignore[arg-type]
    supervisor.close()
    store.pid = None  # the owner stops the store after close(): not a crash
    store.stopped.set()
    wait_until(lambda: not supervisor.watching)
    assert store.restart_calls == [] and supervisor.restarts == 0
