"""LoRA switches while another thread loads a model: never weightless adapters, and a failed load leaves nothing.

diffusers builds models inside accelerate's ``init_empty_weights``, which patches ``nn.Module.register_parameter``
for the whole process. A LoRA injected by another thread meanwhile got meta-device layers, and its half-injected
adapter made every later load of it fail ("already exists"): seen in the chaos soak as 500s on LoRA requests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from deployments.instantid.construction import constructs_modules
from deployments.instantid.loading import load_prompt_encoder
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.weights import WeightsLayout
from deployments.tiny.weights import STYLE_LORAS

PARTS = ("text_encoder", "text_encoder_2")


def text_adapters(layout: WeightsLayout, weights: Path) -> tuple[LoraAdapters, dict[str, torch.nn.Module]]:
    encoder = load_prompt_encoder(layout, device="cpu", dtype="float32")
    targets = dict(zip(PARTS, encoder.encoders, strict=True))
    files = {path.stem: path for path in (weights / "loras").glob("*.safetensors")}
    return LoraAdapters(targets, files, capacity=2), targets


def lora_parameters(model: torch.nn.Module, name: str) -> list[torch.Tensor]:
    return [p for key, p in model.named_parameters() if f".{name}." in key and "lora_" in key]


def test_a_lora_loaded_while_another_thread_builds_a_model_gets_real_weights(tiny_layout, tiny_weights) -> None:
    adapters, targets = text_adapters(tiny_layout, tiny_weights)
    inside, release = threading.Event(), threading.Event()

    @constructs_modules
    def build_a_model() -> None:  # as diffusers' from_pretrained does, for as long as the test says
        with init_empty_weights():
            inside.set()
            release.wait(timeout=30)

    builder = threading.Thread(target=build_a_model)
    builder.start()
    assert inside.wait(timeout=30)
    finished: list[float] = []
    switcher = threading.Thread(target=lambda: (adapters.activate(((STYLE_LORAS[0], 1.0),)), finished.append(1)))
    switcher.start()
    time.sleep(0.5)
    assert not finished  # the LoRA load waits for the model build to end
    release.set()
    builder.join(timeout=30)
    switcher.join(timeout=60)
    assert finished
    for model in targets.values():
        params = lora_parameters(model, STYLE_LORAS[0])
        assert params and all(p.device.type == "cpu" for p in params)


def test_a_lora_load_failing_halfway_leaves_no_layers_and_loads_again(tiny_layout, tiny_weights, monkeypatch) -> None:
    from diffusers import StableDiffusionXLPipeline

    adapters, targets = text_adapters(tiny_layout, tiny_weights)
    real = StableDiffusionXLPipeline.load_lora_into_text_encoder

    def second_part_fails(*args, **kwargs):
        if kwargs.get("prefix") == "text_encoder_2":
            raise NotImplementedError("Cannot copy out of meta tensor; no data!")
        return real(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "load_lora_into_text_encoder", second_part_fails)
    with pytest.raises(NotImplementedError):
        adapters.activate(((STYLE_LORAS[0], 1.0),))
    assert all(lora_parameters(model, STYLE_LORAS[0]) == [] for model in targets.values())
    monkeypatch.setattr(StableDiffusionXLPipeline, "load_lora_into_text_encoder", real)
    adapters.activate(((STYLE_LORAS[0], 1.0),))  # once "adapter already exists": now it loads
    assert all(lora_parameters(model, STYLE_LORAS[0]) for model in targets.values())
