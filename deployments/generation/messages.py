"""The messages the deployments pass to each other, in one place (dataclasses and pydantic models, pickled by Ray).

Every value that crosses a deployment boundary is one of these types: no dictionary is read by string keys on
the other side. JSON documents that are only stored or returned verbatim (meta.json, the effective request
parameters) stay dictionaries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.face_data import ChosenFace, DetectedFace, FaceCondition
from deployments.instantid.options import (
    DEFAULT_CANNY_HIGH,
    DEFAULT_CANNY_LOW,
    DEFAULT_IDENTITY_COMBINE,
    IdentityCombine,
    option_default,
)
from deployments.instantid.params import GenerationParams
from deployments.instantid.safety import SafetyVerdict
from deployments.storage.generations import StoredGeneration, StoredImage

if TYPE_CHECKING:  # tensors and maps that only travel between the model stages, never to the ingress
    from deployments.instantid.control_inputs import ControlInputs
    from deployments.instantid.editing import PreparedEdit
    from deployments.instantid.face_detail import SmallFace
    from deployments.instantid.text import PromptEmbeddings


# When a stage ran: wall-clock start and end (unix seconds) and its duration, from one pair of clock reads.
# (Also part of API responses, whose schema would show a class docstring.)
class StageTiming(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: float = Field(description="Unix time, seconds.")
    end: float
    seconds: float

    @classmethod
    def since(cls, start: float) -> StageTiming:
        """The stage that started at ``start`` and ends now."""
        end = time.time()
        return cls(start=start, end=end, seconds=end - start)


Timings = dict[str, StageTiming]


@contextmanager
def timed(timings: Timings, stage: str) -> Iterator[None]:
    """Record the enclosed block as ``timings[stage]`` (also when it raises)."""
    start = time.time()
    try:
        yield
    finally:
        timings[stage] = StageTiming.since(start)


# ---------------------------------------------------------------------------------------------- face analysis


@dataclass
class EditRequest:
    """An edit's target photo, its optional repaint mask (white repaints; the target's size) and how the mask and
    the crop are made (the request's fields of the same names)."""

    target_image: bytes
    mask_image: bytes | None = None
    target_face_index: int = 0
    mask_padding: float = option_default("mask_padding")
    mask_blur: int = option_default("mask_blur")
    edit_resolution: int = option_default("edit_resolution")


@dataclass
class FaceRequest:
    """The face condition's inputs: one face photo (``face_image``), or none when several photos were analysed
    one by one (their results come with the call); the optional pose photo; the output size."""

    face_image: bytes | None
    pose_image: bytes | None = None
    width: int | None = None
    height: int | None = None
    face_index: int = 0
    pose_face_index: int = 0
    identity_combine: IdentityCombine = DEFAULT_IDENTITY_COMBINE
    edit: EditRequest | None = None  # an edit: the keypoints and output size come from the target's crop
    hires_scale: float | None = None  # a hires pass: the output size this chooses, scaled, must be within the limits


@dataclass
class IdentityRequest:
    """One of several face photos of one person (of identity ``identity`` in a multi-identity request)."""

    image: bytes
    photo_index: int
    photos: int
    face_index: int = 0
    identity: int | None = None
    thumbnail: bool = False  # enrolment: also a small face thumbnail (WebP) of the chosen face


@dataclass(frozen=True)
class IdentitySpec:
    """One person of a multi-identity request, as the face stage needs it (its photos come analysed)."""

    photos: int
    identity_combine: IdentityCombine = DEFAULT_IDENTITY_COMBINE
    region: tuple[float, float, float, float] | None = None


@dataclass
class GroupFaceRequest:
    """Several people: each identity's spec (its photos' :class:`IdentityResult` come with the call, identity by
    identity in photo order), the optional pose photo whose faces are matched left to right, the output size."""

    identities: list[IdentitySpec]
    pose_image: bytes | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class IdentityResult:
    chosen: ChosenFace  # with its embedding
    timings: Timings
    replica: str = ""
    thumbnail: bytes | None = None  # when the request asked for one


@dataclass
class Enrolment:
    """A person's photos analysed for a saved identity: each photo's chosen face (with its embedding), the
    combined embedding the record keeps, and the first photo's face thumbnail."""

    chosen: list[ChosenFace]
    embedding: np.ndarray
    thumbnail: bytes


@dataclass
class FaceResult:
    condition: FaceCondition
    timings: Timings
    replica: str = ""
    photo_replicas: dict[str, str] = field(default_factory=dict)  # face_photo_N -> the replica that analysed it
    edit: PreparedEdit | None = None  # an edit: the crop the condition is sized to, and how it is pasted back


@dataclass
class FaceListing:
    """``POST /v1/faces``: every face of one photo, largest first, and the one a generation would use."""

    width: int
    height: int
    faces: list[DetectedFace]  # without embeddings
    chosen: int | None
    keypoint_image_png: bytes | None = None


@dataclass
class GroupLayout:
    """``POST /v1/faces`` with identities: the layout a generation would use, and the pose photo's faces."""

    condition: FaceCondition  # with ``identities`` and ``layout``
    pose_faces: list[DetectedFace]  # without embeddings; empty without a pose photo
    keypoint_image_png: bytes | None = None


# ----------------------------------------------------------------------------------------------- control maps


@dataclass
class ControlMapsRequest:
    """The pictures an extra ControlNet or image-to-image needs, as bytes, and how to make the missing maps."""

    source_image: bytes  # the keypoints' source: the pose photo when given, else the face photo
    source_name: str  # "pose_image" or "face_image" (recorded with each map computed from it)
    width: int | None = None
    height: int | None = None
    compute: tuple[str, ...] = ()  # maps to compute from the source photo
    uploaded: dict[str, bytes] = field(default_factory=dict)  # ready-made maps, any size
    canny_low: int = DEFAULT_CANNY_LOW
    canny_high: int = DEFAULT_CANNY_HIGH
    init_image: bytes | None = None


@dataclass
class ControlMapsResult:
    inputs: ControlInputs  # at the output size the face stage derives from the same photo
    timings: Timings
    replica: str = ""


# ---------------------------------------------------------------------------------------------- prompt encoding


@dataclass
class PromptRequest:
    prompt: str
    negative_prompt: str | None
    do_classifier_free_guidance: bool
    model: ModelChoice  # the base whose text encoders encode, and the LoRAs with text-encoder parts


@dataclass
class PromptResult:
    embeddings: PromptEmbeddings
    timings: Timings
    replica: str = ""


# ----------------------------------------------------------------------------------------------------- denoising


@dataclass(frozen=True)
class DenoiseBatch:
    """How a job shared its UNet/IdentityNet forwards.

    static: jobs with one id ran every step together. continuous: the id names the running set the job joined
    (it lasts while that group of compatible jobs never empties); ``jobs`` and ``latents`` are the most that
    shared one of its forwards.
    """

    id: str  # unique per replica and batch group (static) or run (continuous)
    jobs: int
    latents: int
    mode: str = "static"
    forwards: int = 0  # the forwards the job took part in (one per scheduler timestep it ran)
    mean_rows: float = 0.0  # UNet rows per forward, averaged over its forwards


@dataclass
class DenoiseResult:
    """The images plus everything the store must record about how they were made."""

    images: np.ndarray  # (num_images, H, W, 3) uint8
    params: GenerationParams  # sized
    model: ModelChoice
    face: DetectedFace  # the identity face, in face-photo pixels, without its embedding
    faces: list[ChosenFace]  # every face used (identity photos, then the pose photo), without embeddings
    prompt_chunks: int  # 77-token chunks of the longer of prompt and negative prompt (1: a short prompt)
    timings: Timings = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)  # stage -> the Serve replica that ran it
    batch: DenoiseBatch | None = None
    layout: dict[str, Any] | None = None  # several people: group_layout() of the face condition
    repaired: list[SmallFace] | None = None  # the face detail pass: each face it repainted (scores before only)


# ------------------------------------------------------------------------------------------------- safety check


@dataclass
class SafetyResult:
    """The safety check's verdict on each image of one generation (in order), and what made it."""

    verdicts: list[SafetyVerdict]
    policy: str  # flag, blur or refuse (off runs no check)
    model: str
    threshold: float
    timings: Timings = field(default_factory=dict)
    replica: str = ""

    def meta(self) -> dict[str, Any]:
        """meta.json's ``safety``: the policy and, per refused image, its index and scores (it is stored nowhere)."""
        refused = [{"index": i, "scores": v.scores} for i, v in enumerate(self.verdicts) if v.action == "refuse"]
        return {"policy": self.policy, "model": self.model, "threshold": self.threshold, "refused": refused}


# ------------------------------------------------------------------------------------------------------- storage


@dataclass
class GenerationRecord:
    """What the ingress knows about a request, for meta.json (the store adds what the stages made)."""

    id: str
    request_id: str
    owner: str
    created_at: str  # ISO 8601, UTC
    prompt: str  # after the style template
    negative_prompt: str | None
    parameters: dict[str, Any]  # the effective request options (a JSON document)
    pose_image_given: bool
    inputs_stored: bool
    models: dict[str, Any]
    init_image_given: bool = False
    face_photos: int = 1
    identity_ids: list[str] = field(default_factory=list)  # the saved identities it used
    job_id: str | None = None  # an async job's id (its progress events go to the job channel)
    job_attempt: int = 1  # which run of the job this is (a takeover after a replica's death starts the next)

    @property
    def job(self) -> JobTicket | None:
        return None if self.job_id is None else JobTicket(self.job_id, self.job_attempt)


@dataclass(frozen=True)
class JobTicket:
    """An async job as a stage sees it: its id (progress goes to the job's events) and the attempt this run is. A run
    whose attempt a takeover superseded stops at its next step, so two runs never both finish one job."""

    id: str
    attempt: int = 1


@dataclass
class SavedGeneration:
    """``ResultStore.save``: what is confirmed in S3, and how the request went through the stages."""

    stored: StoredGeneration
    params: GenerationParams  # sized
    model: ModelChoice
    face: DetectedFace
    faces: list[ChosenFace]
    prompt_chunks: int  # 77-token chunks of the longer of prompt and negative prompt (1: a short prompt)
    timings: Timings
    replicas: dict[str, str]
    batch: DenoiseBatch | None
    layout: dict[str, Any] | None = None
    safety: dict[str, Any] | None = None  # meta.json's safety block (SafetyResult.meta); None when the check is off
    repaired_faces: list[dict[str, Any]] | None = None  # the face detail pass: SmallFace.to_dict() of each face


def group_layout(condition: FaceCondition) -> dict[str, Any] | None:
    """A multi-identity condition's layout as JSON (responses, meta.json, ``POST /v1/faces``): how it was decided
    and, per identity, its region, placed face box and keypoints in output pixels; None for one person."""
    if condition.identities is None:
        return None
    return {
        "layout": condition.layout,
        "width": condition.width,
        "height": condition.height,
        "identities": [{"index": i, **placed.geometry()} for i, placed in enumerate(condition.identities)],
    }


@dataclass
class GenerationMeta:
    """``ResultStore.get``: a generation's meta.json (with fresh presigned URLs) and what the ingress checks."""

    document: dict[str, Any]  # returned to its owner as it is
    owner: str | None
    images: list[StoredImage]
    status: Literal["stored", "pending_upload"]
