"""The public request and response models: the single source of truth for the API's ranges.

Used by the HTTP routes (JSON and multipart), by Python ``DeploymentHandle`` callers and for OpenAPI.
Generation defaults are the published InstantID demo's, read from ``GenerationParams`` (defined there once).
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from deployments.instantid.catalogue import LORA_SCALE_RANGE, MAX_REQUEST_LORAS, ModeSpec
from deployments.instantid.faces import DetectedFace
from deployments.instantid.params import DEFAULT_PARAMS, GenerationParams
from deployments.instantid.schedulers import SchedulerName
from deployments.instantid.styles import DEFAULT_STYLE, StyleName
from deployments.messages import StageTiming
from deployments.storage.generations import StoredImage

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MIN_SIDE = 256
MAX_PIXELS = 2048 * 2048
MAX_IMAGES = 8

OutputFormat = Literal["png", "jpeg", "webp"]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)]


class LoraChoice(BaseModel):
    """One LoRA of the catalogue (``GET /v1/models``) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    scale: float | None = Field(
        default=None, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], description="Absent: the catalogue's default."
    )


class GenerationOptions(BaseModel):
    """Everything about a generation except the images themselves.

    In multipart bodies, a list- or object-valued field (``loras``) is one form field holding its JSON.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    style: StyleName = Field(default=DEFAULT_STYLE, description="Prompt template preset ('none' to disable).")
    num_inference_steps: int = Field(default=DEFAULT_PARAMS.num_inference_steps, ge=1, le=100)
    guidance_scale: float = Field(default=DEFAULT_PARAMS.guidance_scale, ge=0.0, le=20.0)
    identitynet_strength: float = Field(
        default=DEFAULT_PARAMS.identitynet_strength, ge=0.0, le=1.5, description="IdentityNet (ControlNet) scale."
    )
    adapter_strength: float = Field(
        default=DEFAULT_PARAMS.adapter_strength, ge=0.0, le=1.5, description="Face-token attention scale."
    )
    control_guidance_start: float = Field(default=DEFAULT_PARAMS.control_guidance_start, ge=0.0, le=1.0)
    control_guidance_end: float = Field(default=DEFAULT_PARAMS.control_guidance_end, ge=0.0, le=1.0)
    enhance_face_region: bool = Field(
        default=DEFAULT_PARAMS.enhance_face_region, description="Confine IdentityNet and face tokens to the face."
    )
    scheduler: SchedulerName = DEFAULT_PARAMS.scheduler  # type: ignore[assignment]
    width: Side | None = Field(default=None, description="With height; absent: the reference size rule.")
    height: Side | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Absent: drawn and returned.")
    num_images: int = Field(default=DEFAULT_PARAMS.num_images, ge=1, le=MAX_IMAGES)
    output_format: OutputFormat = "webp"
    output_quality: int = Field(default=95, ge=1, le=100, description="JPEG/WebP quality.")
    base_model: str | None = Field(default=None, max_length=64, description="A base from GET /v1/models.")
    loras: list[LoraChoice] = Field(
        default_factory=list, max_length=MAX_REQUEST_LORAS, description="LoRAs from GET /v1/models, with scales."
    )
    mode: str | None = Field(
        default=None,
        max_length=64,
        description="A fast-mode preset (lcm, lightning, hyper, ...): its LoRA, scheduler, steps and guidance; "
        "fields set explicitly in the request win.",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_form_fields(cls, data: Any) -> Any:
        """A multipart form carries list/object fields as JSON text; decode those (JSON bodies pass through)."""
        if isinstance(data, dict) and isinstance(data.get("loras"), str):
            try:
                data = {**data, "loras": json.loads(data["loras"])}
            except ValueError:
                raise ValueError('loras must be a JSON list, e.g. [{"name": "x", "scale": 0.8}]') from None
        return data

    def lora_requests(self) -> list[tuple[str, float | None]]:
        return [(lora.name, lora.scale) for lora in self.loras]

    def sampling_params(self, seed: int, preset: ModeSpec | None = None) -> GenerationParams:
        """The model-level parameters (one mapping, shared by the ingress and `instantid generate`).

        A mode's preset supplies steps, guidance and scheduler unless the request set them itself.
        """
        given = self.model_fields_set

        def pick(field: str) -> Any:
            if preset is not None and field not in given:
                return getattr(preset, field)
            return getattr(self, field)

        return GenerationParams(
            width=self.width,
            height=self.height,
            seed=seed,
            num_images=self.num_images,
            num_inference_steps=pick("num_inference_steps"),
            guidance_scale=pick("guidance_scale"),
            identitynet_strength=self.identitynet_strength,
            adapter_strength=self.adapter_strength,
            control_guidance_start=self.control_guidance_start,
            control_guidance_end=self.control_guidance_end,
            enhance_face_region=self.enhance_face_region,
            scheduler=pick("scheduler"),
        )

    def resolved_seed(self) -> int:
        """The given seed, or a fresh random one (returned to the client so it can reproduce the image)."""
        return self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)

    @model_validator(mode="after")
    def _check_consistency(self) -> GenerationOptions:
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError("control_guidance_start must be less than control_guidance_end")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ValueError(f"width*height must be at most {MAX_PIXELS} pixels")
        return self


class GenerateRequest(GenerationOptions):
    """JSON body of ``POST /v1/generate`` and the argument of ``Ingress.generate`` over a handle.

    Images come as base64 (``*_b64``) or as ``s3://`` URIs in an allowed bucket (``*_uri``); multipart
    uploads fill ``*_b64``'s place with the file bytes.
    """

    face_image_b64: str | None = Field(default=None, description="The identity photo, base64.")
    face_image_uri: str | None = Field(default=None, description="The identity photo as s3://bucket/key.")
    pose_image_b64: str | None = Field(default=None, description="Optional pose/composition photo, base64.")
    pose_image_uri: str | None = None
    store_inputs: bool = Field(
        default=False, description="Keep the input photos next to the results (biometric data: off by default)."
    )

    @model_validator(mode="after")
    def _check_images(self) -> GenerateRequest:
        if (self.face_image_b64 is None) == (self.face_image_uri is None):
            raise ValueError("give exactly one of face_image_b64 and face_image_uri")
        if self.pose_image_b64 is not None and self.pose_image_uri is not None:
            raise ValueError("give at most one of pose_image_b64 and pose_image_uri")
        return self

    def options(self) -> GenerationOptions:
        """The generation options alone; fields the request did not set stay unset (a mode's preset fills them)."""
        fields = self.model_dump(include=set(GenerationOptions.model_fields), exclude_unset=True)
        return GenerationOptions(**fields)


class FacesRequest(BaseModel):
    """JSON body of ``POST /v1/faces``; ``face_image_b64``/``face_image_uri`` are accepted as on ``/v1/generate``."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = Field(
        default=None, validation_alias=AliasChoices("image_b64", "face_image_b64"), description="The photo, base64."
    )
    image_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("image_uri", "face_image_uri"),
        description="The photo as s3://bucket/key.",
    )
    include_keypoint_image: bool = False

    @model_validator(mode="after")
    def _check_image(self) -> FacesRequest:
        if (self.image_b64 is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image_b64 and image_uri")
        return self


class FaceInfo(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in the analysed image's pixels.")
    keypoints: list[list[float]] = Field(description="5 points: eyes, nose, mouth corners.")
    score: float

    @classmethod
    def of(cls, face: DetectedFace) -> FaceInfo:
        return cls(box=[float(v) for v in face.bbox], keypoints=face.kps.tolist(), score=face.det_score)


class LoraUsed(BaseModel):
    name: str
    scale: float


class ModelUsed(BaseModel):
    base: str = Field(description="The base model that made the images.")
    loras: list[LoraUsed] = Field(description="Every active LoRA with its scale (a mode's LoRA last).")
    mode: str | None


class BatchInfo(BaseModel):
    id: str = Field(description="Requests with the same id ran every denoising step in one forward.")
    jobs: int
    latents: int


class GenerateResponse(BaseModel):
    id: str
    request_id: str
    images: list[StoredImage]
    seed: int
    face: FaceInfo
    model: ModelUsed
    timings: dict[str, StageTiming] = Field(
        description="Per stage; *_model_load and *_lora_load appear when this request waited for a cold load."
    )
    parameters: dict[str, Any] = Field(
        description="The effective parameters, defaults and the mode's preset filled in."
    )
    replicas: dict[str, str] = Field(default_factory=dict, description="The Serve replica that ran each stage.")
    batch: BatchInfo | None = Field(default=None, description="The denoising batch this request shared.")
    warnings: list[str] = Field(default_factory=list)


class FacesResponse(BaseModel):
    request_id: str
    width: int
    height: int
    faces: list[FaceInfo]
    chosen: int | None = Field(description="Index of the face generation would use (the largest).")
    keypoint_image_png_b64: str | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
    generation_id: str | None = Field(
        default=None, description="Set when the images were made but S3 failed: they are kept and uploaded later."
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class BaseModelInfo(BaseModel):
    description: str
    single_file: bool = Field(description="A single-file checkpoint (else a diffusers folder).")


class LoraInfo(BaseModel):
    scale: float = Field(description="The scale a request gets when it names the LoRA without one.")
    description: str


class ModeInfo(BaseModel):
    lora: str | None
    lora_scale: float
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    description: str


class ModelsResponse(BaseModel):
    default_base: str
    base_models: dict[str, BaseModelInfo]
    loras: dict[str, LoraInfo]
    modes: dict[str, ModeInfo]
    denoiser: dict[str, Any] = Field(description="One denoiser replica: InstantID's weights, its bases and LoRAs.")
    api_version: str
