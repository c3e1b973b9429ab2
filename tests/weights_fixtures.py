"""Session fixtures: one tiny weights folder (written in the published formats) and models loaded from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.instantid.loading import load_denoiser, load_prompt_encoder
from deployments.instantid.options import CONTROLNET_NAMES
from deployments.instantid.weights import WeightsLayout
from deployments.tiny.weights import write_tiny_weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"), seed=0)


@pytest.fixture(scope="session")
def tiny_layout(tiny_weights: Path) -> WeightsLayout:
    return WeightsLayout.from_root(tiny_weights)


@pytest.fixture(scope="session")
def denoiser(tiny_layout: WeightsLayout):
    return load_denoiser(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def prompt_encoder(tiny_layout: WeightsLayout):
    return load_prompt_encoder(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def controlled_denoiser(tiny_layout: WeightsLayout, tiny_weights: Path):
    """The tiny denoiser with the layout's three extra ControlNets (pose, canny, depth)."""
    folders = {name: tiny_weights / "controlnets" / name for name in CONTROLNET_NAMES}
    return load_denoiser(tiny_layout, device="cpu", dtype="float32", controlnets=folders)
