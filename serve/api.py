"""The Ingress deployment: the HTTP routes (FastAPI) and the Python handle API over the deployment graph.

Face analysis and prompt encoding start together; their responses go straight into the Denoiser call and
the Denoiser's response straight into the ResultStore call, so no image passes through the ingress.
A response is sent only after the store confirmed every object in S3.

Request reading lives in ``serve.inputs``, the error mapping in ``serve.errors``, the request and response
models in ``serve.schemas``; this module is the list of routes and the generation flow.
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import base64
import dataclasses
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve as ray_serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments import metrics
from deployments.instantid.catalogue import ModelCatalogue
from deployments.instantid.control_inputs import COMPUTED_MAPS
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.identity import MAX_FACE_PHOTOS
from deployments.instantid.params import CONTROLNET_NAMES, GenerationParams
from deployments.instantid.styles import apply_style
from deployments.job_events import job_events
from deployments.messages import (
    ControlMapsRequest,
    FaceRequest,
    GenerationMeta,
    GenerationRecord,
    GroupFaceRequest,
    GroupLayout,
    IdentityRequest,
    IdentitySpec,
    PromptRequest,
    SavedGeneration,
    StageTiming,
    group_layout,
)
from deployments.storage.generations import GenerationNotFound, new_generation_id, validate_generation_id
from deployments.storage.idempotency_records import IdempotencyRecord
from deployments.storage.inputs import S3InputReader
from deployments.storage.job_records import JobRecords
from deployments.storage.s3 import S3Settings, make_client
from serve.auth import ANONYMOUS, ApiKeys, AuthError
from serve.autoscaling import GENERATIONS_METRIC
from serve.config import ApiConfig
from serve.errors import OVERLOADED, REPLICA_GONE, ApiError, classify_error, install_error_handlers, request_id
from serve.idempotency_guard import IdempotencyGuard, IdempotencyInProgress, IdempotencyKeyReused
from serve.inputs import ImageInputs, read_body
from serve.jobs import (
    TERMINAL,
    Admission,
    JobNotFound,
    JobStates,
    SharedFeeds,
    follow_events,
    lease,
    lease_expired,
    now_iso,
    public_body,
)
from serve.openapi import ERROR_RESPONSES, FACES_BODY, GENERATE_BODY
from serve.request_log import RequestLogMiddleware, note, note_prompt, seconds_by_stage
from serve.schemas import (
    CONTROL_IMAGE_PART,
    IDENTITY_PARTS,
    BaseModelInfo,
    BatchInfo,
    FaceInfo,
    FacesRequest,
    FacesResponse,
    FaceUsed,
    GenerateRequest,
    GenerateResponse,
    GenerationOptions,
    IdentityChoice,
    JobAccepted,
    LayoutInfo,
    LoraInfo,
    ModeInfo,
    ModelsResponse,
    ModelUsed,
)
from serve.webhooks import WebhookRefused, deliver, validate_callback_url

logger = logging.getLogger("ray.serve")

API_VERSION = "1"
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Multipart file parts -> the JSON field each fills (``NAME`` -> ``NAME_b64``); the first is required.
GENERATE_FILES = {
    "face_image": "face_image",
    "pose_image": "pose_image",
    "init_image": "init_image",
    **{CONTROL_IMAGE_PART.format(name): CONTROL_IMAGE_PART.format(name) for name in CONTROLNET_NAMES},
    **{part: part for part in IDENTITY_PARTS},
}
# /v1/generate's name works here too; several people's parts show their layout
FACES_FILES = {"image": "image", "face_image": "image", **{part: part for part in IDENTITY_PARTS}}
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # the page's files, and only those

app = FastAPI(
    title="InstantID Serve",
    version=API_VERSION,
    description="Identity-preserving SDXL generation (InstantID) on Ray Serve; results in S3.",
    responses=ERROR_RESPONSES,
)
install_error_handlers(app)
app.add_middleware(RequestLogMiddleware)  # one JSON log line and one counted request per HTTP request


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


class _StoreRecords:
    """The ResultStore deployment's idempotency-record methods, as serve.idempotency_guard.RecordStore."""

    def __init__(self, store: DeploymentHandle) -> None:
        self.store = store

    async def read(self, digest: str) -> IdempotencyRecord | None:
        return await self.store.read_idempotency.remote(digest)

    async def claim(self, digest: str, body: dict[str, Any]) -> str | None:
        return await self.store.claim_idempotency.remote(digest, body)

    async def replace(self, digest: str, body: dict[str, Any], etag: str) -> str | None:
        return await self.store.replace_idempotency.remote(digest, body, etag)

    async def release(self, digest: str) -> None:
        await self.store.release_idempotency.remote(digest)


@ray_serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@ray_serve.ingress(app)
class Ingress:
    def __init__(
        self,
        face: DeploymentHandle,
        prompt: DeploymentHandle,
        denoiser: DeploymentHandle,
        store: DeploymentHandle,
        control_maps: DeploymentHandle,
        api: dict[str, Any],
        storage: dict[str, Any],
        weights: dict[str, Any],
        models: dict[str, Any],
        controlnets: list[str],
        log_prompts: bool = False,
    ) -> None:
        self.face, self.prompt, self.denoiser, self.store = face, prompt, denoiser, store
        self.log_prompts = log_prompts  # prompts in the request log lines (off: never logged)
        self.control_maps = control_maps
        self.api = ApiConfig(**api)
        self.weights = weights
        self.catalogue = ModelCatalogue.model_validate(models)
        self.controlnets = [name for name in CONTROLNET_NAMES if name in controlnets]  # what the denoiser loaded
        self.keys = ApiKeys(self.api.auth)
        reader = S3InputReader(S3Settings(**storage), self.api.allowed_input_buckets)
        self.images = ImageInputs(reader, self.api.max_upload_bytes)
        self.admission = Admission(self.api.max_in_flight)
        # A claimant may run the request and its one replica-loss retry, each bounded by the timeout.
        self.idempotency = IdempotencyGuard(_StoreRecords(store), lease_s=2 * self.api.request_timeout_s + 60)
        if self.api.auth.required and self.keys.count == 0 and self.api.auth.keys_file is None:
            logger.warning("API keys are required but none are configured: every request will get 401")
        self.channel = job_events()
        self.feeds = SharedFeeds(self.channel)
        storage_settings = S3Settings(**storage)
        self.job_states = JobStates(JobRecords(make_client(storage_settings), storage_settings))
        self.replica = ray_serve.get_replica_context().replica_id.unique_id
        self._jobs: dict[str, asyncio.Task] = {}  # jobs this replica runs
        self._cancelling: set[str] = set()  # of those, the ones cancelled by their owner
        self._streams = 0
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------------------ Python handle API
    async def generate(
        self,
        request: GenerateRequest,
        request_id: str | None = None,
        owner: str = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> GenerateResponse:
        """Run one generation. Handle callers pass a :class:`GenerateRequest` (base64 or s3:// images).

        With an ``idempotency_key``, a repeated call (same owner, key and request) returns the first
        call's result without generating again, also when it reaches another ingress replica (the claim
        is a conditional S3 write, see serve/idempotency_guard.py); the same key with a different request
        is refused (422), and a repeat that outwaits a still-running first call gets a 409.
        """
        request_id = request_id or uuid.uuid4().hex
        if idempotency_key is None:
            return await self._admitted(request, request_id, owner)
        if not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise ApiError(422, "invalid_parameter", "Idempotency-Key must be 1-128 characters [A-Za-z0-9._:-]")
        digest = hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()
        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()

        async def produce() -> dict[str, Any]:
            return (await self._admitted(request, request_id, owner)).model_dump(mode="json")

        try:
            body, replayed = await self.idempotency.run(digest, fingerprint, produce, wait_s=self.api.request_timeout_s)
        except IdempotencyKeyReused:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used with a different request"
            ) from None
        except IdempotencyInProgress:
            raise ApiError(
                409,
                "idempotency_key_in_progress",
                "the request that first used this Idempotency-Key is still running; retry later",
                {"Retry-After": "10"},
            ) from None
        response = GenerateResponse.model_validate(body)
        return await self._refreshed(response) if replayed else response

    async def analyze_faces(self, request: FacesRequest, request_id: str | None = None) -> FacesResponse:
        if request.identities is not None:
            return await self._faces_layout(request, request_id)
        image = await self.images.load(request.image_b64, request.image_uri, "image")
        maps = None
        if request.include_control_maps:
            computable = [name for name in self.controlnets if name in COMPUTED_MAPS]
            if not computable:
                have = ", ".join(self.controlnets) or "none"
                raise InvalidParameterError(f"this deployment computes no control maps (its extra ControlNets: {have})")
            maps = self.control_maps.preview.remote(
                ControlMapsRequest(
                    image,
                    "face_image",
                    request.width,
                    request.height,
                    compute=tuple(computable),
                    canny_low=request.canny_low,
                    canny_high=request.canny_high,
                )
            )
        listing = await self.face.faces.remote(image, request.include_keypoint_image, request.width, request.height)
        keypoint_png = listing.keypoint_image_png
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=listing.width,
            height=listing.height,
            faces=[FaceInfo.of(face) for face in listing.faces],
            chosen=listing.chosen,
            keypoint_image_png_b64=None if keypoint_png is None else base64.b64encode(keypoint_png).decode(),
            control_maps_png_b64=None
            if maps is None
            else {name: base64.b64encode(png).decode() for name, png in (await maps).items()},
        )

    async def _faces_layout(self, request: FacesRequest, request_id: str | None) -> FacesResponse:
        """The layout a multi-identity generation with these identities (and this pose photo) would use: the same
        face stage calls, without generating."""
        assert request.identities is not None
        pose = None
        if request.image_b64 is not None or request.image_uri is not None:
            pose = await self.images.load(request.image_b64, request.image_uri, "image")
        photos = await self._identity_photos(request.identities)
        specs, identified = self._identify_all(request.identities, photos)
        layout: GroupLayout = await self.face.group_layout.remote(
            GroupFaceRequest(specs, pose, request.width, request.height), request.include_keypoint_image, *identified
        )
        png = layout.keypoint_image_png
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=layout.condition.width,
            height=layout.condition.height,
            faces=[FaceInfo.of(face) for face in layout.pose_faces],
            chosen=None,
            keypoint_image_png_b64=None if png is None else base64.b64encode(png).decode(),
            layout=LayoutInfo.model_validate(group_layout(layout.condition)),
        )

    async def _identity_photos(self, identities: list[IdentityChoice]) -> list[list[bytes]]:
        """Every identity's photos as bytes (base64 or allowed s3://), loaded concurrently."""
        loads = [
            self.images.load(photo.b64, photo.uri, f"identities[{i}].images[{j}]")
            for i, identity in enumerate(identities)
            for j, photo in enumerate(identity.images)
        ]
        flat = iter(await asyncio.gather(*loads))
        return [[next(flat) for _ in identity.images] for identity in identities]

    def _identify_all(
        self, identities: list[IdentityChoice], photos: list[list[bytes]]
    ) -> tuple[list[IdentitySpec], list[DeploymentResponse]]:
        """One FaceAnalyzer ``identify`` call per photo of every identity (spread over the replicas), in identity and
        photo order, and each identity's spec for the call that combines them."""
        specs, identified = [], []
        for i, (identity, data) in enumerate(zip(identities, photos, strict=True)):
            specs.append(IdentitySpec(len(data), identity.identity_combine, identity.spec()))
            identified += [
                self.face.identify.remote(IdentityRequest(image, j, len(data), identity.face_index, identity=i))
                for j, image in enumerate(data)
            ]
        return specs, identified

    async def models(self) -> ModelsResponse:
        """The catalogue (names, descriptions, defaults; never where the files are) and what one denoiser holds."""
        catalogue = self.catalogue
        return ModelsResponse(
            default_base=catalogue.default_base,
            base_models={
                name: BaseModelInfo(description=spec.description, single_file=spec.single_file)
                for name, spec in sorted(catalogue.base_models.items())
            },
            loras={
                name: LoraInfo(scale=spec.scale, description=spec.description)
                for name, spec in sorted(catalogue.loras.items())
            },
            modes={name: ModeInfo(**mode.model_dump()) for name, mode in sorted(catalogue.all_modes().items())},
            controlnets=self.controlnets,
            denoiser=await self.denoiser.model_info.remote(),
            api_version=API_VERSION,
        )

    async def get_generation(self, generation_id: str, owner: str | None = None) -> dict[str, Any]:
        """Stored metadata with fresh URLs. With ``owner``, another principal's generation is "not found"."""
        return (await self._owned(generation_id, owner)).document

    async def delete_generation(self, generation_id: str, owner: str | None = None) -> int:
        """Delete outputs and metadata (and kept inputs); only the owner may. Returns objects removed."""
        await self._owned(generation_id, owner)
        return await self.store.delete.remote(generation_id)

    # ------------------------------------------------------------------------------------------ async jobs
    async def submit_job(
        self,
        request: GenerateRequest,
        request_id: str | None = None,
        owner: str = ANONYMOUS,
        idempotency_key: str | None = None,
        base_path: str = "",
    ) -> JobAccepted:
        """Accept a generation as a job: checked as ``generate`` checks it, stored in S3, run in the background.

        With an ``idempotency_key`` a repeat (same owner, key and request) gets the first call's job back.
        """
        request_id = request_id or uuid.uuid4().hex
        self._ensure_sweeper()
        options = request.options()
        _, preset = self.catalogue.choose(options.base_model, options.lora_requests(), options.mode)
        params = options.sampling_params(options.resolved_seed(), preset, img2img=request.has_init_image)
        self._check_controls(params, {c.name for c in request.controlnets if c.has_image})
        if request.callback_url is not None:
            try:
                validate_callback_url(request.callback_url, self.api.webhooks)
            except WebhookRefused as exc:
                raise InvalidParameterError(f"callback_url: {exc}") from None
            if self._webhook_secret(owner) is None:
                raise InvalidParameterError("callback_url: this service has no webhook secret configured")

        async def produce() -> dict[str, Any]:
            return (await self._create_job(request, request_id, owner, base_path)).model_dump(mode="json")

        if idempotency_key is None:
            return await self._create_job(request, request_id, owner, base_path)
        if not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise ApiError(422, "invalid_parameter", "Idempotency-Key must be 1-128 characters [A-Za-z0-9._:-]")
        digest = hashlib.sha256(f"jobs\0{owner}\0{idempotency_key}".encode()).hexdigest()
        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        try:
            body, _ = await self.idempotency.run(digest, fingerprint, produce, wait_s=30)
        except IdempotencyKeyReused:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used with a different request"
            ) from None
        except IdempotencyInProgress:
            raise ApiError(409, "idempotency_key_in_progress", "retry later", {"Retry-After": "5"}) from None
        return JobAccepted.model_validate(body)

    async def get_job(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """The job's status (and its result or error once finished); another owner's job is "not found"."""
        self._ensure_sweeper()
        state = await self._owned_job(job_id, owner)
        return public_body(state, await self.channel.progress.remote(job_id))

    async def cancel_job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """Cancel an unfinished job (the denoiser drops it at its next step): its body. A finished job is deleted
        with its generation, as ``DELETE /v1/generations/{id}`` does: None."""
        state = await self._owned_job(job_id, owner)
        if state["status"] in TERMINAL:
            if state["status"] == "succeeded":
                await self.store.delete.remote(job_id)
            await self.job_states.delete(job_id)
            return None
        await self.channel.cancel.remote(job_id)

        def cancel(current: dict[str, Any]) -> bool:
            if current["status"] in TERMINAL:
                return False
            current.update(status="cancelled", lease=None, error=None)
            return True

        final = await self.job_states.update(job_id, cancel)
        if final is None:
            raise JobNotFound(f"job {job_id} not found")
        if final["status"] == "cancelled":
            self.channel.publish.remote(job_id, "cancelled", public_body(final))
        if job_id in self._jobs:
            self._cancelling.add(job_id)
            self._jobs[job_id].cancel()
        return public_body(final)

    async def job_events(
        self, job_id: str, owner: str | None, last_event_id: int, previews: bool
    ) -> AsyncIterator[bytes]:
        """The job's Server-Sent Events (its own limit: open streams never take generation slots)."""
        if self._streams >= self.api.jobs.max_event_streams:
            metrics.record_admission_rejected("too_many_streams")
            raise ApiError(
                503, "too_many_streams", "too many open event streams; poll the job instead", {"Retry-After": "5"}
            )
        state = await self._owned_job(job_id, owner)
        if previews:
            await self.channel.want_previews.remote(job_id)
        self._streams += 1

        async def read_state() -> dict[str, Any] | None:
            return await self.job_states.read(job_id)

        try:
            async for chunk in follow_events(
                job_id, self.channel, self.feeds, state, read_state, last_event_id, self.api.jobs.heartbeat_s
            ):
                yield chunk
        finally:
            self._streams -= 1

    async def _create_job(self, request: GenerateRequest, request_id: str, owner: str, base_path: str) -> JobAccepted:
        job_id = new_generation_id()
        created = now_iso()
        state = {
            "id": job_id,
            "owner": owner,
            "request_id": request_id,
            "status": "queued",
            "created_at": created,
            "updated_at": created,
            "attempts": 1,
            "lease": lease(self.replica, self.api.jobs.lease_s),
            "callback_url": request.callback_url,
            "result": None,
            "error": None,
        }
        # As sent (unset fields stay unset: a mode's preset fills them, and validation sees the same request).
        await self.job_states.create(job_id, state, request.model_dump(mode="json", exclude_unset=True))
        self._start_job(job_id, request, owner, request_id)
        url = f"{base_path}/v1/jobs/{job_id}"
        return JobAccepted(id=job_id, status="queued", status_url=url, events_url=f"{url}/events")

    def _start_job(self, job_id: str, request: GenerateRequest, owner: str, request_id: str) -> None:
        task = asyncio.create_task(self._run_job(job_id, request, owner, request_id))
        self._jobs[job_id] = task
        task.add_done_callback(lambda _: (self._jobs.pop(job_id, None), self._cancelling.discard(job_id)))

    async def _run_job(self, job_id: str, request: GenerateRequest, owner: str, request_id: str) -> None:
        """Run one job to its end while holding its lease; write the outcome unless the owner cancelled first."""
        keeper = asyncio.create_task(self._keep_lease(job_id, asyncio.current_task()))
        try:
            outcome = await self._job_outcome(job_id, request, owner, request_id)
        except asyncio.CancelledError:
            if job_id not in self._cancelling:
                raise  # the replica is stopping or lost the lease: another replica takes the job over
            outcome = {"status": "cancelled", "result": None, "error": None}
        finally:
            keeper.cancel()

        wrote = False

        def finish(current: dict[str, Any]) -> bool:
            nonlocal wrote
            wrote = current["status"] not in TERMINAL and (current.get("lease") or {}).get("holder") == self.replica
            if wrote:
                current.update(outcome, lease=None)
            return wrote

        final = None
        for attempt in range(5):  # S3 trouble must not lose a finished job's outcome (it would run again)
            try:
                final = await self.job_states.update(job_id, finish)
                break
            except Exception:
                logger.warning("job %s: writing its outcome failed (try %d)", job_id, attempt + 1, exc_info=True)
                await asyncio.sleep(min(2**attempt, self.api.jobs.lease_s / 3))
        if final is None:
            return
        if wrote:  # a cancellation was published by the DELETE that wrote it
            self.channel.publish.remote(job_id, final["status"], public_body(final))
        if final["status"] == "cancelled" and outcome["status"] == "succeeded":
            await self.store.delete.remote(job_id)  # cancelled while it was being stored: keep nothing
        if final.get("callback_url") and (wrote or final["status"] == "cancelled"):
            await self._deliver_webhook(final, owner)

    async def _job_outcome(self, job_id: str, request: GenerateRequest, owner: str, request_id: str) -> dict[str, Any]:
        def queued(position: int) -> None:
            self.channel.publish.remote(job_id, "queued", {"position": position})

        try:
            await self.admission.wait_turn(job_id, queued)
            try:

                def running(current: dict[str, Any]) -> bool:
                    if current["status"] in TERMINAL:
                        return False
                    current["status"] = "running"
                    return True

                state = await self.job_states.update(job_id, running)
                if state is None or state["status"] != "running":
                    raise asyncio.CancelledError
                self.channel.publish.remote(job_id, "stage", {"stage": "prepare", "phase": "start"})
                response = await asyncio.wait_for(
                    self._generate_with_retry(request, request_id, owner, job_id), self.api.request_timeout_s
                )
            finally:
                await self.admission.leave()
        except asyncio.TimeoutError:
            return {"status": "failed", "result": None, "error": {"code": "timeout", "message": "the job timed out"}}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job's failure is its outcome, mapped as a request's would be
            info = classify_error(exc)
            if info.code == "cancelled":
                return {"status": "cancelled", "result": None, "error": None}
            return {"status": "failed", "result": None, "error": {"code": info.code, "message": info.message}}
        return {"status": "succeeded", "result": response.model_dump(mode="json"), "error": None}

    async def _keep_lease(self, job_id: str, runner: asyncio.Task | None) -> None:
        """Renew the lease every third of its length; stop the run when the job was cancelled or taken over."""
        while True:
            await asyncio.sleep(self.api.jobs.lease_s / 3)

            def renew(current: dict[str, Any]) -> bool:
                if current["status"] in TERMINAL or (current.get("lease") or {}).get("holder") != self.replica:
                    return False
                current["lease"] = lease(self.replica, self.api.jobs.lease_s)
                return True

            try:
                state = await self.job_states.update(job_id, renew)
            except Exception:  # S3 trouble: try again at the next renewal, the lease has slack
                logger.warning("job %s: lease renewal failed", job_id, exc_info=True)
                continue
            held = state is not None and (state.get("lease") or {}).get("holder") == self.replica
            if state is None or state["status"] in TERMINAL or not held:
                if state is not None and state["status"] == "cancelled":
                    self._cancelling.add(job_id)
                if runner is not None:
                    runner.cancel()
                return

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self._sweep()
            except Exception:
                logger.warning("job sweep failed", exc_info=True)
            await asyncio.sleep(self.api.jobs.sweep_interval_s)

    async def _sweep(self) -> None:
        """Take over unfinished jobs whose lease expired (their replica died) and run them again."""
        for job_id in await self.job_states.active():
            if job_id in self._jobs:
                continue
            state = await self.job_states.read(job_id)
            if state is None or state["status"] in TERMINAL or not lease_expired(state):
                continue

            def take(current: dict[str, Any]) -> bool:
                if current["status"] in TERMINAL or not lease_expired(current):
                    return False
                current.update(
                    status="queued", lease=lease(self.replica, self.api.jobs.lease_s), attempts=current["attempts"] + 1
                )
                return True

            taken = await self.job_states.update(job_id, take)
            if taken is None or (taken.get("lease") or {}).get("holder") != self.replica or job_id in self._jobs:
                continue
            body = await self.job_states.read_request(job_id)
            try:
                request = GenerateRequest.model_validate(body)
            except (ValidationError, TypeError) as exc:  # nothing to run again: the job fails instead of looping
                error = {"code": "internal_error", "message": "the job's request could not be read back"}
                logger.warning("job %s: unreadable stored request (%s)", job_id, type(exc).__name__)
                failed = await self.job_states.update(
                    job_id, lambda s, error=error: s.update(status="failed", lease=None, error=error) is None
                )
                if failed is not None:
                    self.channel.publish.remote(job_id, "failed", public_body(failed))
                continue
            logger.warning("job %s: its lease expired; taking it over (attempt %d)", job_id, taken["attempts"])
            self.channel.publish.remote(job_id, "queued", {"position": None, "attempt": taken["attempts"]})
            self._start_job(job_id, request, taken["owner"], taken["request_id"])

    async def _owned_job(self, job_id: str, owner: str | None) -> dict[str, Any]:
        try:
            validate_generation_id(job_id)
        except ValueError:
            raise JobNotFound(f"job {job_id} not found") from None
        state = await self.job_states.read(job_id)
        if state is None or (owner is not None and self.api.auth.required and state.get("owner") != owner):
            raise JobNotFound(f"job {job_id} not found")
        return state

    def _webhook_secret(self, owner: str) -> str | None:
        """An API key's own secret (the hex SHA-256 of the key), or ``api.webhooks.secret`` with keys off."""
        return self.keys.webhook_secret(owner) if self.api.auth.required else self.api.webhooks.secret

    async def _deliver_webhook(self, final: dict[str, Any], owner: str) -> None:
        secret = self._webhook_secret(owner)
        if secret is None:
            logger.warning("job %s: no webhook secret for its owner; the webhook is not sent", final["id"])
            return
        result = await deliver(final["callback_url"], public_body(final), secret, self.api.webhooks)

        def record(current: dict[str, Any]) -> bool:
            current["webhook"] = {"delivered": result.delivered, "attempts": result.attempts, "status": result.status}
            return True

        await self.job_states.update(final["id"], record)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the ingress's autoscaling policy scales on (serve/autoscaling.py): generations admitted or waiting,
        never the open event streams."""
        return {GENERATIONS_METRIC: float(self.admission.in_flight + self.admission.waiting)}

    # ------------------------------------------------------------------------------------ HTTP routes
    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        summary="Generate images of the face in a photo",
        openapi_extra=GENERATE_BODY,
    )
    async def http_generate(self, request: Request) -> JSONResponse:
        owner = self._principal(request)
        fields = await self._read_body(request, GENERATE_FILES)
        body = GenerateRequest(**fields)
        note_prompt(request, body.prompt, body.negative_prompt, self.log_prompts)
        result = await self.generate(body, request_id(request), owner, request.headers.get("idempotency-key"))
        note(
            request,
            generation_id=result.id,
            images=len(result.images),
            image_bytes=sum(image.bytes for image in result.images),
            width=result.parameters.get("width"),
            height=result.parameters.get("height"),
            steps=result.parameters.get("num_inference_steps"),
            model=result.model.base,
            timings=seconds_by_stage(result.timings),
        )
        return JSONResponse(result.model_dump(mode="json"))

    @app.post(
        "/v1/faces",
        response_model=FacesResponse,
        summary="Detect faces; show the one generation would use",
        openapi_extra=FACES_BODY,
    )
    async def http_faces(self, request: Request) -> JSONResponse:
        self._principal(request)
        fields = await self._read_body(request, FACES_FILES)
        result = await self.analyze_faces(FacesRequest(**fields), request_id(request))
        return JSONResponse(result.model_dump(mode="json"))

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        summary="Start a generation as an async job (the body of /v1/generate, plus callback_url)",
        openapi_extra=GENERATE_BODY,
    )
    async def http_submit_job(self, request: Request) -> JSONResponse:
        owner = self._principal(request)
        fields = await self._read_body(request, GENERATE_FILES)
        body = GenerateRequest(**fields)
        note_prompt(request, body.prompt, body.negative_prompt, self.log_prompts)
        accepted = await self.submit_job(
            body,
            request_id(request),
            owner,
            request.headers.get("idempotency-key"),
            base_path=request.scope.get("root_path", "").rstrip("/"),
        )
        note(request, job_id=accepted.id)
        return JSONResponse(
            accepted.model_dump(mode="json"), status_code=202, headers={"Location": accepted.status_url}
        )

    @app.get("/v1/jobs/{job_id}", summary="A job's status, stage and step; its result or error once finished")
    async def http_get_job(self, job_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await self.get_job(job_id, self._principal(request)))

    @app.delete("/v1/jobs/{job_id}", summary="Cancel an unfinished job, or delete a finished one and its images")
    async def http_cancel_job(self, job_id: str, request: Request) -> Response:
        body = await self.cancel_job(job_id, self._principal(request))
        return Response(status_code=204) if body is None else JSONResponse(body, status_code=202)

    @app.get(
        "/v1/jobs/{job_id}/events",
        summary="Server-Sent Events: the job's state, stages, steps (previews=1: with previews), then its outcome",
    )
    async def http_job_events(self, job_id: str, request: Request, previews: bool = False) -> StreamingResponse:
        owner = self._principal(request)
        header = request.headers.get("last-event-id", "")
        last_event_id = int(header) if header.isdigit() else 0
        stream = self.job_events(job_id, owner, last_event_id, previews)
        first = await anext(stream)  # errors (not found, too many streams) are answered as JSON, before streaming
        return StreamingResponse(
            _prepend(first, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/generations/{generation_id}", summary="Stored metadata of a generation, with fresh URLs")
    async def http_get_generation(self, generation_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await self.get_generation(generation_id, self._principal(request)))

    @app.delete("/v1/generations/{generation_id}", status_code=204, summary="Delete a generation's objects")
    async def http_delete_generation(self, generation_id: str, request: Request) -> Response:
        await self.delete_generation(generation_id, self._principal(request))
        return Response(status_code=204)

    @app.get("/v1/generations/{generation_id}/images/{index}", summary="One image of a generation, through the service")
    async def http_generation_image(self, generation_id: str, index: int, request: Request) -> Response:
        """For browsers that cannot reach S3: the image streamed by the ingress (owner-scoped, like the metadata)."""
        await self._owned(generation_id, self._principal(request))
        data, content_type = await self.store.read_image.remote(generation_id, index)
        return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    async def http_page(self, request: Request) -> Response:
        """The web page (plain files in the package; it uses only the public API)."""
        if not request.url.path.endswith("/"):  # under a route prefix: relative links need the trailing slash
            return RedirectResponse(request.url.path + "/", status_code=307)
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def http_static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", f"no static file {name}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness of the ingress")
    async def http_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelsResponse, summary="The bases, LoRAs and modes a request can choose")
    async def http_models(self, request: Request) -> JSONResponse:
        self._principal(request)
        return JSONResponse((await self.models()).model_dump(mode="json"))

    # ------------------------------------------------------------------------------------ generation flow
    async def _admitted(self, request: GenerateRequest, request_id: str, owner: str) -> GenerateResponse:
        """Bounded admission: beyond ``max_in_flight`` the answer is an immediate JSON 503, not a queue."""
        if request.callback_url is not None:
            raise InvalidParameterError("callback_url is for POST /v1/jobs (a generation request answers directly)")
        if not self.admission.try_enter():
            metrics.record_admission_rejected(OVERLOADED[0])
            raise ApiError(503, *OVERLOADED, {"Retry-After": "5"})
        try:
            return await self._generate_with_retry(request, request_id, owner)
        finally:
            await self.admission.leave()

    async def _generate_with_retry(
        self, request: GenerateRequest, request_id: str, owner: str, job_id: str | None = None
    ) -> GenerateResponse:
        try:
            return await self._generate(request, request_id, owner, job_id)
        except REPLICA_GONE:
            # A replica died mid-request; Serve is replacing it. Generation is deterministic for the
            # seed, so one transparent retry is safe; a second failure reaches the client as a 503.
            logger.warning("request %s: a replica failed; retrying once", request_id)
            return await self._generate(request, request_id, owner, job_id)

    async def _generate(
        self, request: GenerateRequest, request_id: str, owner: str, job_id: str | None = None
    ) -> GenerateResponse:
        started = time.time()
        options = request.options()
        model, preset = self.catalogue.choose(options.base_model, options.lora_requests(), options.mode)
        params = options.sampling_params(options.resolved_seed(), preset, img2img=request.has_init_image)
        self._check_controls(params, {c.name for c in request.controlnets if c.has_image})
        identities = request.identities
        identity_photos: list[list[bytes]] = []
        if identities is not None:  # several people: their count is part of the batch key (context length)
            params = dataclasses.replace(params, identities=len(identities))
            identity_photos = await self._identity_photos(identities)
            face_images = [data for photos_of_one in identity_photos for data in photos_of_one]
        else:
            photos = request.face_photos()
            face_images = list(
                await asyncio.gather(
                    *(
                        self.images.load(
                            photo.b64, photo.uri, "face_image" if len(photos) == 1 else f"face_images[{i}]"
                        )
                        for i, photo in enumerate(photos)
                    )
                )
            )
        face_image = face_images[0]
        pose_image = None
        if request.has_pose_image:
            pose_image = await self.images.load(request.pose_image_b64, request.pose_image_uri, "pose_image")
        init_image = None
        if request.has_init_image:
            init_image = await self.images.load(request.init_image_b64, request.init_image_uri, "init_image")
        active = {c.name for c in params.active_controlnets}
        uploaded = {
            c.name: await self.images.load(c.image_b64, c.image_uri, CONTROL_IMAGE_PART.format(c.name))
            for c in request.controlnets
            if c.has_image and c.name in active
        }
        if identities is not None and pose_image is None and active - set(uploaded):
            raise InvalidParameterError(
                "with identities, computed control maps need a pose_image (the faces are placed by the layout, not "
                "where they are in the identity photos); give pose_image or upload the maps"
            )
        prompt, negative = apply_style(options.style, options.prompt, options.negative_prompt)
        if identities is not None:
            specs, identified = self._identify_all(identities, identity_photos)
            group = GroupFaceRequest(specs, pose_image, options.width, options.height)
            face = self.face.analyze_group.remote(group, *identified)
        else:
            face = self._analyze_faces(face_images, pose_image, options)
        # Routed by base: Serve prefers replicas that report it loaded (model multiplexing).
        prompt_stage = self.prompt.options(multiplexed_model_id=model.base)
        denoiser = self.denoiser.options(multiplexed_model_id=model.base)
        cfg = params.do_classifier_free_guidance
        encoded = prompt_stage.encode.remote(PromptRequest(prompt, negative, cfg, model))
        source_name = "face_image" if pose_image is None else "pose_image"
        controls = None
        if active or init_image is not None:  # maps and the init image are made beside face analysis
            controls = self.control_maps.prepare.remote(
                ControlMapsRequest(
                    pose_image if pose_image is not None else face_image,
                    source_name,
                    options.width,
                    options.height,
                    compute=tuple(name for name in sorted(active) if name not in uploaded),
                    uploaded=uploaded,
                    canny_low=options.canny_low,
                    canny_high=options.canny_high,
                    init_image=init_image,
                )
            )
        images = denoiser.generate.remote(params, model, face, encoded, controls, job_id)
        effective = {
            **options.model_dump(),
            "seed": params.seed,
            "base_model": model.base,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "scheduler": params.scheduler,
            "controlnets": [
                {**dataclasses.asdict(c), "map": "uploaded" if c.name in uploaded else f"computed from {source_name}"}
                for c in params.active_controlnets
            ],
            "strength": params.strength,
            "denoising_steps": params.denoising_steps,
        }
        if identities is not None:  # the single-person face fields do not apply: each identity has its own
            for name in ("face_index", "identity_combine", "pose_face_index"):
                effective.pop(name, None)
            effective["identities"] = [
                {
                    "index": i,
                    "photos": len(identity.images),
                    "face_index": identity.face_index,
                    "identity_combine": identity.identity_combine,
                    "region": identity.region,
                }
                for i, identity in enumerate(identities)
            ]
        record = GenerationRecord(
            id=job_id or new_generation_id(),
            request_id=request_id,
            owner=owner,
            created_at=datetime.now(timezone.utc).isoformat(),
            prompt=prompt,
            negative_prompt=negative,
            parameters=effective,
            pose_image_given=pose_image is not None,
            face_photos=len(face_images),
            job_id=job_id,
            inputs_stored=request.store_inputs,
            models=self.weights,
            init_image_given=init_image is not None,
        )
        inputs = None
        if request.store_inputs:
            if identities is not None:
                inputs = {
                    f"identity-{i}-{j}": data
                    for i, photos_of_one in enumerate(identity_photos)
                    for j, data in enumerate(photos_of_one)
                }
            elif len(face_images) == 1:
                inputs = {"face": face_image}
            else:
                inputs = {f"face-{i}": data for i, data in enumerate(face_images)}
            inputs |= {"pose": pose_image} if pose_image is not None else {}
            inputs |= {"init": init_image} if init_image is not None else {}
            inputs |= {f"control-{name}": data for name, data in uploaded.items()}
        try:
            # Every image is scored by the FaceAnalyzer (images go there and to the store, never through here).
            # (several people: each identity is scored in its own region)
            scores = self.face.score.remote(images, face) if identities is None else None
            region_scores = self.face.score_identities.remote(images, face) if identities is not None else None
            saved: SavedGeneration = await asyncio.wait_for(
                self.store.save.remote(
                    record, images, options.output_format, options.output_quality, inputs, scores, region_scores
                ),
                timeout=self.api.request_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"generation did not finish within {self.api.request_timeout_s:.0f} s",
                {"Retry-After": "30"},
            ) from None
        warnings = [
            f"no face found in image {index}: its identity_similarity is null"
            for index, image in enumerate(saved.stored.images)
            if image.identity_similarity is None and image.identities is None
        ]
        warnings += [
            f"no face found in identity {score.index}'s region in image {index}: its similarity is null"
            for index, image in enumerate(saved.stored.images)
            for score in image.identities or []
            if score.similarity is None
        ]
        stored_images = saved.stored.images
        if options.min_identity_similarity is not None:
            threshold = options.min_identity_similarity
            stored_images = [
                image.model_copy(
                    update={
                        "below_min_identity_similarity": image.identity_similarity is None
                        or image.identity_similarity < threshold
                    }
                )
                for image in stored_images
            ]
        timings = {**saved.timings, "total": StageTiming.since(started)}
        metrics.record_generation(
            {stage: timing.seconds for stage, timing in timings.items()},
            model.base,
            [image.identity_similarity for image in saved.stored.images],
        )
        return GenerateResponse(
            id=record.id,
            request_id=request_id,
            images=stored_images,
            seed=params.seed,
            face=FaceInfo.of(saved.face),
            faces=[FaceUsed.of_chosen(chosen) for chosen in saved.faces],
            model=ModelUsed.model_validate(saved.model.describe()),
            timings=timings,
            parameters={**effective, "width": saved.params.width, "height": saved.params.height},
            replicas=saved.replicas,
            batch=BatchInfo(**dataclasses.asdict(saved.batch)) if saved.batch is not None else None,
            layout=LayoutInfo.model_validate(saved.layout) if saved.layout is not None else None,
            warnings=warnings,
        )

    def _analyze_faces(
        self, face_images: list[bytes], pose_image: bytes | None, options: GenerationOptions
    ) -> DeploymentResponse:
        """The face condition, as a response for the Denoiser call (it never comes back through the ingress).

        One photo is analysed in the ``analyze`` call itself. Several are analysed in parallel, one ``identify``
        call each (spread over the FaceAnalyzer replicas); Serve resolves them before ``analyze`` combines them.
        """
        request = FaceRequest(
            None,
            pose_image,
            options.width,
            options.height,
            face_index=options.face_index,
            pose_face_index=options.pose_face_index,
            identity_combine=options.identity_combine,
        )
        if len(face_images) == 1:
            return self.face.analyze.remote(dataclasses.replace(request, face_image=face_images[0]))
        identified = [
            self.face.identify.remote(IdentityRequest(data, i, len(face_images), options.face_index))
            for i, data in enumerate(face_images)
        ]
        return self.face.analyze.remote(request, *identified)

    def _check_controls(self, params: GenerationParams, with_image: set[str]) -> None:
        """Every named ControlNet is loaded, maps that cannot be computed are uploaded, and image-to-image leaves a
        step to run: refused before any work starts."""
        for setting in params.controlnets:
            if setting.name not in self.controlnets:
                available = ", ".join(self.controlnets) or "none"
                raise InvalidParameterError(f"this deployment has no {setting.name} ControlNet; available: {available}")
        for setting in params.active_controlnets:
            if setting.name not in COMPUTED_MAPS and setting.name not in with_image:
                raise InvalidParameterError(
                    f"the {setting.name} ControlNet needs a ready-made map ({CONTROL_IMAGE_PART.format(setting.name)} "
                    f"or controlnets[].image_b64/image_uri): only {' and '.join(COMPUTED_MAPS)} maps are computed"
                )
        if params.strength is not None and params.denoising_steps == 0:
            raise InvalidParameterError(
                f"strength {params.strength} leaves no denoising step of {params.num_inference_steps}: "
                "int(num_inference_steps x strength) must be at least 1"
            )

    async def _refreshed(self, response: GenerateResponse) -> GenerateResponse:
        """A stored response with fresh presigned URLs (the old ones may have expired)."""
        meta: GenerationMeta = await self.store.get.remote(response.id)
        fresh = {image.uri: image for image in meta.images}
        return response.model_copy(update={"images": [fresh.get(image.uri, image) for image in response.images]})

    async def _owned(self, generation_id: str, owner: str | None) -> GenerationMeta:
        """The generation's metadata; "not found" for an invalid id or, with API keys on, another owner's id."""
        try:
            validate_generation_id(generation_id)
        except ValueError:
            raise GenerationNotFound(f"generation {generation_id} not found") from None
        meta: GenerationMeta = await self.store.get.remote(generation_id)
        if owner is not None and self.api.auth.required and meta.owner != owner:
            raise GenerationNotFound(f"generation {generation_id} not found")
        return meta

    async def _read_body(self, request: Request, files: dict[str, str]) -> dict[str, Any]:
        return await read_body(
            request,
            max_upload_bytes=self.api.max_upload_bytes,
            max_request_bytes=self.api.max_request_bytes,
            idle_timeout_s=self.api.body_idle_timeout_s,
            files=files,
            repeated={
                "face_image": ("face_images", MAX_FACE_PHOTOS),
                **{part: (f"{part}_images", MAX_FACE_PHOTOS) for part in IDENTITY_PARTS},
            },
            alternatives=IDENTITY_PARTS,
        )

    def _principal(self, request: Request) -> str:
        try:
            owner = self.keys.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None
        note(request, owner=owner)  # the key's name (never the key) in the request's log line
        return owner
