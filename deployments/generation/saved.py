"""A saved identity's record as what the face stage would have made of its photos: the same chosen faces, with the
embeddings computed when it was enrolled, so a generation from it skips detection and recognition and gives the
image the photos give."""

from __future__ import annotations

import numpy as np

from deployments.instantid.face_data import ChosenFace, DetectedFace
from deployments.storage.identities import SavedIdentity

from .messages import IdentityResult, StageTiming


def saved_faces(record: SavedIdentity, loaded: StageTiming, identity: int | None = None) -> tuple[IdentityResult, ...]:
    """Each enrolled photo's chosen face (``identity``: its index among several people), timed as ``loaded``."""
    results = []
    for index, photo in enumerate(record.photos):
        face = DetectedFace(
            np.asarray(photo.box, np.float32),
            np.asarray(photo.keypoints, np.float32),
            photo.score,
            np.asarray(photo.embedding, np.float32),
        )
        chosen = ChosenFace(
            face, "face", index, photo.face_index, photo.width, photo.height, identity, saved_identity=record.id
        )
        stage = "face_identity" if identity is None else f"face_{identity}_identity"
        results.append(IdentityResult(chosen, {stage: loaded} if index == 0 else {}, ""))
    return tuple(results)


def saved_photos(chosen: list[ChosenFace]) -> list[dict]:
    """The record's photo entries of an enrolment's chosen faces (embedding as floats: the JSON round trip of a
    float32 through Python's float is exact, so a generation from the record equals one from the photos)."""
    return [
        {
            "width": c.image_width,
            "height": c.image_height,
            "face_index": c.face_index,
            "box": [float(v) for v in c.face.bbox],
            "keypoints": c.face.kps.tolist(),
            "score": c.face.det_score,
            "embedding": [float(v) for v in c.face.embedding],
        }
        for c in chosen
    ]
