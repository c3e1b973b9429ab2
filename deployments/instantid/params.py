"""Per-request sampling parameters, with the published demo's defaults: the one place they are defined.

The public API's request models, the command line and the benchmarks read their defaults from here. The module
imports nothing heavy, so argument parsers can read it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_SCHEDULER = "euler"  # the demo's; every name the API accepts is in schedulers.SCHEDULER_NAMES


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

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def sized(self, width: int, height: int) -> GenerationParams:
        return dataclasses.replace(self, width=width, height=height)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share UNet/IdentityNet forwards (same latent shape and timesteps)."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.scheduler,
            self.do_classifier_free_guidance,
            self.control_guidance_start,
            self.control_guidance_end,
        )


DEFAULT_PARAMS = GenerationParams()
