"""The Ingress deployment: HTTP routes (FastAPI) and the Python handle API over the deployment graph.

Face analysis and prompt encoding start together; their responses go straight into the Denoiser call and
the Denoiser's response straight into the ResultStore call, so no image passes through the ingress.
A response is sent only after the store confirmed every object in S3.
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.instantid.errors import (
    ImageTooLargeError,
    InstantIDError,
    InvalidImageError,
    InvalidParameterError,
    UnsupportedImageTypeError,
)
from deployments.instantid.styles import apply_style
from deployments.messages import FaceRequest, PromptRequest
from deployments.storage.idempotency import IdempotencyRecord
from deployments.storage.results import GenerationNotFound, new_generation_id, validate_generation_id
from deployments.storage.s3 import S3Settings, make_client, parse_s3_uri
from serve.auth import ANONYMOUS, ApiKeys, AuthError
from serve.config import ApiConfig
from serve.idempotency import IdempotencyGuard, IdempotencyInProgress, IdempotencyKeyReused
from serve.schemas import (
    ErrorResponse,
    FaceInfo,
    FacesRequest,
    FacesResponse,
    GenerateRequest,
    GenerateResponse,
    StageTiming,
    StoredImage,
)

logger = logging.getLogger("ray.serve")

API_VERSION = "1"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BODY_IDLE_TIMEOUT_S = 60.0  # longest pause while a request body arrives before the answer is a 408
_IMAGE_CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream"}

app = FastAPI(
    title="InstantID Serve",
    version=API_VERSION,
    description="Identity-preserving SDXL generation (InstantID) on Ray Serve; results in S3.",
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        408: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
        504: {"model": ErrorResponse},
    },
)


class ApiError(Exception):
    """An error with a status and code decided at the API boundary."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _StoreRecords:
    """The ResultStore deployment's idempotency-record methods, as serve.idempotency.RecordStore."""

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


def _request_id(request: Request) -> str:
    """Serve's proxy puts the request id (the client's X-Request-ID, or a new one) on the request and on
    every response; we reuse it so logs, errors, bodies and meta.json all carry the same id."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


@dataclass
class ErrorInfo:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    generation_id: str | None = None


def _error(request: Request, info: ErrorInfo) -> JSONResponse:
    body: dict[str, Any] = {"code": info.code, "message": info.message, "request_id": _request_id(request)}
    if info.generation_id:
        body["generation_id"] = info.generation_id
    return JSONResponse({"error": body}, status_code=info.status, headers=info.headers)


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


_OVERLOADED = ("overloaded", "the service is at capacity; retry shortly")
# A replica that died or is being replaced: the request may simply be retried.
_REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


def classify_error(exc: BaseException) -> ErrorInfo:
    """Status, code, message and headers for any exception reaching the API, downstream ones included."""
    if isinstance(exc, ApiError):
        return ErrorInfo(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return ErrorInfo(422, "invalid_parameter", _validation_message(exc))
    # Errors raised in another deployment arrive wrapped (RayTaskError); the original is in the cause chain.
    cause: BaseException | None = exc
    for _ in range(6):
        if cause is None:
            break
        if isinstance(cause, InstantIDError):
            headers = {"Retry-After": "10"} if cause.status == 503 else {}
            return ErrorInfo(cause.status, cause.code, cause.message, headers, getattr(cause, "generation_id", None))
        if isinstance(cause, BackPressureError):
            return ErrorInfo(503, *_OVERLOADED, {"Retry-After": "5"})
        if isinstance(cause, _REPLICA_GONE):
            return ErrorInfo(
                503, "replica_unavailable", "a worker failed while serving the request; retry", {"Retry-After": "5"}
            )
        nxt = getattr(cause, "cause", None) or cause.__cause__
        cause = None if nxt is cause else nxt
    return ErrorInfo(500, "internal_error", "internal error; quote the request id when reporting it")


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    info = classify_error(exc)
    if info.status >= 500:
        logger.error("request %s failed: %s", _request_id(request), exc, exc_info=info.status == 500)
    return _error(request, info)


# Starlette sends the catch-all (Exception) handler's response and then re-raises, so Serve would log every
# refused request as a failure with a traceback, in the replica and again in the proxy (which must unpickle
# our exception, importing this whole module: a stall of seconds on its first 4xx). The errors we expect
# are answered here instead, without re-raising; only unexpected ones still reach the catch-all.
for _expected in (ApiError, InstantIDError, ValidationError, RayError, RayServeException):
    app.add_exception_handler(_expected, _any_error)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(request, classify_error(exc))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the same JSON error shape as everything else."""
    code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
    return _error(request, ErrorInfo(exc.status_code, code, str(exc.detail), dict(exc.headers or {})))


def _decode_b64(data: str, field: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise ImageTooLargeError(f"{field} is larger than {limit} bytes")
    try:
        raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"{field} is not valid base64") from None
    if not raw:
        raise InvalidImageError(f"{field} is empty")
    return raw


def _timings(raw: dict[str, dict[str, float]]) -> dict[str, StageTiming]:
    return {stage: StageTiming(**values) for stage, values in raw.items()}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        face: DeploymentHandle,
        prompt: DeploymentHandle,
        denoiser: DeploymentHandle,
        store: DeploymentHandle,
        api: dict[str, Any],
        storage: dict[str, Any],
        weights: dict[str, Any],
    ) -> None:
        self.face, self.prompt, self.denoiser, self.store = face, prompt, denoiser, store
        self.api = ApiConfig(**api)
        self.results = S3Settings(**storage)
        self.weights = weights
        self.keys = ApiKeys(self.api.auth)
        self._input_clients: dict[str, Any] = {}
        self._in_flight = 0
        # A claimant may run the request and its one replica-loss retry, each bounded by the timeout.
        self.idempotency = IdempotencyGuard(_StoreRecords(store), lease_s=2 * self.api.request_timeout_s + 60)
        if self.api.auth.required and self.keys.count == 0 and self.api.auth.keys_file is None:
            logger.warning("API keys are required but none are configured: every request will get 401")

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
        is a conditional S3 write, see serve/idempotency.py); the same key with a different request is
        refused (422), and a repeat that outwaits a still-running first call gets a 409.
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

    async def _refreshed(self, response: GenerateResponse) -> GenerateResponse:
        """A stored response with fresh presigned URLs (the old ones may have expired)."""
        meta = await self.store.get.remote(response.id)
        urls = {image["uri"]: image["url"] for image in meta.get("images", []) if "url" in image}
        images = [image.model_copy(update={"url": urls.get(image.uri, image.url)}) for image in response.images]
        return response.model_copy(update={"images": images})

    async def _admitted(self, request: GenerateRequest, request_id: str, owner: str) -> GenerateResponse:
        """Bounded admission: beyond ``max_in_flight`` the answer is an immediate JSON 503, not a queue."""
        if self._in_flight >= self.api.max_in_flight:
            raise ApiError(503, *_OVERLOADED, {"Retry-After": "5"})
        self._in_flight += 1
        try:
            try:
                return await self._generate(request, request_id, owner)
            except _REPLICA_GONE:
                # A replica died mid-request; Serve is replacing it. Generation is deterministic for the
                # seed, so one transparent retry is safe; a second failure reaches the client as a 503.
                logger.warning("request %s: a replica failed; retrying once", request_id)
                return await self._generate(request, request_id, owner)
        finally:
            self._in_flight -= 1

    async def _generate(self, request: GenerateRequest, request_id: str, owner: str) -> GenerateResponse:
        started = time.time()
        options = request.options()
        face_image = await self._load_input(request.face_image_b64, request.face_image_uri, "face_image")
        pose_image = None
        if request.pose_image_b64 is not None or request.pose_image_uri is not None:
            pose_image = await self._load_input(request.pose_image_b64, request.pose_image_uri, "pose_image")
        seed = options.resolved_seed()
        prompt, negative = apply_style(options.style, options.prompt, options.negative_prompt)
        params = options.sampling_params(seed)
        face = self.face.analyze.remote(FaceRequest(face_image, pose_image, options.width, options.height))
        encoded = self.prompt.encode.remote(PromptRequest(prompt, negative, params.do_classifier_free_guidance))
        images = self.denoiser.generate.remote(params, face, encoded)
        generation_id = new_generation_id()
        effective = {**options.model_dump(), "seed": seed}
        record = {
            "id": generation_id,
            "request_id": request_id,
            "owner": owner,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "prompt": prompt,
            "negative_prompt": negative,
            "parameters": effective,
            "pose_image_given": pose_image is not None,
            "inputs_stored": request.store_inputs,
            "models": self.weights,
        }
        inputs = None
        if request.store_inputs:
            inputs = {"face": face_image, **({"pose": pose_image} if pose_image is not None else {})}
        try:
            stored = await asyncio.wait_for(
                self.store.save.remote(record, images, options.output_format, options.output_quality, inputs),
                timeout=self.api.request_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"generation did not finish within {self.api.request_timeout_s:.0f} s",
                {"Retry-After": "30"},
            ) from None
        timings = stored["timings"]
        timings["total"] = {"start": started, "end": time.time(), "seconds": time.time() - started}
        warnings = []
        if stored["prompt_truncated"]:
            warnings.append("the prompt or negative prompt was longer than 77 CLIP tokens and was truncated")
        return GenerateResponse(
            id=generation_id,
            request_id=request_id,
            images=[StoredImage(**{k: img[k] for k in StoredImage.model_fields}) for img in stored["stored"]["images"]],
            seed=seed,
            face=FaceInfo(
                box=stored["face"]["bbox"], keypoints=stored["face"]["kps"], score=stored["face"]["det_score"]
            ),
            timings=_timings(timings),
            parameters={**effective, "width": stored["width"], "height": stored["height"]},
            warnings=warnings,
        )

    async def analyze_faces(self, request: FacesRequest, request_id: str | None = None) -> FacesResponse:
        image = await self._load_input(request.image_b64, request.image_uri, "image")
        result = await self.face.faces.remote(image, request.include_keypoint_image)
        faces = [FaceInfo(box=f["bbox"], keypoints=f["kps"], score=f["det_score"]) for f in result["faces"]]
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=result["width"],
            height=result["height"],
            faces=faces,
            chosen=result["chosen"],
            keypoint_image_png_b64=result["keypoint_image_png_b64"],
        )

    async def get_generation(self, generation_id: str, owner: str | None = None) -> dict[str, Any]:
        """Stored metadata with fresh URLs. With ``owner``, another principal's generation is "not found"."""
        meta = await self.store.get.remote(self._checked_id(generation_id))
        if owner is not None and self.api.auth.required and meta.get("owner") != owner:
            raise GenerationNotFound(f"generation {generation_id} not found")
        return meta

    async def delete_generation(self, generation_id: str, owner: str | None = None) -> int:
        """Delete outputs and metadata (and kept inputs); only the owner may. Returns objects removed."""
        await self.get_generation(generation_id, owner)  # existence and ownership
        return await self.store.delete.remote(generation_id)

    @staticmethod
    def _checked_id(generation_id: str) -> str:
        try:
            return validate_generation_id(generation_id)
        except ValueError:
            raise GenerationNotFound(f"generation {generation_id} not found") from None

    def _principal(self, request: Request) -> str:
        try:
            return self.keys.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None

    # ------------------------------------------------------------------------------------ HTTP routes
    @app.post("/v1/generate", response_model=GenerateResponse, summary="Generate images of the face in a photo")
    async def http_generate(self, request: Request) -> JSONResponse:
        owner = self._principal(request)
        fields = await self._read_body(request, file_fields=("face_image", "pose_image"))
        result = await self.generate(
            GenerateRequest(**fields), _request_id(request), owner, request.headers.get("idempotency-key")
        )
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/v1/faces", response_model=FacesResponse, summary="Detect faces; show the one generation would use")
    async def http_faces(self, request: Request) -> JSONResponse:
        self._principal(request)
        fields = await self._read_body(request, file_fields=("image",))
        result = await self.analyze_faces(FacesRequest(**fields), _request_id(request))
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/v1/generations/{generation_id}", summary="Stored metadata of a generation, with fresh URLs")
    async def http_get_generation(self, generation_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await self.get_generation(generation_id, self._principal(request)))

    @app.delete("/v1/generations/{generation_id}", status_code=204, summary="Delete a generation's objects")
    async def http_delete_generation(self, generation_id: str, request: Request) -> Response:
        await self.delete_generation(generation_id, self._principal(request))
        return Response(status_code=204)

    @app.get("/healthz", summary="Liveness of the ingress")
    async def http_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The models this deployment serves")
    async def http_models(self, request: Request) -> dict[str, Any]:
        self._principal(request)
        info = await self.denoiser.model_info.remote()
        return {"weights": self.weights, "denoiser": info, "api_version": API_VERSION}

    # ------------------------------------------------------------------------------------ input helpers
    async def _read_body(self, request: Request, file_fields: tuple[str, ...]) -> dict[str, Any]:
        """JSON or multipart, with size limits, as the JSON model's fields (file parts become ``<name>_b64``)."""
        limit = self.api.max_upload_bytes
        max_body = 2 * (limit * 4 // 3) + 256 * 1024
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid_request", "invalid Content-Length")
            if int(declared) > max_body:
                raise ImageTooLargeError(f"request body is larger than {max_body} bytes")
        chunks, size = [], 0
        stream = request.stream()
        while True:
            try:  # a client that stops sending (slowloris) must not hold an ingress slot forever
                chunk = await asyncio.wait_for(anext(stream), BODY_IDLE_TIMEOUT_S)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, "request_timeout", f"no body data for {BODY_IDLE_TIMEOUT_S:.0f} s") from None
            size += len(chunk)
            if size > max_body:
                raise ImageTooLargeError(f"request body is larger than {max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # starlette parses forms from the cached body
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            try:
                fields = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                raise ApiError(400, "invalid_request", "the body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise ApiError(422, "invalid_parameter", "the JSON body must be an object")
            return fields
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=len(file_fields), max_fields=64, max_part_size=64 * 1024)
            except Exception as exc:  # malformed multipart, too many parts
                raise ApiError(400, "invalid_request", f"could not parse the multipart body: {exc}") from None
            fields: dict[str, Any] = {}
            files: dict[str, bytes] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in file_fields:
                        raise ApiError(422, "invalid_parameter", f"unexpected file field {name!r}")
                    if name in files:
                        raise ApiError(422, "invalid_parameter", f"file {name!r} given twice")
                    kind = (value.content_type or "application/octet-stream").split(";")[0].strip().lower()
                    if kind not in _IMAGE_CONTENT_TYPES:
                        raise UnsupportedImageTypeError(f"{name}: content type {kind} is not an image we accept")
                    data = await value.read(limit + 1)
                    if len(data) > limit:
                        raise ImageTooLargeError(f"{name} is larger than {limit} bytes")
                    if not data:
                        raise InvalidImageError(f"{name} is empty")
                    files[name] = data
                elif name in fields:
                    raise ApiError(422, "invalid_parameter", f"field {name!r} given twice")
                elif name in file_fields:
                    raise ApiError(422, "invalid_parameter", f"{name} must be a file part")
                else:
                    fields[name] = value
            if file_fields[0] not in files:
                raise ApiError(422, "invalid_parameter", f"multipart requests need a file part {file_fields[0]!r}")
            for name, data in files.items():
                fields[f"{name}_b64"] = base64.b64encode(data).decode()
            return fields
        raise UnsupportedImageTypeError(
            f"content type {content_type or '(none)'} is not accepted; use application/json or multipart/form-data"
        )

    async def _load_input(self, b64: str | None, uri: str | None, field: str) -> bytes:
        limit = self.api.max_upload_bytes
        if b64 is not None:
            return _decode_b64(b64, field, limit)
        if uri is None:
            raise InvalidParameterError(f"{field} is required")
        return await asyncio.to_thread(self._fetch_s3, uri, field, limit)

    def _fetch_s3(self, uri: str, field: str, limit: int) -> bytes:
        """Read an input photo from an allowed bucket: never URLs, never other buckets."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise InvalidParameterError(f"{field}: {exc}") from None
        if bucket not in self.api.allowed_input_buckets or not key or key.endswith("/"):
            raise InvalidParameterError(f"{field}: s3 inputs are accepted only from the configured input buckets")
        client = self._input_clients.get(bucket)
        if client is None:
            client = make_client(self.results.model_copy(update={"bucket": bucket, "create_bucket": False}))
            self._input_clients[bucket] = client
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength", 0)) > limit:
                raise ImageTooLargeError(f"{field} is larger than {limit} bytes")
            return client.get_object(Bucket=bucket, Key=key)["Body"].read(limit + 1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                raise InvalidParameterError(f"{field}: {uri} cannot be read ({code})") from None
            raise
        except BotoCoreError as exc:
            from deployments.storage.results import StorageError

            raise StorageError(f"{field}: could not read {uri}: {type(exc).__name__}") from exc
