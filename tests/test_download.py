"""``instantid weights download`` against a stand-in for the hub's two calls (no network here): every file is
checked against the sha256 the hub publishes, and lands where the layout expects it, preset LoRAs included."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from deployments.instantid.catalogue import PRESET_LORA_FILES
from deployments.instantid.errors import WeightsError
from serve.tools import download


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``repos`` (repo -> {file: bytes}) and ``corrupt`` ((repo, file) pairs served with a changed byte): the hub's
    ``model_info`` publishes the sha256 of each file as stored, ``snapshot_download`` serves them."""
    repos: dict[str, dict[str, bytes]] = {}
    corrupt: set[tuple[str, str]] = set()

    def model_info(self, repo: str, files_metadata: bool = False):
        siblings = [
            SimpleNamespace(rfilename=name, lfs=SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()))
            for name, data in repos[repo].items()
        ]
        return SimpleNamespace(siblings=siblings)

    def snapshot_download(repo_id: str, allow_patterns: list[str]):
        from fnmatch import fnmatch

        folder = tmp_path / "hub" / repo_id
        for name, data in repos[repo_id].items():
            if any(fnmatch(name, p) for p in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data + (b"!" if (repo_id, name) in corrupt else b""))
        return str(folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return {"repos": repos, "corrupt": corrupt}


def _publish_everything(repos: dict[str, dict[str, bytes]]) -> None:
    repos[download.INSTANTID_REPO] = {name: name.encode() for name in download.INSTANTID_FILES}
    repos["sdxl/base"] = {"model_index.json": b"{}", "unet/config.json": b"{}", "unet/extra.bin": b"not wanted"}
    repos["faces/antelopev2"] = {f"antelopev2/{n}": n.encode() for n in ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
    for name, (repo, file) in download.PRESET_LORA_SOURCES.items():
        repos[repo] = {file: f"lora {name}".encode(), "README.md": b"not wanted"}
    for name, (repo, file) in download.CONTROLNET_SOURCES.items():
        repos[repo] = {
            "config.json": f"{name} config".encode(),
            file: name.encode(),
            "diffusion_pytorch_model.fp16.safetensors": b"not wanted",
            "diffusion_pytorch_model.bin": b"a pickle: never fetched",
        }
    repos[download.DEFAULT_DEPTH_REPO] = {
        "config.json": b"{}",
        "preprocessor_config.json": b"{}",
        "model.safetensors": b"depth",
        "README.md": b"not wanted",
    }


def test_download_writes_the_layout_with_the_preset_loras_under_their_names(hub, tmp_path: Path) -> None:
    _publish_everything(hub["repos"])
    out = download.download_real_weights(tmp_path / "w", sdxl_repo="sdxl/base", antelopev2_repo="faces/antelopev2")
    assert (out / "instantid" / "ip-adapter.bin").read_bytes() == b"ip-adapter.bin"
    assert (out / "sdxl" / "unet" / "config.json").is_file() and not (out / "sdxl" / "unet" / "extra.bin").exists()
    assert (out / "antelopev2" / "glintr100.onnx").is_file()  # flattened out of the repo's subfolder
    assert sorted(p.name for p in (out / "loras").iterdir()) == sorted(PRESET_LORA_FILES.values())
    for name, file in PRESET_LORA_FILES.items():
        assert (out / "loras" / file).read_bytes() == f"lora {name}".encode()
    for name in ("pose", "canny", "depth"):
        folder = out / "controlnets" / name
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == name.encode()
    assert sorted(p.name for p in (out / "depth").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_a_file_whose_sha256_differs_from_the_published_one_is_refused(hub, tmp_path: Path) -> None:
    _publish_everything(hub["repos"])
    repo, file = download.PRESET_LORA_SOURCES["sdxl-lightning-8step"]
    hub["corrupt"].add((repo, file))
    with pytest.raises(WeightsError, match=f"{repo}/{file}: sha256 mismatch"):
        download.download_real_weights(tmp_path / "w", sdxl_repo="sdxl/base", antelopev2_repo="faces/antelopev2")
