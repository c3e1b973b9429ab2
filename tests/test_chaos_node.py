"""The second node's start, without Ray: a fake ``ray`` whose first ``ray start`` fails (as one whose raylet misses
the 30 s registration does) is tried again, leftovers of each try are stopped, and the node id comes from the raylet."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import psutil
import pytest

from serve.bench import BenchError
from serve.bench.chaos import node as node_module
from serve.bench.chaos.node import WorkerNode

FAKE_RAY = """#!/bin/bash
# a fake `ray start --block`: a "raylet" child, then (unless told to fail this try) the line ray prints once started
n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "{count}"
(exec -a raylet {python} -c "import time; time.sleep(120)" --node_id=abc${{n}}def) &
echo $! >> "{pids}"
if [ "$n" -le "{failures}" ]; then echo "The current node timed out during startup."; exit 1; fi
echo "Ray runtime started."
wait
"""


def _fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int) -> Path:
    script = tmp_path / "ray"
    body = FAKE_RAY.format(count=tmp_path / "count", pids=tmp_path / "pids", python=sys.executable, failures=failures)
    script.write_text(body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(node_module, "ray_command", lambda: [str(script)])
    monkeypatch.setattr(node_module, "free_port", lambda: 1)
    return tmp_path / "pids"


def _alive(pids: Path) -> list[int]:
    return [
        int(p)
        for p in pids.read_text().split()
        if psutil.pid_exists(int(p)) and psutil.Process(int(p)).status() != psutil.STATUS_ZOMBIE
    ]


@pytest.mark.timeout(60)
def test_a_failed_ray_start_is_tried_again_and_its_leftovers_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = _fake_ray(tmp_path, monkeypatch, failures=1)
    worker = WorkerNode(tmp_path / "node.log", {"PATH": "/usr/bin:/bin"})
    try:
        assert worker.start("127.0.0.1:1", attempts=3, attempt_timeout_s=20) == "abc2def"
        assert worker.node_id() == "abc2def"
        assert "timed out during startup" in (tmp_path / "node.log").read_text()
    finally:
        worker.stop()
    assert _alive(pids) == []


@pytest.mark.timeout(60)
def test_a_node_that_never_starts_fails_after_its_tries_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = _fake_ray(tmp_path, monkeypatch, failures=5)
    worker = WorkerNode(tmp_path / "node.log", {"PATH": "/usr/bin:/bin"})
    with pytest.raises(BenchError, match="did not start in 2 tries"):
        worker.start("127.0.0.1:1", attempts=2, attempt_timeout_s=20)
    assert len(pids.read_text().split()) == 2
    assert _alive(pids) == []
