"""ControlMaps deployment (CPU or a small GPU): the control-maps stage (``deployments/generation/control_stage.py``)
served by Ray.

Kept off the ingress (decoding and depth estimation are real work) and off the denoiser's GPU. The ingress calls it
only for requests with an extra ControlNet or an init image, in parallel with face analysis and prompt encoding.
"""

from __future__ import annotations

from typing import Any

from ray import serve as ray_serve

from deployments.generation.control_stage import ControlMapsStage
from deployments.instantid.catalogue import WeightsSource
from deployments.instantid.control_maps import load_depth_estimator
from deployments.instantid.loading import pick_device, pick_dtype
from deployments.replica import replica_id

DEPTH_FILES = ("config.json", "preprocessor_config.json", "model*.safetensors*")


@ray_serve.deployment(name="ControlMaps", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class ControlMapsDeployment(ControlMapsStage):
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
        depth = None
        if depth_model is not None:
            source = WeightsSource.model_validate(depth_model)
            folder = source.resolve(cache_dir, what="depth model", patterns=DEPTH_FILES)
            dev = pick_device(device)
            depth = load_depth_estimator(folder, device=dev, dtype=pick_dtype(dtype, dev))
        super().__init__(
            depth,
            long_side=long_side,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            replica=replica_id(),
        )

    def check_health(self) -> None:
        if self.depth is not None:
            self.depth.check_health()
