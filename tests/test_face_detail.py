"""The face detail pass: each small face of a finished image repainted at portrait resolution as an edit of it.

Each face is an edit (test_edit.py pins the edit itself against diffusers' inpainting pipeline); these tests pin
which faces are repainted, that nothing outside their padded boxes (or, for an edit, outside its mask) changes, the
scores before and after, what is reported, and what is refused. The attention-mask size rule the crops exposed is
checked against the UNet's own downsampling here too.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from deployments.generation.messages import FaceResult, PromptRequest
from deployments.generation.plan import GenerationInputs, InputsGiven, PersonGiven, check_inputs
from deployments.instantid.attention import attention_size
from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.editing import face_mask
from deployments.instantid.errors import InstantIDError
from deployments.instantid.face_detail import FaceDetailPass
from deployments.instantid.images import decode_image
from deployments.instantid.options import GenerationOptions
from deployments.instantid.params import ControlSetting, GenerationParams
from tests.support import astronaut_jpeg, astronaut_rgb, encode_image, generate_with_params, group_photo_jpeg

PROMPT, NEGATIVE = "a portrait photo", "blurry"
FIRST = GenerationParams(width=64, height=64, seed=7, num_inference_steps=4, guidance_scale=5.0)
REQUEST = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 3, "style": "none", "output_format": "png"}


@pytest.fixture(scope="module")
def pipeline(tiny_layout):
    from deployments.generation.local import InstantIDPipeline

    return InstantIDPipeline.from_layout(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return decode_image(group_photo_jpeg())


def first_pass_on(pipeline, image: np.ndarray):
    """A first pass whose result holds ``image`` (a photo with faces; the tiny model draws none): (model, face,
    prompt, result)."""
    first = generate_with_params(pipeline, astronaut_rgb(), PROMPT, NEGATIVE, params=FIRST)
    model = ModelChoice(pipeline.catalogue.default_base, ())
    prompt = pipeline.prompt.encode(PromptRequest(PROMPT, NEGATIVE, True, model))
    result = dataclasses.replace(first.result, images=image[None].copy())
    return model, FaceResult(first.condition, {}), prompt, result


def long_side(box) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


# --------------------------------------------------------------------------------------------- the pass itself


def test_on_a_group_photo_only_faces_under_min_face_are_repainted_and_only_within_their_padded_boxes(
    pipeline, group
) -> None:
    detected = pipeline.face.analyzer.detect(group)
    min_face = 320  # between the detector's face sizes on this photo: some faces are repaired, some are not
    small = [face for face in detected if long_side(face.bbox) < min_face]
    assert 0 < len(small) < len(detected)
    detail = FaceDetailPass(strength=0.75, min_face=min_face, padding=0.2, steps=4, blur=4)
    model, face, prompt, first = first_pass_on(pipeline, group)
    # A first pass with an extra ControlNet: its map is of the whole picture, the face jobs run without it.
    first = dataclasses.replace(
        first, params=dataclasses.replace(first.params, controlnets=(ControlSetting("canny", 0.5),))
    )
    found = pipeline.face.find_small_faces(detail, first, face)
    assert sorted(tuple(np.round(s.box)) for s in found) == sorted(tuple(np.round(f.bbox)) for f in small)
    assert all(s.score_before is not None for s in found)

    out = pipeline.denoise.detail(detail, model, face, prompt, first, found)
    height, width = group.shape[:2]
    masks = [face_mask(s.box, width, height, detail.padding) for s in found]
    changed = np.any(out.images[0] != group, axis=-1)
    assert not (changed & ~np.logical_or.reduce(masks)).any()  # nothing outside the repaired faces' padded boxes
    for mask in masks:  # and each of them was repainted
        assert np.abs(out.images[0][mask].astype(int) - group[mask].astype(int)).mean() > 2
    assert out.repaired == found
    assert out.timings["denoise_detail"].seconds > 0 and "denoiser_detail" in out.replicas
    assert np.array_equal(first.images[0], group)  # the first pass's images are not written over


def test_a_face_at_least_min_face_is_left_as_it_is(pipeline, group) -> None:
    detail = FaceDetailPass(strength=0.75, min_face=16, padding=0.2, steps=4, blur=4)
    model, face, prompt, first = first_pass_on(pipeline, group)
    found = pipeline.face.find_small_faces(detail, first, face)
    assert found == []
    out = pipeline.denoise.detail(detail, model, face, prompt, first, found)
    assert np.array_equal(out.images, first.images) and out.repaired == []
    assert "denoise_detail" not in out.timings


def test_scores_after_are_of_the_face_found_where_each_repaired_one_was(pipeline, group) -> None:
    detail = FaceDetailPass(strength=0.75, min_face=320, padding=0.2, steps=4, blur=4)
    _, face, _, first = first_pass_on(pipeline, group)
    found = pipeline.face.find_small_faces(detail, first, face)
    unchanged = pipeline.face.score_repaired(dataclasses.replace(first, repaired=found), face)
    # Scored on the image they were found in, each face's score after equals its score before.
    assert [entry["score_after"] for entry in unchanged] == pytest.approx([s.score_before for s in found])
    assert [entry["box"] for entry in unchanged] == [[round(float(v), 2) for v in s.box] for s in found]
    blank = dataclasses.replace(first, images=np.full_like(first.images, 128), repaired=found)
    assert all(entry["score_after"] is None for entry in pipeline.face.score_repaired(blank, face))


def test_with_several_people_each_face_is_repainted_as_the_person_whose_region_holds_it(
    pipeline, group, monkeypatch
) -> None:
    """Two people owning the left and right parts: each small face is scored against, and repainted with, the
    identity of the half its centre is in; a job carries one identity."""
    from deployments.instantid.identity_score import cosine, reference_direction
    from deployments.instantid.regions import PlacedIdentity

    model, face, prompt, first = first_pass_on(pipeline, group)
    analyzer = pipeline.face.analyzer
    other = analyzer.embed(group, analyzer.detect(group)[0])  # someone else: a face of the group photo
    height, width = group.shape[:2]
    split = 700  # the small faces' centres: one left of it, two right
    halves = [np.array([0, 0, split, height], np.float32), np.array([split, 0, width, height], np.float32)]
    embeddings = [face.condition.embedding, other]
    placed = [
        PlacedIdentity(e, face.condition.keypoints, face.condition.box, r)
        for e, r in zip(embeddings, halves, strict=True)
    ]
    people = FaceResult(dataclasses.replace(face.condition, identities=placed, layout="regions"), {})
    detail = FaceDetailPass(strength=0.75, min_face=320, padding=0.2, steps=4, blur=4)
    found = pipeline.face.find_small_faces(detail, first, people)
    assert {s.identity for s in found} == {0, 1}
    for small in found:
        centre = (small.box[0] + small.box[2]) / 2
        assert small.identity == (0 if centre < split else 1)
        direction = reference_direction(embeddings[small.identity])
        assert small.score_before == pytest.approx(
            cosine(analyzer.embed(group, _detected(analyzer, group, small)), direction)
        )

    jobs = []
    generate = pipeline.denoise.denoiser.generate
    monkeypatch.setattr(pipeline.denoise.denoiser, "generate", lambda js: (jobs.extend(js), generate(js))[1])
    out = pipeline.denoise.detail(detail, model, people, prompt, first, found)
    assert [job.identities for job in jobs] == [None] * len(found)
    for job, small in zip(jobs, found, strict=True):
        assert np.array_equal(job.face_embedding, embeddings[small.identity])
    masks = [face_mask(s.box, width, height, detail.padding) for s in found]
    changed = np.any(out.images[0] != group, axis=-1)
    assert changed.any() and not (changed & ~np.logical_or.reduce(masks)).any()
    scored = pipeline.face.score_repaired(dataclasses.replace(out, repaired=found), people)
    assert [entry["identity"] for entry in scored] == [s.identity for s in found]


def _detected(analyzer, image: np.ndarray, small):
    """The detected face of ``image`` whose box is ``small``'s."""
    return next(f for f in analyzer.detect(image) if np.allclose(f.bbox, small.box, atol=1e-3))


def checkerboard_mask(target: np.ndarray) -> np.ndarray:
    """A repaint mask of every other pixel over the right part of the target: the paste-back's feather keeps most
    of the target's texture there, so the detector still finds the faces the detail pass then repaints."""
    rows, columns = np.mgrid[0 : target.shape[0], 0 : target.shape[1]]
    return ((rows + columns) % 2 == 0) & (rows > 300) & (columns > 600)


def test_an_edit_with_face_detail_changes_nothing_outside_its_mask(pipeline, group) -> None:
    target = encode_image(group, "PNG")
    inside = checkerboard_mask(group)
    mask = encode_image(np.repeat(inside[..., None] * np.uint8(255), 3, axis=-1), "PNG")
    options = GenerationOptions(
        **REQUEST, edit_resolution=256, face_detail={"min_face": 400, "strength": 0.5, "padding": 0.1}
    )
    out = pipeline(options, GenerationInputs(faces=(astronaut_jpeg(),), target=target, mask=mask))
    assert out.images.shape == (1, *group.shape)
    changed = np.any(out.images[0] != group, axis=-1)
    assert changed.any() and not (changed & ~inside).any()
    repaired = out.repaired_faces
    keys = {"image", "identity", "box", "score_before", "score_after"}
    assert repaired and all(entry.keys() == keys and entry["identity"] is None for entry in repaired)
    for entry in repaired:  # every repaired face overlaps the mask
        x1, y1, x2, y2 = (int(v) for v in entry["box"])
        assert inside[max(0, y1) : y2, max(0, x1) : x2].any()
    assert out.plan.effective_parameters()["face_detail"] == {
        "strength": 0.5,
        "min_face": 400,
        "padding": 0.1,
        "steps": 4,
        "denoising_steps": 2,
        "resolution": 256,  # an edit's faces are generated at its edit_resolution
    }


def test_a_generation_without_small_faces_reports_an_empty_list(pipeline) -> None:
    options = GenerationOptions(**REQUEST, width=256, height=256, face_detail={})
    out = pipeline(options, GenerationInputs(faces=(astronaut_jpeg(),)))
    assert out.repaired_faces == []  # the tiny model draws no face the detector finds
    assert out.plan.effective_parameters()["face_detail"]["resolution"] is None  # its own long side
    assert pipeline(GenerationOptions(**REQUEST, width=256, height=256), GenerationInputs(faces=(astronaut_jpeg(),)))


# -------------------------------------------------------------------------------------------- what is refused


def test_face_detail_is_refused_without_a_step(pipeline) -> None:
    check_inputs(GenerationOptions(prompt="x", face_detail={}), InputsGiven(people=(PersonGiven(1), PersonGiven(1))))
    options = GenerationOptions(prompt="x", num_inference_steps=4, face_detail={"strength": 0.2})
    with pytest.raises(InstantIDError, match="leaves no denoising step") as caught:
        pipeline.plan(options, GenerationInputs(faces=(astronaut_jpeg(),)))
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("face_detail", "message"),
    [
        ({"strength": 0}, "greater than 0"),
        ({"min_face": 8}, "greater than or equal to 16"),
        ({"padding": 3}, "less than or equal to 2"),
        ({"size": 3}, "Extra inputs"),
    ],
)
def test_face_detail_fields_out_of_range_are_refused_by_the_schema(face_detail, message) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationOptions(prompt="x", face_detail=face_detail)


def test_a_multipart_form_carries_face_detail_as_json() -> None:
    assert GenerationOptions.model_validate({"prompt": "x", "face_detail": '{"min_face": 200}'}).face_detail.min_face
    with pytest.raises(ValidationError, match="face_detail must be a JSON object"):
        GenerationOptions.model_validate({"prompt": "x", "face_detail": "on"})


def test_the_cli_flag_takes_an_optional_strength(tmp_path) -> None:
    from serve.tools import CliError
    from serve.tools.generate import add_generate_parser, face_detail_item
    from serve.tools.remote import request_body

    assert face_detail_item(None) is None
    assert face_detail_item("") == {}
    assert face_detail_item("0.5") == {"strength": 0.5}
    with pytest.raises(CliError, match="expected a strength"):
        face_detail_item("strong")
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers())
    face = tmp_path / "face.jpg"
    face.write_bytes(astronaut_jpeg())
    base = ["generate", "--url", "http://x", "--face", str(face), "--prompt", "p", "--out", "o.png"]
    assert request_body(parser.parse_args([*base, "--face-detail"]))["face_detail"] == {}
    assert request_body(parser.parse_args([*base, "--face-detail", "0.3"]))["face_detail"] == {"strength": 0.3}
    assert "face_detail" not in request_body(parser.parse_args(base))


# ------------------------------------------------------------------------------------ the attention mask size


def test_the_attention_mask_size_is_the_unets_own_halving_for_every_shape() -> None:
    """The face-region mask is resized to each attention layer's (rows, columns): those of a stride-2, padding-1
    convolution applied to the latent, as SDXL's downsamplers are (odd sides round up)."""
    down = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for height in range(64, 1025, 40):
        for width in range(64, 1025, 24):
            latent = torch.zeros(1, 1, height // 8, width // 8)
            for _ in range(3):
                with torch.no_grad():
                    latent = down(latent)
                rows, columns = latent.shape[-2:]
                assert attention_size(height, width, rows * columns) == (rows, columns), (height, width)
    assert attention_size(264, 384, 108) == (9, 12)  # the square-root rule gave (9, 13): the step failed


# ------------------------------------------------------------------------------------------------------ served


@pytest.mark.slow
def test_an_edit_job_with_face_detail_over_http_reports_the_detail_stage_and_the_repaired_faces(
    serve_stack, group
) -> None:
    """The served path: the FaceAnalyzer finds the faces, the Denoiser repaints each as its own job (``detail``
    stage events), the FaceAnalyzer scores them after, and the response and meta.json list them."""
    import base64

    import httpx

    from tests.support import stored_pixels
    from tests.test_jobs import events, submit

    inside = checkerboard_mask(group)
    mask = encode_image(np.repeat(inside[..., None] * np.uint8(255), 3, axis=-1), "PNG")
    accepted = submit(
        serve_stack.url,
        width=None,
        height=None,
        num_inference_steps=4,
        target_image_b64=base64.b64encode(encode_image(group, "PNG")).decode(),
        mask_image_b64=base64.b64encode(mask).decode(),
        edit_resolution=256,
        face_detail={"min_face": 400, "strength": 0.5, "padding": 0.1},
    )
    stream = events(serve_stack.url, accepted["id"])
    assert stream[-1][1] == "succeeded", stream[-1]
    stages = [(data["stage"], data["phase"]) for _, kind, data in stream if kind == "stage"]
    assert stages.index(("denoise", "end")) < stages.index(("detail", "start")) < stages.index(("store", "start"))
    result = stream[-1][2]["result"]
    repaired = result["repaired_faces"]
    assert repaired and all(entry["score_before"] is not None for entry in repaired)
    assert stages.count(("detail", "start")) == len(repaired)  # one denoiser job per face
    stored = stored_pixels(serve_stack.s3.client(), result["images"][0]["uri"])
    changed = np.any(stored != group, axis=-1)
    assert changed.any() and not (changed & ~inside).any()
    assert result["parameters"]["face_detail"]["denoising_steps"] == 2
    assert result["timings"]["denoise_detail"]["start"] >= result["timings"]["denoise"]["end"]
    meta = httpx.get(f"{serve_stack.url}/v1/generations/{accepted['id']}", timeout=30).json()
    assert meta["repaired_faces"] == repaired
