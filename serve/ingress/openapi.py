"""What ``/docs`` shows for the POST routes: both request bodies (JSON and multipart), and the error answers.

The routes read the raw request themselves (one body reader for JSON and multipart, with size limits and a
slow-client timeout), so FastAPI cannot infer their bodies; they are described here from the same pydantic
models that validate them. In multipart, each file part replaces the JSON body's ``*_b64``/``*_uri`` pair of
the same name, and every other field is a form field of the same name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from deployments.instantid.options import CONTROLNET_NAMES, MAX_FACE_PHOTOS, MAX_IDENTITIES
from serve.schemas import (
    CONTROL_IMAGE_PART,
    IDENTITY_PART,
    ErrorResponse,
    FacesRequest,
    GenerateRequest,
    IdentityCreateRequest,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 415, 422, 503, 504)
}


def _request_body(
    model: type[BaseModel],
    files: dict[str, str],
    required_file: str | None,
    repeated: dict[str, str] | None = None,
    identity_parts: bool = False,
) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model`` and whose multipart body has ``files``;
    ``repeated``: file parts that may be sent several times -> the JSON list field they replace. ``identity_parts``:
    the ``identity_N`` parts (repeatable) that fill ``identities[N].images``; the ``identities`` form field holds
    the JSON of the rest. ``required_file`` None: no single part is required (one of several forms is)."""
    repeated = repeated or {}
    schema = model.model_json_schema()
    file_fields = {f"{name}{suffix}" for name in files for suffix in ("_b64", "_uri")} | set(repeated.values())
    form_properties = {name: prop for name, prop in schema["properties"].items() if name not in file_fields}
    for name, description in files.items():
        binary = {"type": "string", "format": "binary"}
        if name in repeated:
            limit = schema["properties"][repeated[name]]["anyOf"][0]["maxItems"]
            form_properties[name] = {"type": "array", "items": binary, "maxItems": limit, "description": description}
        else:
            form_properties[name] = {**binary, "description": description}
    if identity_parts:
        for index in range(MAX_IDENTITIES):
            form_properties[IDENTITY_PART.format(index)] = {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "maxItems": MAX_FACE_PHOTOS,
                "description": f"Several people: photos of identity {index} (identities[{index}].images); number the "
                "parts from identity_0 without gaps.",
            }
    required = [required_file] if required_file is not None else []
    form_required = [*required, *(name for name in schema.get("required", []) if name in form_properties)]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {
                    "schema": {
                        "title": f"{model.__name__}Form",
                        "type": "object",
                        "properties": form_properties,
                        "required": form_required,
                    }
                },
            },
        }
    }


GENERATE_BODY = _request_body(
    GenerateRequest,
    {
        "face_image": "The identity photo (PNG, JPEG or WebP); repeat the part for up to 8 photos of the same person. "
        "Required unless the request has several people (identity_N parts).",
        "pose_image": "Optional photo whose largest face sets the pose, the composition and (without width/height) "
        "the size.",
        "init_image": "Optional image-to-image start (with strength); scaled to cover the output, centre-cropped.",
        "target_image": "Optional photo to edit: its chosen face (or mask_image) is repainted with the identity.",
        "mask_image": "Optional repaint mask for target_image (white repaints), the target's size.",
        **{
            CONTROL_IMAGE_PART.format(name): f"Optional ready-made map for the {name} ControlNet (listed in "
            "controlnets); scaled to cover the output, centre-cropped."
            for name in CONTROLNET_NAMES
        },
    },
    required_file=None,
    repeated={"face_image": "face_images"},
    identity_parts=True,
)
FACES_BODY = _request_body(
    FacesRequest,
    {
        "image": "The photo to analyse (PNG, JPEG or WebP); the part may also be named face_image. With identity_N "
        "parts: the optional pose photo."
    },
    required_file=None,
    identity_parts=True,
)
IDENTITY_BODY = _request_body(
    IdentityCreateRequest,
    {"face_image": "A photo of the person (PNG, JPEG or WebP); repeat the part for up to 8 photos of them."},
    required_file="face_image",
    repeated={"face_image": "face_images"},
)
