"""The face condition of a multi-identity request: each identity's vector, and the layout of faces and regions.

The face stage analyses every photo of every identity (one ``identify`` call each, as for one person's several
photos) and the pose photo's faces; :func:`group_condition` then decides the layout (see ``regions``) at the
output size and returns a :class:`~.conditioning.FaceCondition` whose ``identities`` the denoiser reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .conditioning import identify, output_size
from .errors import InstantIDError, InvalidParameterError, NoFaceError
from .face_data import ChosenFace, DetectedFace, FaceCondition
from .faces import FaceAnalyzer
from .identity import DEFAULT_IDENTITY_COMBINE, combine_embeddings
from .keypoints import REFERENCE_LONG_SIDE
from .options import MAX_IDENTITIES
from .regions import (
    Layout,
    PlacedIdentity,
    box_centre_inside,
    check_regions,
    column_regions,
    match_left_to_right,
    place_face,
    pose_regions,
)


@dataclass
class IdentityPhotos:
    """One identity of the request: its analysed photos (with embeddings, in photo order), how they combine, and
    the region it asked for (output pixels), if any."""

    chosen: list[ChosenFace]
    identity_combine: str = DEFAULT_IDENTITY_COMBINE
    region: Sequence[float] | None = None


@dataclass
class PoseFaces:
    """Every face of the pose photo (largest first, the ``POST /v1/faces`` order) and the photo's size."""

    faces: list[DetectedFace]
    width: int
    height: int
    chosen: list[int] = field(default_factory=list)  # filled by group_condition: the face index per identity


def locate_pose_faces(analyzer: FaceAnalyzer, rgb: np.ndarray) -> PoseFaces:
    faces = analyzer.detect(rgb)
    if not faces:
        raise NoFaceError("no face detected in the pose image")
    return PoseFaces(faces, rgb.shape[1], rgb.shape[0])


def group_condition(
    identities: Sequence[IdentityPhotos],
    pose: PoseFaces | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    long_side: int = REFERENCE_LONG_SIDE,
) -> FaceCondition:
    """Every identity placed at the output size (the pose photo's, else the first identity's first photo's, by the
    single-identity rule). The request model holds 2..4 identities; one is accepted here too, and is then exactly
    the single-identity condition with a region covering the whole image."""
    count = len(identities)
    if not 1 <= count <= MAX_IDENTITIES:
        raise InvalidParameterError(f"identities holds 1 to {MAX_IDENTITIES} people here, got {count}")
    if any(not identity.chosen for identity in identities):
        raise ValueError("group_condition needs at least one analysed photo per identity")
    given = [identity.region is not None for identity in identities]
    if any(given) and not all(given):
        raise InvalidParameterError("give a region for every identity or for none")
    first = identities[0].chosen[0]
    source = (pose.width, pose.height) if pose is not None else (first.image_width, first.image_height)
    out_w, out_h, transform = output_size(*source, width, height, long_side)
    regions = [np.asarray(identity.region, dtype=np.float32) for identity in identities] if all(given) else None
    if regions is not None:
        check_regions(regions, out_w, out_h)

    layout: Layout
    pose_used: list[ChosenFace] = []
    if pose is not None:
        boxes = [face.bbox for face in pose.faces]
        order = match_left_to_right(boxes, count)
        pose.chosen = order
        faces = [pose.faces[i] for i in order]
        keypoints = [transform.apply_points(face.kps).astype(np.float32) for face in faces]
        placed_boxes = [transform.apply_box(face.bbox).astype(np.float32) for face in faces]
        if regions is None:
            regions = pose_regions(placed_boxes, out_w, out_h)
            try:
                check_regions(regions, out_w, out_h)
            except InvalidParameterError as exc:
                raise InvalidParameterError(
                    f"the pose image's faces are too close together for automatic regions ({exc}); give regions"
                ) from None
        for index, (box, region) in enumerate(zip(placed_boxes, regions, strict=True)):
            if not box_centre_inside(box, region):
                raise InvalidParameterError(
                    f"identities[{index}]'s face in the pose image (matched left to right, box "
                    f"{[round(float(v), 1) for v in box]} at the output size) is not inside its region"
                )
        pose_used = [
            ChosenFace(pose.faces[face_index], "pose", 0, face_index, pose.width, pose.height, identity=i)
            for i, face_index in enumerate(order)
        ]
        layout = "pose"
    else:
        layout = "regions" if regions is not None else "columns"
        if regions is None:
            regions = column_regions(count, out_w, out_h)
        keypoints, placed_boxes = [], []
        for identity, region in zip(identities, regions, strict=True):
            own = identity.chosen[0].face
            kps, box = place_face(own.kps, own.bbox, region)
            keypoints.append(kps)
            placed_boxes.append(box)

    placed = [
        PlacedIdentity(
            embedding=np.asarray(
                combine_embeddings([c.face.embedding for c in identity.chosen], identity.identity_combine),
                dtype=np.float32,
            ),
            keypoints=kps,
            box=box,
            region=np.asarray(region, dtype=np.float32),
        )
        for identity, kps, box, region in zip(identities, keypoints, placed_boxes, regions, strict=True)
    ]
    used = [
        replace(chosen.without_embedding(), identity=i)
        for i, identity in enumerate(identities)
        for chosen in sorted(identity.chosen, key=lambda c: c.photo_index)
    ]
    return FaceCondition(
        embedding=placed[0].embedding,
        keypoints=placed[0].keypoints,
        box=placed[0].box,
        width=out_w,
        height=out_h,
        face=replace(first.face, embedding=None),
        pose_face=pose.faces[pose.chosen[0]] if pose is not None else None,
        used=used + pose_used,
        identities=placed,
        layout=layout,
    )


@dataclass
class IdentityInput:
    """One person for :func:`prepare_group_condition`: photos (RGB uint8), optional region, face choice, combining."""

    photos: Sequence[np.ndarray]
    region: Sequence[float] | None = None
    face_index: int = 0
    identity_combine: str = DEFAULT_IDENTITY_COMBINE


def prepare_group_condition(
    analyzer: FaceAnalyzer,
    identities: Sequence[IdentityInput],
    pose_rgb: np.ndarray | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    long_side: int = REFERENCE_LONG_SIDE,
    min_face_px: int = 1,
) -> FaceCondition:
    """All of a multi-identity face stage in one process: every identity's photos and the optional pose photo.
    The served graph runs the same steps, each photo on its own FaceAnalyzer replica."""
    analysed = []
    for index, person in enumerate(identities):
        chosen = []
        for photo_index, rgb in enumerate(person.photos):
            try:
                found = identify(
                    analyzer,
                    rgb,
                    photo_index=photo_index,
                    photos=len(person.photos),
                    face_index=person.face_index,
                    min_face_px=min_face_px,
                )
            except InstantIDError as exc:
                raise type(exc)(f"identities[{index}]: {exc.message}") from exc
            chosen.append(replace(found, identity=index))
        analysed.append(IdentityPhotos(chosen, person.identity_combine, person.region))
    pose = locate_pose_faces(analyzer, pose_rgb) if pose_rgb is not None else None
    return group_condition(analysed, pose, width=width, height=height, long_side=long_side)
