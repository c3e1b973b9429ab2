"""The application builder: typed args -> the Ray Serve deployment graph.

``import_path: serve.app:build_app`` in a Serve config file; ``args`` is an :class:`AppConfig`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.control_maps import ControlMapsDeployment
from deployments.denoiser import DenoiserDeployment
from deployments.face_analyzer import FaceAnalyzerDeployment
from deployments.prompt_encoder import PromptEncoderDeployment
from deployments.result_store import ResultStoreDeployment
from deployments.safety_checker import SafetyCheckerDeployment
from serve.config import AppConfig
from serve.ingress.routes import Ingress
from serve.licenses import check_licenses

APP_NAME = "instantid"


def stage_arguments(config: AppConfig) -> dict[str, dict[str, Any]]:
    """The constructor arguments of the model and storage deployments, from the config.

    ``build_app`` binds them; tests construct a deployment's class directly with the same arguments.
    """
    weights = config.weights.model_dump(exclude_none=True, exclude={"make_tiny_if_missing"})
    models = config.weights.catalogue(config.models).model_dump()
    root = config.weights.root
    controlnets = {name: spec.under(root).model_dump() for name, spec in config.denoiser.controlnets.items()}
    depth_model = config.control_maps.depth_model
    speed = config.denoiser.speed
    if speed.vae is not None:  # a relative VAE source lies under the weights root, as the ControlNets' do
        speed = speed.model_copy(update={"vae": speed.vae.under(root)})
    needs_depth = "depth" in controlnets and depth_model is not None
    return {
        "face": {
            "weights": weights,
            "providers": config.face.providers,
            "long_side": config.face.long_side,
            "min_face_px": config.face.min_face_px,
            "cache_entries": config.face.cache_entries,
            "cache_ttl_s": config.face.cache_ttl_s,
            "max_image_bytes": config.api.max_upload_bytes,
            "max_image_pixels": config.api.max_image_pixels,
        },
        "prompt": {
            "models": models,
            "cache_dir": config.weights.cache_dir,
            "device": config.prompt.device,
            "dtype": config.prompt.dtype,
            "max_batch_size": config.prompt.batching.max_batch_size,
            "batch_wait_timeout_s": config.prompt.batching.batch_wait_timeout_s,
        },
        "denoiser": {
            "weights": weights,
            "models": models,
            "device": config.denoiser.device,
            "dtype": config.denoiser.dtype,
            "vae_batch_size": config.denoiser.vae_batch_size,
            "preview_every": config.denoiser.preview_every,
            "batching": config.denoiser.batching,
            "controlnets": controlnets,
            "cost_model": config.denoiser.cost_model,
            "speed": speed,
        },
        "control_maps": {
            "depth_model": depth_model.under(root).model_dump() if needs_depth and depth_model else None,
            "cache_dir": config.weights.cache_dir,
            "device": config.control_maps.device,
            "dtype": config.control_maps.dtype,
            "long_side": config.face.long_side,
            "max_image_bytes": config.api.max_upload_bytes,
            "max_image_pixels": config.api.max_image_pixels,
        },
        "store": {
            "s3": config.storage.s3.model_dump(),
            "spool_dir": config.storage.spool_dir,
            "spool_retry_s": config.storage.spool_retry_s,
        },
        "safety": config.safety.model_dump(include={"policy", "threshold", "providers", "threads"}),
    }


def build_app(args: dict[str, Any] | AppConfig, *, safety_checker: Deployment = SafetyCheckerDeployment) -> Application:
    """Bind the deployments (the SafetyChecker unless its policy is off), each with its own Ray options from ``args``,
    after checking the licences of every weight source they would load (:class:`LicenseNotAccepted` names each
    non-commercial or unknown one unless the config accepts them). ``safety_checker``: the deployment that judges
    images (tests give one whose classifier is a double; Serve config files always get the real one)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    licenses = check_licenses(config)
    arguments = stage_arguments(config)
    face = FaceAnalyzerDeployment.options(**config.face.deployment.to_options()).bind(**arguments["face"])
    prompt = PromptEncoderDeployment.options(**config.prompt.deployment.to_options()).bind(**arguments["prompt"])
    denoiser = DenoiserDeployment.options(**config.denoiser.deployment.to_options()).bind(**arguments["denoiser"])
    store = ResultStoreDeployment.options(**config.store.deployment.to_options()).bind(**arguments["store"])
    maps_options = config.control_maps.deployment.to_options()
    control_maps = ControlMapsDeployment.options(**maps_options).bind(**arguments["control_maps"])
    safety = None
    if config.safety.policy != "off":
        safety = safety_checker.options(**config.safety.deployment.to_options()).bind(**arguments["safety"])
    return Ingress.options(**config.ingress.deployment.to_options()).bind(
        face,
        prompt,
        denoiser,
        store,
        control_maps,
        safety,
        api=config.api,
        storage=config.storage.s3,
        weights=arguments["denoiser"]["weights"],
        models=config.weights.catalogue(config.models),
        controlnets=sorted(arguments["denoiser"]["controlnets"]),
        log_prompts=config.ingress.log_prompts,
        licenses=licenses,
    )
