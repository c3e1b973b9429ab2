"""Generations on the deployment graph, for every ingress path (HTTP JSON and multipart, the handle API, jobs).

A request is planned once (``deployments/generation/plan.py``: every cross-field rule, the catalogue, this
deployment's ControlNets), its pictures are loaded (base64 or allowed ``s3://``), and the one flow
(``deployments/generation/flow.py``) runs on the deployment handles: face analysis, prompt encoding and control maps
side by side, their responses handed to the Denoiser, the Denoiser's to the FaceAnalyzer's score and the
ResultStore, so no image passes through the ingress. The answer is built from what the store confirmed in S3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments import metrics
from deployments.generation.flow import generate
from deployments.generation.messages import (
    ControlMapsRequest,
    FaceRequest,
    GenerationRecord,
    GroupFaceRequest,
    IdentityRequest,
    JobTicket,
    PromptRequest,
    SavedGeneration,
    StageTiming,
)
from deployments.generation.plan import (
    CONTROL_IMAGE_PART,
    GenerationInputs,
    GenerationPlan,
    plan_generation,
)
from deployments.instantid.catalogue import ModelCatalogue, ModelChoice
from deployments.instantid.face_detail import FaceDetailPass
from deployments.instantid.hires import HiresPass
from deployments.instantid.params import GenerationParams
from deployments.storage.generations import new_generation_id
from serve.schemas import (
    BatchInfo,
    FaceInfo,
    FaceUsed,
    GenerateRequest,
    GenerateResponse,
    LayoutInfo,
    ModelUsed,
)

from .errors import ApiError, replica_gone
from .inputs import ImageInputs

if TYPE_CHECKING:
    from .identities import Identities

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class StageHandles:
    """The ingress's handles to the model and storage deployments."""

    face: DeploymentHandle
    prompt: DeploymentHandle
    denoiser: DeploymentHandle
    store: DeploymentHandle
    control_maps: DeploymentHandle
    safety: DeploymentHandle | None = None  # bound unless the safety policy is off


class HandleStages:
    """:class:`~deployments.generation.flow.Stages` on deployment handles: every call returns its response at once,
    and the next deployment resolves it. The prompt encoder and the denoiser are called with the request's base as
    ``multiplexed_model_id``, so Serve routes to a replica that holds it warm."""

    def __init__(self, handles: StageHandles, base: str, request_timeout_s: float) -> None:
        self.handles = handles
        self.base = base
        self.request_timeout_s = request_timeout_s

    def identify(self, request: IdentityRequest) -> DeploymentResponse:
        return self.handles.face.identify.remote(request)

    def analyze(self, request: FaceRequest, *identified: DeploymentResponse) -> DeploymentResponse:
        return self.handles.face.analyze.remote(request, *identified)

    def analyze_group(self, request: GroupFaceRequest, *identified: DeploymentResponse) -> DeploymentResponse:
        return self.handles.face.analyze_group.remote(request, *identified)

    def encode(self, request: PromptRequest) -> DeploymentResponse:
        return self.handles.prompt.options(multiplexed_model_id=self.base).encode.remote(request)

    def prepare_controls(self, request: ControlMapsRequest) -> DeploymentResponse:
        return self.handles.control_maps.prepare.remote(request)

    def denoise(
        self,
        params: GenerationParams,
        model: ModelChoice,
        face: DeploymentResponse,
        prompt: DeploymentResponse,
        controls: DeploymentResponse | None,
        job: JobTicket | None,
    ) -> DeploymentResponse:
        denoiser = self.handles.denoiser.options(multiplexed_model_id=self.base)
        return denoiser.generate.remote(params, model, face, prompt, controls, job)

    def refine(
        self,
        hires: HiresPass,
        model: ModelChoice,
        face: DeploymentResponse,
        prompt: DeploymentResponse,
        controls: DeploymentResponse | None,
        first: DeploymentResponse,
        job: JobTicket | None,
    ) -> DeploymentResponse:
        """The hires pass: the first pass's response is resolved by the Denoiser itself, so the second job is
        submitted only once the first has finished."""
        denoiser = self.handles.denoiser.options(multiplexed_model_id=self.base)
        return denoiser.refine.remote(hires, model, face, prompt, controls, first, job)

    def find_small_faces(
        self, detail: FaceDetailPass, output: DeploymentResponse, face: DeploymentResponse
    ) -> DeploymentResponse:
        return self.handles.face.find_small_faces.remote(detail, output, face)

    def detail(
        self,
        detail: FaceDetailPass,
        model: ModelChoice,
        face: DeploymentResponse,
        prompt: DeploymentResponse,
        first: DeploymentResponse,
        found: DeploymentResponse,
        job: JobTicket | None,
    ) -> DeploymentResponse:
        """The face detail pass: the Denoiser resolves the first pass's result and the faces found on it itself."""
        denoiser = self.handles.denoiser.options(multiplexed_model_id=self.base)
        return denoiser.detail.remote(detail, model, face, prompt, first, found, job)

    def score(self, output: DeploymentResponse, face: DeploymentResponse) -> DeploymentResponse:
        return self.handles.face.score.remote(output, face)

    def score_repaired(self, output: DeploymentResponse, face: DeploymentResponse) -> DeploymentResponse:
        return self.handles.face.score_repaired.remote(output, face)

    def score_regions(self, output: DeploymentResponse, face: DeploymentResponse) -> DeploymentResponse:
        return self.handles.face.score_identities.remote(output, face)

    def check_safety(self, output: DeploymentResponse) -> DeploymentResponse | None:
        return None if self.handles.safety is None else self.handles.safety.check.remote(output)

    async def store(
        self,
        plan: GenerationPlan,
        record: GenerationRecord,
        output: DeploymentResponse,
        scores: DeploymentResponse | None,
        region_scores: DeploymentResponse | None,
        kept: dict[str, bytes] | None,
        safety: DeploymentResponse | None = None,
        repaired: DeploymentResponse | None = None,
    ) -> SavedGeneration:
        options = plan.options
        saving = self.handles.store.save.remote(
            record, output, options.output_format, options.output_quality, kept, scores, region_scores, safety, repaired
        )
        try:
            return await asyncio.wait_for(saving, timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"generation did not finish within {self.request_timeout_s:.0f} s",
                {"Retry-After": "30"},
            ) from None


class Generations:
    """Plans and runs generations on the graph: what every ingress path calls."""

    def __init__(
        self,
        handles: StageHandles,
        images: ImageInputs,
        catalogue: ModelCatalogue,
        controlnets: list[str],
        weights: dict[str, Any],
        request_timeout_s: float,
        identities: Identities,
    ) -> None:
        self.handles = handles
        self.images = images
        self.identities = identities  # saved identities, read by id in place of face photos
        self.catalogue = catalogue
        self.controlnets = controlnets  # the extra ControlNets the denoiser loaded
        self.weights = weights  # recorded in meta.json
        self.request_timeout_s = request_timeout_s

    def plan(self, request: GenerateRequest) -> GenerationPlan:
        """The request checked against every rule and resolved (422 before any work starts)."""
        return plan_generation(request.options(), request.inputs_given(), self.catalogue, self.controlnets)

    async def check(self, request: GenerateRequest, owner: str) -> None:
        """Every rule, and that each saved identity the request names is ``owner``'s (else a 404), without loading
        a picture: what a job's submission checks before the job exists."""
        self.plan(request)
        for identity_id in request.inputs_given().saved_identities:
            await self.identities.record(owner, identity_id)

    async def run(
        self, request: GenerateRequest, request_id: str, owner: str, job: JobTicket | None = None
    ) -> GenerateResponse:
        """One generation, retried once when a replica died under it (generation is deterministic for the seed,
        so the retry gives the same images); a second failure reaches the client as a 503."""
        try:
            return await self._run(request, request_id, owner, job)
        except Exception as exc:
            if not replica_gone(exc):
                raise
            logger.warning("request %s: a replica failed (%s); retrying once", request_id, type(exc).__name__)
        return await self._run(request, request_id, owner, job)

    async def _run(
        self, request: GenerateRequest, request_id: str, owner: str, job: JobTicket | None
    ) -> GenerateResponse:
        started = time.time()
        plan, inputs = await self.load(request, self.plan(request), owner)
        record = plan.record(
            job.id if job is not None else new_generation_id(),
            request_id,
            owner,
            models=self.weights,
            inputs_stored=request.store_inputs,
            job_id=None if job is None else job.id,
            job_attempt=1 if job is None else job.attempt,
        )
        stages = HandleStages(self.handles, plan.model.base, self.request_timeout_s)
        saved: SavedGeneration = await generate(plan, inputs, stages, record, keep_inputs=request.store_inputs)
        return self._response(plan, record, saved, started)

    async def load(
        self, request: GenerateRequest, plan: GenerationPlan, owner: str
    ) -> tuple[GenerationPlan, GenerationInputs]:
        """The request's pictures as bytes, from base64 or allowed ``s3://`` URIs (photos are read concurrently), and
        its saved identities' faces (``owner``'s only: another's is a 404); the plan completed with what they hold."""
        load = self.images.load
        people = None
        faces: tuple[bytes, ...] = ()
        known: tuple = ()
        identity_combine = None
        if request.identities is not None:
            saved = {
                i: await self.identities.faces(owner, choice.identity_id, i)
                for i, choice in enumerate(request.identities)
                if choice.identity_id is not None
            }
            people = await self.images.people(request.identities, saved)
        elif request.identity_id is not None:
            record, known = await self.identities.faces(owner, request.identity_id)
            identity_combine = record.identity_combine
        else:
            given = request.face_photos()
            faces = await self.images.photos(given, "face_image" if len(given) == 1 else "face_images")
        pose = (
            await load(request.pose_image_b64, request.pose_image_uri, "pose_image") if request.has_pose_image else None
        )
        init = (
            await load(request.init_image_b64, request.init_image_uri, "init_image") if request.has_init_image else None
        )
        maps = {
            c.name: await load(c.image_b64, c.image_uri, CONTROL_IMAGE_PART.format(c.name))
            for c in request.controlnets
            if plan.map_sources.get(c.name) == "uploaded"
        }
        target = (
            await load(request.target_image_b64, request.target_image_uri, "target_image")
            if request.has_target_image
            else None
        )
        mask = (
            await load(request.mask_image_b64, request.mask_image_uri, "mask_image") if request.has_mask_image else None
        )
        inputs = GenerationInputs(faces, people, pose, init, maps, known, request.identity_id, target, mask)
        return plan.loaded(inputs, identity_combine), inputs

    def _response(
        self, plan: GenerationPlan, record: GenerationRecord, saved: SavedGeneration, started: float
    ) -> GenerateResponse:
        """The client's answer: what the store confirmed, the warnings for images without a face, each image
        flagged against ``min_identity_similarity``, every stage's timing."""
        images = saved.stored.images
        warnings = [
            f"no face found in image {index}: its identity_similarity is null"
            for index, image in enumerate(images)
            if image.identity_similarity is None and image.identities is None
        ]
        warnings += [
            f"no face found in identity {score.index}'s region in image {index}: its similarity is null"
            for index, image in enumerate(images)
            for score in image.identities or []
            if score.similarity is None
        ]
        warnings += safety_warnings(saved.safety)
        threshold = plan.options.min_identity_similarity
        flagged = images
        if threshold is not None:
            flagged = [
                image.model_copy(
                    update={
                        "below_min_identity_similarity": image.identity_similarity is None
                        or image.identity_similarity < threshold
                    }
                )
                for image in images
            ]
        timings = {**saved.timings, "total": StageTiming.since(started)}
        metrics.record_generation(
            {stage: timing.seconds for stage, timing in timings.items()},
            plan.model.base,
            [image.identity_similarity for image in images],
        )
        return GenerateResponse(
            id=record.id,
            request_id=record.request_id,
            images=flagged,
            seed=plan.params.seed,
            face=FaceInfo.of(saved.face),
            faces=[FaceUsed.of_chosen(chosen) for chosen in saved.faces],
            model=ModelUsed.model_validate(saved.model.describe()),
            timings=timings,
            parameters={**record.parameters, "width": saved.params.width, "height": saved.params.height},
            replicas=saved.replicas,
            batch=BatchInfo(**dataclasses.asdict(saved.batch)) if saved.batch is not None else None,
            layout=LayoutInfo.model_validate(saved.layout) if saved.layout is not None else None,
            repaired_faces=saved.repaired_faces,
            warnings=warnings,
        )


def safety_warnings(safety: dict[str, Any] | None) -> list[str]:
    """One warning per image the safety check refused (policy refuse): it is in no list, since it was never stored."""
    return [
        f"image {refused['index']} was refused by the safety check and not stored (scores: "
        + ", ".join(f"{name} {score:.3f}" for name, score in refused["scores"].items())
        + f"; threshold {safety['threshold']})"
        for refused in (safety or {}).get("refused", [])
    ]
