"""FaceAnalyzer deployment (CPU): the face stage (``deployments/generation/face_stage.py``) served by Ray.

Several photos of one person are analysed in parallel, one ``identify`` call each (Serve spreads them over the
replicas); one ``analyze`` call then combines them with the pose photo's geometry.
"""

from __future__ import annotations

from typing import Any

from ray import serve as ray_serve

from deployments.generation.face_cache import FaceCache
from deployments.generation.face_stage import FaceStage
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.weights import WeightsLayout
from deployments.replica import replica_id


@ray_serve.deployment(name="FaceAnalyzer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class FaceAnalyzerDeployment(FaceStage):
    def __init__(
        self,
        weights: dict[str, Any],
        *,
        providers: list[str] | None,
        long_side: int,
        min_face_px: int,
        max_image_bytes: int,
        max_image_pixels: int,
        cache_entries: int = 0,
        cache_ttl_s: float = 3600.0,
    ) -> None:
        layout = WeightsLayout.resolve(**weights, parts=("antelopev2",))
        super().__init__(
            FaceAnalyzer(layout.antelopev2, providers=providers),
            long_side=long_side,
            min_face_px=min_face_px,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            replica=replica_id(),
            cache=FaceCache(cache_entries, cache_ttl_s),
        )

    def check_health(self) -> None:
        self.analyzer.check_health()
