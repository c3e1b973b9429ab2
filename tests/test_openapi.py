"""The OpenAPI document describes both request bodies of each POST route, from the models that validate them."""

from __future__ import annotations

import pytest

from serve.ingress.routes import app
from serve.schemas import FacesRequest, GenerateRequest


@pytest.fixture(scope="module")
def spec() -> dict:
    return app.openapi()


@pytest.mark.parametrize(
    ("path", "model", "files", "required_file"),
    [
        (
            "/v1/generate",
            GenerateRequest,
            {
                "face_image",
                "pose_image",
                "init_image",
                "target_image",
                "mask_image",
                *(f"control_image_{n}" for n in ("pose", "canny", "depth")),
            },
            None,  # face_image, or identity_N parts for several people
        ),
        ("/v1/faces", FacesRequest, {"image"}, None),  # image, or identity_N parts (with an optional pose photo)
    ],
)
def test_post_routes_document_their_json_and_multipart_bodies(spec, path, model, files, required_file) -> None:
    body = spec["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"application/json", "multipart/form-data"}
    json_schema = body["content"]["application/json"]["schema"]
    expected = model.model_json_schema()
    assert set(json_schema["properties"]) == set(expected["properties"])  # every field, by the name it is sent as
    assert json_schema.get("required", []) == expected.get("required", [])
    for name, prop in expected["properties"].items():  # constraints and descriptions survive FastAPI's rendering
        for key in ("maximum", "minimum", "maxLength", "multipleOf", "enum", "description"):
            assert json_schema["properties"][name].get(key) == prop.get(key), (name, key)

    form = body["content"]["multipart/form-data"]["schema"]
    repeated = {"face_image": "face_images"} if path == "/v1/generate" else {}
    for name in files:  # a file part instead of the JSON body's base64/URI pair
        part = form["properties"][name]
        if name in repeated:  # a part that may be repeated: an array of files, as many as the JSON list allows
            assert part["type"] == "array" and part["maxItems"] == 8
            part = part["items"]
        assert (part["type"], part["format"]) == ("string", "binary")
        assert f"{name}_b64" not in form["properties"] and f"{name}_uri" not in form["properties"]
    assert not set(repeated.values()) & set(form["properties"])  # the JSON list's place is taken by the parts
    plain = {name for name in json_schema["properties"] if not name.endswith(("_b64", "_uri"))}
    plain -= set(repeated.values())
    assert plain <= set(form["properties"])  # every other field is a form field of the same name
    for name in plain:
        assert form["properties"][name] == json_schema["properties"][name]
    assert required_file is None or required_file in form["required"]
    assert set(form["required"]) - {required_file} == set(json_schema.get("required", []))
    for index in range(4):  # several people: identity_N parts, each repeatable up to 8 photos
        part = form["properties"][f"identity_{index}"]
        assert (part["type"], part["maxItems"], part["items"]["format"]) == ("array", 8, "binary")
    assert "identity_4" not in form["properties"] and "identities" in form["properties"]


def test_generate_form_lists_every_generation_option(spec) -> None:
    form = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    wanted = {"prompt", "seed", "num_inference_steps", "identitynet_strength", "store_inputs", "controlnets"}
    assert wanted <= set(form["properties"])
    assert form["required"] == ["prompt"]  # face_image or identity_N parts: enforced by the request model


def test_faces_request_accepts_the_generate_field_names() -> None:
    assert FacesRequest.model_validate({"face_image_b64": "AAAA"}).image_b64 == "AAAA"
    assert FacesRequest.model_validate({"face_image_uri": "s3://bucket/a.jpg"}).image_uri == "s3://bucket/a.jpg"
    assert FacesRequest.model_validate({"image_b64": "AAAA"}).image_b64 == "AAAA"
    with pytest.raises(ValueError, match="exactly one"):
        FacesRequest.model_validate({})
