"""Control maps (Canny, depth), the cover-and-crop fit, and the tiny extra ControlNets and depth model."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from deployments.instantid.control_inputs import prepare_control_inputs
from deployments.instantid.control_maps import (
    DEFAULT_CANNY_HIGH,
    DEFAULT_CANNY_LOW,
    canny_map,
    fit_image,
    load_depth_estimator,
)
from deployments.instantid.errors import WeightsError
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import CropTransform
from deployments.tiny.controls import CONTROL_KINDS, write_tiny_depth_model
from tests.support import astronaut_jpeg, group_photo_jpeg

# The relative change of a tiny ControlNet's residuals between a blank control image and the astronaut's Canny map
# at 64x64 measured 3.4 (pose), 2.9 (canny) and 8.4 (depth) on seed 0; with a signed colour mix the depth
# ControlNet's was 0.03, which this threshold rejects.
MIN_RESIDUAL_CHANGE = 0.5


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return decode_image(astronaut_jpeg())


@pytest.fixture(scope="module")
def group_photo() -> np.ndarray:
    return decode_image(group_photo_jpeg())


@pytest.fixture(scope="module")
def depth_estimator(tiny_weights: Path):
    return load_depth_estimator(tiny_weights / "depth")


def reference_canny(rgb: np.ndarray, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH) -> np.ndarray:
    """The published demo's Canny step, written out with cv2 (RGB -> BGR, Canny, one channel -> three)."""
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), low, high)
    return np.stack([edges] * 3, axis=-1)


def reference_depth(folder: Path, rgb: np.ndarray) -> np.ndarray:
    """The transformers depth-estimation pipeline's prediction, normalised per image as the demo does."""
    from transformers import pipeline

    output = pipeline("depth-estimation", model=str(folder))(Image.fromarray(rgb))
    depth = output["predicted_depth"].numpy().astype(np.float32)
    unit = (depth - depth.min()) / (depth.max() - depth.min())
    expected = np.stack([(unit * 255.0).clip(0, 255).astype(np.uint8)] * 3, axis=-1)
    assert np.array_equal(expected[..., 0], np.asarray(output["depth"]))  # the pipeline's own picture agrees
    return expected


# --- Canny ---------------------------------------------------------------------------------------------------------


def test_canny_map_is_opencv_canny_of_the_fitted_image(group_photo: np.ndarray) -> None:
    width, height = 192, 128
    src_h, src_w = group_photo.shape[:2]
    resized = CropTransform.cover(src_w, src_h, width, height).apply_image(group_photo)
    ours = canny_map(fit_image(group_photo, width, height))
    assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, reference_canny(resized))
    edge_fraction = (ours[..., 0] > 0).mean()
    assert 0.01 < edge_fraction < 0.5
    assert set(np.unique(ours)) == {0, 255}


def test_canny_thresholds_change_the_map(astronaut: np.ndarray) -> None:
    image = fit_image(astronaut, 128, 128)
    default = canny_map(image)
    looser = canny_map(image, 20, 60)
    assert np.array_equal(looser, reference_canny(image, 20, 60))
    assert (looser[..., 0] > 0).sum() > (default[..., 0] > 0).sum()


def test_prepared_canny_map_uses_the_requested_thresholds(astronaut: np.ndarray) -> None:
    """``prepare_control_inputs`` (what the ControlMaps stage and the in-process pipeline both call) makes the canny
    map with the request's thresholds: OpenCV's Canny at exactly (canny_low, canny_high) on the source brought to the
    output size, which is not the default 100/200 map. (OpenCV orders the two thresholds itself, so only the values
    matter to the map; a swap before ``canny_map`` is refused by its low <= high check.)"""
    low, high = 50, 150
    inputs = prepare_control_inputs(
        astronaut, source_name="pose image", width=128, height=96, compute=("canny",), canny_low=low, canny_high=high
    )
    fitted = CropTransform.cover(astronaut.shape[1], astronaut.shape[0], 128, 96).apply_image(astronaut)
    expected = reference_canny(fitted, low, high)
    assert inputs.maps["canny"].shape == (96, 128, 3) and inputs.sources["canny"] == "pose image"
    assert np.array_equal(inputs.maps["canny"], expected)
    default = reference_canny(fitted)
    assert np.sum(expected != default) > 100  # the thresholds visibly change this map


def test_canny_before_resizing_is_a_different_map(group_photo: np.ndarray) -> None:
    """Pins the order: edges are found at the output size, so they stay one pixel wide there."""
    after = canny_map(fit_image(group_photo, 192, 128))
    before = fit_image(canny_map(group_photo), 192, 128)
    assert not np.array_equal(after, before)
    assert np.mean(after != before) > 0.05


@pytest.mark.parametrize(
    ("image", "low", "high"),
    [
        (np.zeros((8, 8), np.uint8), 100, 200),
        (np.zeros((8, 8, 3), np.float32), 100, 200),
        (np.zeros((8, 8, 4), np.uint8), 100, 200),
        (np.zeros((8, 8, 3), np.uint8), 200, 100),
        (np.zeros((8, 8, 3), np.uint8), -1, 100),
    ],
)
def test_canny_map_rejects_bad_input(image: np.ndarray, low: int, high: int) -> None:
    with pytest.raises(ValueError):
        canny_map(image, low, high)


# --- fit_image -----------------------------------------------------------------------------------------------------


def test_fit_image_crops_the_middle_instead_of_stretching() -> None:
    """A 2:1 picture (red | green green | blue, in quarters) fitted to a square keeps only the green middle."""
    image = np.zeros((60, 120, 3), np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, 30:90] = (0, 255, 0)
    image[:, 90:] = (0, 0, 255)
    fitted = fit_image(image, 30, 30)
    assert fitted.shape == (30, 30, 3)
    assert np.array_equal(fitted[:, 1:-1], np.broadcast_to(np.array([0, 255, 0], np.uint8), (30, 28, 3)))
    edges = fitted[:, [0, -1]].astype(int)  # bilinear filtering may borrow a little from outside the crop
    assert np.all(edges[..., 1] > 200) and np.all(edges[..., 0] + edges[..., 2] < 55)


def test_fit_image_of_a_landscape_photo_to_a_square(group_photo: np.ndarray) -> None:
    """1280x886 -> 1024x1024 puts the crop box's top edge at -5.7e-14 by rounding, which Pillow refuses unclamped."""
    fitted = fit_image(group_photo, 1024, 1024)
    assert fitted.shape == (1024, 1024, 3)


def test_fit_image_keeps_an_image_already_at_size(astronaut: np.ndarray) -> None:
    fitted = fit_image(astronaut, astronaut.shape[1], astronaut.shape[0])
    assert np.array_equal(fitted, astronaut) and fitted.flags.c_contiguous


# --- depth ---------------------------------------------------------------------------------------------------------


def test_depth_map_matches_the_transformers_pipeline(
    tiny_weights: Path, depth_estimator, astronaut: np.ndarray
) -> None:
    image = fit_image(astronaut, 96, 64)  # not square: the processor keeps the aspect ratio
    (ours,) = depth_estimator([image])
    assert ours.shape == image.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, reference_depth(tiny_weights / "depth", image))
    assert ours.min() == 0 and ours.max() == 255  # min-max normalised per image
    assert np.array_equal(ours[..., 0], ours[..., 1]) and np.array_equal(ours[..., 0], ours[..., 2])
    assert ours[..., 0].std() > 20  # the tiny model's depth varies over the picture


def test_depth_maps_of_different_sizes_in_one_call(
    depth_estimator, astronaut: np.ndarray, group_photo: np.ndarray
) -> None:
    images = [fit_image(astronaut, 64, 64), fit_image(group_photo, 112, 80)]
    together = depth_estimator(images)
    assert [m.shape for m in together] == [i.shape for i in images]
    for image, depth in zip(images, together, strict=True):
        assert np.array_equal(depth, depth_estimator([image])[0])


def test_depth_depends_on_the_picture(depth_estimator, astronaut: np.ndarray, group_photo: np.ndarray) -> None:
    images = [fit_image(astronaut, 112, 80), fit_image(group_photo, 112, 80)]
    first, second = depth_estimator(images)
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 10
    # Not float noise stretched to 0..255: the raw depth's std measured 0.10 and 0.08 on seed 0 (about 5e-8 with
    # the library's own initialisation).
    assert all(depth_estimator.predict(image).std() > 0.01 for image in images)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # 0 / 0 would also end as zeros, after a warning
def test_constant_depth_becomes_zeros(depth_estimator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(depth_estimator, "predict", lambda rgb: np.full(rgb.shape[:2], 3.0, np.float32))
    (depth,) = depth_estimator([np.zeros((16, 24, 3), np.uint8)])
    assert depth.shape == (16, 24, 3) and not depth.any()


def test_depth_check_health_finds_nan(tiny_weights: Path) -> None:
    estimator = load_depth_estimator(tiny_weights / "depth")
    estimator.check_health()
    with torch.no_grad():
        next(estimator.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        estimator.check_health()


def test_load_depth_estimator_names_what_is_missing(tiny_weights: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"config\.json") as caught:
        load_depth_estimator(empty)
    assert str(empty) in str(caught.value) and "found: nothing" in str(caught.value)

    partial = tmp_path / "partial"
    shutil.copytree(tiny_weights / "depth", partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match=r"preprocessor_config\.json") as caught:
        load_depth_estimator(partial)
    assert str(partial) in str(caught.value) and "model.safetensors" in str(caught.value)  # listed as found

    with pytest.raises(WeightsError, match="does not exist"):
        load_depth_estimator(tmp_path / "nowhere")


def test_load_depth_estimator_wraps_unloadable_weights(tiny_weights: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights / "depth", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=re.escape(str(broken))):
        load_depth_estimator(broken)


def test_tiny_depth_model_is_seeded_and_leaves_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    write_tiny_depth_model(tmp_path / "a", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    write_tiny_depth_model(tmp_path / "b", seed=7)
    write_tiny_depth_model(tmp_path / "c", seed=8)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


# --- the tiny extra ControlNets ------------------------------------------------------------------------------------


def residuals(controlnet: ControlNetModel, control: np.ndarray, cross_attention_dim: int) -> torch.Tensor:
    """All down and mid residuals of one ControlNet call, flattened (fixed latents, text and time ids)."""
    height, width = control.shape[:2]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, height // 8, width // 8, generator=generator)
    text = torch.randn(1, 77, cross_attention_dim, generator=generator)
    pooled = torch.randn(1, controlnet.config.projection_class_embeddings_input_dim - 6 * 8, generator=generator)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    condition = torch.from_numpy(control.copy()).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        down, mid = controlnet(
            latents,
            torch.tensor(500),
            text,
            controlnet_cond=condition,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )
    return torch.cat([t.flatten() for t in (*down, mid)])


@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_tiny_controlnet_reads_text_and_sees_its_map(tiny_weights: Path, astronaut: np.ndarray, kind: str) -> None:
    unet_config = json.loads((tiny_weights / "sdxl" / "unet" / "config.json").read_text())
    controlnet = ControlNetModel.from_pretrained(tiny_weights / "controlnets" / kind).eval()
    assert controlnet.config.cross_attention_dim == unet_config["cross_attention_dim"]
    assert controlnet.config.addition_time_embed_dim == 8  # residuals() builds the pooled width from it

    edges = canny_map(fit_image(astronaut, 64, 64))
    blank = residuals(controlnet, np.zeros_like(edges), unet_config["cross_attention_dim"])
    drawn = residuals(controlnet, edges, unet_config["cross_attention_dim"])
    assert torch.isfinite(drawn).all()
    assert float((drawn - blank).norm() / blank.norm()) > MIN_RESIDUAL_CHANGE


def test_tiny_controlnets_differ(tiny_weights: Path) -> None:
    from safetensors.torch import load_file

    folders = [tiny_weights / "controlnets" / kind for kind in CONTROL_KINDS] + [tiny_weights / "instantid"]
    embeddings = [
        load_file(next(folder.rglob("diffusion_pytorch_model.safetensors")))["controlnet_cond_embedding.conv_in.weight"]
        for folder in folders
    ]
    for index, first in enumerate(embeddings):
        for second in embeddings[index + 1 :]:
            assert not torch.equal(first, second)
