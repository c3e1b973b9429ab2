"""How well a generated image kept the requested identity: one cosine similarity per image.

The score tells the user, per image, how close the face InstantID drew is to the identity they uploaded, so a
batch can be ranked or a weak result retried without looking at every picture. The generated image is analysed
exactly like the face photo was: the LARGEST face (the same rule that chose the input face) is recognised by the
same antelopev2 ArcFace model that produced the reference embedding, so both vectors live in one space and 1.0
means the very same face crop; unrelated faces score near 0 (the score is a cosine, in [-1, 1]).

No face in a generated image gives ``None`` rather than a number (the caller turns that into a warning): a
made-up low score would be indistinguishable from a real identity loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .face_data import DetectedFace
from .faces import FaceAnalyzer

__all__ = [
    "RegionScore",
    "cosine",
    "identity_similarities",
    "identity_similarity",
    "reference_direction",
    "region_similarities",
]


def reference_direction(reference: np.ndarray) -> np.ndarray:
    """The unit (float64) direction a generated face is compared with.

    ``reference`` is the identity the generation was conditioned on, as the face stage produced it: a (512,) raw
    embedding (one photo, or several combined with ``mean``/``normalized_mean``), or (N, 512) when the request used
    ``identity_combine="concat"``. Rule for (N, 512): each row is L2-normalised first and the generated face is
    compared with the MEAN OF THOSE UNIT ROWS, so every photo weighs the same however long its raw vector is (the
    same idea as ``normalized_mean``; cosine ignores the mean's length). One row is the (512,) case.

    Raises ValueError for any other shape, non-finite values, a zero vector (a reference of norm 0 has no
    direction: any score would be meaningless), or concat rows whose directions cancel out exactly.
    """
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim not in (1, 2) or ref.shape[-1] == 0 or (ref.ndim == 2 and ref.shape[0] == 0):
        raise ValueError(f"the reference identity must be (D,) or (N, D) with N, D >= 1; got shape {ref.shape}")
    if not np.all(np.isfinite(ref)):
        raise ValueError("the reference identity has non-finite values")
    rows = ref.reshape(-1, ref.shape[-1])
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("the reference identity has norm 0: it has no direction to compare a face with")
    direction = (rows / norms).mean(axis=0)
    length = np.linalg.norm(direction)
    if length == 0:
        raise ValueError("the reference identity's rows point in opposite directions and cancel out")
    return direction / length


def cosine(embedding: np.ndarray, direction: np.ndarray) -> float | None:
    """Cosine (float64) of a raw embedding with a unit direction; None when the embedding has no direction."""
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    if vector.shape != direction.shape:
        raise ValueError(
            f"the face embedding is {vector.shape[0]}-d but the reference is {direction.shape[0]}-d: "
            "they must come from the same recognition model"
        )
    norm = np.linalg.norm(vector)
    if norm == 0 or not np.isfinite(norm):  # a degenerate crop: no identity can be measured
        return None
    # Clipped only against float rounding (a face compared with itself may give 1.0000000000000002).
    return float(min(1.0, max(-1.0, float(vector @ direction) / float(norm))))


def _score(analyzer: FaceAnalyzer, image_rgb: np.ndarray, direction: np.ndarray) -> float | None:
    faces = analyzer.detect(image_rgb)  # largest box first
    if not faces:
        return None
    return cosine(analyzer.embed(image_rgb, faces[0]), direction)


def identity_similarity(analyzer: FaceAnalyzer, image_rgb: np.ndarray, reference: np.ndarray) -> float | None:
    """Cosine similarity between the largest face in ``image_rgb`` (RGB uint8, (H, W, 3)) and ``reference``.

    The face's raw embedding comes from ``analyzer``, the same recognition model that made the reference, so
    scoring a face photo against its own embedding gives 1.0. ``reference`` is (512,) or, for
    ``identity_combine="concat"``, (N, 512): then the face is compared with the mean of the L2-normalised rows
    (see :func:`reference_direction`). Computed in float64 and returned as a full-precision Python float in
    [-1, 1]; ``None`` when no face is found (or the found face's embedding is the zero vector).

    Raises ValueError for a reference of norm 0 (or of a bad shape) and for an image that is not RGB uint8.
    """
    return _score(analyzer, image_rgb, reference_direction(reference))


def identity_similarities(analyzer: FaceAnalyzer, images: np.ndarray, reference: np.ndarray) -> list[float | None]:
    """:func:`identity_similarity` for every image of a generation's batch ((N, H, W, 3) uint8), in order.

    The reference is checked (a norm-0 reference is a ValueError even for an empty batch) and reduced to its
    direction once for the whole batch.
    """
    direction = reference_direction(reference)
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise ValueError(f"expected images of shape (N, H, W, 3), got {type(images).__name__} {shape}")
    return [_score(analyzer, image, direction) for image in images]


@dataclass(frozen=True)
class RegionScore:
    """One identity's score in a multi-identity image: its region's best-matching face (box in the image's pixels)
    and that face's cosine with the identity; both None when no face lies in the region."""

    index: int
    box: list[float] | None
    similarity: float | None


def region_similarities(
    analyzer: FaceAnalyzer, image_rgb: np.ndarray, identities: Sequence[tuple[np.ndarray, np.ndarray]]
) -> list[RegionScore]:
    """Several people in one image: per identity ``(reference, region)``, its region's best-matching face.

    The image's faces are detected once; a face belongs to the region that holds its box centre (regions do not
    overlap), and each face there is compared with that identity's reference (as :func:`identity_similarity`
    compares). Returns one :class:`RegionScore` per identity, in order. So a client sees
    whether each person came out as themselves, and where.
    """
    directions = [reference_direction(reference) for reference, _ in identities]
    faces = analyzer.detect(image_rgb)
    results: list[RegionScore] = []
    for index, ((_, region), direction) in enumerate(zip(identities, directions, strict=True)):
        x1, y1, x2, y2 = (float(v) for v in np.asarray(region).reshape(-1)[:4])
        best: tuple[float, DetectedFace] | None = None
        for face in faces:
            cx, cy = float(face.bbox[0] + face.bbox[2]) / 2.0, float(face.bbox[1] + face.bbox[3]) / 2.0
            if not (x1 <= cx < x2 and y1 <= cy < y2):
                continue
            similarity = cosine(analyzer.embed(image_rgb, face), direction)
            if similarity is not None and (best is None or similarity > best[0]):
                best = (similarity, face)
        if best is None:
            results.append(RegionScore(index, None, None))
        else:
            results.append(RegionScore(index, [float(v) for v in best[1].bbox], best[0]))
    return results
