"""Editing a photo: the mask, the crop that is generated, and pasting the result back into the full-size target.

An edit repaints part of a target photo (by default its chosen face, grown by a padding) with the request's
identity. The masked region plus some context is cut out and resized so that it is generated at portrait
resolution (a face that fills 200 pixels of a group photo would otherwise be drawn at 200 pixels); the denoiser
runs image-to-image on that crop with the masked latent blend (``denoiser.py``), and the crop is scaled back,
colour matched to its surroundings and composited into the target with a feathered mask. The feather lies inside
the mask, so every pixel outside it is the target's, bit for bit.

Model math only (NumPy, OpenCV, Pillow): no serving code is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidParameterError
from .keypoints import CropTransform

EDIT_CONTEXT = 0.25  # context kept around the mask's bounding box, per side, as a share of the box's size
MIN_CONTEXT_PX = 16  # ... and at least this many target pixels, so the colour-matching ring has pixels to read
MIN_EDIT_SIDE = 64  # the crop's short side is generated at least this large (eight latent pixels)
RING_PX = 16  # width of the ring around the mask whose colours the generated crop is matched to (target pixels)
MIN_STD = 1.0  # a ring channel flatter than this (in 0..255) is matched by its mean only


def face_mask(box: np.ndarray, width: int, height: int, padding: float) -> np.ndarray:
    """The repaint mask of a face: its ``box`` (x1, y1, x2, y2) grown on every side by ``padding`` x the box's width
    (left, right) and height (top, bottom), clipped to the ``width`` x ``height`` image; (H, W) bool."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box).reshape(-1)[:4])
    grow_x, grow_y = padding * (x2 - x1), padding * (y2 - y1)
    left, top = max(0, int(np.floor(x1 - grow_x))), max(0, int(np.floor(y1 - grow_y)))
    right, bottom = min(width, int(np.ceil(x2 + grow_x))), min(height, int(np.ceil(y2 + grow_y)))
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def uploaded_mask(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """An uploaded mask image as (H, W) bool: white repaints. It must be the target's size (a mask scaled to fit
    would no longer say which pixels to keep); a pixel repaints where its luma (ITU-R 601, as Pillow's "L") is at
    least 128, the threshold at which diffusers' inpainting pipelines binarise a mask."""
    if rgb.shape[:2] != (height, width):
        raise InvalidParameterError(
            f"mask_image is {rgb.shape[1]}x{rgb.shape[0]} but target_image is {width}x{height}: they must match"
        )
    mask = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) >= 128
    if not mask.any():
        raise InvalidParameterError("mask_image has no white pixel: nothing to repaint")
    return mask


def feathered(mask: np.ndarray, blur_px: float) -> np.ndarray:
    """The paste-back weight of a (H, W) bool mask: a linear ramp from 0 outside the mask to 1 at ``blur_px``
    pixels inside it (Euclidean distance), float32. 0 everywhere outside the mask, so those pixels stay the
    target's exactly; ``blur_px`` 0 is the hard mask."""
    if blur_px <= 0:
        return mask.astype(np.float32)
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(inside / float(blur_px), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class EditRegion:
    """The part of the target that is generated: ``box`` (left, top, right, bottom; right/bottom exclusive) in target
    pixels, resized to ``width`` x ``height`` (multiples of 8) for the denoiser."""

    box: tuple[int, int, int, int]
    width: int
    height: int

    @property
    def crop_size(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top

    def transform(self) -> CropTransform:
        """Target pixels -> generation pixels (keypoints and boxes)."""
        left, top = self.box[:2]
        crop_w, crop_h = self.crop_size
        scale_x, scale_y = self.width / crop_w, self.height / crop_h
        return CropTransform(scale_x, scale_y, -left * scale_x, -top * scale_y, self.width, self.height)


def edit_region(mask: np.ndarray, resolution: int, context: float = EDIT_CONTEXT) -> EditRegion:
    """The crop around a (H, W) bool mask: its bounding box grown by ``context`` of its size per side (at least
    ``MIN_CONTEXT_PX``), clipped to the image, and the generation size whose long side is ``resolution`` (sides
    rounded to multiples of 8, the short one at least ``MIN_EDIT_SIDE``). The rounding may stretch the crop by
    less than 8 pixels; pasting back undoes it."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise InvalidParameterError("the edit mask is empty: nothing to repaint")
    height, width = mask.shape
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    grow_x = max(MIN_CONTEXT_PX, int(np.ceil(context * (x1 - x0))))
    grow_y = max(MIN_CONTEXT_PX, int(np.ceil(context * (y1 - y0))))
    box = (max(0, x0 - grow_x), max(0, y0 - grow_y), min(width, x1 + grow_x), min(height, y1 + grow_y))
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    scale = resolution / max(crop_w, crop_h)
    out_w = max(MIN_EDIT_SIDE, round(crop_w * scale / 8) * 8)
    out_h = max(MIN_EDIT_SIDE, round(crop_h * scale / 8) * 8)
    return EditRegion(box, out_w, out_h)


def _resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of an RGB uint8 image (Pillow's, the filter the published demos resize photos with)."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.LANCZOS))


def colour_ring(mask: np.ndarray, px: int = RING_PX) -> np.ndarray:
    """The pixels outside a (H, W) bool mask within ``px`` pixels of it (a square dilation), bool."""
    kernel = np.ones((2 * px + 1, 2 * px + 1), dtype=np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask


def colour_matched(generated: np.ndarray, target: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """``generated`` (H, W, 3, float) shifted and scaled per channel so that its mean and standard deviation over
    ``ring`` equal ``target``'s there: the VAE round trip and the prompt shift colours, and the surroundings are
    the reference the eye compares a pasted region with. A channel whose ring is flat (std < ``MIN_STD`` in
    either image) is shifted only; an empty ring leaves the image as it is. float32."""
    generated = generated.astype(np.float32)
    if not ring.any():
        return generated
    out = np.empty_like(generated)
    for c in range(3):
        g, t = generated[..., c][ring], target[..., c][ring].astype(np.float32)
        g_mean, g_std, t_mean, t_std = g.mean(), g.std(), t.mean(), t.std()
        gain = t_std / g_std if g_std >= MIN_STD and t_std >= MIN_STD else 1.0
        out[..., c] = (generated[..., c] - g_mean) * gain + t_mean
    return out


@dataclass
class PreparedEdit:
    """An edit ready to generate and paste back: the full target, its feathered paste weight, the crop and the
    crop's pictures at the generation size (the init image and the repaint mask, white = repaint)."""

    target: np.ndarray  # (H, W, 3) uint8, the full target photo
    alpha: np.ndarray  # (H, W) float32 paste weight: 0 outside the mask
    region: EditRegion
    init_image: np.ndarray  # (h, w, 3) uint8: the crop at the generation size
    mask_image: np.ndarray  # (h, w) uint8, 0 or 255: the hard mask's crop at the generation size
    ring: np.ndarray  # (crop_h, crop_w) bool: the colour-matching ring inside the crop

    @classmethod
    def make(cls, target: np.ndarray, mask: np.ndarray, blur_px: float, resolution: int) -> PreparedEdit:
        """The edit of ``target`` that repaints ``mask`` ((H, W) bool), generated at ``resolution`` long side."""
        region = edit_region(mask, resolution)
        left, top, right, bottom = region.box
        crop_mask = mask[top:bottom, left:right]
        mask_small = cv2.resize(
            crop_mask.astype(np.uint8) * 255, (region.width, region.height), interpolation=cv2.INTER_NEAREST
        )
        return cls(
            target=np.ascontiguousarray(target),
            alpha=feathered(mask, blur_px),
            region=region,
            init_image=_resized(target[top:bottom, left:right], region.width, region.height),
            mask_image=mask_small,
            ring=colour_ring(mask)[top:bottom, left:right],
        )

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """One generated crop ((h, w, 3) uint8 at the generation size) back into the full target: scaled to the
        crop (Lanczos), colour matched over the ring, blended by the feathered weight; outside the mask the
        target's own pixels. (H, W, 3) uint8."""
        left, top, right, bottom = self.region.box
        crop_w, crop_h = self.region.crop_size
        known = self.target[top:bottom, left:right]
        back = colour_matched(_resized(generated, crop_w, crop_h), known, self.ring)
        weight = self.alpha[top:bottom, left:right, None]
        blended = np.clip(np.rint(known.astype(np.float32) * (1.0 - weight) + back * weight), 0, 255).astype(np.uint8)
        out = self.target.copy()
        out[top:bottom, left:right] = np.where(weight > 0, blended, known)
        return out
