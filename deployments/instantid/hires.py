"""The hires pass: a second, image-to-image pass that refines each first-pass image at a larger size.

The first pass composes the picture at the size the model was trained for; the second upscales each of its images
in pixels (Pillow's Lanczos) and denoises it again from ``strength`` of the schedule, so detail is added at the
larger size without the duplicated faces and limbs a direct large generation tends to draw. The identity is the
same (the same embedding gives the same face tokens), IdentityNet's keypoint image is redrawn at the new size from
keypoints scaled by the same factors as the pixels, and the prompt embeddings and seed are the first pass's.

NumPy and Pillow only (Pillow imported where an image is resized): the planner imports this without the model
stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameterError
from .face_data import FaceCondition
from .options import MAX_PIXELS, MAX_SIDE
from .params import GenerationParams

SIZE_STEP = 8  # the VAE's downscale factor: latent sides are whole numbers


@dataclass(frozen=True)
class HiresPass:
    """A request's resolved hires pass: its upscale factor, strength and steps (the request's when it set none)."""

    scale: float
    strength: float
    steps: int

    @property
    def denoising_steps(self) -> int:
        """The steps that run (diffusers' image-to-image rule, as ``GenerationParams.denoising_steps``)."""
        return min(int(self.steps * self.strength), self.steps)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size for a first pass of ``width`` x ``height`` (see :func:`hires_size`)."""
        return hires_size(width, height, self.scale)

    def params(self, first: GenerationParams) -> GenerationParams:
        """The second pass's parameters: the first pass's (seed, guidance, strengths, scheduler, windows) at the
        scaled size, with this pass's steps and strength."""
        if first.width is None or first.height is None:
            raise ValueError("the first pass's size is not set (GenerationParams.sized)")
        width, height = self.size(first.width, first.height)
        return dataclasses.replace(
            first, width=width, height=height, num_inference_steps=self.steps, strength=self.strength
        )

    def describe(self) -> dict[str, float | int]:
        """What the response and meta.json record."""
        return {
            "scale": self.scale,
            "strength": self.strength,
            "steps": self.steps,
            "denoising_steps": self.denoising_steps,
        }


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``width`` x ``height`` times ``scale``, each side rounded to a multiple of 8; a 422 when the result is
    outside the sizes a request may ask for (each side at most ``MAX_SIDE``, at most ``MAX_PIXELS`` pixels): the
    pass would need more memory than the service is sized for."""
    out_w = max(SIZE_STEP, round(width * scale / SIZE_STEP) * SIZE_STEP)
    out_h = max(SIZE_STEP, round(height * scale / SIZE_STEP) * SIZE_STEP)
    if max(out_w, out_h) > MAX_SIDE or out_w * out_h > MAX_PIXELS:
        raise InvalidParameterError(
            f"hires.scale {scale} makes the {width}x{height} image {out_w}x{out_h}: over the size limit (each side at "
            f"most {MAX_SIDE}, at most {MAX_PIXELS} pixels); lower hires.scale or the size"
        )
    return out_w, out_h


def upscaled(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each of ``images`` ((N, h, w, 3) uint8) resized to ``width`` x ``height`` with Pillow's Lanczos filter (the
    filter the published demos resize photos with); (N, height, width, 3) uint8."""
    from PIL import Image

    resized = [Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.LANCZOS) for rgb in images]
    return np.stack([np.asarray(image) for image in resized])


def scaled_condition(condition: FaceCondition, width: int, height: int) -> FaceCondition:
    """The face condition at ``width`` x ``height``: the same identity, its keypoints and face box scaled by the
    factors the pixels were (per axis: rounding to multiples of 8 may make them differ slightly), so the keypoint
    image lands on the upscaled face. One person only (the plan refuses a hires pass with several)."""
    if condition.identities is not None:
        raise InvalidParameterError("a hires pass is not available with identities (several people) yet")
    factors = np.array([width / condition.width, height / condition.height], dtype=np.float32)
    keypoints = np.asarray(condition.keypoints, dtype=np.float32) * factors
    box = np.asarray(condition.box, dtype=np.float32) * np.tile(factors, 2)
    return dataclasses.replace(condition, keypoints=keypoints, box=box, width=width, height=height)
