"""The whole InstantID generation in one process, no Ray: for notebooks, ``instantid generate`` and parity.

The served pipeline runs the very same steps, split across deployments: style -> prompt encoding,
face analysis -> :class:`FaceCondition`, then the denoiser with the size the face stage fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bases import SDXLBase
from .conditioning import FaceCondition, prepare_face_condition
from .control_inputs import ControlInputs, prepare_control_inputs
from .control_maps import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, DepthEstimator, load_depth_estimator
from .denoiser import DenoiseJob, InstantIDDenoiser
from .errors import InvalidParameterError
from .faces import FaceAnalyzer
from .group import IdentityInput, prepare_group_condition
from .identity import DEFAULT_IDENTITY_COMBINE
from .keypoints import REFERENCE_LONG_SIDE
from .loading import load_denoiser, load_face_analyzer, load_prompt_encoder, pick_device, pick_dtype
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
    prompt_chunks: int  # 77-token chunks the prompt and negative prompt were encoded in
    controls: ControlInputs | None = None  # the extra ControlNets' maps and the fitted init image, when used


class InstantIDPipeline:
    """Face analyzer + prompt encoder + denoiser in one object, with optional LoRAs (``lora_files``: name -> file)
    and a depth estimator for the depth ControlNet's maps."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        prompt_encoder: SDXLPromptEncoder,
        denoiser: InstantIDDenoiser,
        long_side: int = REFERENCE_LONG_SIDE,
        lora_files: Mapping[str, Path] | None = None,
        fuse_loras: bool = True,
        depth: DepthEstimator | None = None,
    ) -> None:
        self.analyzer = analyzer
        self.prompt_encoder = prompt_encoder
        self.denoiser = denoiser
        self.long_side = long_side
        self.depth = depth
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
        controlnets: Mapping[str, Path] | None = None,
        depth_model: Path | None = None,
    ) -> InstantIDPipeline:
        """The layout's models; ``base`` replaces its SDXL folder (a folder or a single-file checkpoint);
        ``controlnets``: extra ControlNet folders by name; ``depth_model``: a transformers depth-estimation folder."""
        depth = None
        if depth_model is not None:
            dev = pick_device(device)
            depth = load_depth_estimator(depth_model, device=dev, dtype=pick_dtype(dtype, dev))
        return cls(
            load_face_analyzer(layout, providers=providers),
            load_prompt_encoder(layout, device=device, dtype=dtype, base=base),
            load_denoiser(layout, device=device, dtype=dtype, base=base, controlnets=controlnets),
            long_side=long_side,
            lora_files=lora_files,
            fuse_loras=fuse_loras,
            depth=depth,
        )

    def __call__(
        self,
        face_rgb: np.ndarray | Sequence[np.ndarray],
        prompt: str,
        negative_prompt: str | None = None,
        *,
        params: GenerationParams,
        style: str = "none",
        pose_rgb: np.ndarray | None = None,
        loras: tuple[tuple[str, float], ...] = (),
        control_images: Mapping[str, np.ndarray] | None = None,
        canny_thresholds: tuple[int, int] = (DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH),
        init_rgb: np.ndarray | None = None,
        face_index: int = 0,
        pose_face_index: int = 0,
        identity_combine: str = DEFAULT_IDENTITY_COMBINE,
        identities: Sequence[IdentityInput] | None = None,
    ) -> GenerationOutput:
        """One generation; ``loras`` are (name, scale) pairs of ``lora_files``; ``control_images`` are ready-made
        maps for ``params.controlnets`` (the others are computed from the pose photo, else the face photo);
        ``init_rgb`` starts image-to-image (with ``params.strength``). ``face_rgb`` may be 1..8 photos of one person,
        combined by ``identity_combine``; ``face_index``/``pose_face_index`` pick a face (largest first).
        ``identities``: several people, each with its photos, optional region and face choice (``face_rgb``,
        ``face_index``, ``pose_face_index`` and ``identity_combine`` are then unused; computed control maps need the
        pose photo)."""
        styled, styled_negative = apply_style(style, prompt, negative_prompt)
        if identities is not None:
            condition = prepare_group_condition(
                self.analyzer,
                identities,
                pose_rgb,
                width=params.width,
                height=params.height,
                long_side=self.long_side,
            )
            params = dataclasses.replace(params, identities=len(identities))
            face_rgb = identities[0].photos[0]
        else:
            condition = prepare_face_condition(
                self.analyzer,
                face_rgb,
                pose_rgb,
                width=params.width,
                height=params.height,
                long_side=self.long_side,
                face_index=face_index,
                pose_face_index=pose_face_index,
                identity_combine=identity_combine,
            )
        first_photo = face_rgb if isinstance(face_rgb, np.ndarray) else face_rgb[0]
        active = [c.name for c in params.active_controlnets]
        controls = None
        if active or init_rgb is not None:
            uploaded = {name: image for name, image in (control_images or {}).items() if name in active}
            if identities is not None and pose_rgb is None and set(active) - set(uploaded):
                raise InvalidParameterError(
                    "with several identities, computed control maps need a pose photo (or give the maps)"
                )
            controls = prepare_control_inputs(
                first_photo if pose_rgb is None else pose_rgb,
                source_name="face_image" if pose_rgb is None else "pose_image",
                width=params.width,
                height=params.height,
                long_side=self.long_side,
                compute=[name for name in active if name not in uploaded],
                uploaded=uploaded,
                canny_low=canny_thresholds[0],
                canny_high=canny_thresholds[1],
                depth=self.depth,
                init_rgb=init_rgb,
            )
        self.text_adapters.activate(loras)
        self.unet_adapters.activate(loras)
        embeddings = self.prompt_encoder.encode([styled], [styled_negative], params.do_classifier_free_guidance)[0]
        sized = params.sized(condition.width, condition.height)
        job = DenoiseJob(
            sized,
            condition.embedding,
            condition.keypoints,
            condition.box,
            embeddings,
            control_maps=controls.maps if controls is not None else {},
            init_image=controls.init_image if controls is not None else None,
            identities=condition.identities,
        )
        images = self.denoiser.generate([job])[0]
        return GenerationOutput(images, condition, sized, styled, styled_negative, embeddings.chunks, controls)
