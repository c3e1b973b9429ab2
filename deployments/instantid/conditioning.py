"""From photos to what the denoiser needs: identity vector, keypoints and face box in output pixels, size.

This is the face-analysis stage's whole job, kept compact (a 512-d vector and a handful of numbers)
because it crosses process boundaries. The keypoint image itself is drawn by the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FaceTooSmallError, InvalidParameterError, NoFaceError
from .faces import DetectedFace, FaceAnalyzer
from .keypoints import REFERENCE_LONG_SIDE, CropTransform, reference_size


@dataclass
class FaceCondition:
    """The identity (from the face photo) and the geometry (from the pose photo, else the face photo)."""

    embedding: np.ndarray  # (512,) float32, raw (not normalised)
    keypoints: np.ndarray  # (5, 2) in output pixels
    box: np.ndarray  # (4,) in output pixels
    width: int
    height: int
    face: DetectedFace  # the identity face, in face-photo pixels (reported to the client)
    pose_face: DetectedFace | None = None


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


def prepare_face_condition(
    analyzer: FaceAnalyzer,
    face_rgb: np.ndarray,
    pose_rgb: np.ndarray | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    long_side: int = REFERENCE_LONG_SIDE,
    min_face_px: int = 1,
) -> FaceCondition:
    """Analyse the face photo (largest face, with embedding) and the optional pose photo (largest face)."""
    identity = analyzer.analyze(face_rgb)
    x1, y1, x2, y2 = (float(v) for v in identity.bbox)
    if min(x2 - x1, y2 - y1) < min_face_px:
        raise FaceTooSmallError(
            f"the largest face is {x2 - x1:.0f}x{y2 - y1:.0f} px; at least {min_face_px} px across is needed"
        )
    pose_face = None
    source_face, source_image = identity, face_rgb
    if pose_rgb is not None:
        faces = analyzer.detect(pose_rgb)
        if not faces:
            raise NoFaceError("no face detected in the pose image")
        pose_face = max(faces, key=lambda f: f.area)
        source_face, source_image = pose_face, pose_rgb
    src_h, src_w = source_image.shape[:2]
    out_w, out_h, transform = output_size(src_w, src_h, width, height, long_side)
    return FaceCondition(
        embedding=np.asarray(identity.embedding, dtype=np.float32),
        keypoints=transform.apply_points(source_face.kps).astype(np.float32),
        box=transform.apply_box(source_face.bbox).astype(np.float32),
        width=out_w,
        height=out_h,
        face=identity,
        pose_face=pose_face,
    )
