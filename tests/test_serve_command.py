"""``instantid serve`` as a user runs it: README's DeploymentHandle example from a second process, then SIGTERM.

One real ``instantid serve`` process (its own session) on a temporary copy of ``serve/configs/local.yaml``:
the README's Python example, taken from README.md and run unchanged in a second Python process, must join
that Ray and get an image into the embedded S3; then SIGTERM (what ``docker stop``, systemd and Kubernetes
send) must stop it like Ctrl-C: exit status 0, no native stack trace, no Ray process and no ``weed`` left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import psutil
import pytest
import yaml
from PIL import Image

from tests.support import astronaut_jpeg, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).absolute().parents[1]
LOCAL_CONFIG = REPO / "serve" / "configs" / "local.yaml"
HANDLE_HEADING = "### Python (DeploymentHandle)"
START_TIMEOUT_S = 180
EXAMPLE_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
SERVING_LINE = re.compile(r"^serving on (http://\S+) \(.*Ray at (\S+)\);", re.MULTILINE)


def readme_handle_example() -> str:
    """The first ```python block under README's "### Python (DeploymentHandle)" heading, verbatim."""
    section = REPO.joinpath("README.md").read_text(encoding="utf-8").split(HANDLE_HEADING + "\n", 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next heading
    match = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, f"no ```python block under {HANDLE_HEADING!r} in README.md"
    return match.group(1)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    workdir: Path
    url: str
    ray_address: str

    def stderr(self) -> str:
        return (self.workdir / "serve.err").read_text(errors="replace")


def ours(server_pid: int, workdir: Path) -> list[psutil.Process]:
    """Live processes the server started: its session (the CLI, Ray's processes and workers), and ``weed``
    (SeaweedFS runs in a session of its own; it is ours when its command line names our folder)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(proc.pid) == server_pid or str(workdir) in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return [proc for proc in found if alive(proc)]


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
    return "\n".join(lines)


def kill_all(server_pid: int, workdir: Path) -> None:
    """Last resort after a failure: SIGKILL what the server left (only ours, never the suite's own Ray)."""
    for proc in ours(server_pid, workdir):
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Server]:
    """``instantid serve COPY --port FREE`` in a new session, until it printed its "serving on" line."""
    workdir = tmp_path_factory.mktemp("serve-command")
    raw = yaml.safe_load(LOCAL_CONFIG.read_text())
    for app in raw["applications"]:
        app["args"]["weights"]["root"] = str(tiny_weights)
        app["args"]["storage"]["embedded_data_dir"] = str(workdir / "s3")
        app["args"]["storage"]["spool_dir"] = str(workdir / "spool")
    config = workdir / "local.yaml"
    config.write_text(yaml.safe_dump(raw))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)  # it must start its own Ray and S3
    command = [sys.executable, "-m", "serve.tools.cli", "serve", str(config), "--port", str(free_port())]
    with open(workdir / "serve.out", "wb") as out, open(workdir / "serve.err", "wb") as err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        server = None
        while server is None:
            found = SERVING_LINE.search((workdir / "serve.out").read_text(errors="replace"))
            if found:
                server = Server(proc, workdir, found.group(1), found.group(2))
            elif proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "serve.err").read_text(errors="replace")[-3000:]
                pytest.fail(f"instantid serve did not start (exit {proc.poll()}):\n{tail}")
            else:
                time.sleep(0.5)
        with urllib.request.urlopen(server.url + "/healthz", timeout=10) as response:
            assert response.status == 200
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a test failed before SIGTERM: stop it as Ctrl-C does
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_all(proc.pid, workdir)


def test_readme_handle_example_joins_the_served_cluster(server: Server, tmp_path: Path):
    example = tmp_path / "call.py"
    example.write_text(readme_handle_example())
    (tmp_path / "face.jpg").write_bytes(astronaut_jpeg())  # a real portrait: the face detector finds it
    # RAY_ADDRESS and RAY_AUTH_MODE, as README says for a machine with several Ray clusters: the suite runs its own.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": server.ray_address, "RAY_AUTH_MODE": "token"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))  # it imports serve.schemas
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"^(s3://\S+) (http://\S+)$", result.stdout, re.MULTILINE)
    assert found, result.stdout
    uri, url = found.groups()
    bucket, key = uri[len("s3://") :].split("/", 1)
    assert f"/{bucket}/{key}" in url  # the presigned URL (path-style) names the same object
    with urllib.request.urlopen(url, timeout=30) as response:  # the object is in the embedded S3
        image = Image.open(BytesIO(response.read()))
        image.load()  # a whole, decodable image


def test_sigterm_stops_everything_with_status_0(server: Server):
    before = ours(server.proc.pid, server.workdir)
    names = {p.info["name"] for p in before}
    assert {"raylet", "gcs_server", "weed"} <= names, describe(before)

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        status = server.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"instantid serve still running {STOP_TIMEOUT_S} s after SIGTERM:\n{server.stderr()[-3000:]}")
    stopped_s = time.monotonic() - started
    stderr = server.stderr()
    assert status == 0, f"exit status {status} ({stopped_s:.1f} s after SIGTERM):\n{stderr[-3000:]}"
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-3000:]

    deadline = time.monotonic() + 15  # processes reparented to init may still be on their way out
    while (left := [p for p in before if alive(p)]) or (left := ours(server.proc.pid, server.workdir)):
        if time.monotonic() > deadline:
            pytest.fail(f"left running after SIGTERM:\n{describe(left)}")
        time.sleep(0.5)
