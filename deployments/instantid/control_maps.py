"""Control maps for the extra ControlNets (canny edges, depth) and the rule that brings any picture to the output size.

The maps follow the published InstantID multi-ControlNet demo, because the ControlNets were trained on maps made
that way: Canny edges of the BGR image at thresholds 100/200, and a monocular depth estimate min-max normalised
per image to 0..255. Every map is computed on the picture already brought to the output size, so that the edges
keep their one-pixel width and the depth map its full 0..255 range at the size the ControlNet sees.
Model math only: no serving code is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .construction import constructs_modules
from .errors import WeightsError
from .keypoints import CropTransform
from .options import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW

DEPTH_CONFIG = "config.json"
DEPTH_PREPROCESSOR = "preprocessor_config.json"
DEPTH_WEIGHTS = "model*.safetensors*"  # one file, or shards with their index


def _check_rgb(rgb: np.ndarray, what: str = "image") -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {shape} and dtype {dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {rgb.shape}")


def _three_channels(single: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3): the ControlNet pipeline turns the demo's one-channel ("L") maps into RGB this way."""
    return np.ascontiguousarray(np.repeat(single[:, :, None], 3, axis=2))


def canny_map(rgb: np.ndarray, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH) -> np.ndarray:
    """Canny edges of an (H, W, 3) uint8 RGB image, as an (H, W, 3) uint8 map (0 or 255 in all three channels).

    As the demo: the image goes to BGR first (cv2's channel order; Canny's gradient is taken on a weighted sum of
    the channels, so the order matters at the margins). OpenCV is imported here, as in keypoints.py, so that
    this module imports on machines without it.
    """
    import cv2

    _check_rgb(rgb)
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    return _three_channels(cv2.Canny(bgr, low, high))


def fit_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` brought to ``width`` x ``height`` as the keypoint image's source is: scaled uniformly until it
    covers the output, then centre-cropped (never stretched), so that a map lines up with the face keypoints."""
    _check_rgb(rgb)
    src_h, src_w = rgb.shape[:2]
    if (src_w, src_h) == (width, height):
        return np.ascontiguousarray(rgb)
    return CropTransform.cover(src_w, src_h, width, height).apply_image(rgb)


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """A float depth map -> (H, W, 3) uint8, min-max normalised per image and truncated, as the demo does.

    A constant map has no depth to show and becomes all zeros (rather than a division by zero).
    """
    depth = np.asarray(depth, dtype=np.float32)
    low, high = depth.min(), depth.max()
    unit = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    return _three_channels((unit * 255.0).clip(0, 255).astype(np.uint8))


class DepthEstimator:
    """A transformers depth-estimation model (Depth Anything, DPT, ...) that turns RGB images into depth maps.

    Each map has its image's own size: the prediction is resized back exactly as the transformers
    depth-estimation pipeline resizes it (the image processor's ``post_process_depth_estimation``, bicubic),
    in float32 even when the model runs in half precision, so that the min-max range is not quantised.
    """

    def __init__(self, processor, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.processor = processor
        self.model = model
        self.device = device
        self.dtype = dtype

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One (H, W, 3) uint8 depth map per (H, W, 3) uint8 RGB image, each at its image's size.

        Images go through the model one at a time: they may differ in size, and a map must not depend on
        which other images shared its call.
        """
        for index, image in enumerate(images):
            _check_rgb(image, f"image {index}")
        return [normalise_depth(self.predict(image)) for image in images]

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """The raw (H, W) float32 depth of one image, before normalisation (larger is nearer for Depth Anything)."""
        from PIL import Image

        height, width = rgb.shape[:2]
        # A PIL image, as the pipeline passes, so that both take the same resize path in the processor.
        inputs = self.processor(images=Image.fromarray(np.ascontiguousarray(rgb)), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        outputs = self.model(pixel_values=pixel_values)
        outputs.predicted_depth = outputs.predicted_depth.float()
        resized = self.processor.post_process_depth_estimation(outputs, target_sizes=[(height, width)])
        return resized[0]["predicted_depth"].reshape(height, width).cpu().numpy()

    def check_health(self) -> None:
        """Raise RuntimeError when a weight is NaN or infinite (a corrupt file or a bad half-precision cast)."""
        for name, parameter in self.model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise RuntimeError(f"depth model weight {name} holds NaN or infinite values")


def _missing_depth_files(folder: Path) -> list[str]:
    missing = [name for name in (DEPTH_CONFIG, DEPTH_PREPROCESSOR) if not (folder / name).is_file()]
    if not any(folder.glob(DEPTH_WEIGHTS)):
        missing.append("model.safetensors")
    return missing


@constructs_modules
def load_depth_estimator(
    folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DepthEstimator:
    """The depth model in ``folder`` (a transformers folder: config.json, model.safetensors,
    preprocessor_config.json, as the hub's depth-anything repos hold), in eval mode on ``device``.

    Raises WeightsError naming the folder and what it lacks, so that a misplaced download fails at start-up.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    # Imported here: loading imports the denoiser, which may import this module.
    from .loading import quiet_progress_bars

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"depth model folder {folder} does not exist")
    missing = _missing_depth_files(folder)
    if missing:
        found = sorted(p.name for p in folder.iterdir())
        raise WeightsError(
            f"depth model folder {folder} lacks {', '.join(missing)} (expected {DEPTH_CONFIG}, model.safetensors "
            f"and {DEPTH_PREPROCESSOR} as in a transformers depth-estimation repo; found: {found or 'nothing'})"
        )
    quiet_progress_bars()
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype)
    except Exception as exc:
        raise WeightsError(f"could not load the depth model in {folder} ({type(exc).__name__}: {exc})") from exc
    target = torch.device(device)
    return DepthEstimator(processor, model.to(target).eval(), target, dtype)
