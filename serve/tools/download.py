"""``instantid weights download DIR``: the real weights into the layout ``instantid weights tiny`` writes.

Sources (Hugging Face hub): ``InstantX/InstantID`` (IdentityNet + ip-adapter.bin), an SDXL base in
diffusers format, and a repo holding the five antelopev2 .onnx files (insightface's own download URL is
dead); the LoRAs of the fast-mode presets (LCM-LoRA SDXL, SDXL-Lightning 8-step, Hyper-SDXL 8-step CFG) into
``loras/``; the extra ControlNets of the InstantID multi-ControlNet demo into ``controlnets/{pose,canny,depth}/``
and a depth estimator into ``depth/``. Every LFS file's sha256, which the hub publishes, is checked after download.
``licenses.json`` records each part's repo and its publisher's licence (``instantid weights licenses`` prints it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from deployments.instantid.catalogue import LORAS_DIR, PRESET_LORA_FILES
from deployments.instantid.errors import WeightsError
from deployments.instantid.faces import ANTELOPEV2_FILES
from deployments.instantid.licenses import published, write_manifest

INSTANTID_REPO = "InstantX/InstantID"
INSTANTID_FILES = (
    "ControlNetModel/config.json",
    "ControlNetModel/diffusion_pytorch_model.safetensors",
    "ip-adapter.bin",
)
# The fast-mode presets' LoRAs, from their publishers: (repo, file in it), stored as WEIGHTS/loras/<preset name>.
PRESET_LORA_SOURCES = {
    "lcm-lora-sdxl": ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
    "sdxl-lightning-8step": ("ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors"),
    "hyper-sdxl-8step-cfg": ("ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors"),
}
# The extra ControlNets the InstantID demo uses, from their publishers: (repo, its safetensors weights file), stored
# as WEIGHTS/controlnets/<name>/{config.json, diffusion_pytorch_model.safetensors}. The openpose repo keeps its
# diffusers-layout weights as safetensors under another name (its diffusion_pytorch_model file is a pickle).
CONTROLNET_SOURCES = {
    "pose": ("thibaud/controlnet-openpose-sdxl-1.0", "OpenPoseXL2.safetensors"),
    "canny": ("diffusers/controlnet-canny-sdxl-1.0", "diffusion_pytorch_model.safetensors"),
    "depth": ("diffusers/controlnet-depth-sdxl-1.0-small", "diffusion_pytorch_model.safetensors"),
}
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Depth Anything V2 Small (Apache-2.0): sharper and ~5x smaller than the demo's DPT-Hybrid MiDaS, same kind of
# output (relative inverse depth, near is bright), which is what the depth ControlNet was trained on.
DEFAULT_DEPTH_REPO = "depth-anything/Depth-Anything-V2-Small-hf"
DEPTH_PATTERNS = ("config.json", "preprocessor_config.json", "model.safetensors")
SDXL_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(repo: str, dest: Path, patterns: tuple[str, ...], rename: dict[str, str] | None = None) -> None:
    """Copy the files of ``repo`` matching ``patterns`` under ``dest`` (``rename``: repo file -> local name),
    each checked against the sha256 the hub publishes for it."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo, files_metadata=True)
        snapshot = Path(snapshot_download(repo_id=repo, allow_patterns=list(patterns)))
    except Exception as exc:  # offline, no such repo, gated repo without a token
        raise WeightsError(f"cannot download {repo} from the Hugging Face hub: {type(exc).__name__}: {exc}") from None
    wanted = [s for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in patterns)]
    if not wanted:
        raise WeightsError(f"{repo} has none of the expected files ({', '.join(patterns)})")
    for sibling in wanted:
        source = snapshot / sibling.rfilename
        expected = getattr(getattr(sibling, "lfs", None), "sha256", None)
        if expected and _sha256(source) != expected:
            raise WeightsError(f"{repo}/{sibling.rfilename}: sha256 mismatch (corrupted download)")
        target = dest / (rename or {}).get(sibling.rfilename, sibling.rfilename)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def download_real_weights(
    directory: Path, *, sdxl_repo: str, antelopev2_repo: str, depth_repo: str = DEFAULT_DEPTH_REPO
) -> Path:
    """Download into ``directory/{sdxl,instantid,antelopev2,loras,controlnets,depth}``; one clear error when
    offline."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsError("HF_HUB_OFFLINE=1: cannot download weights (copy them into the layout instead)")
    directory = Path(directory)
    _fetch(INSTANTID_REPO, directory / "instantid", INSTANTID_FILES)
    _fetch(sdxl_repo, directory / "sdxl", SDXL_PATTERNS)
    _fetch(antelopev2_repo, directory / "antelopev2", tuple(f"*{name}" for name in ANTELOPEV2_FILES))
    for name, (repo, file) in PRESET_LORA_SOURCES.items():
        _fetch(repo, directory / LORAS_DIR, (file,), rename={file: PRESET_LORA_FILES[name]})
    for name, (repo, file) in CONTROLNET_SOURCES.items():
        _fetch(repo, directory / "controlnets" / name, ("config.json", file), rename={file: CONTROLNET_WEIGHTS})
    _fetch(depth_repo, directory / "depth", DEPTH_PATTERNS)
    nested = [p for p in (directory / "antelopev2").rglob("*.onnx") if p.parent != directory / "antelopev2"]
    for path in nested:  # repos that keep the files in a subfolder: flatten into the expected layout
        path.replace(directory / "antelopev2" / path.name)
    origins = {"sdxl": sdxl_repo, "instantid": INSTANTID_REPO, "antelopev2": antelopev2_repo, "depth": depth_repo}
    origins |= {f"{LORAS_DIR}/{PRESET_LORA_FILES[name]}": repo for name, (repo, _) in PRESET_LORA_SOURCES.items()}
    origins |= {f"controlnets/{name}": repo for name, (repo, _) in CONTROLNET_SOURCES.items()}
    write_manifest(directory, {path: (repo, published(repo)) for path, repo in origins.items()})
    return directory
