"""The pictures beside the keypoints, at the output size: the extra ControlNets' maps and the image-to-image start.

One function serves the ControlMaps deployment and the in-process pipeline alike. The output size and the
source -> output transform are the face stage's (:func:`output_size` on the keypoints' source photo), so a map
computed here lines up pixel for pixel with the keypoint image IdentityNet sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .conditioning import output_size
from .control_maps import DepthEstimator, canny_map, fit_image
from .errors import InvalidParameterError
from .keypoints import REFERENCE_LONG_SIDE
from .options import COMPUTED_MAPS, DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW

UPLOADED = "uploaded"


@dataclass
class ControlInputs:
    """Maps (name -> (H, W, 3) uint8), where each came from, and the fitted init image, all at width x height."""

    width: int
    height: int
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # name -> "uploaded" or the photo it was computed from
    init_image: np.ndarray | None = None


def prepare_control_inputs(
    source_rgb: np.ndarray,
    *,
    source_name: str,
    width: int | None,
    height: int | None,
    long_side: int = REFERENCE_LONG_SIDE,
    compute: Sequence[str] = (),
    uploaded: Mapping[str, np.ndarray] | None = None,
    canny_low: int = DEFAULT_CANNY_LOW,
    canny_high: int = DEFAULT_CANNY_HIGH,
    depth: DepthEstimator | None = None,
    init_rgb: np.ndarray | None = None,
) -> ControlInputs:
    """Maps computed from ``source_rgb`` (the pose photo when given, else the face photo: ``source_name`` says
    which) for ``compute``, ready-made ``uploaded`` maps and the init image, each brought to the output size.

    Computed maps are made from the source already resized and cropped like the keypoints; uploaded maps and the
    init image are scaled to cover the output and centre-cropped (never stretched).
    """
    src_h, src_w = source_rgb.shape[:2]
    out_w, out_h, transform = output_size(src_w, src_h, width, height, long_side)
    inputs = ControlInputs(out_w, out_h)
    for name, image in (uploaded or {}).items():
        inputs.maps[name] = fit_image(image, out_w, out_h)
        inputs.sources[name] = UPLOADED
    wanted = [name for name in compute if name not in inputs.maps]
    unknown = [name for name in wanted if name not in COMPUTED_MAPS]
    if unknown:
        raise InvalidParameterError(
            f"no {unknown[0]} map can be computed here: upload a ready-made one (control image for {unknown[0]}); "
            f"computed maps: {', '.join(COMPUTED_MAPS)}"
        )
    if wanted:
        fitted = transform.apply_image(source_rgb)
        if "canny" in wanted:
            if not 0 <= canny_low <= canny_high:
                raise InvalidParameterError(f"need 0 <= canny_low <= canny_high, got {canny_low} and {canny_high}")
            inputs.maps["canny"] = canny_map(fitted, canny_low, canny_high)
            inputs.sources["canny"] = source_name
        if "depth" in wanted:
            if depth is None:
                raise InvalidParameterError("this deployment has no depth estimator: upload a ready-made depth map")
            inputs.maps["depth"] = depth([fitted])[0]
            inputs.sources["depth"] = source_name
    if init_rgb is not None:
        inputs.init_image = fit_image(init_rgb, out_w, out_h)
    return inputs
