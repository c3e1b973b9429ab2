"""Weight files: the tiny writer (deterministic, published layout, loadable by stock APIs), loading errors
and where weights come from (local folder, Hugging Face hub cache offline, S3 copied into a local cache)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from deployments.instantid.attention import install_face_attention
from deployments.instantid.denoiser import InstantIDDenoiser
from deployments.instantid.errors import WeightsError
from deployments.instantid.faces import ANTELOPEV2_FILES
from deployments.instantid.loading import load_denoiser, load_face_analyzer, load_prompt_encoder
from deployments.instantid.resampler import Resampler, ResamplerConfig
from deployments.instantid.weights import (
    DENOISER_COMPONENTS,
    PROMPT_COMPONENTS,
    SDXL_SUBFOLDERS,
    WeightsLayout,
    load_ip_adapter,
    resolve_source,
)
from deployments.storage.s3 import COMPLETE_MARKER
from deployments.tiny.weights import PARTS, write_tiny_weights
from serve.tools.seaweed import EmbeddedS3
from tests.support import published_image_proj_keys

TENSOR_FILES = (  # every file holding random tensors: each must change with the seed
    "sdxl/unet/diffusion_pytorch_model.safetensors",
    "sdxl/vae/diffusion_pytorch_model.safetensors",
    "sdxl/text_encoder/model.safetensors",
    "sdxl/text_encoder_2/model.safetensors",
    "instantid/ControlNetModel/diffusion_pytorch_model.safetensors",
    "instantid/ip-adapter.bin",
    "antelopev2/glintr100.onnx",
    "bases/tiny-alt.safetensors",
    "loras/style-peft.safetensors",
    "loras/lcm-lora-sdxl.safetensors",
)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def file_stats(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file: a re-download replaces files, changing both."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tiny_ip_adapter(tiny_weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(tiny_weights / "instantid" / "ip-adapter.bin", map_location="cpu", weights_only=True)


# -- the tiny writer ------------------------------------------------------------------------------------


def test_tiny_weights_are_deterministic_small_and_leave_the_global_rng_alone(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    first = write_tiny_weights(tmp_path / "a", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # a caller's seeded run stays reproducible
    second = write_tiny_weights(tmp_path / "b", seed=0)
    other = write_tiny_weights(tmp_path / "c", seed=1)

    hashes = file_hashes(first)
    assert sum(p.stat().st_size for p in first.rglob("*") if p.is_file()) < 64 * 1024 * 1024
    assert set(TENSOR_FILES) <= set(hashes)
    assert file_hashes(second) == hashes  # same relative files, same bytes
    other_hashes = file_hashes(other)
    assert set(other_hashes) == set(hashes)
    assert [f for f in TENSOR_FILES if other_hashes[f] == hashes[f]] == []
    # Nothing is left behind but the three parts (the staging folder is removed).
    assert sorted(p.name for p in first.iterdir()) == sorted((*PARTS, "licenses.json"))


def test_tiny_weights_rewrite_replaces_the_parts(tmp_path: Path) -> None:
    write_tiny_weights(tmp_path, seed=1)
    (tmp_path / "sdxl" / "stale.txt").write_text("left over")
    write_tiny_weights(tmp_path, seed=0)
    assert not (tmp_path / "sdxl" / "stale.txt").exists()
    fresh = write_tiny_weights(tmp_path / "fresh", seed=0)
    assert file_hashes(tmp_path / "sdxl") == file_hashes(fresh / "sdxl")


def test_tiny_sdxl_folder_is_a_published_style_diffusers_folder(tiny_weights: Path) -> None:
    sdxl = tiny_weights / "sdxl"
    index = json.loads((sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    for sub in SDXL_SUBFOLDERS:
        assert (sdxl / sub).is_dir(), sub
        assert sub in index, sub
    for sub in ("unet", "vae"):
        assert (sdxl / sub / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert scheduler["timestep_spacing"] == "leading" and scheduler["steps_offset"] == 1
    assert sorted(p.name for p in (tiny_weights / "antelopev2").iterdir()) == sorted(ANTELOPEV2_FILES)


def test_tiny_identitynet_config_has_the_published_size_independent_values(tiny_weights: Path) -> None:
    folder = tiny_weights / "instantid" / "ControlNetModel"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    published = {
        "_class_name": "ControlNetModel",
        "addition_embed_type": "text_time",
        "conditioning_channels": 3,
        "use_linear_projection": True,
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
        "in_channels": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    assert {k: config.get(k) for k in published} == published
    assert len(config["conditioning_embedding_out_channels"]) == 4  # [16, 32, 96, 256] in the real file

    # The same relations as the real files: IdentityNet mirrors the UNet; the UNet's sizes follow the encoders
    # (2048 = 768 + 1280 cross-attention; 2816 = 1280 pooled + 6 x 256 time ids).
    unet = json.loads((tiny_weights / "sdxl" / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block"):
        assert config[key] == unet[key], key
    text = json.loads((tiny_weights / "sdxl" / "text_encoder" / "config.json").read_text())
    text_2 = json.loads((tiny_weights / "sdxl" / "text_encoder_2" / "config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"] + text_2["hidden_size"]
    assert (
        unet["projection_class_embeddings_input_dim"] == text_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    )


def test_tiny_ip_adapter_has_the_published_keys(tiny_weights: Path) -> None:
    state = tiny_ip_adapter(tiny_weights)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert set(state["image_proj"]) == published_image_proj_keys()
    assert all(t.dtype == torch.float32 for part in state.values() for t in part.values())

    # k indexes the UNet's attention processors in attn_processors order; the cross-attention ones (attn2)
    # alternate with self-attention, so they sit at the odd indices.
    unet = UNet2DConditionModel.from_pretrained(tiny_weights / "sdxl" / "unet")
    cross = [k for k, name in enumerate(unet.attn_processors) if name.endswith("attn2.processor")]
    assert cross and all(k % 2 == 1 for k in cross)
    assert len(cross) == len(unet.attn_processors) // 2
    expected = {f"{k}.{proj}.weight" for k in cross for proj in ("to_k_ip", "to_v_ip")}
    assert set(state["ip_adapter"]) == expected
    hidden = {
        name: unet.get_submodule(name.removesuffix(".processor")).to_k.out_features for name in unet.attn_processors
    }
    names = list(unet.attn_processors)
    for k in cross:  # Linear cross_attention_dim -> the layer's hidden size, no bias
        weight = state["ip_adapter"][f"{k}.to_k_ip.weight"]
        assert tuple(weight.shape) == (hidden[names[k]], unet.config.cross_attention_dim)


# -- code written for the real files loads the tiny ones --------------------------------------------------


def test_stock_diffusers_and_transformers_load_the_tiny_folders_strictly(tiny_weights: Path) -> None:
    sdxl = tiny_weights / "sdxl"
    unet, info = UNet2DConditionModel.from_pretrained(sdxl / "unet", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    controlnet, info = ControlNetModel.from_pretrained(
        tiny_weights / "instantid" / "ControlNetModel", output_loading_info=True
    )
    assert not any(info.values()), info
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        _, info = cls.from_pretrained(sdxl / sub, output_loading_info=True)
        assert not any(v for k, v in info.items() if k != "error_msgs"), (sub, info)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer("a photo").input_ids[0] == pipe.tokenizer.bos_token_id

    # The IdentityNet weights are a ControlNet built from this UNet: the same constructor call as for the
    # real file, only with the tiny sizes, loads them strictly.
    rebuilt = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    weights = safetensors.torch.load_file(
        tiny_weights / "instantid" / "ControlNetModel" / "diffusion_pytorch_model.safetensors"
    )
    rebuilt.load_state_dict(weights, strict=True)
    assert torch.equal(
        rebuilt.controlnet_cond_embedding.conv_in.weight, controlnet.controlnet_cond_embedding.conv_in.weight
    )

    # Likewise the resampler and face K/V projections: the published classes, told the smaller sizes.
    state = tiny_ip_adapter(tiny_weights)
    resampler = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=unet.config.cross_attention_dim))
    resampler.load_state_dict(state["image_proj"], strict=True)
    assert ResamplerConfig.from_state_dict(state["image_proj"]) == resampler.config
    install_face_attention(unet).load_state_dict(state["ip_adapter"], strict=True)


def test_load_denoiser_loads_the_tiny_layout(tiny_weights: Path) -> None:
    denoiser = load_denoiser(WeightsLayout.from_root(tiny_weights), device="cpu", dtype="float32")
    assert isinstance(denoiser, InstantIDDenoiser)


# -- loading errors -------------------------------------------------------------------------------------


def link_parts(root: Path, tiny_weights: Path, *, except_: tuple[str, ...] = ()) -> Path:
    """A weights root whose parts link to the tiny ones, except the named parts (left for the test to build)."""
    root.mkdir(parents=True, exist_ok=True)
    for part in ("sdxl", "instantid", "antelopev2"):
        if part not in except_:
            (root / part).symlink_to(tiny_weights / part, target_is_directory=True)
    return root


def instantid_with(root: Path, tiny_weights: Path, ip_adapter: object | None) -> WeightsLayout:
    """A layout whose InstantID folder has the tiny IdentityNet and ``ip_adapter`` (torch.save'd) or none."""
    link_parts(root, tiny_weights, except_=("instantid",))
    (root / "instantid").mkdir()
    (root / "instantid" / "ControlNetModel").symlink_to(tiny_weights / "instantid" / "ControlNetModel")
    if ip_adapter is not None:
        torch.save(ip_adapter, root / "instantid" / "ip-adapter.bin")
    return WeightsLayout.from_root(root)


def test_missing_unet_names_it_and_the_layout(tmp_path: Path, tiny_weights: Path) -> None:
    root = link_parts(tmp_path / "w", tiny_weights, except_=("sdxl",))
    (root / "sdxl").mkdir()
    for entry in (tiny_weights / "sdxl").iterdir():
        if entry.name != "unet":
            (root / "sdxl" / entry.name).symlink_to(entry)
    with pytest.raises(WeightsError) as err:
        load_denoiser(WeightsLayout.from_root(root), device="cpu")
    message = str(err.value)
    assert "missing unet" in message
    assert "model_index.json" in message and all(sub in message for sub in DENOISER_COMPONENTS)


def test_missing_ip_adapter_names_it_and_the_published_layout(tmp_path: Path, tiny_weights: Path) -> None:
    layout = instantid_with(tmp_path / "w", tiny_weights, None)
    with pytest.raises(WeightsError) as err:
        load_denoiser(layout, device="cpu")
    message = str(err.value)
    assert "lacks ip-adapter.bin" in message and "InstantX/InstantID" in message
    assert "ControlNetModel" in message  # found: the folder's contents
    with pytest.raises(WeightsError, match="does not exist"):
        load_ip_adapter(layout.ip_adapter)


UNPICKLED = False  # set by _mark_unpickled: only ever True if a loader executed the pickled payload


def _mark_unpickled() -> str:
    global UNPICKLED
    UNPICKLED = True
    return "code ran"


class Payload:
    """Unpickling this calls _mark_unpickled: stands in for arbitrary code in a hostile ip-adapter.bin."""

    def __reduce__(self):
        return (_mark_unpickled, ())


def test_ip_adapter_with_a_pickled_object_is_refused_without_running_it(tmp_path: Path, tiny_weights: Path) -> None:
    global UNPICKLED
    state = tiny_ip_adapter(tiny_weights)
    hostile = {"image_proj": state["image_proj"], "ip_adapter": {**state["ip_adapter"], "extra": Payload()}}
    layout = instantid_with(tmp_path / "w", tiny_weights, hostile)
    UNPICKLED = False
    with pytest.raises(WeightsError, match="not a loadable tensor file"):
        load_denoiser(layout, device="cpu")
    assert UNPICKLED is False
    # The payload is live: a plain unpickling does run it (so the check above means something).
    try:
        loaded = torch.load(layout.ip_adapter, weights_only=False)
        assert loaded["ip_adapter"]["extra"] == "code ran" and UNPICKLED is True
    finally:
        UNPICKLED = False


def test_ip_adapter_with_a_missing_key_is_refused_naming_it(tmp_path: Path, tiny_weights: Path) -> None:
    state = tiny_ip_adapter(tiny_weights)
    key = sorted(state["ip_adapter"])[-1]
    del state["ip_adapter"][key]
    layout = instantid_with(tmp_path / "w", tiny_weights, state)
    with pytest.raises(WeightsError, match="ip_adapter weights do not match") as err:
        load_denoiser(layout, device="cpu")
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda s: {"image_proj": s["image_proj"]}, "exactly 'image_proj' and 'ip_adapter'"),
        (lambda s: {0: s["image_proj"], "ip_adapter": s["ip_adapter"]}, "exactly 'image_proj' and 'ip_adapter'"),
        (lambda s: [s["image_proj"], s["ip_adapter"]], "exactly 'image_proj' and 'ip_adapter'"),
        (lambda s: {"image_proj": torch.zeros(3), "ip_adapter": s["ip_adapter"]}, "'image_proj' must be a state dict"),
        (lambda s: {"image_proj": s["image_proj"], "ip_adapter": [1, 2]}, "'ip_adapter' must be a state dict"),
        (lambda s: {**s, "ip_adapter": {**s["ip_adapter"], "x": 1}}, "'ip_adapter' must be a state dict"),
    ],
    ids=["no ip_adapter", "int key", "a list", "tensor image_proj", "list ip_adapter", "non-tensor value"],
)
def test_ip_adapter_of_the_wrong_shape_is_refused(tmp_path: Path, tiny_weights: Path, content, message: str) -> None:
    layout = instantid_with(tmp_path / "w", tiny_weights, content(tiny_ip_adapter(tiny_weights)))
    with pytest.raises(WeightsError, match=message):
        load_denoiser(layout, device="cpu")


def test_resampler_width_not_matching_the_unet_is_refused(tmp_path: Path, tiny_weights: Path) -> None:
    state = tiny_ip_adapter(tiny_weights)
    unet_width = json.loads((tiny_weights / "sdxl" / "unet" / "config.json").read_text())["cross_attention_dim"]
    other = Resampler(ResamplerConfig(dim=128, heads=2, output_dim=unet_width // 2)).state_dict()
    layout = instantid_with(tmp_path / "w", tiny_weights, {"image_proj": other, "ip_adapter": state["ip_adapter"]})
    with pytest.raises(WeightsError, match="do not belong together") as err:
        load_denoiser(layout, device="cpu")
    assert f"{unet_width // 2}-d" in str(err.value) and str(unet_width) in str(err.value)


# -- sources --------------------------------------------------------------------------------------------


def test_local_source_resolves_to_itself(tiny_weights: Path) -> None:
    assert resolve_source(tiny_weights / "sdxl") == tiny_weights / "sdxl"
    assert resolve_source(str(tiny_weights / "sdxl")) == tiny_weights / "sdxl"
    layout = WeightsLayout.resolve(tiny_weights)
    assert layout == WeightsLayout.from_root(tiny_weights)


@pytest.mark.parametrize("relative", ["missing", "./weights/sdxl", "deep/er/sdxl"])
def test_missing_path_is_an_error_not_a_hub_lookup(tmp_path: Path, relative: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for source in (relative, str(tmp_path / relative)):
        with pytest.raises(WeightsError, match="does not exist"):
            resolve_source(source, what="sdxl")


def test_no_root_and_no_source_is_an_error() -> None:
    with pytest.raises(WeightsError, match="no source for sdxl"):
        WeightsLayout.resolve(instantid="x", antelopev2="y")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in tmp, offline. huggingface_hub reads HF_HUB_OFFLINE once at import (into
    ``constants.HF_HUB_OFFLINE``, which ``is_offline_mode()`` returns), so patch that too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repo_not_in_the_cache_offline_is_an_error_naming_the_hub(offline_hub: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        resolve_source("someone/sdxl-finetune", what="sdxl")
    message = str(err.value)
    assert "Hugging Face hub" in message and "someone/sdxl-finetune" in message and "HF_HUB_OFFLINE" in message
    assert time.perf_counter() - start < 10  # no network attempt
    assert list(offline_hub.iterdir()) == []


def build_hub_cache(cache: Path, repo: str, source: Path) -> Path:
    """The hub cache layout huggingface_hub writes: blobs, snapshots/<commit>/ of symlinks, refs/main."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for file in sorted(source.rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_repo_in_the_cache_resolves_offline_and_loads(offline_hub: Path, tiny_weights: Path) -> None:
    snapshot = build_hub_cache(offline_hub, "owner/name", tiny_weights / "sdxl")
    assert resolve_source("owner/name", what="sdxl").resolve() == snapshot.resolve()
    layout = WeightsLayout.resolve(
        sdxl="owner/name", instantid=str(tiny_weights / "instantid"), antelopev2=str(tiny_weights / "antelopev2")
    )
    assert layout.sdxl.resolve() == snapshot.resolve()
    assert layout.instantid == tiny_weights / "instantid"
    assert isinstance(load_denoiser(layout, device="cpu", dtype="float32"), InstantIDDenoiser)


@pytest.fixture(scope="module")
def s3_weights(embedded_s3: EmbeddedS3, tiny_weights: Path) -> str:
    """The tiny weights uploaded to the embedded SeaweedFS; returns the s3:// root."""
    client = embedded_s3.client()
    prefix = "weights-test"
    for file in sorted(tiny_weights.rglob("*")):
        if file.is_file():
            client.upload_file(str(file), embedded_s3.bucket, f"{prefix}/{file.relative_to(tiny_weights).as_posix()}")
    return f"s3://{embedded_s3.bucket}/{prefix}"


@pytest.fixture
def s3_env(embedded_s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_source builds its client from the standard environment, as on a cluster node."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in embedded_s3.env().items():
        monkeypatch.setenv(name, value)


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.usefixtures("s3_env")
def test_s3_weights_are_copied_once_into_the_cache_and_load(
    s3_weights: str, tiny_weights: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    layout = WeightsLayout.resolve(s3_weights, cache_dir=cache)
    parts = {"sdxl": layout.sdxl, "instantid": layout.instantid, "antelopev2": layout.antelopev2}
    assert sorted(visible_dirs(cache / "s3")) == sorted(parts.values())
    for part, folder in parts.items():
        copied = file_hashes(folder)
        assert COMPLETE_MARKER in copied, part
        del copied[COMPLETE_MARKER]
        assert copied == file_hashes(tiny_weights / part), part
    assert isinstance(load_denoiser(layout, device="cpu", dtype="float32"), InstantIDDenoiser)
    load_face_analyzer(layout)

    before = file_stats(cache)
    again = WeightsLayout.resolve(s3_weights, cache_dir=cache)
    assert again == layout
    assert file_stats(cache) == before  # nothing downloaded again (same inodes and mtimes)


@pytest.mark.slow
@pytest.mark.usefixtures("s3_env")
def test_s3_resolve_of_one_part_downloads_only_that_part(s3_weights: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layout = WeightsLayout.resolve(s3_weights, cache_dir=cache, parts=("antelopev2",))
    assert visible_dirs(cache / "s3") == [layout.antelopev2]
    assert sorted(p.name for p in layout.antelopev2.iterdir()) == sorted((*ANTELOPEV2_FILES, COMPLETE_MARKER))
    assert not layout.sdxl.exists() and cache not in layout.sdxl.parents
    load_face_analyzer(layout)


@pytest.mark.slow
@pytest.mark.usefixtures("s3_env")
def test_s3_sdxl_components_copy_only_what_each_replica_reads(
    s3_weights: str, tiny_weights: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    prompt = WeightsLayout.resolve(s3_weights, cache_dir=cache, parts=("sdxl",), sdxl_components=PROMPT_COMPONENTS)
    copied = set(file_hashes(prompt.sdxl)) - {COMPLETE_MARKER}
    expected = {
        f for f in file_hashes(tiny_weights / "sdxl") if f.split("/")[0] in (*PROMPT_COMPONENTS, "model_index.json")
    }
    assert copied == expected and not (prompt.sdxl / "unet").exists()
    encoder = load_prompt_encoder(prompt, device="cpu", dtype="float32")
    assert encoder.encode(["a photo"], [None], True)[0].embeds.shape[0] == 77
    with pytest.raises(WeightsError, match="missing unet, vae, scheduler"):
        load_denoiser(prompt, device="cpu", dtype="float32")

    before = file_stats(prompt.sdxl)
    denoise = WeightsLayout.resolve(
        s3_weights, cache_dir=cache, parts=("sdxl", "instantid"), sdxl_components=DENOISER_COMPONENTS
    )
    assert denoise.sdxl != prompt.sdxl  # its own cache folder: neither replaces the other's copy
    assert {p.name for p in denoise.sdxl.iterdir()} == {"unet", "vae", "scheduler", "model_index.json", COMPLETE_MARKER}
    assert isinstance(load_denoiser(denoise, device="cpu", dtype="float32"), InstantIDDenoiser)
    assert file_stats(prompt.sdxl) == before
    with pytest.raises(ValueError, match="unknown SDXL components"):
        WeightsLayout.resolve(s3_weights, cache_dir=cache, parts=("sdxl",), sdxl_components=("unet", "refiner"))


@pytest.mark.slow
@pytest.mark.usefixtures("s3_env")
def test_s3_prefix_with_nothing_under_it_is_a_weights_error(embedded_s3: EmbeddedS3, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="could not copy sdxl from s3://") as err:
        resolve_source(f"s3://{embedded_s3.bucket}/no-such-weights/sdxl", tmp_path, what="sdxl")
    assert "no objects under" in str(err.value)
    assert not (tmp_path / "s3").exists() or visible_dirs(tmp_path / "s3") == []
