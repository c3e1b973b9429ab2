"""Where weights come from and how they are laid out.

One layout for tiny and real weights alike::

    WEIGHTS/sdxl/                       a diffusers SDXL folder (any SDXL checkpoint, finetunes too)
    WEIGHTS/instantid/ControlNetModel/  config.json + diffusion_pytorch_model.safetensors (IdentityNet)
    WEIGHTS/instantid/ip-adapter.bin    {'image_proj': resampler, 'ip_adapter': face K/V projections}
    WEIGHTS/antelopev2/                 the five insightface .onnx files

Each part may instead come from its own source: a local folder, a Hugging Face repo id (the hub cache;
``HF_HUB_OFFLINE=1`` is respected) or an ``s3://bucket/prefix`` copied once into a local cache.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError

PARTS = ("sdxl", "instantid", "antelopev2")
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# The files each SDXL component is read from, as hub/S3 patterns (fnmatch on the folder-relative path).
# Weights are safetensors only; "*" after the stem admits fp16 variants and sharded files with their index.
SDXL_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("unet/config.json", "unet/diffusion_pytorch_model*.safetensors*"),
    "vae": ("vae/config.json", "vae/diffusion_pytorch_model*.safetensors*"),
    "text_encoder": ("text_encoder/config.json", "text_encoder/model*.safetensors*"),
    "text_encoder_2": ("text_encoder_2/config.json", "text_encoder_2/model*.safetensors*"),
    "tokenizer": ("tokenizer/*",),
    "tokenizer_2": ("tokenizer_2/*",),
    "scheduler": ("scheduler/scheduler_config.json",),
}
# What each GPU replica reads: a prompt replica never needs the 5-10 GB UNet, a denoiser no text encoder.
DENOISER_COMPONENTS = ("unet", "vae", "scheduler")
PROMPT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def sdxl_patterns(components: tuple[str, ...]) -> tuple[str, ...]:
    """The file patterns of ``components`` of an SDXL folder, plus its ``model_index.json``."""
    unknown = sorted(set(components) - set(SDXL_FILES))
    if unknown:
        raise ValueError(f"unknown SDXL components {unknown}; known: {', '.join(SDXL_FILES)}")
    return ("model_index.json", *(pattern for c in components for pattern in SDXL_FILES[c]))


CONTROLNET_DIR = "ControlNetModel"
IP_ADAPTER_FILE = "ip-adapter.bin"


def default_cache_dir() -> Path:
    """Node-local cache for weights copied from S3 (``INSTANTID_CACHE`` or ~/.cache/instantid)."""
    return Path(os.environ.get("INSTANTID_CACHE", Path.home() / ".cache" / "instantid"))


def _s3_client(uri: str):
    """A client for weight copies: the standard credential chain and endpoint (``AWS_ENDPOINT_URL[_S3]``), long
    read timeouts (weight files are gigabytes)."""
    from deployments.storage.s3 import S3Settings, make_client, parse_s3_uri

    bucket, _ = parse_s3_uri(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    settings = S3Settings(
        bucket=bucket,
        endpoint_url=endpoint,
        region=region,
        read_timeout_s=120,
        addressing_style="path" if endpoint else "auto",
    )
    return make_client(settings)


def _cache_folder(cache_dir: str | Path | None, selection: str) -> Path:
    # A different selection is a different cache folder: replicas of different kinds on one node must not keep
    # replacing each other's copy.
    digest = hashlib.sha256(selection.encode()).hexdigest()[:16]
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "s3" / digest


def is_file_source(source: str | Path) -> bool:
    """A single weights file (a single-file base, a LoRA) rather than a folder."""
    return str(source).endswith(".safetensors")


def resolve_source(
    source: str | Path,
    cache_dir: str | Path | None = None,
    *,
    what: str = "weights",
    patterns: tuple[str, ...] | None = None,
) -> Path:
    """A local folder (or ``.safetensors`` file) for ``source``: an existing path, ``s3://bucket/prefix`` (or
    ``/key.safetensors``), or a hub repo id.

    Anything that is neither an existing path nor ``s3://`` and looks like ``owner/name`` is a hub repo id;
    a path-like string that does not exist is an error (we never guess). ``patterns`` limit what an S3 or
    hub folder copies (a hub SDXL repo holds every weight format several times over); a local folder is
    used as it is.
    """
    text = str(source)
    if text.startswith("s3://"):
        from deployments.storage.s3 import download_object, download_prefix

        selection = text if patterns is None else text + "\0" + "\0".join(patterns)
        dest = _cache_folder(cache_dir, selection)
        try:
            client = _s3_client(text)
            if is_file_source(text):
                return download_object(client, text, dest)
            return download_prefix(client, text, dest, patterns)
        except Exception as exc:
            raise WeightsError(f"could not copy {what} from {text}: {exc}") from exc
    path = Path(text).expanduser()
    if path.exists():
        return path
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_repo:
        raise WeightsError(f"{what} {path} does not exist")
    return resolve_hub(text, what=what, patterns=patterns)


def resolve_hub(repo: str, file: str | None = None, *, what: str, patterns: tuple[str, ...] | None = None) -> Path:
    """A hub repo (or one ``file`` of it) in the local hub cache, downloaded unless ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if file is not None:
            return Path(hf_hub_download(repo_id=repo, filename=file, cache_dir=os.environ.get("HF_HUB_CACHE")))
        allow = list(patterns) if patterns is not None else None
        return Path(snapshot_download(repo_id=repo, cache_dir=os.environ.get("HF_HUB_CACHE"), allow_patterns=allow))
    except Exception as exc:  # offline mode, missing repo, no network
        raise WeightsError(
            f"could not get {what} from the Hugging Face hub repo {repo!r} ({type(exc).__name__}: {exc}); "
            "with HF_HUB_OFFLINE=1 the repo must already be in the hub cache"
        ) from exc


def check_source(source: str, *, what: str) -> None:
    """Fail with ``what`` named when a local or ``s3://`` source does not exist, without copying anything.

    Run when a replica starts, so that a catalogue typo fails the deploy instead of a request. Hub repos are
    checked when they are fetched (offline, only the hub cache can be asked, which a later download may fill).
    """
    if source.startswith("s3://"):
        from deployments.storage.s3 import is_not_found, parse_s3_uri

        bucket, key = parse_s3_uri(source)
        client = _s3_client(source)
        try:
            if is_file_source(source):
                client.head_object(Bucket=bucket, Key=key)
                return
            listed = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        except Exception as exc:
            reason = "it does not exist" if is_not_found(exc) else f"{type(exc).__name__}: {exc}"
            raise WeightsError(f"{what}: {source} cannot be read ({reason})") from None
        if not listed.get("KeyCount"):
            raise WeightsError(f"{what}: nothing under {source}")
        return
    if not Path(source).expanduser().exists():
        raise WeightsError(f"{what}: {source} does not exist")


@dataclass(frozen=True)
class WeightsLayout:
    """Resolved local folders of the three parts."""

    sdxl: Path
    instantid: Path
    antelopev2: Path

    @classmethod
    def from_root(cls, root: str | Path) -> WeightsLayout:
        root = Path(root)
        return cls(root / "sdxl", root / "instantid", root / "antelopev2")

    @classmethod
    def resolve(
        cls,
        root: str | Path | None = None,
        *,
        sdxl: str | None = None,
        instantid: str | None = None,
        antelopev2: str | None = None,
        cache_dir: str | Path | None = None,
        parts: tuple[str, ...] = PARTS,
        sdxl_components: tuple[str, ...] | None = None,
    ) -> WeightsLayout:
        """Each part from its own source when given, else ``root/<part>``, resolved to a local folder.

        Only ``parts`` are fetched (a face-analysis replica needs no SDXL download); the others keep their
        unresolved location and must not be used. ``sdxl_components`` (e.g. :data:`PROMPT_COMPONENTS`)
        limit an S3 or hub SDXL copy to those subfolders' files.
        """
        sdxl_selection = sdxl_patterns(sdxl_components) if sdxl_components is not None else None
        explicit = {"sdxl": sdxl, "instantid": instantid, "antelopev2": antelopev2}
        folders: dict[str, Path] = {}
        for part in PARTS:
            source = explicit[part]
            if source is None:
                if root is None:
                    raise WeightsError(f"no source for {part}: give a weights root or a {part} source")
                source = str(root).rstrip("/") + "/" + part if str(root).startswith("s3://") else Path(root) / part
            if part in parts:
                patterns = sdxl_selection if part == "sdxl" else None
                folders[part] = resolve_source(source, cache_dir, what=part, patterns=patterns)
            else:
                folders[part] = Path(str(source))
        return cls(**folders)

    @property
    def controlnet(self) -> Path:
        return self.instantid / CONTROLNET_DIR

    @property
    def ip_adapter(self) -> Path:
        return self.instantid / IP_ADAPTER_FILE

    def check_sdxl(self, components: tuple[str, ...] = SDXL_SUBFOLDERS) -> None:
        """The SDXL folder has ``model_index.json`` and the ``components`` subfolders (default: all)."""
        missing = [s for s in components if not (self.sdxl / s).is_dir()]
        if missing or not (self.sdxl / "model_index.json").is_file():
            raise WeightsError(
                f"{self.sdxl} is not a diffusers SDXL folder: missing {', '.join(missing) or 'model_index.json'} "
                f"(expected model_index.json and {', '.join(components)}/)"
            )

    def check_instantid(self) -> None:
        wanted = [
            self.controlnet / "config.json",
            self.controlnet / "diffusion_pytorch_model.safetensors",
            self.ip_adapter,
        ]
        missing = [str(p.relative_to(self.instantid)) for p in wanted if not p.is_file()]
        if missing:
            found = sorted(p.name for p in self.instantid.iterdir()) if self.instantid.is_dir() else []
            raise WeightsError(
                f"InstantID folder {self.instantid} lacks {', '.join(missing)} "
                f"(expected {CONTROLNET_DIR}/config.json, {CONTROLNET_DIR}/diffusion_pytorch_model.safetensors "
                f"and {IP_ADAPTER_FILE} as in InstantX/InstantID; found: {found or 'nothing'})"
            )

    def describe(self) -> dict[str, Any]:
        """Model identities for metadata: folder names and the SDXL/IdentityNet config hashes."""

        def config_hash(path: Path) -> str | None:
            return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None

        return {
            "sdxl": str(self.sdxl),
            "sdxl_unet_config": config_hash(self.sdxl / "unet" / "config.json"),
            "identitynet_config": config_hash(self.controlnet / "config.json"),
            "antelopev2": str(self.antelopev2),
        }


def load_ip_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(image_proj, ip_adapter)`` state dicts from ``ip-adapter.bin``, without unpickling objects."""
    if not path.is_file():
        raise WeightsError(f"{path} does not exist (expected the InstantID ip-adapter.bin)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a loadable tensor file: {exc}") from exc
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"}:
        keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
        raise WeightsError(f"{path} must hold exactly 'image_proj' and 'ip_adapter' (found {keys})")
    for name in ("image_proj", "ip_adapter"):
        part = state[name]
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()
        ):
            raise WeightsError(f"{path}: {name!r} must be a state dict of named tensors (got {type(part).__name__})")
    return state["image_proj"], state["ip_adapter"]


def sdxl_variant(folder: Path) -> str | None:
    """``"fp16"`` when a diffusers component folder has only fp16-variant weight files."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    plain = any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in names)
    if not plain and any(".fp16." in n for n in names):
        return "fp16"
    return None
