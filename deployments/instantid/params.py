"""The denoiser's per-request parameters, mapped from the request options (``options.py``) by field name.

A field of :class:`GenerationParams` that has the name of a request option takes the option's value and its
default: adding a sampling option means declaring it in the schema, declaring it here, and reading it in the stage.
The few fields that are resolved rather than copied (the seed, a mode's preset, image-to-image's strength, the
extra ControlNets' windows, the number of people) are set by :meth:`GenerationParams.from_options`.
The module imports nothing heavy, so the ingress and argument parsers read it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import CONTROLNET_NAMES, DEFAULT_CONTROLNET_STRENGTH, GenerationOptions, option_default

if TYPE_CHECKING:
    from .catalogue import ModeSpec


@dataclass(frozen=True)
class ControlSetting:
    """One extra ControlNet of a request: its strength and its window (fractions of the steps it runs)."""

    name: str
    strength: float = DEFAULT_CONTROLNET_STRENGTH
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in CONTROLNET_NAMES:
            raise ValueError(f"unknown ControlNet {self.name!r}; known: {', '.join(CONTROLNET_NAMES)}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"ControlNet {self.name}: need 0 <= start < end <= 1, got {self.start}, {self.end}")


def _option(name: str) -> Any:
    """A dataclass field whose default is the request option's (declared once, in the schema)."""
    return field(default=option_default(name))


@dataclass(frozen=True)
class GenerationParams:
    """Per-request sampling parameters; the defaults are the request schema's (the published InstantID demo's).

    ``width``/``height`` may be left None until face analysis has fixed the output size (``sized``).
    """

    width: int | None = None
    height: int | None = None
    seed: int = 0
    num_images: int = _option("num_images")
    num_inference_steps: int = _option("num_inference_steps")
    guidance_scale: float = _option("guidance_scale")
    guidance_rescale: float = _option("guidance_rescale")
    identitynet_strength: float = _option("identitynet_strength")
    adapter_strength: float = _option("adapter_strength")
    control_guidance_start: float = _option("control_guidance_start")
    control_guidance_end: float = _option("control_guidance_end")
    enhance_face_region: bool = _option("enhance_face_region")
    scheduler: str = _option("scheduler")
    face_noise: float = _option("face_noise")  # CFG negative identity input: face_noise x U(0, 1) instead of zeros
    controlnets: tuple[ControlSetting, ...] = ()  # extra ControlNets, IdentityNet aside
    strength: float | None = None  # image-to-image: how far the init image is noised; None: text-to-image
    identities: int = 1  # people in the image: each brings its own 16 face tokens (the context length grows)

    @classmethod
    def from_options(
        cls,
        options: GenerationOptions,
        seed: int,
        preset: ModeSpec | None = None,
        *,
        img2img: bool = False,
        edit: bool = False,
        identities: int = 1,
    ) -> GenerationParams:
        """The parameters of a request: every field named like an option is copied from it; a mode's ``preset``
        supplies steps, guidance and scheduler unless the request set them itself; ``strength`` applies only with
        an init image (``img2img``), ``edit_strength`` in its place for an edit; each extra ControlNet gets the
        request's window where it sets none."""
        given = options.model_fields_set
        copied = {
            f.name: getattr(options, f.name)
            for f in dataclasses.fields(cls)
            if f.name in GenerationOptions.model_fields and f.name not in _RESOLVED
        }
        if preset is not None:
            copied |= {name: getattr(preset, name) for name in _PRESET_FIELDS if name not in given}
        controlnets = tuple(
            ControlSetting(
                c.name,
                c.strength,
                options.control_guidance_start if c.start is None else c.start,
                options.control_guidance_end if c.end is None else c.end,
            )
            for c in options.controlnets
        )
        return cls(
            **copied,
            seed=seed,
            controlnets=controlnets,
            strength=options.edit_strength if edit else options.strength if img2img else None,
            identities=identities,
        )

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def unet_rows(self) -> int:
        """Rows this request occupies in every UNet forward: one per image, two with classifier-free guidance."""
        return self.num_images * (2 if self.do_classifier_free_guidance else 1)

    def sized(self, width: int, height: int) -> GenerationParams:
        return dataclasses.replace(self, width=width, height=height)

    @property
    def active_controlnets(self) -> tuple[ControlSetting, ...]:
        """The extra ControlNets that act (strength 0 is the same as absent, and costs nothing), in residual
        order."""
        active = [c for c in self.controlnets if c.strength != 0.0]
        return tuple(sorted(active, key=lambda c: CONTROLNET_NAMES.index(c.name)))

    @property
    def skipped_steps(self) -> int:
        """Image-to-image: the schedule's first steps that the noised init image replaces (diffusers' rule:
        ``int(steps x strength)`` steps run); 0 for text-to-image."""
        if self.strength is None:
            return 0
        return self.num_inference_steps - min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    @property
    def denoising_steps(self) -> int:
        """The steps that actually run."""
        return self.num_inference_steps - self.skipped_steps

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share every UNet/ControlNet forward: same latent shape, timesteps, CFG, control
        windows and set of extra ControlNets (their strengths may differ: they weigh each row), and number of identities
        (each adds its own face tokens to the attention context, whose length must match across rows)."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.scheduler,
            self.do_classifier_free_guidance,
            self.control_guidance_start,
            self.control_guidance_end,
            self.strength is not None,
            self.skipped_steps,
            tuple((c.name, c.start, c.end) for c in self.active_controlnets),
            self.identities,
        )

    def step_key(self) -> tuple:
        """Jobs with equal keys (and prompts of as many 77-token chunks) can share a forward at any of their steps:
        the same latent shape, set of extra ControlNets and number of identities (the face tokens' length). Steps,
        schedulers, timesteps, guidance (CFG on or off), strengths, windows and image-to-image starts may differ:
        they are per row or per job."""
        return (self.width, self.height, tuple(sorted(c.name for c in self.active_controlnets)), self.identities)


_RESOLVED = {"seed", "controlnets", "strength"}  # options that are resolved by from_options, not copied
_PRESET_FIELDS = ("num_inference_steps", "guidance_scale", "scheduler")  # what a mode's preset may supply

DEFAULT_PARAMS = GenerationParams()
DEFAULT_VAE_BATCH_SIZE = 2  # latents decoded at once: SDXL's VAE at 1024^2 needs ~3 GiB of activations each
