"""What a generation can be asked for: every option once, with its type, default, range and description.

These models are the one declaration of the request fields. The HTTP bodies and the handle API
(``serve.schemas.GenerateRequest`` adds the pictures), the ``instantid generate`` flags and the web page's form
(read from the OpenAPI document) are made from them, and the denoiser's parameters take their defaults from here
(:class:`~.params.GenerationParams`). Defaults follow the published InstantID demo.

Pydantic and the standard library only: the ingress and argument parsers import this without the model stack.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .styles import DEFAULT_STYLE, StyleName

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000
MIN_SIDE = 256
MAX_SIDE = 2048
MAX_PIXELS = 2048 * 2048
MAX_IMAGES = 8
MAX_FACE_INDEX = 63  # more faces than this in one photo are not told apart
MAX_FACE_PHOTOS = 8  # photos of one person
MIN_IDENTITIES = 2  # several people in one image, each with its own region
MAX_IDENTITIES = 4
MAX_REQUEST_LORAS = 4
LORA_SCALE_RANGE = (-2.0, 2.0)
HIRES_SCALE_RANGE = (1.0, 2.0)  # the hires pass's upscale factor
DEFAULT_DETAIL_STRENGTH = 0.4  # the face detail pass: ADetailer's default inpainting strength (redrawn, not replaced)
DEFAULT_MIN_FACE = 384  # px: a face whose box's longer side is at least this is left as it is
DEFAULT_DETAIL_PADDING = 0.35  # as an edit's mask_padding
DEFAULT_HIRES_STRENGTH = 0.35  # re-noise little: the pass adds detail, the first pass keeps the composition

# The extra ControlNets beside IdentityNet, in the order their residuals are added (the published demo's order).
CONTROLNET_NAMES = ("pose", "canny", "depth")
ControlNetName = Literal["pose", "canny", "depth"]
COMPUTED_MAPS = ("canny", "depth")  # maps made from a photo; a pose map is uploaded ready-made
DEFAULT_CONTROLNET_STRENGTH = 0.4  # the published multi-ControlNet demo's default for each
DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH = 100, 200  # the published demo's Canny thresholds
# Several photos of one person: how their identity vectors become the resampler's input (identity.py).
IdentityCombine = Literal["mean", "normalized_mean", "concat"]
IDENTITY_COMBINE_MODES: tuple[str, ...] = get_args(IdentityCombine)
DEFAULT_IDENTITY_COMBINE: IdentityCombine = "mean"
# Every name maps to a diffusers scheduler in schedulers.py.
SchedulerName = Literal[
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde_karras",
    "ddim",
    "unipc",
    "heun",
    "deis",
    "lcm",
    "tcd",
    "euler_trailing",
    "ddim_trailing",
]
DEFAULT_SCHEDULER: SchedulerName = "euler"  # the demo's
OutputFormat = Literal["png", "jpeg", "webp"]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)]
CannyThreshold = Annotated[int, Field(ge=0, le=1000)]
# List- and object-valued fields a multipart form carries as JSON text.
JSON_FORM_FIELDS = ("loras", "controlnets", "identities", "hires", "face_detail")
_JSON_EXAMPLES = {
    "loras": '[{"name": "x", "scale": 0.8}]',
    "controlnets": '[{"name": "canny", "strength": 0.4}]',
    "identities": '[{"region": [0, 0, 512, 1024]}, {"region": [512, 0, 1024, 1024]}]',
    "hires": '{"scale": 1.5, "strength": 0.35}',
    "face_detail": '{"strength": 0.4, "min_face": 384}',
}
_OBJECT_FIELDS = ("hires", "face_detail")


def decode_json_form_fields(data: Any) -> Any:
    """A multipart form carries list/object fields as JSON text; decode those (JSON bodies pass through)."""
    if not isinstance(data, dict):
        return data
    for name in JSON_FORM_FIELDS:
        if isinstance(data.get(name), str):
            try:
                data = {**data, name: json.loads(data[name])}
            except ValueError:
                kind = "object" if name in _OBJECT_FIELDS else "list"
                raise ValueError(f"{name} must be a JSON {kind}, e.g. {_JSON_EXAMPLES[name]}") from None
    return data


class LoraChoice(BaseModel):
    """One LoRA of the catalogue (``GET /v1/models``) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    scale: float | None = Field(
        default=None, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], description="Absent: the catalogue's default."
    )


class ControlNetChoice(BaseModel):
    """One extra ControlNet beside IdentityNet (``GET /v1/models`` lists the deployment's), and optionally its map.

    Without an image its map is computed from the pose photo when given, else from the face photo (canny, depth;
    a pose map must be uploaded). A map of another size is scaled to cover the output and centre-cropped.
    """

    model_config = ConfigDict(extra="forbid")

    name: ControlNetName
    strength: float = Field(default=DEFAULT_CONTROLNET_STRENGTH, ge=0.0, le=2.0, description="Residual scale.")
    start: float | None = Field(default=None, ge=0.0, le=1.0, description="Absent: control_guidance_start.")
    end: float | None = Field(default=None, ge=0.0, le=1.0, description="Absent: control_guidance_end.")
    image_b64: str | None = Field(default=None, description="A ready-made map, base64 (multipart: control_image_NAME).")
    image_uri: str | None = Field(default=None, description="A ready-made map as s3://bucket/key.")

    @model_validator(mode="after")
    def _one_image(self) -> ControlNetChoice:
        if self.image_b64 is not None and self.image_uri is not None:
            raise ValueError(f"controlnet {self.name}: give at most one of image_b64 and image_uri")
        return self

    @property
    def has_image(self) -> bool:
        return self.image_b64 is not None or self.image_uri is not None


class HiresChoice(BaseModel):
    """A second, image-to-image pass at a larger size: each first-pass image is upscaled (Lanczos) by ``scale`` and
    re-noised by ``strength``, with the same identity, keypoints (scaled), prompt and seed."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        ge=HIRES_SCALE_RANGE[0],
        le=HIRES_SCALE_RANGE[1],
        description="Upscale factor; each side is rounded to a multiple of 8 and the result must be within the "
        "service's size limits.",
    )
    strength: float = Field(
        default=DEFAULT_HIRES_STRENGTH,
        ge=0.0,
        le=1.0,
        description="How far the upscaled image is re-noised; int(steps x strength) steps run.",
    )
    steps: int | None = Field(default=None, ge=1, le=100, description="Absent: the request's num_inference_steps.")


class FaceDetailChoice(BaseModel):
    """A second pass on each small face of the finished image: every face whose box's longer side is under
    ``min_face`` pixels is cropped with ``padding``, generated again at portrait resolution from ``strength`` of the
    schedule with the request's identity, and pasted back (as an edit of that face)."""

    model_config = ConfigDict(extra="forbid")

    strength: float = Field(
        default=DEFAULT_DETAIL_STRENGTH,
        gt=0.0,
        le=1.0,
        description="How far each face's crop is re-noised; int(num_inference_steps x strength) steps run per face.",
    )
    min_face: int = Field(
        default=DEFAULT_MIN_FACE,
        ge=16,
        le=MAX_SIDE,
        description="Faces whose box's longer side is at least this many pixels are left as they are.",
    )
    padding: float = Field(
        default=DEFAULT_DETAIL_PADDING,
        ge=0.0,
        le=2.0,
        description="Each face's repaint mask: its box grown on each side by this share of its size.",
    )


class GenerationOptions(BaseModel):
    """Everything about a generation except the images themselves.

    In multipart bodies, a list- or object-valued field (``loras``, ``controlnets``) is one form field holding its
    JSON.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to keep out of the image (added to the style's)."
    )
    style: StyleName = Field(default=DEFAULT_STYLE, description="Prompt template preset ('none' to disable).")
    num_inference_steps: int = Field(default=30, ge=1, le=100, description="Denoising steps.")
    guidance_scale: float = Field(
        default=5.0, ge=0.0, le=20.0, description="Classifier-free guidance scale (at most 1: no CFG pass)."
    )
    identitynet_strength: float = Field(default=0.8, ge=0.0, le=1.5, description="IdentityNet (ControlNet) scale.")
    adapter_strength: float = Field(default=0.8, ge=0.0, le=1.5, description="Face-token attention scale.")
    control_guidance_start: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Share of the steps before IdentityNet starts acting."
    )
    control_guidance_end: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of the steps after which IdentityNet stops acting."
    )
    enhance_face_region: bool = Field(default=True, description="Confine IdentityNet and face tokens to the face.")
    scheduler: SchedulerName = Field(default=DEFAULT_SCHEDULER, description="The sampler.")
    width: Side | None = Field(default=None, description="With height; absent: the reference size rule.")
    height: Side | None = Field(default=None, description="With width; absent: the reference size rule.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Absent: drawn and returned.")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images generated from the request.")
    output_format: OutputFormat = Field(default="webp", description="Encoding of the stored images.")
    output_quality: int = Field(default=95, ge=1, le=100, description="JPEG/WebP quality.")
    min_identity_similarity: float | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="Flag images whose identity_similarity is below this (or that show no face) in the response.",
    )
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
    controlnets: list[ControlNetChoice] = Field(
        default_factory=list,
        max_length=len(CONTROLNET_NAMES),
        description="Extra ControlNets beside IdentityNet (pose, canny, depth), each with its strength and window.",
    )
    canny_low: CannyThreshold = Field(default=DEFAULT_CANNY_LOW, description="Canny's lower hysteresis threshold.")
    canny_high: CannyThreshold = Field(default=DEFAULT_CANNY_HIGH, description="Canny's upper hysteresis threshold.")
    identity_combine: IdentityCombine = Field(
        default=DEFAULT_IDENTITY_COMBINE,
        description="Several face photos: mean of the raw embeddings, mean of the normalised ones rescaled to the "
        "mean norm, or concat (all go to the resampler as input tokens). One photo is used as it is.",
    )
    face_index: int = Field(
        default=0, ge=0, le=MAX_FACE_INDEX, description="Which face of each face photo, in POST /v1/faces order."
    )
    pose_face_index: int = Field(
        default=0, ge=0, le=MAX_FACE_INDEX, description="Which face of the pose photo, in POST /v1/faces order."
    )
    guidance_rescale: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Rescale the guided prediction toward the conditional one's standard deviation (Lin et al. 2023, "
        "as diffusers' SDXL pipelines do); against over-exposed images at high guidance. 0: off.",
    )
    face_noise: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="CFG negative identity input face_noise x U(0,1) (seeded) instead of zeros; against burnt images.",
    )
    edit_strength: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Editing (with target_image): how far the masked area is re-noised; int(steps x edit_strength) "
        "steps run. 1: the masked area is drawn from noise.",
    )
    target_face_index: int = Field(
        default=0,
        ge=0,
        le=MAX_FACE_INDEX,
        description="Editing: which face of the target photo is repainted and gives the keypoints (POST /v1/faces "
        "order).",
    )
    mask_padding: float = Field(
        default=0.35,
        ge=0.0,
        le=2.0,
        description="Editing without mask_image: the target face's box grown on each side by this share of its size.",
    )
    mask_blur: int = Field(
        default=12, ge=0, le=256, description="Editing: the paste-back feather, in target pixels inside the mask."
    )
    edit_resolution: int = Field(
        default=1024,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=8,
        description="Editing: the long side the masked region (with context) is generated at.",
    )
    strength: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="Image-to-image (with init_image): how far the init image is noised; int(steps x strength) "
        "steps run. 1: the init image only sets the start.",
    )
    hires: HiresChoice | None = Field(
        default=None,
        description="A second pass at a larger size (absent: none): each image upscaled by hires.scale and refined "
        "image-to-image at hires.strength; the output has the scaled size.",
    )
    face_detail: FaceDetailChoice | None = Field(
        default=None,
        description="Repaint each small face of the result at portrait resolution (absent: off); the response lists "
        "each repaired face with its identity score before and after.",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_form_fields(cls, data: Any) -> Any:
        return decode_json_form_fields(data)

    @model_validator(mode="after")
    def _check_consistency(self) -> GenerationOptions:
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError("control_guidance_start must be less than control_guidance_end")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ValueError(f"width*height must be at most {MAX_PIXELS} pixels")
        names = [c.name for c in self.controlnets]
        if len(set(names)) != len(names):
            raise ValueError("each controlnet may be listed once")
        if self.canny_low > self.canny_high:
            raise ValueError("canny_low must be at most canny_high")
        for c in self.controlnets:  # a window that is empty once the request's window fills in
            start = self.control_guidance_start if c.start is None else c.start
            end = self.control_guidance_end if c.end is None else c.end
            if not start < end:
                raise ValueError(f"ControlNet {c.name}: need 0 <= start < end <= 1, got {start}, {end}")
        return self


EDIT_OPTIONS = ("edit_strength", "target_face_index", "mask_padding", "mask_blur", "edit_resolution")


def option_default(name: str) -> Any:
    """The schema's default of option ``name`` (what a request that leaves it out gets)."""
    return GenerationOptions.model_fields[name].get_default(call_default_factory=True)
