"""The local Ray's settings that need no Ray running: its token file is private (0600), loopback mode is undone,
what ``LocalRay`` hands ``ray.init`` and calls on stop (Ray's functions replaced by stand-ins), and the
``instantid serve`` options that reach it.

What they do to a real cluster (every port on loopback, the token Ray reads, metrics, teardown) is checked on a
running ``instantid serve`` in ``test_serve_command``.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import ray

from serve.tools.local_ray import SINGLE_MACHINE_ENV, private_auth_token, single_machine_mode


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user home of the test's own (``~/.ray/auth_token`` resolves under it), token settings cleared."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_is_written_for_this_user_only_in_rays_format(home: Path):
    umask = os.umask(0o022)  # the usual one: Ray's own open(path, "w") makes 0644 under it
    try:
        path = private_auth_token(create=True)
    finally:
        os.umask(umask)
    assert path is not None
    assert path == home / ".ray" / "auth_token"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", path.read_text())  # 256 bits in hex, as Ray generates them
    assert private_auth_token(create=True) == path and re.fullmatch(r"[0-9a-f]{64}", path.read_text())
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind


def test_an_existing_token_open_to_others_is_tightened_and_kept(home: Path):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("a" * 64)
    path.chmod(0o644)  # what Ray 2.60 leaves under the usual umask
    assert private_auth_token(create=False) == path
    assert mode(path) == 0o600 and path.read_text() == "a" * 64


@pytest.mark.parametrize(
    ("env", "create"),
    [({}, False), ({"RAY_AUTH_MODE": "disabled"}, True), ({"RAY_AUTH_TOKEN": "t" * 64}, True)],
    ids=["joining-a-cluster", "auth-disabled", "token-from-the-environment"],
)
def test_no_token_file_is_made_when_ray_would_not_make_one(
    home: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], create: bool
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert private_auth_token(create=create) is None
    assert not (home / ".ray").exists()


def test_single_machine_mode_is_undone_on_exit(monkeypatch: pytest.MonkeyPatch):
    from ray._private import ray_constants

    monkeypatch.delenv(SINGLE_MACHINE_ENV, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with single_machine_mode():
        assert os.environ[SINGLE_MACHINE_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
        if not ray.is_initialized():  # else Ray answers with the running node's address
            assert ray.util.get_node_ip_address() == "127.0.0.1"  # what a Ray started now takes as its address
    assert SINGLE_MACHINE_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is before


class _InitCalled(Exception):
    """Raised by the stand-in ``ray.init``: what ``LocalRay.start`` prepared is checked without starting Ray."""


def test_a_started_ray_gets_loopback_mode_a_private_token_and_the_metrics_port(
    home: Path, monkeypatch: pytest.MonkeyPatch
):
    from serve.tools.local_ray import LocalRay

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(SINGLE_MACHINE_ENV, raising=False)
    seen: dict[str, object] = {}

    def fake_init(**kwargs: object) -> None:
        token = home / ".ray" / "auth_token"
        seen.update(kwargs, token_mode=mode(token) if token.exists() else None)
        seen["single_machine"] = os.environ.get(SINGLE_MACHINE_ENV)
        raise _InitCalled

    monkeypatch.setattr(ray, "init", fake_init)
    cluster = LocalRay(metrics_port=9123)
    with pytest.raises(_InitCalled):
        cluster.start()
    # A Ray that this test process started for other tests must live on: stop() sees none to shut down.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: pytest.fail("stop() shut down a Ray it was told is not running"))
    cluster.stop([])
    assert seen["address"] == "local" and seen["_metrics_export_port"] == 9123
    assert seen["token_mode"] == 0o600  # written before Ray could write it 0644
    assert seen["single_machine"] == "0" and SINGLE_MACHINE_ENV not in os.environ  # undone by stop()


def test_metrics_port_is_refused_for_a_joined_cluster(monkeypatch: pytest.MonkeyPatch):
    from serve.tools import CliError
    from serve.tools.local_ray import LocalRay

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(CliError, match="--metrics-export-port"):
        LocalRay(metrics_port=9123)


@pytest.mark.parametrize("joined", [False, True], ids=["started-here", "joined"])
def test_stop_deletes_the_apps_of_its_own_ray_and_shuts_serve_down_only_on_a_joined_one(
    monkeypatch: pytest.MonkeyPatch, joined: bool
):
    """``serve.shutdown`` on a Ray about to stop only adds Ray's "Failed to push error to driver" noise."""
    from serve.tools import local_ray

    if joined:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls: list[object] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(local_ray, "_delete_apps", lambda names: calls.append(("delete", list(names))))
    monkeypatch.setattr(local_ray, "_shutdown_serve", lambda: calls.append("serve.shutdown"))
    local_ray.LocalRay().stop(["instantid"])
    expected = "serve.shutdown" if joined else ("delete", ["instantid"])
    assert calls == [expected, "ray.shutdown"]


def test_instantid_serve_passes_metrics_port_and_skips_the_final_collections(monkeypatch: pytest.MonkeyPatch):
    import gc

    from serve.tools import cli, runner

    seen: dict[str, object] = {}
    monkeypatch.setattr(runner, "run_config", lambda path, **kwargs: seen.update(kwargs, path=path))
    args = cli.build_parser().parse_args(["serve", "some.yaml", "--metrics-port", "9123"])
    try:
        assert args.func(args) == 0
        assert seen == {"path": Path("some.yaml"), "port": None, "metrics_port": 9123}
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # nothing left for exit's collections to walk
    finally:
        gc.unfreeze()
        gc.enable()
