"""The licence of every weight source a deployment loads, from its config, and the start-up refusal.

Each source's terms, first match wins: what its catalogue entry states (``license``, ``license_url``,
``commercial_use``) or ``licenses.parts`` for the weights' own parts; a hub repo the licence table knows; a path under
the weights root by what the root holds (``licenses.weights``: ``published``, each part as ``instantid weights
download`` fetches it by default, or ``tiny``, this project's random weights); anything else is unknown.

:func:`check_licenses` runs when the app is built (``serve/app.py``), so a deployment that would serve a
non-commercial or unknown source refuses to start, naming each one, unless ``licenses.accept_noncommercial`` is true:
before any replica or GPU node starts. Reads the config only (the weights may be in S3).
"""

from __future__ import annotations

from deployments.instantid.catalogue import (
    LORAS_DIR,
    PRESET_LORA_FILES,
    PRESET_MODES,
    BaseModelSpec,
    LoraSpec,
    WeightsSource,
)
from deployments.instantid.errors import LicenseNotAccepted
from deployments.instantid.licenses import (
    PUBLISHED,
    SAFETY_MODEL,
    TINY,
    UNKNOWN,
    LicenseTerms,
    SourceLicense,
    not_commercial,
    published,
)
from serve.config import AppConfig

# The weights root's own parts as `instantid weights download` fetches them by default (a test checks that this
# table and serve/tools/download.py name the same repos).
DEFAULT_LAYOUT_REPOS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "instantid": "InstantX/InstantID",
    "antelopev2": "DIAMONIK7777/antelopev2",
    f"{LORAS_DIR}/{PRESET_LORA_FILES['lcm-lora-sdxl']}": "latent-consistency/lcm-lora-sdxl",
    f"{LORAS_DIR}/{PRESET_LORA_FILES['sdxl-lightning-8step']}": "ByteDance/SDXL-Lightning",
    f"{LORAS_DIR}/{PRESET_LORA_FILES['hyper-sdxl-8step-cfg']}": "ByteDance/Hyper-SD",
    "controlnets/pose": "thibaud/controlnet-openpose-sdxl-1.0",
    "controlnets/canny": "diffusers/controlnet-canny-sdxl-1.0",
    "controlnets/depth": "diffusers/controlnet-depth-sdxl-1.0-small",
    "depth": "depth-anything/Depth-Anything-V2-Small-hf",
}


class _Terms:
    """The rules above, for one config."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config

    def layout(self, path: str) -> LicenseTerms:
        """A path under the weights root."""
        if self.config.licenses.weights == "tiny":
            return TINY
        repo = DEFAULT_LAYOUT_REPOS.get(path.strip("/").removeprefix("./"))
        return UNKNOWN if repo is None else published(repo)

    def source(self, source: str) -> LicenseTerms:
        """A source string: under the root when relative, a known hub repo, else unknown."""
        if source in PUBLISHED:
            return PUBLISHED[source]
        if source.startswith(("s3://", "/", "~")) or self.config.weights.root is None:
            return UNKNOWN
        return self.layout(source)

    def entry(self, spec: BaseModelSpec | LoraSpec | WeightsSource) -> LicenseTerms:
        if spec.terms is not None:
            return spec.terms
        return published(spec.repo) if spec.repo is not None else self.source(str(spec.source))

    def part(self, name: str) -> LicenseTerms:
        """``sdxl``, ``instantid`` or ``antelopev2``: stated, or its own source, or the root's."""
        stated = self.config.licenses.parts.get(name)  # type: ignore[call-overload]
        if stated is not None:
            return stated
        own = getattr(self.config.weights, name)
        return self.layout(name) if own is None else self.source(own)


def weight_licenses(config: AppConfig) -> list[SourceLicense]:
    """Every weight source the deployment loads, with its terms: bases, LoRAs, extra ControlNets, IdentityNet and
    the face adapter, antelopev2, the depth model (when the depth ControlNet is loaded), the safety model (unless the
    check is off)."""
    terms = _Terms(config)
    models = config.models
    bases = {"sdxl": terms.part("sdxl")} | {name: terms.entry(spec) for name, spec in models.base_models.items()}
    preset_loras = {mode.lora for preset in models.presets if (mode := PRESET_MODES[preset]).lora is not None}
    loras = {name: terms.layout(f"{LORAS_DIR}/{PRESET_LORA_FILES[name]}") for name in sorted(preset_loras)}
    loras |= {name: terms.entry(spec) for name, spec in models.loras.items()}
    sources = [SourceLicense.of("base", name, t) for name, t in sorted(bases.items())]
    sources += [SourceLicense.of("lora", name, t) for name, t in sorted(loras.items())]
    controlnets = config.denoiser.controlnets
    sources += [SourceLicense.of("controlnet", name, terms.entry(spec)) for name, spec in sorted(controlnets.items())]
    sources.append(SourceLicense.of("identitynet", "instantid", terms.part("instantid")))
    sources.append(SourceLicense.of("face", "antelopev2", terms.part("antelopev2")))
    depth = config.control_maps.depth_model
    if depth is not None and "depth" in controlnets:
        sources.append(SourceLicense.of("depth", "depth", terms.entry(depth)))
    if config.safety.policy != "off":
        sources.append(SourceLicense.of("safety", "open_nsfw", SAFETY_MODEL))
    return sources


def check_licenses(config: AppConfig) -> list[SourceLicense]:
    """The deployment's sources; :class:`LicenseNotAccepted` naming each one whose licence does not allow commercial
    use (or does not say), unless the config accepts them."""
    sources = weight_licenses(config)
    refused = not_commercial(sources)
    if refused and not config.licenses.accept_noncommercial:
        named = "; ".join(
            f"{s.label}: {s.license}, commercial use {s.commercial_use}" + (f" ({s.url})" if s.url else "")
            for s in refused
        )
        raise LicenseNotAccepted(
            f"{len(refused)} weight source(s) do not allow commercial use or do not say: {named}. Replace them, state "
            "their licence in the config if it is known, or set licenses.accept_noncommercial: true to serve them "
            "anyway (for research, or under a licence you hold)."
        )
    return sources
