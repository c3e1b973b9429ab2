"""``instantid serve`` as a user runs it: ``serve/configs/local.yaml`` as shipped, one real process, then SIGTERM.

One real ``instantid serve`` process (its own session) with ``INSTANTID_HOME`` and ``HOME`` of the test's own
(tiny weights linked in) and ``--metrics-port``. In order: its state lands under ``INSTANTID_HOME``; every
process it started listens on loopback only; Ray's token file is private; Prometheus answers on the chosen
port; the README's Python example, taken from README.md and run unchanged in a second process, joins that
Ray and gets an image into the embedded S3; a killed ``weed`` is restarted and generation works again; and
SIGTERM (what ``docker stop``, systemd and Kubernetes send) stops it like Ctrl-C: exit status 0, quickly,
without Ray's shutdown noise or a native stack trace, no Ray process and no ``weed`` left.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import signal
import stat
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

from tests.support import FAST_REQUEST, astronaut_jpeg, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).absolute().parents[1]
LOCAL_CONFIG = REPO / "serve" / "configs" / "local.yaml"
HANDLE_HEADING = "### Python (DeploymentHandle)"
START_TIMEOUT_S = 300  # six replicas on 2 cores shared with other test runs
EXAMPLE_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
# SIGTERM to exit, measured on 2 shared cores: 4.2-4.5 s (serve.shutdown, Serve's 2 s drain loops, a stalled
# weed and Python's final garbage collection made it 10-24 s).
STOP_BOUND_S = 10
RESTART_TIMEOUT_S = 30
SERVING_LINE = re.compile(r"^serving on (http://\S+) \(.*Ray at (\S+)\);", re.MULTILINE)
METRICS_LINE = re.compile(r"^metrics \(Prometheus\) at (http://\S+)$", re.MULTILINE)
JOIN_LINE = re.compile(r"^to use this Ray from another process on this machine: (.*) python \.\.\.$", re.MULTILINE)
# Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0", hard-coded
# (serve/_private/replica.py, _on_initialized), with no setting to bind it elsewhere; it checks the cluster's
# token. The only listener allowed off loopback, one per replica process.
SERVE_REPLICA = "ray::ServeReplica"


def local_deployments() -> list[str]:
    """The deployments ``local.yaml`` as shipped composes, one replica each (the SafetyChecker only when its
    policy is not ``off``)."""
    from serve.config import AppConfig

    application = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))["applications"][0]
    config = AppConfig.model_validate(application["args"])
    stages = ["FaceAnalyzer", "PromptEncoder", "Denoiser", "ResultStore", "ControlMaps", "Ingress"]
    return stages + (["SafetyChecker"] if config.safety.policy != "off" else [])


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
    metrics_url: str
    home: Path  # INSTANTID_HOME
    user_home: Path  # HOME: where Ray keeps ~/.ray/auth_token

    def stdout(self) -> str:
        return (self.workdir / "serve.out").read_text(errors="replace")

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


def tree(server: Server) -> list[psutil.Process]:
    """The server and every process it started: its descendants (Ray's, weed) and, should any have been
    reparented, those in its session or naming its folder (see :func:`ours`)."""
    found = {p.pid: p for p in ours(server.proc.pid, server.workdir)}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(server.proc.pid)
        found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    return [p for p in found.values() if alive(p)]


def listening(procs: list[psutil.Process]) -> list[tuple[psutil.Process, str, int]]:
    """Every TCP/UDP socket in LISTEN state of ``procs``: (process, address, port)."""
    sockets = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    sockets.append((proc, conn.laddr.ip, conn.laddr.port))
    return sockets


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # ::ffff:127.0.0.1 (dual stack)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def first_arg(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return (proc.cmdline() or [""])[0]
    return ""


def weed_of(server: Server) -> psutil.Process:
    weeds = [p for p in ours(server.proc.pid, server.workdir) if p.info["name"] == "weed"]
    assert len(weeds) == 1, describe(weeds)
    return weeds[0]


def flag(proc: psutil.Process, name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in proc.cmdline() if arg.startswith(f"-{name}="))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Server]:
    """``instantid serve serve/configs/local.yaml --port FREE --metrics-port FREE`` in a new session, with
    ``INSTANTID_HOME`` and ``HOME`` of its own (the tiny weights linked into the first), until it served."""
    workdir = tmp_path_factory.mktemp("serve-command")
    home, user_home = workdir / "home", workdir / "user"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "tiny").symlink_to(tiny_weights)  # found there: not written again
    user_home.mkdir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INSTANTID_HOME": str(home), "HOME": str(user_home)}
    for name in ("RAY_ADDRESS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)  # it must start its own Ray and S3
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)  # Ray's defaults: token authentication with ~/.ray/auth_token
    command = [sys.executable, "-m", "serve.tools.cli", "serve", str(LOCAL_CONFIG)]
    command += ["--port", str(free_port()), "--metrics-port", str(free_port())]
    with open(workdir / "serve.out", "wb") as out, open(workdir / "serve.err", "wb") as err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        server = None
        while server is None:
            output = (workdir / "serve.out").read_text(errors="replace")
            found, metrics = SERVING_LINE.search(output), METRICS_LINE.search(output)
            if found and metrics:
                server = Server(proc, workdir, found.group(1), found.group(2), metrics.group(1), home, user_home)
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


def test_state_lands_under_instantid_home(server: Server):
    assert "making tiny weights" not in server.stdout()  # found under INSTANTID_HOME/weights/tiny
    assert (server.home / "s3" / "credentials.json").is_file() and (server.home / "s3" / "data").is_dir()
    assert flag(weed_of(server), "dir") == str(server.home / "s3" / "data")
    assert (server.home / "spool").is_dir()
    assert not (server.user_home / ".instantid").exists()  # nothing went to the default ~/.instantid


def test_every_listening_socket_is_on_loopback(server: Server):
    procs = tree(server)
    sockets = listening(procs)
    ports = {port for _, _, port in sockets}
    gcs_port = int(server.ray_address.rsplit(":", 1)[1])
    http_port, metrics_port = (int(url.split(":")[2].split("/")[0]) for url in (server.url, server.metrics_url))
    s3_port = int(flag(weed_of(server), "s3.port"))
    assert {gcs_port, http_port, metrics_port, s3_port} <= ports, sockets  # the main ones are all in view
    programs = {Path(first_arg(p)).name for p in procs}
    assert {"raylet", "gcs_server", "weed"} <= programs, describe(procs)

    replicas = [p for p in procs if first_arg(p).startswith(SERVE_REPLICA)]
    names = sorted(first_arg(p).split()[0].rsplit(":", 1)[1] for p in replicas)
    assert names == sorted(local_deployments()), describe(procs)  # one replica per deployment of local.yaml
    off_loopback = [(p, ip, port) for p, ip, port in sockets if not is_loopback(ip)]
    # Only Serve's hard-coded inter-deployment gRPC servers, on the IPv6 wildcard, one in each replica.
    assert sorted(p.pid for p, ip, _ in off_loopback if ip == "::") == sorted(p.pid for p in replicas), "\n".join(
        f"{p.pid} {first_arg(p)[:60]} {ip}:{port}" for p, ip, port in off_loopback
    )
    assert len(off_loopback) == len(replicas)


def test_ray_token_file_is_readable_by_this_user_only(server: Server):
    token = server.user_home / ".ray" / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())  # the token of the cluster it started
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)
    assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0


def test_metrics_port_answers_prometheus_text_with_ray_series(server: Server):
    assert server.metrics_url.startswith("http://127.0.0.1:") and server.metrics_url.endswith("/metrics")
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text = response.read().decode()
        if re.search(r"^ray_\w+", text, re.MULTILINE):
            break
        assert time.monotonic() < deadline, text[:2000]
        time.sleep(2)


def test_readme_handle_example_joins_the_served_cluster(server: Server, tmp_path: Path):
    example = tmp_path / "call.py"
    example.write_text(readme_handle_example())
    (tmp_path / "face.jpg").write_bytes(astronaut_jpeg())  # a real portrait: the face detector finds it
    # The environment instantid serve prints for joining its Ray (RAY_ADDRESS, as README says for a machine
    # with several Ray clusters: the suite runs its own; and Ray's single-machine mode, as Ray listens on loopback).
    join = dict(pair.split("=", 1) for pair in JOIN_LINE.search(server.stdout()).group(1).split())
    assert join["RAY_ADDRESS"] == server.ray_address and join["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **join}
    env["HOME"] = str(server.user_home)  # the same user's home: ~/.ray/auth_token of the cluster it joins
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


def test_a_killed_weed_is_restarted_on_its_ports_and_generation_works_again(server: Server):
    weed = weed_of(server)
    s3_port = flag(weed, "s3.port")
    weed.kill()
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while "embedded S3 restarted" not in server.stderr():
        assert time.monotonic() < deadline, f"weed not restarted:\n{server.stderr()[-3000:]}"
        time.sleep(0.2)
    assert re.search(rf"embedded S3 \(weed pid {weed.pid}\) exited with code -9; restarting", server.stderr())
    assert str(server.home / "s3" / "logs" / "weed.out") in server.stderr()  # where to look
    restarted = weed_of(server)
    assert restarted.pid != weed.pid and flag(restarted, "s3.port") == s3_port  # where the workers point

    body = {**FAST_REQUEST, "face_image_b64": base64.b64encode(astronaut_jpeg()).decode()}
    request = urllib.request.Request(
        server.url + "/v1/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=EXAMPLE_TIMEOUT_S) as response:
        result = json.loads(response.read())
    with urllib.request.urlopen(result["images"][0]["url"], timeout=30) as response:  # in the restarted S3
        image = Image.open(BytesIO(response.read()))
        image.load()
    assert image.size == (FAST_REQUEST["width"], FAST_REQUEST["height"])


def test_sigterm_stops_everything_quickly_quietly_and_with_status_0(server: Server):
    before = tree(server)
    names = {p.info["name"] for p in ours(server.proc.pid, server.workdir)}
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
    # Ray's noise when the driver's call to the Serve controller fails under it as it shuts down.
    for noise in ("Failed to push error to driver", "graceful_shutdown failed", "ignored SIGTERM"):
        assert noise not in stderr, stderr[-3000:]
    assert stopped_s < STOP_BOUND_S, f"{stopped_s:.1f} s from SIGTERM to exit:\n{stderr[-3000:]}"

    deadline = time.monotonic() + 15  # processes reparented to init may still be on their way out
    while (left := [p for p in before if alive(p)]) or (left := ours(server.proc.pid, server.workdir)):
        if time.monotonic() > deadline:
            pytest.fail(f"left running after SIGTERM:\n{describe(left)}")
        time.sleep(0.5)
