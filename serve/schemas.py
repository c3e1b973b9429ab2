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
from deployments.instantid.conditioning import ChosenFace
from deployments.instantid.control_maps import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.faces import DetectedFace
from deployments.instantid.identity import DEFAULT_IDENTITY_COMBINE, MAX_FACE_PHOTOS, IdentityCombine
from deployments.instantid.params import (
    CONTROLNET_NAMES,
    DEFAULT_CONTROLNET_STRENGTH,
    DEFAULT_IMG2IMG_STRENGTH,
    DEFAULT_PARAMS,
    MAX_IDENTITIES,
    MIN_IDENTITIES,
    ControlNetName,
    ControlSetting,
    GenerationParams,
)
from deployments.instantid.regions import Layout, check_regions
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
MAX_FACE_INDEX = 63  # more faces than this in one photo are not told apart

OutputFormat = Literal["png", "jpeg", "webp"]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8)]
CannyThreshold = Annotated[int, Field(ge=0, le=1000)]
JSON_FORM_FIELDS = ("loras", "controlnets", "identities")  # list-valued fields a multipart form carries as JSON text
CONTROL_IMAGE_PART = "control_image_{}"  # multipart file part of a ready-made map, per ControlNet
IDENTITY_PART = "identity_{}"  # multipart file part (repeatable) of identity N's photos
IDENTITY_PARTS = tuple(IDENTITY_PART.format(i) for i in range(MAX_IDENTITIES + 1))  # one more: its 422 names the limit
SINGLE_FACE_FIELDS = ("face_image_b64", "face_image_uri", "face_images", "face_index", "identity_combine")


def decode_json_form_fields(data: Any) -> Any:
    """A multipart form carries list/object fields as JSON text; decode those (JSON bodies pass through)."""
    if not isinstance(data, dict):
        return data
    for name in JSON_FORM_FIELDS:
        if isinstance(data.get(name), str):
            try:
                data = {**data, name: json.loads(data[name])}
            except ValueError:
                raise ValueError(f"{name} must be a JSON list, e.g. {_JSON_EXAMPLES[name]}") from None
    return data


_JSON_EXAMPLES = {
    "loras": '[{"name": "x", "scale": 0.8}]',
    "controlnets": '[{"name": "canny", "strength": 0.4}]',
    "identities": '[{"region": [0, 0, 512, 1024]}, {"region": [512, 0, 1024, 1024]}]',
}


def merge_identity_parts(data: Any) -> Any:
    """Multipart ``identity_N`` parts (arriving as ``identity_N_b64``, or ``identity_N_images`` when repeated) become
    ``identities[N].images``; the ``identities`` form field (JSON) holds the rest of each identity."""
    if not isinstance(data, dict):
        return data
    parts: dict[int, list[dict[str, str]]] = {}
    rest = dict(data)
    for index, name in enumerate(IDENTITY_PARTS):
        if f"{name}_b64" in rest:
            parts[index] = [{"b64": rest.pop(f"{name}_b64")}]
        elif f"{name}_images" in rest:
            parts[index] = rest.pop(f"{name}_images")
    if not parts:
        return data
    items = rest.get("identities")
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return rest  # the field's own validation reports it
    count = max(len(items), max(parts) + 1)
    missing = [IDENTITY_PART.format(i) for i in range(count) if i not in parts]
    if missing:
        raise ValueError(f"identity parts must be numbered from 0 without gaps: {', '.join(missing)} missing")
    merged = []
    for index in range(count):
        item = dict(items[index]) if index < len(items) else {}
        if item.get("images") is not None:
            raise ValueError(f"identities[{index}]: its images were given twice (part {IDENTITY_PART.format(index)})")
        merged.append({**item, "images": parts[index]})
    return {**rest, "identities": merged}


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


class GenerationOptions(BaseModel):
    """Everything about a generation except the images themselves.

    In multipart bodies, a list- or object-valued field (``loras``, ``controlnets``) is one form field holding its
    JSON.
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
    face_noise: float = Field(
        default=DEFAULT_PARAMS.face_noise,
        ge=0.0,
        le=1.0,
        description="CFG negative identity input face_noise x U(0,1) (seeded) instead of zeros; against burnt images.",
    )
    strength: float = Field(
        default=DEFAULT_IMG2IMG_STRENGTH,
        ge=0.0,
        le=1.0,
        description="Image-to-image (with init_image): how far the init image is noised; int(steps x strength) "
        "steps run. 1: the init image only sets the start.",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_form_fields(cls, data: Any) -> Any:
        return decode_json_form_fields(data)

    def lora_requests(self) -> list[tuple[str, float | None]]:
        return [(lora.name, lora.scale) for lora in self.loras]

    def control_settings(self) -> tuple[ControlSetting, ...]:
        """The extra ControlNets with their windows (the request's window where an item sets none)."""
        return tuple(
            ControlSetting(
                c.name,
                c.strength,
                self.control_guidance_start if c.start is None else c.start,
                self.control_guidance_end if c.end is None else c.end,
            )
            for c in self.controlnets
        )

    def sampling_params(self, seed: int, preset: ModeSpec | None = None, *, img2img: bool = False) -> GenerationParams:
        """The model-level parameters (one mapping, shared by the ingress and `instantid generate`).

        A mode's preset supplies steps, guidance and scheduler unless the request set them itself. ``img2img``:
        the request has an init image (``strength`` applies).
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
            controlnets=self.control_settings(),
            strength=self.strength if img2img else None,
            face_noise=self.face_noise,
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
        names = [c.name for c in self.controlnets]
        if len(set(names)) != len(names):
            raise ValueError("each controlnet may be listed once")
        if self.canny_low > self.canny_high:
            raise ValueError("canny_low must be at most canny_high")
        try:
            self.control_settings()
        except ValueError as exc:  # a window that is empty once the request's window fills in
            raise ValueError(str(exc)) from None
        return self


class FacePhoto(BaseModel):
    """One photo of the person, as base64 or as an ``s3://`` URI in an allowed bucket."""

    model_config = ConfigDict(extra="forbid")

    b64: str | None = Field(default=None, description="The photo, base64.")
    uri: str | None = Field(default=None, description="The photo as s3://bucket/key.")

    @model_validator(mode="after")
    def _one_source(self) -> FacePhoto:
        if (self.b64 is None) == (self.uri is None):
            raise ValueError("each face_images item needs exactly one of b64 and uri")
        return self


class IdentityChoice(BaseModel):
    """One person of a multi-identity request: their photos, and optionally the region of the output they own."""

    model_config = ConfigDict(extra="forbid")

    images: list[FacePhoto] = Field(
        min_length=1, max_length=MAX_FACE_PHOTOS, description="1-8 photos of this person (multipart: identity_N parts)."
    )
    face_index: int = Field(default=0, ge=0, le=MAX_FACE_INDEX, description="Which face of each of its photos.")
    identity_combine: IdentityCombine = Field(default=DEFAULT_IDENTITY_COMBINE, description="As for one person.")
    region: list[float] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="x1, y1, x2, y2 in output pixels: where this person's face tokens and IdentityNet act, and where "
        "their face goes. Give one for every identity or for none; regions may not overlap.",
    )

    def spec(self) -> tuple[float, float, float, float] | None:
        return None if self.region is None else (self.region[0], self.region[1], self.region[2], self.region[3])


class GenerateRequest(GenerationOptions):
    """JSON body of ``POST /v1/generate`` and the argument of ``Ingress.generate`` over a handle.

    Images come as base64 (``*_b64``) or as ``s3://`` URIs in an allowed bucket (``*_uri``); multipart
    uploads fill ``*_b64``'s place with the file bytes.
    """

    face_image_b64: str | None = Field(default=None, description="The identity photo, base64.")
    face_image_uri: str | None = Field(default=None, description="The identity photo as s3://bucket/key.")
    face_images: list[FacePhoto] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FACE_PHOTOS,
        description="1-8 photos of the same person, instead of face_image_b64/face_image_uri (multipart: repeat the "
        "face_image part).",
    )
    identities: list[IdentityChoice] | None = Field(
        default=None,
        description=f"{MIN_IDENTITIES}-{MAX_IDENTITIES} people in one image, instead of the face_image*/face_images "
        "fields (and face_index/identity_combine, which each identity has itself). Faces come from the pose photo's "
        "faces matched left to right, else from the regions, else from equal columns. Multipart: identity_0, "
        "identity_1, ... parts (repeatable) and an identities field holding the JSON of the rest.",
    )
    pose_image_b64: str | None = Field(default=None, description="Optional pose/composition photo, base64.")
    pose_image_uri: str | None = None
    init_image_b64: str | None = Field(default=None, description="Image-to-image: the start image, base64.")
    init_image_uri: str | None = Field(default=None, description="Image-to-image: the start image as s3://bucket/key.")
    store_inputs: bool = Field(
        default=False, description="Keep the input photos next to the results (biometric data: off by default)."
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POST /v1/jobs only: the final job body is POSTed here, signed (hosts on the allow-list only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _control_image_parts(cls, data: Any) -> Any:
        """Multipart ``control_image_NAME`` parts arrive as ``control_image_NAME_b64``: into their controlnet."""
        data = merge_identity_parts(decode_json_form_fields(data))
        if not isinstance(data, dict):
            return data
        keys = {name: f"{CONTROL_IMAGE_PART.format(name)}_b64" for name in CONTROLNET_NAMES}
        parts = {name: data[key] for name, key in keys.items() if key in data}
        if not parts:
            return data
        items = data.get("controlnets") or []
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            return data  # the field's own validation reports it
        listed = {item.get("name") for item in items}
        for name in parts:
            if name not in listed:
                raise ValueError(f"{CONTROL_IMAGE_PART.format(name)} was sent but controlnets does not list {name}")
        merged = []
        for item in items:
            name = item.get("name")
            if name in parts:
                if item.get("image_b64") is not None or item.get("image_uri") is not None:
                    raise ValueError(f"controlnet {name}: its image was given twice")
                item = {**item, "image_b64": parts[name]}
            merged.append(item)
        rest = {k: v for k, v in data.items() if k not in keys.values()}
        return {**rest, "controlnets": merged}

    @model_validator(mode="after")
    def _check_images(self) -> GenerateRequest:
        if self.identities is not None:
            both = sorted(set(SINGLE_FACE_FIELDS) & self.model_fields_set)
            if both:
                raise ValueError(
                    f"give either identities or the single-person face fields, not both (also got {', '.join(both)}; "
                    "each identity has its own images, face_index and identity_combine)"
                )
            if not MIN_IDENTITIES <= len(self.identities) <= MAX_IDENTITIES:
                raise ValueError(
                    f"identities holds {MIN_IDENTITIES} to {MAX_IDENTITIES} people, got {len(self.identities)}"
                )
            if "pose_face_index" in self.model_fields_set:
                raise ValueError(
                    "pose_face_index is for one person: with identities the pose photo's faces are "
                    "matched to the identities left to right"
                )
            regions = [identity.region for identity in self.identities]
            if any(r is not None for r in regions) and any(r is None for r in regions):
                raise ValueError("give a region for every identity or for none")
            if self.width is not None and self.height is not None and all(r is not None for r in regions):
                try:
                    check_regions(regions, self.width, self.height)  # type: ignore[arg-type]
                except InvalidParameterError as exc:
                    raise ValueError(exc.message) from None
        else:
            given = [self.face_image_b64 is not None, self.face_image_uri is not None, self.face_images is not None]
            if sum(given) != 1:
                raise ValueError(
                    "give exactly one of face_image_b64, face_image_uri and face_images (or identities, for several "
                    "people)"
                )
        if self.pose_image_b64 is not None and self.pose_image_uri is not None:
            raise ValueError("give at most one of pose_image_b64 and pose_image_uri")
        if self.init_image_b64 is not None and self.init_image_uri is not None:
            raise ValueError("give at most one of init_image_b64 and init_image_uri")
        if "pose_face_index" in self.model_fields_set and not self.has_pose_image:
            raise ValueError("pose_face_index is for the pose photo: give pose_image too")
        if "strength" in self.model_fields_set and not self.has_init_image:
            raise ValueError("strength is for image-to-image: give init_image too")
        return self

    def face_photos(self) -> list[FacePhoto]:
        """The face photos in order, whichever form the request used (every identity's, in order, with identities)."""
        if self.identities is not None:
            return [photo for identity in self.identities for photo in identity.images]
        if self.face_images is not None:
            return list(self.face_images)
        return [FacePhoto(b64=self.face_image_b64, uri=self.face_image_uri)]

    @property
    def has_pose_image(self) -> bool:
        return self.pose_image_b64 is not None or self.pose_image_uri is not None

    @property
    def has_init_image(self) -> bool:
        return self.init_image_b64 is not None or self.init_image_uri is not None

    def options(self) -> GenerationOptions:
        """The generation options alone, without any image (ready-made maps stay in the request); fields the
        request did not set stay unset (a mode's preset fills them)."""
        fields = self.model_dump(
            include=set(GenerationOptions.model_fields),
            exclude={"controlnets": {"__all__": {"image_b64", "image_uri"}}},
            exclude_unset=True,
        )
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
    identities: list[IdentityChoice] | None = Field(
        default=None,
        description="Show the layout a multi-identity generation would use (as on /v1/generate); the image, if any, "
        "is then the pose photo.",
    )
    include_keypoint_image: bool = False
    include_control_maps: bool = Field(
        default=False, description="Also return the canny/depth maps a generation from this photo would use."
    )
    width: Side | None = Field(default=None, description="With height: the output size the images are made for.")
    height: Side | None = None
    canny_low: CannyThreshold = DEFAULT_CANNY_LOW
    canny_high: CannyThreshold = DEFAULT_CANNY_HIGH

    @model_validator(mode="before")
    @classmethod
    def _identity_parts(cls, data: Any) -> Any:
        return merge_identity_parts(decode_json_form_fields(data))

    @model_validator(mode="after")
    def _check_image(self) -> FacesRequest:
        if self.identities is not None:
            if not MIN_IDENTITIES <= len(self.identities) <= MAX_IDENTITIES:
                raise ValueError(
                    f"identities holds {MIN_IDENTITIES} to {MAX_IDENTITIES} people, got {len(self.identities)}"
                )
            if self.image_b64 is not None and self.image_uri is not None:
                raise ValueError("give at most one of image_b64 and image_uri (the pose photo)")
            if self.include_control_maps:
                raise ValueError("include_control_maps is for one photo, not for a multi-identity layout")
        elif (self.image_b64 is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image_b64 and image_uri")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if self.canny_low > self.canny_high:
            raise ValueError("canny_low must be at most canny_high")
        return self


class FaceInfo(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in the analysed image's pixels.")
    keypoints: list[list[float]] = Field(description="5 points: eyes, nose, mouth corners.")
    score: float

    @classmethod
    def of(cls, face: DetectedFace) -> FaceInfo:
        return cls(box=[float(v) for v in face.bbox], keypoints=face.kps.tolist(), score=face.det_score)


class FaceUsed(FaceInfo):
    source: Literal["face", "pose"] = Field(description="A face photo (the identity) or the pose photo (geometry).")
    identity: int | None = Field(default=None, description="Several people: the identity this face belongs to.")
    photo_index: int = Field(description="The photo's index among the face photos (0 for the pose photo).")
    face_index: int = Field(description="The face's index in that photo, in POST /v1/faces order.")

    @classmethod
    def of_chosen(cls, chosen: ChosenFace) -> FaceUsed:
        return cls(
            **FaceInfo.of(chosen.face).model_dump(),
            source=chosen.source,
            identity=chosen.identity,
            photo_index=chosen.photo_index,
            face_index=chosen.face_index,
        )


class IdentityPlacement(BaseModel):
    index: int = Field(description="The identity's index in the request's identities.")
    region: list[float] = Field(description="x1, y1, x2, y2 in output pixels: the part of the image it owns.")
    box: list[float] = Field(description="Its face's box in output pixels.")
    keypoints: list[list[float]] = Field(description="Its face's 5 keypoints in output pixels (IdentityNet's input).")


class LayoutInfo(BaseModel):
    layout: Layout = Field(
        description="pose: the pose photo's faces left to right; regions: the given regions; columns: equal columns."
    )
    width: int
    height: int
    identities: list[IdentityPlacement]


class LoraUsed(BaseModel):
    name: str
    scale: float


class ModelUsed(BaseModel):
    base: str = Field(description="The base model that made the images.")
    loras: list[LoraUsed] = Field(description="Every active LoRA with its scale (a mode's LoRA last).")
    mode: str | None


class BatchInfo(BaseModel):
    id: str = Field(
        description="static batching: requests with the same id ran every denoising step in one forward; continuous: "
        "requests with the same id joined one running set of compatible requests."
    )
    jobs: int = Field(description="The most requests that shared one of this request's forwards (itself included).")
    latents: int = Field(description="The most latents (images) in one of this request's forwards.")
    mode: Literal["static", "continuous"] = "static"
    forwards: int = Field(default=0, description="UNet forwards this request took part in.")
    mean_rows: float = Field(default=0.0, description="UNet rows per forward, averaged over those forwards.")


class GenerateResponse(BaseModel):
    id: str
    request_id: str
    images: list[StoredImage]
    seed: int
    face: FaceInfo = Field(description="The first face photo's face.")
    faces: list[FaceUsed] = Field(description="Every face used: each face photo's, then the pose photo's.")
    model: ModelUsed
    timings: dict[str, StageTiming] = Field(
        description="Per stage; *_model_load and *_lora_load appear when this request waited for a cold load."
    )
    parameters: dict[str, Any] = Field(
        description="The effective parameters, defaults and the mode's preset filled in."
    )
    replicas: dict[str, str] = Field(default_factory=dict, description="The Serve replica that ran each stage.")
    batch: BatchInfo | None = Field(default=None, description="The denoising batch this request shared.")
    layout: LayoutInfo | None = Field(default=None, description="Several people: where each one was placed.")
    warnings: list[str] = Field(default_factory=list)


class JobAccepted(BaseModel):
    id: str = Field(description="The job's id, which is also the id of the generation it makes.")
    status: Literal["queued"]
    status_url: str
    events_url: str = Field(description="Server-Sent Events of the job's progress.")


class FacesResponse(BaseModel):
    request_id: str
    width: int
    height: int
    faces: list[FaceInfo]
    chosen: int | None = Field(description="Index of the face generation would use (the largest).")
    keypoint_image_png_b64: str | None = None
    control_maps_png_b64: dict[str, str] | None = Field(
        default=None, description="With include_control_maps: name -> PNG, at the keypoint image's size."
    )
    layout: LayoutInfo | None = Field(
        default=None, description="With identities: the layout (regions and keypoints) a generation would use."
    )


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
    controlnets: list[str] = Field(description="Extra ControlNets a request may name, beside IdentityNet.")
    denoiser: dict[str, Any] = Field(description="One denoiser replica: InstantID's weights, its bases and LoRAs.")
    api_version: str
