"""The Ingress deployment: HTTP routes (FastAPI) and the Python handle API over the deployment graph.

Face analysis and prompt encoding start together; their responses go straight into the Denoiser call and
the Denoiser's response straight into the ResultStore call, so no image passes through the ingress.
A response is sent only after the store confirmed every object in S3.
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from deployments.instantid.errors import (
    ImageTooLargeError,
    InstantIDError,
    InvalidImageError,
    InvalidParameterError,
    UnsupportedImageTypeError,
)
from deployments.instantid.pipeline import GenerationParams
from deployments.instantid.styles import apply_style
from deployments.messages import FaceRequest, PromptRequest
from deployments.storage.results import GenerationNotFound, new_generation_id, validate_generation_id
from deployments.storage.s3 import S3Settings, make_client, parse_s3_uri
from serve.config import ApiConfig
from serve.schemas import (
    MAX_SEED,
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
_IMAGE_CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream"}

app = FastAPI(
    title="InstantID Serve",
    version=API_VERSION,
    description="Identity-preserving SDXL generation (InstantID) on Ray Serve; results in S3.",
    responses={
        400: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)


class ApiError(Exception):
    """An error with a status and code decided at the API boundary."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _request_id(request: Request) -> str:
    """Serve's proxy puts the request id (the client's X-Request-ID, or a new one) on the request and on
    every response; we reuse it so logs, errors, bodies and meta.json all carry the same id."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def _error(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None):
    rid = _request_id(request)
    body = {"error": {"code": code, "message": message, "request_id": rid}}
    return JSONResponse(body, status_code=status, headers=headers or {})


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def classify_error(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, headers) for any exception reaching the API, downstream ones included."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.headers
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return 422, "invalid_parameter", _validation_message(exc), {}
    if isinstance(exc, BackPressureError):
        return 503, "overloaded", "the service is at capacity; retry shortly", {"Retry-After": "5"}
    # Errors raised in another deployment arrive wrapped (RayTaskError); the original is its cause.
    cause = exc
    for _ in range(4):
        if isinstance(cause, InstantIDError):
            headers = {"Retry-After": "10"} if cause.status == 503 else {}
            return cause.status, cause.code, cause.message, headers
        if isinstance(cause, BackPressureError):
            return 503, "overloaded", "the service is at capacity; retry shortly", {"Retry-After": "5"}
        nxt = getattr(cause, "cause", None) or cause.__cause__
        if nxt is None or nxt is cause:
            break
        cause = nxt
    return 500, "internal_error", "internal error; quote the request id when reporting it", {}


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    status, code, message, headers = classify_error(exc)
    if status >= 500:
        logger.error("request %s failed: %s", _request_id(request), exc, exc_info=status == 500)
    return _error(request, status, code, message, headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(request, 422, "invalid_parameter", _validation_message(exc))


def _decode_b64(data: str, field: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise ImageTooLargeError(f"{field} is larger than {limit} bytes")
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
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
        self._input_clients: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ Python handle API
    async def generate(self, request: GenerateRequest, request_id: str | None = None) -> GenerateResponse:
        """Run one generation. Handle callers pass a :class:`GenerateRequest` (base64 or s3:// images)."""
        request_id = request_id or uuid.uuid4().hex
        started = time.time()
        options = request.options()
        face_image = await self._load_input(request.face_image_b64, request.face_image_uri, "face_image")
        pose_image = None
        if request.pose_image_b64 is not None or request.pose_image_uri is not None:
            pose_image = await self._load_input(request.pose_image_b64, request.pose_image_uri, "pose_image")
        seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)
        prompt, negative = apply_style(options.style, options.prompt, options.negative_prompt)
        params = GenerationParams(
            seed=seed,
            num_images=options.num_images,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            identitynet_strength=options.identitynet_strength,
            adapter_strength=options.adapter_strength,
            control_guidance_start=options.control_guidance_start,
            control_guidance_end=options.control_guidance_end,
            enhance_face_region=options.enhance_face_region,
            scheduler=options.scheduler,
        )
        face = self.face.analyze.remote(FaceRequest(face_image, pose_image, options.width, options.height))
        encoded = self.prompt.encode.remote(PromptRequest(prompt, negative, params.do_classifier_free_guidance))
        images = self.denoiser.generate.remote(params, face, encoded)
        generation_id = new_generation_id()
        effective = {**options.model_dump(), "seed": seed}
        record = {
            "id": generation_id,
            "request_id": request_id,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "prompt": prompt,
            "negative_prompt": negative,
            "parameters": effective,
            "pose_image_given": pose_image is not None,
            "models": self.weights,
        }
        try:
            stored = await asyncio.wait_for(
                self.store.save.remote(record, images, options.output_format, options.output_quality),
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

    async def get_generation(self, generation_id: str) -> dict[str, Any]:
        try:
            validate_generation_id(generation_id)
        except ValueError:
            raise GenerationNotFound(f"generation {generation_id} not found") from None
        return await self.store.get.remote(generation_id)

    # ------------------------------------------------------------------------------------ HTTP routes
    @app.post("/v1/generate", response_model=GenerateResponse, summary="Generate images of the face in a photo")
    async def http_generate(self, request: Request) -> JSONResponse:
        rid = _request_id(request)
        fields = await self._read_body(request, file_fields=("face_image", "pose_image"))
        result = await self.generate(GenerateRequest(**fields), rid)
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/v1/faces", response_model=FacesResponse, summary="Detect faces; show the one generation would use")
    async def http_faces(self, request: Request) -> JSONResponse:
        rid = _request_id(request)
        fields = await self._read_body(request, file_fields=("image",))
        result = await self.analyze_faces(FacesRequest(**fields), rid)
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/v1/generations/{generation_id}", summary="Stored metadata of a generation, with fresh URLs")
    async def http_get_generation(self, generation_id: str, request: Request) -> JSONResponse:
        meta = await self.get_generation(generation_id)
        return JSONResponse(meta)

    @app.get("/healthz", summary="Liveness of the ingress")
    async def http_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The models this deployment serves")
    async def http_models(self) -> dict[str, Any]:
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
        async for chunk in request.stream():
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
            except ValueError:
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
