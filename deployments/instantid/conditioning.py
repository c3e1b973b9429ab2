"""From photos to what the denoiser needs: identity vector(s), keypoints and face box in output pixels, size.

This is the face-analysis stage's whole job, kept compact (a 512-d vector and a handful of numbers)
because it crosses process boundaries. The keypoint image itself is drawn by the denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .errors import FaceTooSmallError, InvalidParameterError, NoFaceError
from .face_data import ChosenFace, DetectedFace, FaceCondition
from .faces import FaceAnalyzer
from .identity import DEFAULT_IDENTITY_COMBINE, MAX_FACE_PHOTOS, combine_embeddings
from .keypoints import REFERENCE_LONG_SIDE, CropTransform, reference_size


def output_size(
    src_width: int, src_height: int, width: int | None, height: int | None, long_side: int = REFERENCE_LONG_SIDE
) -> tuple[int, int, CropTransform]:
    """The output size and the source->output transform.

    Without a size, the reference rule (long side ``long_side``, sides floored to multiples of 64) with a
    plain resize; with one, cover-and-centre-crop so faces are never stretched.
    """
    if width is None and height is None:
        w, h = reference_size(src_width, src_height, long_side=long_side)
        if w < 64 or h < 64:
            raise InvalidParameterError(
                f"the image is too narrow for the reference size rule ({src_width}x{src_height})"
            )
        return w, h, CropTransform.resize(src_width, src_height, w, h)
    if width is None or height is None:
        raise InvalidParameterError("give both width and height, or neither")
    return width, height, CropTransform.cover(src_width, src_height, width, height)


def photo_label(photo_index: int, photos: int) -> str:
    """How errors name a face photo: "the face image" for one, "face photo 2" (0-based) among several."""
    return "the face image" if photos == 1 else f"face photo {photo_index}"


def choose_face(faces: Sequence[DetectedFace], index: int, where: str, field_name: str) -> DetectedFace:
    """``faces[index]`` (largest first), or a 422 naming the photo and how many faces it holds."""
    if not faces:
        raise NoFaceError(f"no face detected in {where}")
    if not 0 <= index < len(faces):
        found = f"{len(faces)} face{'s' if len(faces) != 1 else ''}"
        raise InvalidParameterError(f"{field_name} {index} is out of range: {found} found in {where}")
    return faces[index]


def identify(
    analyzer: FaceAnalyzer,
    rgb: np.ndarray,
    *,
    photo_index: int = 0,
    photos: int = 1,
    face_index: int = 0,
    min_face_px: int = 1,
) -> ChosenFace:
    """One identity photo: its face number ``face_index`` (largest first), with that face's embedding."""
    where = photo_label(photo_index, photos)
    face = choose_face(analyzer.detect(rgb), face_index, where, "face_index")
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    if min(x2 - x1, y2 - y1) < min_face_px:
        raise FaceTooSmallError(
            f"the chosen face in {where} is {x2 - x1:.0f}x{y2 - y1:.0f} px; at least {min_face_px} px across is needed"
        )
    face = replace(face, embedding=analyzer.embed(rgb, face))
    return ChosenFace(face, "face", photo_index, face_index, rgb.shape[1], rgb.shape[0])


def locate_pose(analyzer: FaceAnalyzer, rgb: np.ndarray, pose_face_index: int = 0) -> ChosenFace:
    """The pose photo's face number ``pose_face_index``: only its keypoints and box are used (no embedding)."""
    return pose_face(analyzer.detect(rgb), rgb.shape[1], rgb.shape[0], pose_face_index)


def pose_face(faces: Sequence[DetectedFace], width: int, height: int, pose_face_index: int = 0) -> ChosenFace:
    """Face number ``pose_face_index`` of a pose photo's detected ``faces`` (largest first)."""
    face = choose_face(faces, pose_face_index, "the pose image", "pose_face_index")
    return ChosenFace(face, "pose", 0, pose_face_index, width, height)


def condition_from(
    identities: Sequence[ChosenFace],
    pose: ChosenFace | None = None,
    *,
    identity_combine: str = DEFAULT_IDENTITY_COMBINE,
    width: int | None = None,
    height: int | None = None,
    long_side: int = REFERENCE_LONG_SIDE,
) -> FaceCondition:
    """The combined identity of the photos (in photo order) and the geometry of the pose photo, else of the
    first photo, at the output size."""
    ordered = sorted(identities, key=lambda chosen: chosen.photo_index)
    if not ordered:
        raise ValueError("condition_from needs at least one identity photo")
    embedding = combine_embeddings([chosen.face.embedding for chosen in ordered], identity_combine)
    geometry = pose if pose is not None else ordered[0]
    out_w, out_h, transform = output_size(geometry.image_width, geometry.image_height, width, height, long_side)
    return FaceCondition(
        embedding=np.asarray(embedding, dtype=np.float32),
        keypoints=transform.apply_points(geometry.face.kps).astype(np.float32),
        box=transform.apply_box(geometry.face.bbox).astype(np.float32),
        width=out_w,
        height=out_h,
        face=ordered[0].face,
        pose_face=pose.face if pose is not None else None,
        used=[chosen.without_embedding() for chosen in ordered] + ([pose] if pose is not None else []),
    )


def prepare_face_condition(
    analyzer: FaceAnalyzer,
    face_rgb: np.ndarray | Sequence[np.ndarray],
    pose_rgb: np.ndarray | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    long_side: int = REFERENCE_LONG_SIDE,
    min_face_px: int = 1,
    face_index: int = 0,
    pose_face_index: int = 0,
    identity_combine: str = DEFAULT_IDENTITY_COMBINE,
) -> FaceCondition:
    """All of face analysis in one process: each face photo (one array or a list of 1..8) and the optional pose
    photo. The served graph runs the same steps, each photo on its own FaceAnalyzer replica."""
    photos = [face_rgb] if isinstance(face_rgb, np.ndarray) else list(face_rgb)
    if not 1 <= len(photos) <= MAX_FACE_PHOTOS:
        raise InvalidParameterError(f"give 1 to {MAX_FACE_PHOTOS} face photos, got {len(photos)}")
    identities = [
        identify(analyzer, rgb, photo_index=i, photos=len(photos), face_index=face_index, min_face_px=min_face_px)
        for i, rgb in enumerate(photos)
    ]
    pose = locate_pose(analyzer, pose_rgb, pose_face_index) if pose_rgb is not None else None
    return condition_from(
        identities, pose, identity_combine=identity_combine, width=width, height=height, long_side=long_side
    )
