"""Serve config files as ``instantid serve`` reads them: ``${INSTANTID_HOME}`` moves local.yaml's state folder.

Fast: nothing is started; the files are read, expanded and checked against Ray's and our schemas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.tools.runner import ServeFile, expand_home

CONFIGS = Path(__file__).resolve().parents[1] / "serve" / "configs"


def state_paths(serve_file: ServeFile) -> list[Path]:
    """local.yaml's three state folders (weights, S3 data, spool), as the local stack will use them."""
    (_, config), *_ = serve_file.app_configs()
    return [Path(p) for p in (config.weights.root, config.storage.embedded_data_dir, config.storage.spool_dir)]


def test_local_config_follows_instantid_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INSTANTID_HOME", str(tmp_path / "state"))
    paths = state_paths(ServeFile.load(CONFIGS / "local.yaml"))
    assert paths == [tmp_path / "state" / "weights" / "tiny", tmp_path / "state" / "s3", tmp_path / "state" / "spool"]


def test_local_config_defaults_to_dot_instantid_and_an_explicit_home_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("INSTANTID_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    default = state_paths(ServeFile.load(CONFIGS / "local.yaml"))
    assert default == [tmp_path / "user" / ".instantid" / part for part in ("weights/tiny", "s3", "spool")]
    monkeypatch.setenv("INSTANTID_HOME", str(tmp_path / "ignored"))
    explicit = state_paths(ServeFile.load(CONFIGS / "local.yaml", home=tmp_path / "demo"))
    assert all(p.is_relative_to(tmp_path / "demo") for p in explicit), explicit


def test_production_config_is_read_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INSTANTID_HOME", str(tmp_path))
    path = CONFIGS / "production.yaml"
    assert ServeFile.load(path).raw == yaml.safe_load(path.read_text())


def test_only_the_home_placeholder_is_expanded(tmp_path: Path):
    args = {"a": "${INSTANTID_HOME}/x", "b": ["$HOME/y", "${INSTANTID_HOME}"], "c": {"d": "p$ss${word}"}, "n": 3}
    assert expand_home(args, tmp_path) == {
        "a": f"{tmp_path}/x",
        "b": ["$HOME/y", str(tmp_path)],
        "c": {"d": "p$ss${word}"},
        "n": 3,
    }


def test_local_config_drains_its_replicas_without_serves_2_s_wait_loop(tmp_path: Path):
    """Serve sleeps ``graceful_shutdown_wait_loop_s`` before it first counts a stopping replica's requests:
    with its default (2 s) every idle replica of ``instantid serve`` would hold the shutdown that long."""
    (_, config), *_ = ServeFile.load(CONFIGS / "local.yaml", home=tmp_path).app_configs()
    parts = (config.ingress, config.face, config.prompt, config.denoiser, config.control_maps, config.store)
    loops = [part.deployment.to_options().get("graceful_shutdown_wait_loop_s") for part in parts]
    assert all(loop is not None and loop <= 0.5 for loop in loops), loops
