"""The Ingress deployment: the HTTP routes (FastAPI) and the Python handle API, over the deployment graph.

Every route is a few lines: read the body (``inputs``), authenticate (``auth``), call the handle API method of the
same name, answer. The work lives elsewhere: generations in ``generation`` (the one plan and flow every path runs),
``POST /v1/faces`` in ``faces``, async jobs in ``serve/jobs/``, the error mapping in ``errors``. This module and what
it imports load none of the model stack, so an ingress replica stays small.
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import cloudpickle
from ray import serve as ray_serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.generation.messages import GenerationMeta
from deployments.instantid.catalogue import ModelCatalogue
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.licenses import SourceLicense
from deployments.instantid.options import CONTROLNET_NAMES
from deployments.job_events import job_events
from deployments.storage.generations import GenerationNotFound, validate_generation_id
from deployments.storage.identities import IdentityStore
from deployments.storage.inputs import S3InputReader
from deployments.storage.job_records import JobRecords
from deployments.storage.s3 import S3Settings, make_client
from serve.config import ApiConfig
from serve.jobs.admission import Admission
from serve.jobs.events import prepend
from serve.jobs.leases import Leases
from serve.jobs.runner import JobRunner
from serve.jobs.state import JobStates
from serve.jobs.webhooks import WebhookRefused, validate_callback_url
from serve.schemas import FacesRequest, FacesResponse, GenerateRequest, GenerateResponse, JobAccepted, ModelsResponse

from . import history as history_module
from . import identities as identity_module
from .auth import ANONYMOUS, ApiKeys, AuthError
from .autoscaling import GENERATIONS_METRIC
from .errors import OVERLOADED, ApiError, request_id
from .faces import FaceQueries
from .generation import Generations, StageHandles
from .history import HistoryRoutes
from .http_app import API_VERSION, app
from .idempotency import IdempotencyGuard, StoreRecords, run_once
from .identities import Identities, IdentityRoutes
from .inputs import FACES_FILES, GENERATE_FILES, ImageInputs, read_body
from .openapi import FACES_BODY, GENERATE_BODY
from .request_log import note, note_prompt, seconds_by_stage

logger = logging.getLogger("ray.serve")

# Ray Serve pickles the app with the Ingress and binds ``self`` of each route method in the driver. The Ingress's
# own methods travel by value (``Ingress`` names the deployment, not the class); a mixin's methods, importable by
# name, would travel by reference and arrive unbound: its module travels by value too.
cloudpickle.register_pickle_by_value(identity_module)
cloudpickle.register_pickle_by_value(history_module)

STATIC_DIR = Path(__file__).parent.parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # the page's files, and only those


@ray_serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@ray_serve.ingress(app)
class Ingress(IdentityRoutes, HistoryRoutes):
    def __init__(
        self,
        face: DeploymentHandle,
        prompt: DeploymentHandle,
        denoiser: DeploymentHandle,
        store: DeploymentHandle,
        control_maps: DeploymentHandle,
        safety: DeploymentHandle | None,
        api: ApiConfig,
        storage: S3Settings,
        weights: dict[str, Any],
        models: ModelCatalogue,
        controlnets: list[str],
        log_prompts: bool = False,
        licenses: list[SourceLicense] | None = None,
    ) -> None:
        self.api = api
        self.log_prompts = log_prompts  # prompts in the request log lines (off: never logged)
        self.catalogue, self.licenses = models, licenses or []  # every weight source's licence (GET /v1/models)
        self.store, self.denoiser = store, denoiser
        self.controlnets = [name for name in CONTROLNET_NAMES if name in controlnets]  # what the denoiser loaded
        self.keys = ApiKeys(api.auth)
        if api.auth.required and self.keys.count == 0 and api.auth.keys_file is None:
            logger.warning("API keys are required but none are configured: every request will get 401")
        images = ImageInputs(S3InputReader(storage, api.allowed_input_buckets), api.max_upload_bytes)
        handles = StageHandles(face, prompt, denoiser, store, control_maps, safety)
        client = make_client(storage)
        self.identities = Identities(IdentityStore(client, storage), face, images)
        self.generations = Generations(
            handles, images, models, self.controlnets, weights, api.request_timeout_s, self.identities
        )
        self.faces = FaceQueries(handles, images, self.controlnets, self.identities)
        self.admission = Admission(api.max_in_flight)
        self.longest_generation_s = 2 * api.request_timeout_s + 60  # a request and its one retry, each timed out
        self.idempotency = IdempotencyGuard(StoreRecords(store), lease_s=self.longest_generation_s)
        context = ray_serve.get_replica_context()
        self.jobs = JobRunner(
            states=JobStates(JobRecords(client, storage)),
            channel=job_events(),
            admission=self.admission,
            leases=Leases(api.jobs.lease_s),
            replica=context.replica_id.unique_id,
            service=context.app_name,
            config=api.jobs,
            request_timeout_s=api.request_timeout_s,
            generate=self.generations.run,
            delete_generation=lambda job_id: store.delete.remote(job_id),
            webhook_secret=self._webhook_secret,
            webhooks=api.webhooks,
            owner_scoped=api.auth.required,
        )

    # ------------------------------------------------------------------------------ Python handle API
    async def generate(
        self,
        request: GenerateRequest,
        request_id: str | None = None,
        owner: str = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> GenerateResponse:
        """Run one generation. Handle callers pass a :class:`GenerateRequest` (base64 or s3:// images).

        With an ``idempotency_key``, a repeated call (same owner, key and request) returns the first call's result
        without generating again, also when it reaches another ingress replica (see ``idempotency``); the same key
        with a different request is refused (422), and a repeat that outwaits a still-running first call gets a 409.
        """
        request_id = request_id or uuid.uuid4().hex
        if idempotency_key is None:
            return await self._admitted(request, request_id, owner)

        async def produce() -> dict[str, Any]:
            return (await self._admitted(request, request_id, owner)).model_dump(mode="json")

        body, replayed = await run_once(
            self.idempotency,
            "",
            owner,
            idempotency_key,
            request,
            produce,
            wait_s=self.api.request_timeout_s,
            retry_after_s=10,
        )
        response = GenerateResponse.model_validate(body)
        return await self._refreshed(response) if replayed else response

    async def analyze_faces(
        self, request: FacesRequest, request_id: str | None = None, owner: str = ANONYMOUS
    ) -> FacesResponse:
        """What face analysis sees (``owner``: whose saved identities the layout of several people may use)."""
        return await self.faces.analyze(request, request_id, owner)

    async def models(self) -> ModelsResponse:
        """The catalogue (names, descriptions, defaults; never where the files are) and what one denoiser holds."""
        denoiser = await self.denoiser.model_info.remote()
        return ModelsResponse.of(self.catalogue, self.controlnets, denoiser, API_VERSION, self.licenses)

    async def get_generation(self, generation_id: str, owner: str | None = None) -> dict[str, Any]:
        """Stored metadata with fresh URLs. With ``owner``, another principal's generation is "not found"."""
        return (await self._owned(generation_id, owner)).document

    async def delete_generation(self, generation_id: str, owner: str | None = None) -> int:
        """Delete outputs and metadata (and kept inputs); only the owner may. Returns objects removed."""
        await self._owned(generation_id, owner)
        return await self.store.delete.remote(generation_id)

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
        self.jobs.ensure_sweeper()
        await self.generations.check(request, owner)  # every rule and saved identity, before the job exists
        if request.callback_url is not None:
            try:
                validate_callback_url(request.callback_url, self.api.webhooks)
            except WebhookRefused as exc:
                raise InvalidParameterError(f"callback_url: {exc}") from None
            if self._webhook_secret(owner) is None:
                raise InvalidParameterError("callback_url: this service has no webhook secret configured")
        if idempotency_key is None:
            return await self.jobs.submit(request, request_id, owner, base_path)

        async def produce() -> dict[str, Any]:
            return (await self.jobs.submit(request, request_id, owner, base_path)).model_dump(mode="json")

        body, _ = await run_once(
            self.idempotency, "jobs", owner, idempotency_key, request, produce, wait_s=30, retry_after_s=5
        )
        return JobAccepted.model_validate(body)

    async def get_job(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """The job's status (and its result or error once finished); another owner's job is "not found"."""
        return await self.jobs.get(job_id, owner)

    async def cancel_job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """Cancel an unfinished job (the denoiser drops it at its next step): its body. A finished job is deleted
        with its generation, as ``DELETE /v1/generations/{id}`` does: None."""
        return await self.jobs.cancel(job_id, owner)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the autoscaling policy (``autoscaling``) scales on: generations admitted or waiting, never streams."""
        return {GENERATIONS_METRIC: float(self.admission.in_flight + self.admission.waiting)}

    def check_health(self) -> None:
        """Failing when its slots stopped moving (``Admission.check_moving``) makes Serve replace this replica."""
        self.admission.check_moving(self.longest_generation_s)

    # ------------------------------------------------------------------------------------ HTTP routes
    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        summary="Generate images of the face in a photo",
        openapi_extra=GENERATE_BODY,
    )
    async def http_generate(self, request: Request) -> JSONResponse:
        owner = self._principal(request)
        body = GenerateRequest(**await self._read_body(request, GENERATE_FILES))
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
        owner = self._principal(request)
        fields = await self._read_body(request, FACES_FILES)
        result = await self.analyze_faces(FacesRequest(**fields), request_id(request), owner)
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
        body = GenerateRequest(**await self._read_body(request, GENERATE_FILES))
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
        stream = self.jobs.events(job_id, owner, last_event_id, previews)
        first = await anext(stream)  # errors (not found, too many streams) are answered as JSON, before streaming
        return StreamingResponse(
            prepend(first, stream),
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
    @app.head("/", include_in_schema=False)  # probes and prefetches: GET's answer without a body
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
    @app.head("/healthz", include_in_schema=False)  # probes: as GET, no body (in the schema it would repeat GET)
    async def http_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelsResponse, summary="The bases, LoRAs and modes a request can choose")
    async def http_models(self, request: Request) -> JSONResponse:
        self._principal(request)
        return JSONResponse((await self.models()).model_dump(mode="json"))

    # ------------------------------------------------------------------------------------------ helpers
    async def _admitted(self, request: GenerateRequest, request_id: str, owner: str) -> GenerateResponse:
        """Bounded admission: beyond ``max_in_flight`` the answer is an immediate JSON 503, not a queue."""
        if request.callback_url is not None:
            raise InvalidParameterError("callback_url is for POST /v1/jobs (a generation request answers directly)")
        if not self.admission.try_enter():
            metrics.record_admission_rejected(OVERLOADED[0])
            raise ApiError(503, *OVERLOADED, {"Retry-After": "5"})
        try:
            return await self.generations.run(request, request_id, owner)
        finally:
            await self.admission.leave()

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

    def _webhook_secret(self, owner: str) -> str | None:
        """An API key's own secret (the hex SHA-256 of the key), or ``api.webhooks.secret`` with keys off."""
        return self.keys.webhook_secret(owner) if self.api.auth.required else self.api.webhooks.secret

    async def _read_body(self, request: Request, files: dict[str, str]) -> dict[str, Any]:
        return await read_body(request, self.api, files)

    def _principal(self, request: Request) -> str:
        try:
            owner = self.keys.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None
        note(request, owner=owner)  # the key's name (never the key) in the request's log line
        return owner
