"""The application's typed configuration: the ``args`` of a Serve config file (local.yaml, production.yaml).

One pydantic model per concern; each deployment's Ray options (replicas or autoscaling, actor resources,
queue limits) live next to its model options, so a cluster can size every stage on its own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config import BatchOptions, DenoiserBatching, DenoiserCostModel
from deployments.instantid.catalogue import ModelCatalogue, WeightsSource
from deployments.instantid.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from deployments.instantid.keypoints import REFERENCE_LONG_SIDE
from deployments.instantid.licenses import LicenseTerms
from deployments.instantid.options import ControlNetName
from deployments.instantid.params import DEFAULT_VAE_BATCH_SIZE
from deployments.instantid.safety import DEFAULT_THRESHOLD, SafetyPolicy
from deployments.instantid.speed import SpeedOptions
from deployments.storage.s3 import S3Settings
from serve.ingress.auth import AuthConfig
from serve.jobs.state import JobsConfig
from serve.jobs.webhooks import WebhookSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentOptions(_Strict):
    """Ray Serve options of one deployment (passed to ``Deployment.options``)."""

    num_replicas: int | Literal["auto"] | None = Field(default=None, description="Fixed replicas (or autoscaling).")
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Ray Serve AutoscalingConfig: min_replicas, max_replicas, target_ongoing_requests..."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="num_cpus, num_gpus, memory, resources, accelerator_type, label_selector..."
    )
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    max_queued_requests: int | None = Field(default=None, description="-1: unbounded; beyond it callers get 503.")
    health_check_period_s: float | None = Field(default=None, gt=0)
    health_check_timeout_s: float | None = Field(default=None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0)
    graceful_shutdown_wait_loop_s: float | None = Field(
        default=None, gt=0, description="How often a stopping replica checks for in-flight requests (Serve: 2 s)."
    )
    backpressure_config: dict[str, Any] | None = Field(
        default=None, description="Serve's answer when max_queued_requests is exceeded: status_code, retry_after_s."
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    def to_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class WeightsConfig(_Strict):
    """Where weights come from: a root with the standard layout, or a source per part.

    A source is a local folder, ``s3://bucket/prefix`` (copied into ``cache_dir`` on replica start) or a
    Hugging Face repo id.
    """

    root: str | None = None
    sdxl: str | None = None
    instantid: str | None = None
    antelopev2: str | None = None
    cache_dir: str | None = Field(default=None, description="Node-local cache for s3:// sources.")
    make_tiny_if_missing: bool = Field(
        default=False, description="`instantid serve`/`demo` write tiny random weights at `root` when it is empty."
    )

    @model_validator(mode="after")
    def _has_sources(self) -> WeightsConfig:
        if self.root is None and None in (self.sdxl, self.instantid, self.antelopev2):
            raise ValueError("weights need a root, or all of sdxl, instantid and antelopev2")
        return self

    def source(self, part: str) -> str:
        """Where ``part`` (``sdxl``, ``instantid``, ``antelopev2``) comes from: its own source, else root/part."""
        own = getattr(self, part)
        return own if own is not None else str(self.root).rstrip("/") + "/" + part

    def catalogue(self, models: ModelCatalogue) -> ModelCatalogue:
        """``models`` with this layout's base and preset LoRAs, every relative source under ``root``."""
        return models.with_layout(self.source("sdxl"), self.root)


class IngressConfig(_Strict):
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    log_prompts: bool = Field(
        default=False,
        description="Put the prompt and negative prompt in each request's log line (off: prompts are never logged).",
    )


class FaceConfig(_Strict):
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    providers: list[str] | None = Field(default=None, description="onnxruntime providers; None: CUDA if present.")
    long_side: int = Field(default=REFERENCE_LONG_SIDE, ge=256, le=2048, description="Reference size rule's long side.")
    min_face_px: int = Field(default=32, ge=1, description="Smaller faces (box side, in photo pixels) are refused.")
    cache_entries: int = Field(
        default=1024,
        ge=0,
        description="Recent photos' analyses kept per replica (keyed by the photo's SHA-256 and the analysis options; "
        "no photo is kept), so a photo sent again skips detection and recognition; 0: off.",
    )
    cache_ttl_s: float = Field(default=3600.0, gt=0, description="An analysis older than this is made afresh.")


class PromptConfig(_Strict):
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batching: BatchOptions = Field(default_factory=lambda: BatchOptions(max_batch_size=16, batch_wait_timeout_s=0.01))


class DenoiserConfig(_Strict):
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    vae_batch_size: int = Field(default=DEFAULT_VAE_BATCH_SIZE, ge=1, description="Latents decoded at once.")
    preview_every: int = Field(
        default=5, ge=1, description="Async jobs: a latent preview every this many steps, while a client asks for them."
    )
    batching: DenoiserBatching = Field(default_factory=DenoiserBatching)
    controlnets: dict[ControlNetName, WeightsSource] = Field(
        default_factory=dict,
        description="Extra ControlNets beside IdentityNet that requests may name (pose, canny, depth): diffusers "
        "ControlNet folders, e.g. {source: controlnets/canny} under the weights root, or {repo: ...}.",
    )
    cost_model: DenoiserCostModel | None = Field(
        default=None,
        description="SIMULATION ONLY, never in a real deployment: every forward becomes a wait of the modelled length "
        "(images mean nothing), to measure batching under another device's costs (instantid bench serve --open-loop "
        "--cost-model).",
    )
    speed: SpeedOptions = Field(
        default_factory=SpeedOptions,
        description="Compilation, CUDA graphs, fused projections, fp8, VAE precision: all off (the eager step) "
        "until a GPU benchmark shows a gain (instantid bench gpu).",
    )


class ControlMapsConfig(_Strict):
    """The deployment that makes the extra ControlNets' maps (canny, depth) and fits init images."""

    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    depth_model: WeightsSource | None = Field(
        default_factory=lambda: WeightsSource(source="depth"),
        description="A transformers depth-estimation folder (loaded only when the denoiser has a depth ControlNet).",
    )
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class StoreConfig(_Strict):
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


class SafetyConfig(_Strict):
    """The safety check of every output image: open_nsfw in its own CPU deployment (``SafetyChecker``)."""

    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    policy: SafetyPolicy = Field(
        default="flag",
        description="off: no check; flag: keep flagged images and say so; blur: store flagged images blurred beyond "
        "recognition (never the original); refuse: store nothing of them (the request keeps its other images, with a "
        "warning each; all refused: 422 content_refused).",
    )
    threshold: float = Field(
        default=DEFAULT_THRESHOLD, ge=0.0, le=1.0, description="An image is flagged when its nsfw score reaches this."
    )
    providers: list[str] | None = Field(default=None, description="onnxruntime providers; None: CPU.")
    threads: int | None = Field(default=None, ge=1, description="onnxruntime intra-op threads; None: its default.")


class LicensesConfig(_Strict):
    """Which licences the deployment accepts (``serve/licenses.py`` checks them when the app is built)."""

    weights: Literal["published", "tiny"] = Field(
        default="published",
        description="What the weights root holds: published (what `instantid weights download` fetches: each part "
        "under its publisher's licence) or tiny (`instantid weights tiny`: this project's random weights, Apache-2.0).",
    )
    accept_noncommercial: bool = Field(
        default=False,
        description="Start even when a weight source's licence does not allow commercial use, or does not say "
        "(the default InstantID checkpoints and antelopev2 do not): false refuses to start, naming each one.",
    )
    parts: dict[Literal["sdxl", "instantid", "antelopev2"], LicenseTerms] = Field(
        default_factory=dict,
        description="The licence of a weights part that is not the published default (another SDXL base, a licensed "
        "face model); catalogue entries state theirs with license, license_url and commercial_use.",
    )


class StorageConfig(_Strict):
    s3: S3Settings
    embedded_data_dir: str | None = Field(
        default=None,
        description="When set, `instantid serve`/`demo` start the embedded SeaweedFS with this data folder "
        "and pass its endpoint and credentials to Ray through the environment.",
    )
    spool_dir: str | None = Field(
        default=None,
        description="Where finished generations wait when S3 fails (a persistent volume on Kubernetes); "
        "None: no spool, S3 failures lose the result (the client still gets a 503).",
    )
    spool_retry_s: float = Field(default=5.0, gt=0, description="How often the spool retries its uploads.")


class ApiConfig(_Strict):
    max_upload_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024, description="Per image, after base64 decoding.")
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=64 * 1024,
        description="A whole request body (every image in base64 and every other field): bodies beyond it get a 413.",
    )
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=65_536, description="Decoded-size guard (bombs).")
    allowed_input_buckets: list[str] = Field(
        default_factory=list, description="Buckets s3:// inputs may come from; the results bucket is never implied."
    )
    request_timeout_s: float = Field(default=600.0, gt=0)
    body_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest pause while a request body arrives before the answer is a 408."
    )
    max_in_flight: int = Field(
        default=32, ge=1, description="Generations one ingress replica admits at once; beyond: JSON 503 + Retry-After."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings, description="Job callbacks: allowed hosts (none: off), secret, retries."
    )


class AppConfig(_Strict):
    """Everything ``serve.app:build_app`` needs."""

    weights: WeightsConfig
    models: ModelCatalogue = Field(
        default_factory=ModelCatalogue,
        description="Bases, LoRAs and modes requests choose by name; the weights' sdxl folder is the base 'sdxl'.",
    )
    storage: StorageConfig
    api: ApiConfig = Field(default_factory=ApiConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    face: FaceConfig = Field(default_factory=FaceConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    control_maps: ControlMapsConfig = Field(default_factory=ControlMapsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    licenses: LicensesConfig = Field(default_factory=LicensesConfig)

    @model_validator(mode="after")
    def _streams_fit_the_ingress(self) -> AppConfig:
        """Open event streams are ongoing requests to Serve: the ingress must hold them all beside every admitted
        generation, so that streams never take a generation's slot."""
        limit = self.ingress.deployment.max_ongoing_requests
        needed = self.api.max_in_flight + self.api.jobs.max_event_streams
        if limit is not None and limit < needed:
            raise ValueError(
                f"ingress.deployment.max_ongoing_requests ({limit}) must be at least api.max_in_flight + "
                f"api.jobs.max_event_streams ({needed})"
            )
        return self
