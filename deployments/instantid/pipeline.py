"""The whole InstantID generation in one process, no Ray: for notebooks, ``instantid generate`` and parity.

The served pipeline runs the very same steps, split across deployments: style -> prompt encoding,
face analysis -> :class:`FaceCondition`, then the denoiser with the size the face stage fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .conditioning import FaceCondition, prepare_face_condition
from .denoiser import DenoiseJob, InstantIDDenoiser
from .faces import FaceAnalyzer
from .keypoints import REFERENCE_LONG_SIDE
from .loading import load_denoiser, load_face_analyzer, load_prompt_encoder
from .params import GenerationParams
from .styles import apply_style
from .text import SDXLPromptEncoder
from .weights import WeightsLayout


@dataclass
class GenerationOutput:
    images: np.ndarray  # (num_images, H, W, 3) uint8 RGB
    condition: FaceCondition
    params: GenerationParams  # with the output size filled in
    prompt: str  # after the style template
    negative_prompt: str | None
    truncated: bool  # the prompt lost tokens to CLIP's 77-token limit


class InstantIDPipeline:
    """Face analyzer + prompt encoder + denoiser in one object."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        prompt_encoder: SDXLPromptEncoder,
        denoiser: InstantIDDenoiser,
        long_side: int = REFERENCE_LONG_SIDE,
    ) -> None:
        self.analyzer = analyzer
        self.prompt_encoder = prompt_encoder
        self.denoiser = denoiser
        self.long_side = long_side

    @classmethod
    def from_layout(
        cls,
        layout: WeightsLayout,
        *,
        device: str = "auto",
        dtype: str = "auto",
        providers: Sequence[str] | None = None,
        long_side: int = REFERENCE_LONG_SIDE,
    ) -> InstantIDPipeline:
        return cls(
            load_face_analyzer(layout, providers=providers),
            load_prompt_encoder(layout, device=device, dtype=dtype),
            load_denoiser(layout, device=device, dtype=dtype),
            long_side=long_side,
        )

    def __call__(
        self,
        face_rgb: np.ndarray,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        params: GenerationParams,
        style: str = "none",
        pose_rgb: np.ndarray | None = None,
    ) -> GenerationOutput:
        styled, styled_negative = apply_style(style, prompt, negative_prompt)
        condition = prepare_face_condition(
            self.analyzer, face_rgb, pose_rgb, width=params.width, height=params.height, long_side=self.long_side
        )
        embeddings = self.prompt_encoder.encode([styled], [styled_negative], params.do_classifier_free_guidance)[0]
        sized = params.sized(condition.width, condition.height)
        job = DenoiseJob(sized, condition.embedding, condition.keypoints, condition.box, embeddings)
        images = self.denoiser.generate([job])[0]
        return GenerationOutput(images, condition, sized, styled, styled_negative, embeddings.truncated)
