"""The whole InstantID generation in one process, no Ray: for notebooks, ``instantid generate`` and parity.

The served pipeline runs the very same steps, split across deployments: style -> prompt encoding,
face analysis -> :class:`FaceCondition`, then the denoiser with the size the face stage fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bases import SDXLBase
from .conditioning import FaceCondition, prepare_face_condition
from .denoiser import DenoiseJob, InstantIDDenoiser
from .faces import FaceAnalyzer
from .keypoints import REFERENCE_LONG_SIDE
from .loading import load_denoiser, load_face_analyzer, load_prompt_encoder
from .loras import LoraAdapters
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
    """Face analyzer + prompt encoder + denoiser in one object, with optional LoRAs (``lora_files``: name -> file)."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        prompt_encoder: SDXLPromptEncoder,
        denoiser: InstantIDDenoiser,
        long_side: int = REFERENCE_LONG_SIDE,
        lora_files: Mapping[str, Path] | None = None,
        fuse_loras: bool = True,
    ) -> None:
        self.analyzer = analyzer
        self.prompt_encoder = prompt_encoder
        self.denoiser = denoiser
        self.long_side = long_side
        files = dict(lora_files or {})
        capacity = max(1, len(files))
        text_encoders = dict(zip(("text_encoder", "text_encoder_2"), prompt_encoder.encoders, strict=True))
        config = denoiser.unet.config
        self.text_adapters = LoraAdapters(text_encoders, files, capacity=capacity, unet_config=config, fuse=fuse_loras)
        self.unet_adapters = LoraAdapters(
            {"unet": denoiser.unet}, files, capacity=capacity, unet_config=config, fuse=fuse_loras
        )

    @classmethod
    def from_layout(
        cls,
        layout: WeightsLayout,
        *,
        device: str = "auto",
        dtype: str = "auto",
        providers: Sequence[str] | None = None,
        long_side: int = REFERENCE_LONG_SIDE,
        base: SDXLBase | None = None,
        lora_files: Mapping[str, Path] | None = None,
        fuse_loras: bool = True,
    ) -> InstantIDPipeline:
        """The layout's models; ``base`` replaces its SDXL folder (a folder or a single-file checkpoint)."""
        return cls(
            load_face_analyzer(layout, providers=providers),
            load_prompt_encoder(layout, device=device, dtype=dtype, base=base),
            load_denoiser(layout, device=device, dtype=dtype, base=base),
            long_side=long_side,
            lora_files=lora_files,
            fuse_loras=fuse_loras,
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
        loras: tuple[tuple[str, float], ...] = (),
    ) -> GenerationOutput:
        """One generation; ``loras`` are (name, scale) pairs of ``lora_files``."""
        styled, styled_negative = apply_style(style, prompt, negative_prompt)
        condition = prepare_face_condition(
            self.analyzer, face_rgb, pose_rgb, width=params.width, height=params.height, long_side=self.long_side
        )
        self.text_adapters.activate(loras)
        self.unet_adapters.activate(loras)
        embeddings = self.prompt_encoder.encode([styled], [styled_negative], params.do_classifier_free_guidance)[0]
        sized = params.sized(condition.width, condition.height)
        job = DenoiseJob(sized, condition.embedding, condition.keypoints, condition.box, embeddings)
        images = self.denoiser.generate([job])[0]
        return GenerationOutput(images, condition, sized, styled, styled_negative, embeddings.truncated)
