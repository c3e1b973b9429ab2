"""ControlMaps deployment (CPU or a small GPU): photos -> the extra ControlNets' maps and the image-to-image start.

Kept off the ingress (decoding and depth estimation are real work) and off the denoiser's GPU. The ingress calls it
only for requests with an extra ControlNet or an init image, in parallel with face analysis and prompt encoding;
its output size is the face stage's (the same rule on the same photo).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from ray import serve as ray_serve

from deployments.instantid.catalogue import WeightsSource
from deployments.instantid.control_inputs import prepare_control_inputs
from deployments.instantid.control_maps import DepthEstimator, load_depth_estimator
from deployments.instantid.images import decode_image
from deployments.instantid.loading import pick_device, pick_dtype
from deployments.messages import ControlMapsRequest, ControlMapsResult, timed

DEPTH_FILES = ("config.json", "preprocessor_config.json", "model*.safetensors*")


@ray_serve.deployment(name="ControlMaps", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class ControlMapsDeployment:
    def __init__(
        self,
        *,
        depth_model: dict[str, Any] | None,
        cache_dir: str | None,
        device: str,
        dtype: str,
        long_side: int,
        max_image_bytes: int,
        max_image_pixels: int,
    ) -> None:
        self.depth: DepthEstimator | None = None
        if depth_model is not None:
            source = WeightsSource.model_validate(depth_model)
            folder = source.resolve(cache_dir, what="depth model", patterns=DEPTH_FILES)
            dev = pick_device(device)
            self.depth = load_depth_estimator(folder, device=dev, dtype=pick_dtype(dtype, dev))
        self.long_side = long_side
        self.limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}

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
        return ControlMapsResult(inputs, timings, ray_serve.get_replica_context().replica_id.unique_id)

    def preview(self, request: ControlMapsRequest) -> dict[str, bytes]:
        """``POST /v1/faces``' maps: each as the PNG a generation with this photo and size would use."""
        maps = self.prepare(request).inputs.maps
        return {name: _png(image) for name, image in maps.items()}

    def computable(self) -> list[str]:
        """The maps this replica can compute from a photo."""
        return ["canny", *(["depth"] if self.depth is not None else [])]

    def check_health(self) -> None:
        if self.depth is not None:
            self.depth.check_health()


def _png(rgb: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
