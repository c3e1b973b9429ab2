"""What face analysis finds and hands on, as plain data: detected faces, the face a generation used from each photo,
and the face condition the denoiser reads.

Numpy and dataclasses only: these types cross process boundaries (the ingress unpickles them in responses) without
bringing the face models along.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from .regions import Layout, PlacedIdentity


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face in the analysed image's pixel coordinates.

    Arrays are read-only copies so a face can be shared (cached, sent across processes) without being
    mutated behind its owner's back. ``eq=False``: element-wise array equality has no single truth value.
    """

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth corner, right mouth corner
    det_score: float
    embedding: np.ndarray | None = field(default=None, repr=False)  # (512,) float32, raw (not normalised)

    def __post_init__(self) -> None:
        bbox = np.array(self.bbox, dtype=np.float32).reshape(-1)
        kps = np.array(self.kps, dtype=np.float32)
        if bbox.shape != (4,) or kps.shape != (5, 2):
            raise ValueError(f"bbox must be (4,) and kps (5, 2); got {bbox.shape} and {kps.shape}")
        bbox.setflags(write=False)
        kps.setflags(write=False)
        object.__setattr__(self, "bbox", bbox)
        object.__setattr__(self, "kps", kps)
        object.__setattr__(self, "det_score", float(self.det_score))
        if self.embedding is not None:
            embedding = np.array(self.embedding, dtype=np.float32).reshape(-1)
            embedding.setflags(write=False)
            object.__setattr__(self, "embedding", embedding)

    @property
    def area(self) -> float:
        """Box area ``(x2-x1)*(y2-y1)``: the published rule picks the face with the largest one."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return (x2 - x1) * (y2 - y1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able geometry for API responses (the embedding stays server-side)."""
        return {
            "bbox": [float(v) for v in self.bbox],
            "kps": [[float(x), float(y)] for x, y in self.kps],
            "det_score": self.det_score,
            "area": self.area,
        }


@dataclass
class ChosenFace:
    """The face a generation used from one photo: which photo, which of its faces, and the photo's size."""

    face: DetectedFace  # in that photo's pixels; with its embedding for identity photos (until it is reported)
    source: Literal["face", "pose", "target"]
    photo_index: int  # the photo's index among the face photos (0 for the pose photo)
    face_index: int  # its index in the photo's faces, largest first (the order POST /v1/faces lists them)
    image_width: int
    image_height: int
    identity: int | None = None  # a multi-identity request: which identity this face belongs to
    cached: bool = False  # taken from the face stage's cache of recent photos (no detection, no recognition)
    saved_identity: str | None = None  # taken from a saved identity's record (the photo was not sent again)

    def without_embedding(self) -> ChosenFace:
        return replace(self, face=replace(self.face, embedding=None))

    def to_dict(self) -> dict[str, Any]:
        identity = {} if self.identity is None else {"identity": self.identity}
        origin = {"cached": True} if self.cached else {}
        origin |= {"saved_identity": self.saved_identity} if self.saved_identity is not None else {}
        return {
            "source": self.source,
            **identity,
            "photo_index": self.photo_index,
            "face_index": self.face_index,
            **origin,
            **self.face.to_dict(),
        }


@dataclass
class FaceCondition:
    """The identity (from the face photos) and the geometry (from the pose photo, else the first face photo)."""

    embedding: np.ndarray  # (512,) float32 raw (not normalised), or (N, 512) with identity_combine "concat"
    keypoints: np.ndarray  # (5, 2) in output pixels
    box: np.ndarray  # (4,) in output pixels
    width: int
    height: int
    face: DetectedFace  # the first photo's identity face, in its pixels (reported to the client)
    pose_face: DetectedFace | None = None
    used: list[ChosenFace] = field(default_factory=list)  # every face used: identity photos in order, then pose
    # Several people (2..4): each identity's vector, placed face and region; the fields above are the first one's.
    identities: list[PlacedIdentity] | None = None
    layout: Layout | None = None
