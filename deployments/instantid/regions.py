"""Several people in one image: who owns which part of the output, and where each face is drawn.

Each identity owns a *region*, a box in output pixels. Its face tokens and its IdentityNet residuals act only there,
and its face (the five keypoints IdentityNet reads) is placed inside it, so the identities stay apart: a pixel in
one region never sees another identity's face tokens, and a pixel outside every region sees none. Regions may not
overlap, for exactly that reason.

Three layouts fix the faces and regions, first match wins:

- a pose photo: its largest faces, as many as there are identities, matched to the identities left to right (by
  box centre); each keeps its pose keypoints, and the regions are the given boxes or, without them, full-height
  columns split halfway between neighbouring faces;
- explicit regions: each identity's own keypoints (from its first photo) scaled into the upper middle of its region;
- automatic: equal full-height columns, faces placed as for explicit regions, at a natural head height.

Everything here is numpy geometry, shared by the face stage (which decides the layout), ``POST /v1/faces`` (which
shows it) and the denoiser (which turns it into masks and the keypoint image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InvalidParameterError
from .keypoints import draw_keypoint_image, face_region_mask
from .options import MAX_IDENTITIES, MIN_IDENTITIES

Layout = Literal["pose", "regions", "columns"]
Box = tuple[float, float, float, float]

MIN_REGION_PX = 64  # a region narrower than this keeps under two cells at SDXL's coarsest attention layer
# A face placed into a region (explicit or automatic layout): its box is at most this share of the region's
# width and height, centred horizontally, with its centre this far down the region: a head-and-shoulders framing.
FACE_WIDTH_SHARE = 0.5
FACE_HEIGHT_SHARE = 0.4
HEAD_HEIGHT = 0.3


@dataclass(frozen=True, eq=False)
class PlacedIdentity:
    """One identity as the denoiser needs it: identity vector, face geometry and region, all in output pixels."""

    embedding: np.ndarray  # (512,) raw, or (N, 512) with identity_combine "concat"
    keypoints: np.ndarray  # (5, 2) float32
    box: np.ndarray  # (4,) float32: the placed face's box (the enhance-face-region mask inside the region)
    region: np.ndarray  # (4,) float32: x1, y1, x2, y2, the part of the image this identity owns

    def geometry(self) -> dict[str, list]:
        """JSON-able region, face box and keypoints (responses, meta.json, ``POST /v1/faces``)."""
        return {
            "region": [float(v) for v in self.region],
            "box": [float(v) for v in self.box],
            "keypoints": [[float(x), float(y)] for x, y in self.keypoints],
        }


def check_identity_count(count: int) -> None:
    if not MIN_IDENTITIES <= count <= MAX_IDENTITIES:
        raise InvalidParameterError(f"identities holds {MIN_IDENTITIES} to {MAX_IDENTITIES} people, got {count}")


def check_regions(regions: Sequence[Sequence[float]], width: int, height: int) -> None:
    """422 unless every region is a finite box of at least ``MIN_REGION_PX`` inside the image and none overlap.

    Boxes that only touch (one's x2 equals the other's x1) do not overlap: their masks share no pixel.
    """
    boxes = [np.asarray(region, dtype=np.float64).reshape(-1) for region in regions]
    for index, box in enumerate(boxes):
        if box.shape != (4,) or not np.all(np.isfinite(box)):
            raise InvalidParameterError(f"identities[{index}].region must be 4 finite numbers x1, y1, x2, y2")
        x1, y1, x2, y2 = box
        if x2 - x1 < MIN_REGION_PX or y2 - y1 < MIN_REGION_PX:
            raise InvalidParameterError(
                f"identities[{index}].region {_text(box)} must have x1 < x2 and y1 < y2 and be at least "
                f"{MIN_REGION_PX} px in each direction"
            )
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise InvalidParameterError(
                f"identities[{index}].region {_text(box)} lies outside the {width}x{height} output image"
            )
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
                raise InvalidParameterError(
                    f"identities[{i}].region {_text(a)} and identities[{j}].region {_text(b)} overlap: each pixel "
                    "may belong to one identity only"
                )


def _text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def column_regions(count: int, width: int, height: int) -> list[np.ndarray]:
    """``count`` equal full-height columns, left to right, on whole pixels (the automatic layout's regions)."""
    edges = [round(i * width / count) for i in range(count + 1)]
    return [np.array([edges[i], 0, edges[i + 1], height], dtype=np.float32) for i in range(count)]


def pose_regions(boxes: Sequence[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Full-height columns split halfway between neighbouring faces' box centres (faces ordered left to right)."""
    centres = [float(box[0] + box[2]) / 2.0 for box in boxes]
    cuts = [0] + [round((centres[i] + centres[i + 1]) / 2.0) for i in range(len(centres) - 1)] + [width]
    return [np.array([cuts[i], 0, cuts[i + 1], height], dtype=np.float32) for i in range(len(boxes))]


def match_left_to_right(boxes: Sequence[np.ndarray], count: int) -> list[int]:
    """The indices (into ``boxes``, largest face first) of the ``count`` largest faces, ordered left to right by
    box centre: identity i gets the i-th. 422 when the photo holds fewer faces than identities."""
    if len(boxes) < count:
        found = f"{len(boxes)} face{'s' if len(boxes) != 1 else ''}"
        raise InvalidParameterError(
            f"the pose image holds {found} but the request has {count} identities: each identity takes one of its "
            "faces (give a pose photo with enough faces, or regions without a pose photo)"
        )
    chosen = list(range(count))  # boxes are largest first (the detector's order in POST /v1/faces)
    return sorted(chosen, key=lambda i: (float(boxes[i][0] + boxes[i][2]) / 2.0, i))


def place_face(keypoints: np.ndarray, box: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An identity's own face (keypoints and box, in its photo's pixels) scaled and moved into ``region``.

    One uniform scale (the face keeps its shape) makes the box at most ``FACE_WIDTH_SHARE`` of the region's width
    and ``FACE_HEIGHT_SHARE`` of its height; the box is centred horizontally with its centre ``HEAD_HEIGHT`` of the
    way down: the upper middle, where a head sits in a portrait.
    """
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64))
    rx1, ry1, rx2, ry2 = (float(v) for v in np.asarray(region, dtype=np.float64))
    face_w, face_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    scale = min(FACE_WIDTH_SHARE * (rx2 - rx1) / face_w, FACE_HEIGHT_SHARE * (ry2 - ry1) / face_h)
    target = np.array([(rx1 + rx2) / 2.0, ry1 + HEAD_HEIGHT * (ry2 - ry1)])
    centre = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
    points = (np.asarray(keypoints, dtype=np.float64) - centre) * scale + target
    corners = (np.array([[x1, y1], [x2, y2]]) - centre) * scale + target
    return points.astype(np.float32), corners.reshape(4).astype(np.float32)


def box_centre_inside(box: np.ndarray, region: np.ndarray) -> bool:
    cx, cy = float(box[0] + box[2]) / 2.0, float(box[1] + box[3]) / 2.0
    return bool(region[0] <= cx < region[2] and region[1] <= cy < region[3])


# ----------------------------------------------------------------------------------------- the denoiser's inputs


def shared_keypoint_image(keypoints: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """One IdentityNet condition image holding every identity's five keypoints, each drawn exactly as a single face
    is (:func:`draw_keypoint_image`) and combined by per-pixel maximum. One face gives its own drawing unchanged."""
    drawings = [draw_keypoint_image(np.asarray(kps), width, height) for kps in keypoints]
    if len(drawings) == 1:
        return drawings[0]
    return np.maximum.reduce(drawings)


def identity_masks(
    regions: Sequence[np.ndarray], boxes: Sequence[np.ndarray], width: int, height: int, enhance_face_region: bool
) -> np.ndarray | None:
    """Per identity, where its face tokens and IdentityNet residuals act: float32 (k, H, W) of 0/1.

    Its region; with ``enhance_face_region`` narrowed further to its face box, as the single-identity "enhance"
    mask narrows the whole image to the face. Outside every region all masks are 0, whatever ``enhance_face_region``
    says. None when a single identity's mask covers the whole image: no mask is the same as an all-ones mask and
    skips the multiplications (and is exactly the single-identity path).
    """
    masks = []
    for region, box in zip(regions, boxes, strict=True):
        mask = face_region_mask(np.asarray(region), width, height)
        if enhance_face_region:
            mask = mask * face_region_mask(np.asarray(box), width, height)
        masks.append(mask)
    stacked = np.stack(masks).astype(np.float32)
    if len(masks) == 1 and np.all(stacked == 1.0):
        return None
    return stacked
