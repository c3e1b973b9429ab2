"""The whole InstantID generation in one process, no Ray: for notebooks, ``instantid generate`` and parity.

:class:`InstantIDPipeline` holds the same stages the deployments serve (face, prompt, control maps, denoise) and runs
the same plan through the same flow (``flow.generate``); only the last step differs: the images are returned
instead of stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deployments.instantid.bases import SDXLBase
from deployments.instantid.catalogue import (
    DEFAULT_BASE,
    PRESET_MODES,
    BaseModelSpec,
    LoraSpec,
    ModelCatalogue,
    ModelChoice,
)
from deployments.instantid.control_maps import load_depth_estimator
from deployments.instantid.face_detail import FaceDetailPass, SmallFace
from deployments.instantid.hires import HiresPass
from deployments.instantid.identity_score import RegionScore
from deployments.instantid.keypoints import REFERENCE_LONG_SIDE
from deployments.instantid.loading import (
    load_denoiser,
    load_face_analyzer,
    load_prompt_encoder,
    pick_device,
    pick_dtype,
)
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.options import GenerationOptions
from deployments.instantid.params import GenerationParams
from deployments.instantid.weights import WeightsLayout

from .control_stage import ControlMapsStage
from .denoise_stage import DenoiseStage
from .face_stage import FaceStage
from .flow import generate
from .messages import (
    ControlMapsRequest,
    DenoiseResult,
    FaceRequest,
    FaceResult,
    GenerationRecord,
    GroupFaceRequest,
    IdentityRequest,
    IdentityResult,
    JobTicket,
    PromptRequest,
    PromptResult,
    SafetyResult,
)
from .plan import GenerationInputs, GenerationPlan, plan_generation
from .prompt_stage import PromptStage
from .safety_stage import SafetyStage, screen


@dataclass
class GenerationOutput:
    images: np.ndarray  # (num_images, H, W, 3) uint8 RGB
    plan: GenerationPlan
    params: GenerationParams  # with the output size filled in
    result: DenoiseResult  # the faces used, timings, prompt chunks, the layout of several people
    identity_similarities: list[float | None] | None = None  # one person: per image
    region_scores: list[list[RegionScore]] | None = None  # several people: per image, per identity
    safety: SafetyResult | None = None  # with a safety check: every image's verdict (refused ones are not in images)
    repaired_faces: list[dict] | None = None  # the face detail pass: each face repainted, its scores before and after


class InstantIDPipeline:
    """The four stages in one process, with the catalogue of what a request may choose here (one base, the given
    LoRA files, the modes whose LoRAs are among them) and the extra ControlNets loaded."""

    def __init__(
        self,
        face: FaceStage,
        prompt: PromptStage,
        controls: ControlMapsStage,
        denoise: DenoiseStage,
        catalogue: ModelCatalogue,
        safety: SafetyStage | None = None,
    ) -> None:
        self.face = face
        self.prompt = prompt
        self.controls = controls
        self.denoise = denoise
        self.catalogue = catalogue
        self.safety = safety  # None: no safety check (its images are returned as they are)
        self.controlnets = tuple(sorted(denoise.denoiser.controlnets))

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
        ``lora_files``: LoRAs by name; ``controlnets``: extra ControlNet folders by name; ``depth_model``: a
        transformers depth-estimation folder (for computed depth maps)."""
        face = FaceStage(load_face_analyzer(layout, providers=providers), long_side=long_side)
        depth = None
        if depth_model is not None:
            dev = pick_device(device)
            depth = load_depth_estimator(depth_model, device=dev, dtype=pick_dtype(dtype, dev))
        encoder = load_prompt_encoder(layout, device=device, dtype=dtype, base=base)
        denoiser = load_denoiser(layout, device=device, dtype=dtype, base=base, controlnets=controlnets)
        files = dict(lora_files or {})
        capacity = max(1, len(files))
        text_encoders = dict(zip(("text_encoder", "text_encoder_2"), encoder.encoders, strict=True))
        config = denoiser.unet.config
        return cls(
            face,
            PromptStage(
                encoder, LoraAdapters(text_encoders, files, capacity=capacity, unet_config=config, fuse=fuse_loras)
            ),
            ControlMapsStage(depth, long_side=long_side),
            DenoiseStage(
                denoiser,
                LoraAdapters({"unet": denoiser.unet}, files, capacity=capacity, unet_config=config, fuse=fuse_loras),
            ),
            local_catalogue(base.name if base is not None else DEFAULT_BASE, files),
        )

    def plan(self, options: GenerationOptions, inputs: GenerationInputs) -> GenerationPlan:
        """``options`` and ``inputs`` checked and resolved, as the service would."""
        return plan_generation(options, inputs.given(), self.catalogue, self.controlnets)

    def __call__(self, options: GenerationOptions, inputs: GenerationInputs) -> GenerationOutput:
        """One generation: the request's ``options`` and pictures."""
        return self.run(self.plan(options, inputs), inputs)

    def run(self, plan: GenerationPlan, inputs: GenerationInputs) -> GenerationOutput:
        record = plan.record("local", "local", "local", models={}, inputs_stored=False)
        return generate(plan, inputs, _LocalStages(self), record)


def local_catalogue(base: str, lora_files: Mapping[str, Path]) -> ModelCatalogue:
    """What a request may choose in process: the one loaded base, the LoRA files by name and the preset modes whose
    LoRA is among them."""
    presets = [name for name, mode in PRESET_MODES.items() if mode.lora is None or mode.lora in lora_files]
    return ModelCatalogue(
        default_base=base,
        base_models={base: BaseModelSpec(source=base, description="the base loaded in this process")},
        loras={name: LoraSpec(source=str(path)) for name, path in lora_files.items() if name not in _preset_loras()},
        presets=presets,
    )


def _preset_loras() -> set[str]:
    return {mode.lora for mode in PRESET_MODES.values() if mode.lora is not None}


class _LocalStages:
    """:class:`~.flow.Stages` on the pipeline's own objects: each step runs when it is called."""

    def __init__(self, pipeline: InstantIDPipeline) -> None:
        self.pipeline = pipeline

    def identify(self, request: IdentityRequest) -> IdentityResult:
        return self.pipeline.face.identify(request)

    def analyze(self, request: FaceRequest, *identified: IdentityResult) -> FaceResult:
        return self.pipeline.face.analyze(request, *identified)

    def analyze_group(self, request: GroupFaceRequest, *identified: IdentityResult) -> FaceResult:
        return self.pipeline.face.analyze_group(request, *identified)

    def encode(self, request: PromptRequest) -> PromptResult:
        return self.pipeline.prompt.encode(request)

    def prepare_controls(self, request: ControlMapsRequest) -> Any:
        return self.pipeline.controls.prepare(request)

    def denoise(
        self,
        params: GenerationParams,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: Any,
        job: JobTicket | None,
    ) -> DenoiseResult:
        return self.pipeline.denoise.generate(params, model, face, prompt, controls)

    def refine(
        self,
        hires: HiresPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: Any,
        first: DenoiseResult,
        job: JobTicket | None,
    ) -> DenoiseResult:
        return self.pipeline.denoise.refine(hires, model, face, prompt, controls, first)

    def find_small_faces(self, detail: FaceDetailPass, output: DenoiseResult, face: FaceResult) -> list[SmallFace]:
        return self.pipeline.face.find_small_faces(detail, output, face)

    def detail(
        self,
        detail: FaceDetailPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        first: DenoiseResult,
        found: list[SmallFace],
        job: JobTicket | None,
    ) -> DenoiseResult:
        return self.pipeline.denoise.detail(detail, model, face, prompt, first, found)

    def score(self, output: DenoiseResult, face: FaceResult) -> list[float | None]:
        return self.pipeline.face.score(output, face)

    def score_repaired(self, output: DenoiseResult, face: FaceResult) -> list[dict]:
        return self.pipeline.face.score_repaired(output, face)

    def score_regions(self, output: DenoiseResult, face: FaceResult) -> list[list[RegionScore]]:
        return self.pipeline.face.score_identities(output, face)

    def check_safety(self, output: DenoiseResult) -> SafetyResult | None:
        return None if self.pipeline.safety is None else self.pipeline.safety.check(output)

    def store(
        self,
        plan: GenerationPlan,
        record: GenerationRecord,
        output: DenoiseResult,
        scores: list[float | None] | None,
        region_scores: list[list[RegionScore]] | None,
        kept: dict[str, bytes] | None,
        safety: SafetyResult | None = None,
        repaired: list[dict] | None = None,
    ) -> GenerationOutput:
        # Nothing is stored in process: the images go back to the caller, screened as the store would screen them.
        screened = screen(output.images, safety, scores, region_scores)
        return GenerationOutput(
            images=np.stack(screened.images) if safety is not None else output.images,
            plan=plan,
            params=output.params,
            result=output,
            identity_similarities=screened.identity_similarities,
            region_scores=screened.identity_scores,
            safety=safety,
            repaired_faces=repaired,
        )
