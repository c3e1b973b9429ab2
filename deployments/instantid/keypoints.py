"""The IdentityNet condition image, the output-size rule and source->output geometry.

Everything here follows the published InstantID method pixel for pixel, because the ControlNet was trained on
exactly these drawings and users compare our outputs with the reference demo's: five coloured keypoints,
limbs from each to the nose drawn as thin filled ellipses at 60% intensity, full-colour circles on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# RGB colour of keypoints 0..4: left eye, right eye, nose, left mouth corner, right mouth corner.
KEYPOINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
# Every limb runs to the nose and is drawn in the colour of its first keypoint.
LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
LIMB_DIM = 0.6  # limbs end at 60% intensity (255 -> 153); circles are drawn afterwards at full colour
CIRCLE_RADIUS = 10
# The reference demo's resize rule: long side 1280 (1024 in its multi-ControlNet demo), sides floored to 64.
REFERENCE_LONG_SIDE = 1280


def draw_keypoint_image(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    """The 5-keypoint condition image, RGB uint8 (height, width, 3).

    cv2 draws whatever tuple it is given into channels 0, 1, 2 in that order; it never reorders. The canvas
    is RGB and the colours are RGB triples, so no BGR conversion happens anywhere here.
    (OpenCV is imported here, not at module level, so the denoiser imports on machines without it.)
    The keypoints' own dtype is kept for the limb arithmetic (insightface gives float32), as in the
    reference, so that int() truncations land on the same pixels.
    """
    import cv2

    points = np.asarray(kps)
    if points.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2), got {points.shape}")
    if not np.issubdtype(points.dtype, np.floating):
        points = points.astype(np.float64)
    if not np.all(np.isfinite(points)):
        raise ValueError("kps must be finite")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for start, end in LIMBS:
        x0, y0 = points[start]
        x1, y1 = points[end]
        length = ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLOURS[start])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for index, (x, y) in enumerate(points):
        cv2.circle(canvas, (int(x), int(y)), CIRCLE_RADIUS, KEYPOINT_COLOURS[index], -1)
    return canvas


def reference_size(
    width: int, height: int, long_side: int = REFERENCE_LONG_SIDE, multiple: int = 64, *, short_side: int = 1024
) -> tuple[int, int]:
    """The output size the public demo derives from an input of ``width`` x ``height``.

    Same arithmetic as the demo's resize step (Python's round(), i.e. round-half-even): first scale so the
    short side is ``short_side`` and round, then scale so the long side is ``long_side``, round, and floor
    each side to a multiple of ``multiple``. The first step only matters through its rounding, but it is
    kept so sizes match the reference exactly.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    ratio = short_side / min(width, height)
    w, h = round(ratio * width), round(ratio * height)
    ratio = long_side / max(w, h)
    return (round(ratio * w) // multiple) * multiple, (round(ratio * h) // multiple) * multiple


@dataclass(frozen=True)
class CropTransform:
    """Source pixel coordinates -> output pixel coordinates: ``out = src * scale + offset``.

    Coordinates are continuous (pixel i spans [i, i+1)), the same convention insightface uses when it maps
    detections back from its resized detector input. ``width``/``height`` are the output size; boxes are
    clipped to it, points are not (a keypoint just outside the crop still shapes the drawing).
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    @classmethod
    def resize(cls, src_w: int, src_h: int, dst_w: int, dst_h: int) -> CropTransform:
        """Plain resize to ``dst_w`` x ``dst_h`` (the reference rule; aspect changes only by the flooring)."""
        _check_sizes(src_w, src_h, dst_w, dst_h)
        return cls(dst_w / src_w, dst_h / src_h, 0.0, 0.0, dst_w, dst_h)

    @classmethod
    def cover(cls, src_w: int, src_h: int, dst_w: int, dst_h: int) -> CropTransform:
        """Scale uniformly until the source covers the target, then centre-crop: faces are never stretched."""
        _check_sizes(src_w, src_h, dst_w, dst_h)
        scale = max(dst_w / src_w, dst_h / src_h)
        return cls(scale, scale, (dst_w - src_w * scale) / 2.0, (dst_h - src_h * scale) / 2.0, dst_w, dst_h)

    def apply_points(self, pts: np.ndarray) -> np.ndarray:
        """Map (..., 2) points (x, y) to output coordinates, float32."""
        points = np.asarray(pts, dtype=np.float64)
        if points.shape[-1] != 2:
            raise ValueError(f"points must have a last axis of 2, got shape {points.shape}")
        out = np.empty_like(points)
        out[..., 0] = points[..., 0] * self.scale_x + self.offset_x
        out[..., 1] = points[..., 1] * self.scale_y + self.offset_y
        return out.astype(np.float32)

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        """Map an (x1, y1, x2, y2) box to output coordinates, clipped to the output, float32 (4,)."""
        values = np.asarray(box, dtype=np.float64).reshape(-1)
        if values.shape[0] < 4:
            raise ValueError(f"box must hold x1, y1, x2, y2, got {values.shape[0]} values")
        corners = self.apply_points(values[:4].reshape(2, 2)).astype(np.float64)
        corners[:, 0] = np.clip(corners[:, 0], 0.0, self.width)
        corners[:, 1] = np.clip(corners[:, 1], 0.0, self.height)
        return corners.reshape(4).astype(np.float32)

    def apply_image(self, rgb: np.ndarray) -> np.ndarray:
        """Resample an (H, W, 3) uint8 image the same way (bilinear, as the demo's Pillow resize).

        Pillow's ``box`` argument takes the source rectangle in the same continuous coordinates, so the image
        and the points stay exactly consistent.
        """
        from PIL import Image

        x0 = -self.offset_x / self.scale_x
        y0 = -self.offset_y / self.scale_y
        box = (x0, y0, x0 + self.width / self.scale_x, y0 + self.height / self.scale_y)
        # Rounding can put an edge a hair outside the source (e.g. -1e-15); Pillow refuses that, so clamp.
        src_h, src_w = rgb.shape[:2]
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(src_w), box[2]), min(float(src_h), box[3]))
        image = Image.fromarray(np.ascontiguousarray(rgb))
        resized = image.resize((self.width, self.height), Image.Resampling.BILINEAR, box=box)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def _check_sizes(*sizes: int) -> None:
    if any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive, got {sizes}")


def face_region_mask(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """The "enhance non-face region" control mask: 1.0 inside the face box, 0.0 elsewhere, float32 (H, W).

    Rows ``int(y1):int(y2)`` and columns ``int(x1):int(x2)`` as in the reference; bounds are clamped to
    the image first, so a box starting slightly outside (detectors allow that) cannot wrap around through
    Python's negative indexing.
    """
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)[:4])
    mask = np.zeros((height, width), dtype=np.float32)
    left, right = max(0, int(x1)), min(width, int(x2))
    top, bottom = max(0, int(y1)), min(height, int(y2))
    if right > left and bottom > top:
        mask[top:bottom, left:right] = 1.0
    return mask
