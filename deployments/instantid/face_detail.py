"""The face detail pass: small faces of a finished image found, each repainted at portrait resolution, and scored.

Faces that fill only a few dozen pixels of a full-body shot or a group come out soft: the UNet drew them with a
handful of latent pixels. The usual fix is a second pass on each face's crop. This module decides which faces get
it (every face whose box's longer side is under ``min_face`` pixels; for an edit, only faces whose box overlaps its
repaint mask, and only within it, so every pixel outside the mask stays the target's) and the repaint mask of each
(the box grown by ``padding``, as an edit's face mask). Each face is then edited exactly as an edit of the image
would be (crop at portrait resolution, masked latent blend, colour-matched paste-back: ``editing.py``), with the
request's identity and the keypoints the detector found on that face, so the repaired face sits where the soft one
was.

The identity score of each repaired face is measured before (on the first pass's image) and after (the face in the
finished image whose box overlaps the repaired one most), with the model that scores whole images.

Model math only, NumPy at import (the planner imports :class:`FaceDetailPass` without the model stack; the face
models and OpenCV are imported by the functions that use them). No serving code is imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .face_data import DetectedFace
    from .faces import FaceAnalyzer


@dataclass(frozen=True)
class FaceDetailPass:
    """A request's resolved face detail pass. ``resolution``: the long side each face's crop is generated at (None:
    the first pass's own long side, the size the model drew the whole picture at)."""

    strength: float
    min_face: int
    padding: float
    steps: int
    blur: int
    resolution: int | None = None

    @property
    def denoising_steps(self) -> int:
        """The steps that run on each face (diffusers' image-to-image rule)."""
        return min(int(self.steps * self.strength), self.steps)

    def needs_repair(self, box: np.ndarray) -> bool:
        """Whether a face of ``box`` (x1, y1, x2, y2) is small enough to be repainted."""
        x1, y1, x2, y2 = (float(v) for v in np.asarray(box).reshape(-1)[:4])
        return max(x2 - x1, y2 - y1) < self.min_face

    def describe(self) -> dict[str, float | int | None]:
        """What the response's parameters and meta.json record."""
        return {
            "strength": self.strength,
            "min_face": self.min_face,
            "padding": self.padding,
            "steps": self.steps,
            "denoising_steps": self.denoising_steps,
            "resolution": self.resolution,
        }


@dataclass(frozen=True)
class SmallFace:
    """A face of output image ``image`` the pass repaints: its box and keypoints in that image's pixels, whose it is
    (several people: the index of the identity whose region holds the box's centre; one person: None), and its
    identity score before the repair (None: no identity measurable) and, once scored, after."""

    image: int
    box: np.ndarray  # (4,) float32
    keypoints: np.ndarray  # (5, 2) float32
    score_before: float | None
    score_after: float | None = None
    identity: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The response's and meta.json's entry."""
        return {
            "image": self.image,
            "identity": self.identity,
            "box": [round(float(v), 2) for v in self.box],
            "score_before": self.score_before,
            "score_after": self.score_after,
        }


@dataclass(frozen=True)
class Owners:
    """Whose a face can be: one person's identity (``regions`` None), or several people's with the region each
    owns (x1, y1, x2, y2 in output pixels)."""

    embeddings: list[np.ndarray]
    regions: list[np.ndarray] | None = None

    def of(self, box: np.ndarray) -> int | None:
        """The identity a face of ``box`` is repaired as: one person's (0), else the one whose region holds the
        box's centre; None when no region does (nobody's face: it is left as it is)."""
        if self.regions is None:
            return 0
        x1, y1, x2, y2 = (float(v) for v in np.asarray(box).reshape(-1)[:4])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        for index, (rx1, ry1, rx2, ry2) in enumerate(self.regions):
            if rx1 <= cx < rx2 and ry1 <= cy < ry2:
                return index
        return None

    def label(self, index: int) -> int | None:
        """What the response calls identity ``index`` (None for one person)."""
        return None if self.regions is None else index


def small_faces(
    analyzer: FaceAnalyzer,
    images: np.ndarray,
    owners: Owners,
    detail: FaceDetailPass,
    within: np.ndarray | None = None,
) -> list[SmallFace]:
    """Every face of ``images`` ((N, H, W, 3) uint8) the pass repaints, image by image, largest first, each with
    its owner and its score against that identity; with ``within`` ((H, W) bool, an edit's repaint mask), only faces
    whose box overlaps it; with several people, only faces inside one of their regions."""
    from .identity_score import cosine, reference_direction

    directions = [reference_direction(embedding) for embedding in owners.embeddings]
    found = []
    for index, rgb in enumerate(images):
        for face in analyzer.detect(rgb):
            owner = owners.of(face.bbox)
            if owner is None or not detail.needs_repair(face.bbox) or not _inside(face, within):
                continue
            score = cosine(analyzer.embed(rgb, face), directions[owner])
            box, keypoints = np.asarray(face.bbox, dtype=np.float32), np.asarray(face.kps, dtype=np.float32)
            found.append(SmallFace(index, box, keypoints, score, identity=owners.label(owner)))
    return found


def _inside(face: DetectedFace, within: np.ndarray | None) -> bool:
    """Whether ``face``'s box overlaps ``within`` (no mask: every face)."""
    if within is None:
        return True
    height, width = within.shape
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    right, bottom = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
    return bool(within[top:bottom, left:right].any())


def detail_mask(small: SmallFace, width: int, height: int, padding: float, within: np.ndarray | None) -> np.ndarray:
    """The repaint mask of one small face in a ``width`` x ``height`` image: its box grown by ``padding`` (as an edit's
    face mask), cut to ``within`` (an edit's repaint mask) when given; (H, W) bool."""
    from .editing import face_mask

    mask = face_mask(small.box, width, height, padding)
    return mask if within is None else mask & within


def scored_after(
    analyzer: FaceAnalyzer, images: np.ndarray, owners: Owners, repaired: list[SmallFace]
) -> list[SmallFace]:
    """``repaired`` with each face's identity score in the finished ``images`` (against its owner): the detected
    face whose box overlaps the repaired box most (intersection over union), None when no face overlaps it any more."""
    from .identity_score import cosine, reference_direction

    directions = [reference_direction(embedding) for embedding in owners.embeddings]
    detected = {index: analyzer.detect(images[index]) for index in {face.image for face in repaired}}
    scored = []
    for small in repaired:
        overlaps = [(_iou(small.box, face.bbox), face) for face in detected[small.image]]
        best = max(overlaps, key=lambda pair: pair[0], default=(0.0, None))
        score = None
        if best[1] is not None and best[0] > 0:
            direction = directions[small.identity or 0]
            score = cosine(analyzer.embed(images[small.image], best[1]), direction)
        scored.append(dataclasses.replace(small, score_after=score))
    return scored


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ax1, ay1, ax2, ay2 = (float(v) for v in np.asarray(a).reshape(-1)[:4])
    bx1, by1, bx2, by2 = (float(v) for v in np.asarray(b).reshape(-1)[:4])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0
