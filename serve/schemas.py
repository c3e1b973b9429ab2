"""The public request and response models of the HTTP and handle APIs.

A generation request is the generation options (``deployments/instantid/options.py``: every option's type,
default, range and description, declared once) plus its pictures, as base64 or ``s3://`` URIs (multipart uploads
fill the base64 fields); the responses are what the routes answer. Used by the HTTP routes (JSON and multipart), by
Python ``DeploymentHandle`` callers and for OpenAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from deployments.generation.messages import StageTiming
from deployments.generation.plan import CONTROL_IMAGE_PART, InputsGiven, PersonGiven, check_inputs
from deployments.instantid.catalogue import ModelCatalogue
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.face_data import ChosenFace, DetectedFace
from deployments.instantid.licenses import SourceLicense
from deployments.instantid.options import (
    CONTROLNET_NAMES,
    DEFAULT_CANNY_HIGH,
    DEFAULT_CANNY_LOW,
    DEFAULT_IDENTITY_COMBINE,
    MAX_FACE_INDEX,
    MAX_FACE_PHOTOS,
    MAX_IDENTITIES,
    MIN_IDENTITIES,
    CannyThreshold,
    GenerationOptions,
    IdentityCombine,
    Side,
    decode_json_form_fields,
)
from deployments.instantid.regions import Layout
from deployments.storage.generations import StoredImage

IDENTITY_PART = "identity_{}"  # multipart file part (repeatable) of identity N's photos
IDENTITY_PARTS = tuple(IDENTITY_PART.format(i) for i in range(MAX_IDENTITIES + 1))  # one more: its 422 names the limit
SINGLE_FACE_FIELDS = (
    "face_image_b64",
    "face_image_uri",
    "face_images",
    "identity_id",
    "face_index",
    "identity_combine",
)


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
    """One person of a multi-identity request: their photos or a saved identity, and optionally the region of the
    output they own."""

    model_config = ConfigDict(extra="forbid")

    images: list[FacePhoto] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FACE_PHOTOS,
        description="1-8 photos of this person (multipart: identity_N parts), or identity_id.",
    )
    identity_id: str | None = Field(
        default=None, max_length=64, description="A saved identity (POST /v1/identities) instead of images."
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

    @model_validator(mode="after")
    def _photos_or_saved(self) -> IdentityChoice:
        if (self.images is None) == (self.identity_id is None):
            raise ValueError("each identity needs exactly one of images and identity_id")
        if self.identity_id is not None and {"face_index", "identity_combine"} & self.model_fields_set:
            raise ValueError(
                "a saved identity fixed its photos' faces and how they combine: drop face_index and identity_combine"
            )
        return self

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
    identity_id: str | None = Field(
        default=None,
        max_length=64,
        description="A saved identity (POST /v1/identities) instead of face photos: no photo is sent or analysed "
        "again; with no pose_image, its first photo's keypoints set the pose.",
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
    target_image_b64: str | None = Field(
        default=None, description="Editing: the photo whose chosen face (or mask_image) is repainted, base64."
    )
    target_image_uri: str | None = Field(default=None, description="Editing: the photo to edit as s3://bucket/key.")
    mask_image_b64: str | None = Field(
        default=None, description="Editing: the repaint mask (white repaints), the target's size, base64."
    )
    mask_image_uri: str | None = Field(default=None, description="Editing: the repaint mask as s3://bucket/key.")
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
        """How each picture was sent; then the plan's own rules between the options and the pictures."""
        if self.identities is not None:
            both = sorted(set(SINGLE_FACE_FIELDS) & self.model_fields_set)
            if both:
                raise ValueError(
                    f"give either identities or the single-person face fields, not both (also got {', '.join(both)}; "
                    "each identity has its own images, face_index and identity_combine)"
                )
        else:
            given = [
                self.face_image_b64 is not None,
                self.face_image_uri is not None,
                self.face_images is not None,
                self.identity_id is not None,
            ]
            if sum(given) != 1:
                raise ValueError(
                    "give exactly one of face_image_b64, face_image_uri, face_images and identity_id (or identities, "
                    "for several people)"
                )
            if self.identity_id is not None and {"face_index", "identity_combine"} & self.model_fields_set:
                raise ValueError(
                    "a saved identity fixed its photos' faces and how they combine: drop face_index and "
                    "identity_combine"
                )
        if self.pose_image_b64 is not None and self.pose_image_uri is not None:
            raise ValueError("give at most one of pose_image_b64 and pose_image_uri")
        if self.init_image_b64 is not None and self.init_image_uri is not None:
            raise ValueError("give at most one of init_image_b64 and init_image_uri")
        if self.target_image_b64 is not None and self.target_image_uri is not None:
            raise ValueError("give at most one of target_image_b64 and target_image_uri")
        if self.mask_image_b64 is not None and self.mask_image_uri is not None:
            raise ValueError("give at most one of mask_image_b64 and mask_image_uri")
        try:
            check_inputs(self, self.inputs_given())
        except InvalidParameterError as exc:
            raise ValueError(exc.message) from None
        return self

    def inputs_given(self) -> InputsGiven:
        """Which pictures the request brings (before any is loaded)."""
        people = None
        if self.identities is not None:
            people = tuple(
                PersonGiven(len(i.images or ()), i.face_index, i.identity_combine, i.spec(), i.identity_id)
                for i in self.identities
            )
        return InputsGiven(
            face_photos=0 if people is not None else len(self.face_photos()),
            people=people,
            pose=self.has_pose_image,
            init=self.has_init_image,
            maps=frozenset(c.name for c in self.controlnets if c.has_image),
            saved_identity=self.identity_id,
            target=self.has_target_image,
            mask=self.has_mask_image,
        )

    def face_photos(self) -> list[FacePhoto]:
        """The face photos in order, whichever form the request used (every identity's, in order, with identities)."""
        if self.identities is not None:
            return [photo for identity in self.identities for photo in identity.images or ()]
        if self.face_images is not None:
            return list(self.face_images)
        if self.identity_id is not None:
            return []
        return [FacePhoto(b64=self.face_image_b64, uri=self.face_image_uri)]

    @property
    def has_pose_image(self) -> bool:
        return self.pose_image_b64 is not None or self.pose_image_uri is not None

    @property
    def has_init_image(self) -> bool:
        return self.init_image_b64 is not None or self.init_image_uri is not None

    @property
    def has_target_image(self) -> bool:
        return self.target_image_b64 is not None or self.target_image_uri is not None

    @property
    def has_mask_image(self) -> bool:
        return self.mask_image_b64 is not None or self.mask_image_uri is not None

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
    identity_id: str | None = Field(
        default=None,
        max_length=64,
        description="A saved identity instead of a photo: its stored faces, one per enrolled photo (the first sets the "
        "pose of a generation without pose_image).",
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
            if self.identity_id is not None:
                raise ValueError("give identity_id inside identities[] for a multi-identity layout")
        elif self.identity_id is not None:
            if self.image_b64 is not None or self.image_uri is not None:
                raise ValueError("give one of identity_id and the image")
            if self.include_control_maps:
                raise ValueError("include_control_maps needs a photo: a saved identity keeps none to compute maps from")
        elif (self.image_b64 is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image_b64 and image_uri (or identity_id)")
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
    source: Literal["face", "pose", "target"] = Field(
        description="A face photo (the identity), the pose photo or an edit's target photo (geometry)."
    )
    identity: int | None = Field(default=None, description="Several people: the identity this face belongs to.")
    photo_index: int = Field(description="The photo's index among the face photos (0 for the pose photo).")
    face_index: int = Field(description="The face's index in that photo, in POST /v1/faces order.")
    cached: bool = Field(
        default=False, description="The photo was analysed recently: its analysis was reused, not made again."
    )
    saved_identity: str | None = Field(
        default=None, description="The saved identity whose stored analysis gave this face (no photo was analysed)."
    )

    @classmethod
    def of_chosen(cls, chosen: ChosenFace) -> FaceUsed:
        return cls(
            **FaceInfo.of(chosen.face).model_dump(),
            source=chosen.source,
            identity=chosen.identity,
            photo_index=chosen.photo_index,
            face_index=chosen.face_index,
            cached=chosen.cached,
            saved_identity=chosen.saved_identity,
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


class RepairedFace(BaseModel):
    image: int = Field(description="The index of the image the face is in.")
    identity: int | None = Field(description="Several people: whose face it is (the region holding it); else null.")
    box: list[float] = Field(description="x1, y1, x2, y2 in the image's pixels, as found before the repair.")
    score_before: float | None = Field(description="Its identity similarity before the repair (null: not measurable).")
    score_after: float | None = Field(
        description="The identity similarity of the face found there after the repair (null: none found)."
    )


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
    repaired_faces: list[RepairedFace] | None = Field(
        default=None, description="With face_detail: each face the pass repainted (none small enough: empty)."
    )
    warnings: list[str] = Field(default_factory=list)


class HistoryImage(BaseModel):
    index: int
    width: int | None = None
    height: int | None = None
    url: str = Field(description="Presigned GET URL of the image; expires.")
    thumbnail_url: str = Field(description="Presigned GET URL of a WebP at most 256 px on its long side; expires.")
    identity_similarity: float | None = None


class HistoryEntry(BaseModel):
    id: str
    created_at: str | None = None
    job_id: str | None = Field(default=None, description="Set when the generation was made by an async job.")
    parameters: dict[str, Any] = Field(description="The effective parameters it ran with (as its response had them).")
    model: dict[str, Any] | None = None
    images: list[HistoryImage]


class GenerationList(BaseModel):
    generations: list[HistoryEntry] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class JobAccepted(BaseModel):
    id: str = Field(description="The job's id, which is also the id of the generation it makes.")
    status: Literal["queued"]
    status_url: str
    events_url: str = Field(description="Server-Sent Events of the job's progress.")


class FacesResponse(BaseModel):
    request_id: str
    width: int
    height: int
    faces: list[FaceInfo] = Field(
        description="Every face, largest first; with identity_id, each enrolled photo's face in photo order (each in "
        "its own photo's pixels)."
    )
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
    inpainting: bool = Field(default=False, description="An inpainting base: it serves edits (target_image) only.")


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
    licenses: list[SourceLicense] = Field(
        default_factory=list,
        description="Every weight source this deployment loads (bases, LoRAs, ControlNets, IdentityNet, the face "
        "models, the depth and safety models) with its licence and whether it allows commercial use.",
    )

    @classmethod
    def of(
        cls,
        catalogue: ModelCatalogue,
        controlnets: list[str],
        denoiser: dict[str, Any],
        api_version: str,
        licenses: list[SourceLicense] | None = None,
    ) -> ModelsResponse:
        """What a request may choose (names, descriptions, defaults; never where the files are)."""
        return cls(
            default_base=catalogue.default_base,
            base_models={
                name: BaseModelInfo(
                    description=spec.description, single_file=spec.single_file, inpainting=spec.inpainting
                )
                for name, spec in sorted(catalogue.base_models.items())
            },
            loras={
                name: LoraInfo(scale=spec.scale, description=spec.description)
                for name, spec in sorted(catalogue.loras.items())
            },
            modes={name: ModeInfo(**mode.model_dump()) for name, mode in sorted(catalogue.all_modes().items())},
            controlnets=controlnets,
            denoiser=denoiser,
            api_version=api_version,
            licenses=licenses or [],
        )


# ------------------------------------------------------------------------------------------- saved identities


class IdentityCreateRequest(BaseModel):
    """JSON body of ``POST /v1/identities`` (multipart: ``face_image`` parts, every other field a form field)."""

    model_config = ConfigDict(extra="forbid")

    face_image_b64: str | None = Field(default=None, description="One photo of the person, base64.")
    face_image_uri: str | None = Field(default=None, description="One photo as s3://bucket/key.")
    face_images: list[FacePhoto] | None = Field(
        default=None, min_length=1, max_length=MAX_FACE_PHOTOS, description="1-8 photos of the same person."
    )
    face_index: int = Field(default=0, ge=0, le=MAX_FACE_INDEX, description="Which face of each photo.")
    identity_combine: IdentityCombine = Field(
        default=DEFAULT_IDENTITY_COMBINE, description="How several photos make one identity (as on /v1/generate)."
    )
    name: str | None = Field(default=None, max_length=100, description="A label for the owner's own listing.")
    keep_photos: bool = Field(
        default=False,
        description="Keep the photos themselves beside the analysis (biometric data: off by default; without them a "
        "generation from this identity needs a pose_image for computed control maps).",
    )

    @model_validator(mode="after")
    def _one_form(self) -> IdentityCreateRequest:
        given = [self.face_image_b64 is not None, self.face_image_uri is not None, self.face_images is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of face_image_b64, face_image_uri and face_images")
        return self

    def photos(self) -> list[FacePhoto]:
        if self.face_images is not None:
            return list(self.face_images)
        return [FacePhoto(b64=self.face_image_b64, uri=self.face_image_uri)]


class IdentityPhotoInfo(BaseModel):
    index: int
    sha256: str = Field(description="The photo's SHA-256: which photo it was, without keeping it.")
    width: int
    height: int
    face_index: int
    box: list[float] = Field(description="The chosen face's x1, y1, x2, y2 in the photo's pixels.")
    keypoints: list[list[float]]
    score: float
    stored: bool = Field(description="Whether the photo itself is kept (keep_photos).")


class IdentityInfo(BaseModel):
    id: str
    name: str | None
    created_at: str
    identity_combine: str
    photos: list[IdentityPhotoInfo]
    photos_kept: bool
    thumbnail_url: str | None = Field(description="A presigned URL of the 128 px face thumbnail (WebP).")
    embedding: list[float] | list[list[float]] | None = Field(
        default=None, description="With ?include=embeddings: the combined identity (an export, for instantid generate)."
    )
    photo_embeddings: list[list[float]] | None = Field(
        default=None, description="With ?include=embeddings: each photo's embedding."
    )


class IdentityList(BaseModel):
    identities: list[IdentityInfo]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")
