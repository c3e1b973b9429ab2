"""The control-maps stage: the extra ControlNets' maps and the image-to-image start, at the output size.

The ControlMaps deployment serves this class (it adds only its replica id and where the depth model comes from);
the in-process pipeline calls it directly. Its output size is the face stage's: the same rule on the same photo.
"""

from __future__ import annotations

from deployments.instantid.control_inputs import prepare_control_inputs
from deployments.instantid.control_maps import DepthEstimator
from deployments.instantid.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from deployments.instantid.keypoints import REFERENCE_LONG_SIDE
from deployments.instantid.options import COMPUTED_MAPS

from .face_stage import encode_png
from .messages import ControlMapsRequest, ControlMapsResult, timed


class ControlMapsStage:
    """Decodes the request's pictures, computes the missing maps (canny; depth with a ``depth`` estimator) and fits
    every picture to the output size."""

    def __init__(
        self,
        depth: DepthEstimator | None = None,
        *,
        long_side: int = REFERENCE_LONG_SIDE,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        replica: str = "",
    ) -> None:
        self.depth = depth
        self.long_side = long_side
        self.limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self.replica = replica

    def prepare(self, request: ControlMapsRequest) -> ControlMapsResult:
        timings = {}
        with timed(timings, "control_maps"):
            inputs = prepare_control_inputs(
                decode_image(request.source_image, **self.limits),
                source_name=request.source_name,
                width=request.width,
                height=request.height,
                long_side=self.long_side,
                compute=request.compute,
                uploaded={name: decode_image(data, **self.limits) for name, data in request.uploaded.items()},
                canny_low=request.canny_low,
                canny_high=request.canny_high,
                depth=self.depth,
                init_rgb=None if request.init_image is None else decode_image(request.init_image, **self.limits),
            )
        return ControlMapsResult(inputs, timings, self.replica)

    def preview(self, request: ControlMapsRequest) -> dict[str, bytes]:
        """``POST /v1/faces``' maps: each as the PNG a generation with this photo and size would use."""
        maps = self.prepare(request).inputs.maps
        return {name: encode_png(image) for name, image in maps.items()}

    def computable(self) -> list[str]:
        """The maps this stage can compute from a photo."""
        return [name for name in COMPUTED_MAPS if name != "depth" or self.depth is not None]
