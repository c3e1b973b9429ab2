"""Per-request sampling parameters, with the published demo's defaults: the one place they are defined.

The public API's request models, the command line and the benchmarks read their defaults from here. The module
imports nothing heavy, so argument parsers can read it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

DEFAULT_SCHEDULER = "euler"  # the demo's; every name the API accepts is in schedulers.SCHEDULER_NAMES
# The extra ControlNets beside IdentityNet, in the order their residuals are added (the published demo's order).
CONTROLNET_NAMES = ("pose", "canny", "depth")
ControlNetName = Literal["pose", "canny", "depth"]
DEFAULT_CONTROLNET_STRENGTH = 0.4  # the published multi-ControlNet demo's default for each
DEFAULT_IMG2IMG_STRENGTH = 0.8  # share of the schedule an init image is noised to (1: pure noise)
# Several photos of one person: how their identity vectors become the resampler's input (identity.py).
IdentityCombine = Literal["mean", "normalized_mean", "concat"]
IDENTITY_COMBINE_MODES: tuple[str, ...] = get_args(IdentityCombine)
DEFAULT_IDENTITY_COMBINE: IdentityCombine = "mean"
MAX_FACE_PHOTOS = 8
# Several people in one image: how many identities one request may carry (each with its own region).
MIN_IDENTITIES = 2
MAX_IDENTITIES = 4


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


@dataclass(frozen=True)
class GenerationParams:
    """Per-request sampling parameters; the defaults are the published InstantID demo's.

    ``width``/``height`` may be left None until face analysis has fixed the output size (``sized``).
    """

    width: int | None = None
    height: int | None = None
    seed: int = 0
    num_images: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    identitynet_strength: float = 0.8
    adapter_strength: float = 0.8
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    enhance_face_region: bool = True
    scheduler: str = DEFAULT_SCHEDULER
    controlnets: tuple[ControlSetting, ...] = ()  # extra ControlNets, IdentityNet aside
    strength: float | None = None  # image-to-image: how far the init image is noised; None: text-to-image
    face_noise: float = 0.0  # CFG negative identity input: face_noise x U(0, 1) instead of zeros (0: as published)
    identities: int = 1  # people in the image: each brings its own 16 face tokens (the context length grows)

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


DEFAULT_PARAMS = GenerationParams()
