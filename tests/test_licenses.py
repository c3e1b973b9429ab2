"""Licences of the weight sources: every source carries terms, a deployment that would serve non-commercial or unknown
ones refuses to start naming each, the accepting config starts, and `instantid weights licenses` prints a folder's."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve import Application

from deployments.instantid.errors import LicenseNotAccepted
from deployments.instantid.licenses import PUBLISHED, TINY, read_manifest
from serve.app import build_app
from serve.config import AppConfig
from serve.licenses import DEFAULT_LAYOUT_REPOS, check_licenses, weight_licenses
from serve.tools.runner import ServeFile

CONFIGS = Path(__file__).resolve().parents[1] / "serve" / "configs"
# What the default published layout holds that does not clearly allow commercial use (README's licence table).
NOT_COMMERCIAL = {
    "identitynet instantid",  # research use only (the InstantID README)
    "face antelopev2",  # insightface: non-commercial research
    "controlnet pose",  # its publisher's own terms
    "lora hyper-sdxl-8step-cfg",  # a LICENSE.md of its own
}


def config(name: str, **updates) -> AppConfig:
    (_, app), *_ = ServeFile.load(CONFIGS / name).app_configs()
    licenses = app.licenses.model_copy(update=updates)
    return app.model_copy(update={"licenses": licenses})


def test_every_source_of_both_configs_carries_a_licence_and_commercial_use() -> None:
    for name in ("local.yaml", "production.yaml"):
        sources = weight_licenses(config(name))
        kinds = {source.kind for source in sources}
        assert kinds == {"base", "lora", "controlnet", "identitynet", "face", "depth", "safety"}, name
        assert all(source.license and source.commercial_use in (True, False, "unknown") for source in sources)
    local = weight_licenses(config("local.yaml"))
    assert {(s.license, s.commercial_use) for s in local if s.kind != "safety"} == {("Apache-2.0", True)}


def test_production_refuses_to_start_naming_every_noncommercial_source_unless_accepted() -> None:
    production = config("production.yaml")
    assert production.licenses.accept_noncommercial is True  # set explicitly, with the reasons beside it
    assert "accept_noncommercial: true" in (CONFIGS / "production.yaml").read_text()
    refusing = config("production.yaml", accept_noncommercial=False)
    with pytest.raises(LicenseNotAccepted) as refused:
        build_app(refusing)
    message = refused.value.message
    for label in NOT_COMMERCIAL:
        assert label in message, label
    assert "licenses.accept_noncommercial" in message
    assert {s.label for s in weight_licenses(production) if s.commercial_use is not True} == NOT_COMMERCIAL
    assert isinstance(build_app(production), Application)  # accepted: it builds (binding loads nothing)
    assert isinstance(build_app(config("local.yaml")), Application)  # tiny weights: nothing to accept


def test_stated_licences_win_and_unstated_sources_outside_the_layout_are_unknown() -> None:
    args = ServeFile.load(CONFIGS / "local.yaml").raw["applications"][0]["args"]
    args = {**args, "licenses": {"weights": "published", "accept_noncommercial": False}}
    args["models"] = {
        **args["models"],
        "base_models": {
            "mine": {"source": "/models/mine.safetensors"},
            "hub": {"repo": "stabilityai/stable-diffusion-xl-base-1.0"},
            "stated": {"source": "bases/x.safetensors", "license": "MIT", "commercial_use": True},
        },
    }
    args["licenses"]["parts"] = {
        "instantid": {"license": "commercial-agreement", "commercial_use": True},
        "antelopev2": {"license": "licensed", "commercial_use": True},
    }
    sources = {s.label: s for s in weight_licenses(AppConfig.model_validate(args))}
    assert sources["base mine"].commercial_use == "unknown"
    assert sources["base hub"].license == PUBLISHED["stabilityai/stable-diffusion-xl-base-1.0"].license
    assert (sources["base stated"].license, sources["base stated"].commercial_use) == ("MIT", True)
    assert sources["identitynet instantid"].license == "commercial-agreement"
    with pytest.raises(LicenseNotAccepted) as refused:
        check_licenses(AppConfig.model_validate(args))
    assert "base mine" in refused.value.message and "identitynet" not in refused.value.message
    with pytest.raises(ValueError, match="together"):
        AppConfig.model_validate({**args, "models": {"base_models": {"x": {"source": "y", "license": "MIT"}}}})


def test_the_layout_table_names_what_weights_download_fetches() -> None:
    from deployments.instantid.catalogue import LORAS_DIR, PRESET_LORA_FILES
    from serve.tools import download

    fetched = {"instantid": download.INSTANTID_REPO, "depth": download.DEFAULT_DEPTH_REPO}
    fetched |= {f"{LORAS_DIR}/{PRESET_LORA_FILES[n]}": repo for n, (repo, _) in download.PRESET_LORA_SOURCES.items()}
    fetched |= {f"controlnets/{n}": repo for n, (repo, _) in download.CONTROLNET_SOURCES.items()}
    assert {path: DEFAULT_LAYOUT_REPOS[path] for path in fetched} == fetched
    assert set(DEFAULT_LAYOUT_REPOS.values()) <= set(PUBLISHED)  # every default has its publisher's terms


def test_weights_licenses_prints_the_table_of_a_folder(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    from serve.tools.cli import main

    assert {terms for _, terms in read_manifest(tiny_weights).values()} == {TINY}
    assert main(["weights", "licenses", "--weights", str(tiny_weights)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(("note:", "not cleared"))}
    assert rows["antelopev2"][1:3] == ["Apache-2.0", "yes"] and rows["open-nsfw.onnx"][1:3] == ["BSD-2-Clause", "yes"]
    assert {"sdxl", "instantid", "loras/lcm-lora-sdxl.safetensors", "controlnets/pose", "depth"} <= set(rows)
    # A folder without a manifest (weights copied in by hand): every part is unknown, and the command says so.
    (tmp_path / "antelopev2").mkdir()
    assert main(["weights", "licenses", "--weights", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["antelopev2", "unknown", "unknown"]
    assert "not cleared for commercial use: antelopev2" in out
