"""The application builder: typed args -> the Ray Serve deployment graph.

``import_path: serve.app:build_app`` in a Serve config file; ``args`` is an :class:`AppConfig`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.denoise import DenoiserDeployment
from deployments.face import FaceAnalyzerDeployment
from deployments.prompt import PromptEncoderDeployment
from deployments.store import ResultStoreDeployment
from serve.api import Ingress
from serve.config import AppConfig

APP_NAME = "instantid"


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Bind the five deployments, each with its own Ray options from ``args``."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    weights = config.weights.model_dump(exclude_none=True, exclude={"make_tiny_if_missing"})

    face = FaceAnalyzerDeployment.options(**config.face.deployment.to_options()).bind(
        weights,
        providers=config.face.providers,
        long_side=config.face.long_side,
        min_face_px=config.face.min_face_px,
        max_image_bytes=config.api.max_upload_bytes,
        max_image_pixels=config.api.max_image_pixels,
    )
    prompt = PromptEncoderDeployment.options(**config.prompt.deployment.to_options()).bind(
        weights,
        device=config.prompt.device,
        dtype=config.prompt.dtype,
        max_batch_size=config.prompt.batching.max_batch_size,
        batch_wait_timeout_s=config.prompt.batching.batch_wait_timeout_s,
    )
    denoiser = DenoiserDeployment.options(**config.denoiser.deployment.to_options()).bind(
        weights,
        device=config.denoiser.device,
        dtype=config.denoiser.dtype,
        vae_batch_size=config.denoiser.vae_batch_size,
        max_batch_size=config.denoiser.batching.max_batch_size,
        batch_wait_timeout_s=config.denoiser.batching.batch_wait_timeout_s,
    )
    store = ResultStoreDeployment.options(**config.store.deployment.to_options()).bind(
        config.storage.s3.model_dump(), spool_dir=config.storage.spool_dir, spool_retry_s=config.storage.spool_retry_s
    )
    return Ingress.options(**config.ingress.to_options()).bind(
        face,
        prompt,
        denoiser,
        store,
        api=config.api.model_dump(),
        storage=config.storage.s3.model_dump(),
        weights=weights,
    )
