"""Every way of asking for an image gives the in-process pipeline's image: a table-driven safety net.

What it pins: for each case of ``CASES`` (the default request, the ``lcm`` fast mode, a catalogue LoRA, three extra
ControlNets with image-to-image, three photos of one person, a face index in a group photo, two people with regions,
a two-chunk weighted prompt and negative, face noise, an edit of a photo's face) the image the model stages make in
this process (the reference) is, within 2/255 on uint8 RGB, the image that each path gives:

- ``in_process``: :class:`InstantIDPipeline` called with the request's options and pictures (the plan and flow that
  every path runs, in this process);
- ``cli``: ``instantid generate`` (``serve.tools.cli.main`` called in this process, the PNG it writes read back);
- ``http_json`` / ``http_multipart``: ``POST /v1/generate`` with a JSON body (images base64) and a multipart body
  (images as file parts, list fields as one JSON form field);
- ``handle``: ``get_app_handle(app).generate`` with a :class:`GenerateRequest`;
- ``job``: ``POST /v1/jobs``, then ``GET /v1/jobs/{id}`` until it succeeded;

the served paths each against two apps on one local Ray cluster: local.yaml's (continuous batching, ``serve_stack``)
and the same app with ``denoiser.batching.mode: static``. Served images are read back from S3 as PNG. Each served
answer must also carry the case's seed, the requested size and the batching mode of the app that ran it, so a path
cannot pass on an empty or wrong result.

The reference is built from the case's fields by this module itself (``reference_call``: the model stages with
explicit parameters), not through the request options or the plan, so a mistake in the request-to-parameters
mapping that every path shares shows too; and
``test_the_case_changes_the_image`` checks that each case's distinctive feature changes the reference image by more
than the tolerance (each case's ``twins``: the request without it), so a path that drops it cannot pass.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from deployments.generation.local import InstantIDPipeline
from deployments.generation.plan import GenerationInputs, PersonInput
from deployments.instantid.catalogue import LORAS_DIR, PRESET_LORA_FILES, PRESET_MODES
from deployments.instantid.group import IdentityInput
from deployments.instantid.images import decode_image
from deployments.instantid.options import CONTROLNET_NAMES, GenerationOptions
from deployments.instantid.params import DEFAULT_PARAMS, ControlSetting, GenerationParams
from deployments.instantid.weights import WeightsLayout
from tests.serve_fixtures import LOCAL_CONFIG, ServeStack, local_app_config
from tests.support import (
    astronaut_jpeg,
    astronaut_rgb,
    encode_image,
    generate_with_params,
    group_photo_jpeg,
    sample_control_maps,
    stored_pixels,
)

pytestmark = pytest.mark.slow

TOLERANCE = 2  # max |difference| on uint8 RGB: float noise across processes, thread counts and batch shapes
TIMEOUT_S = 240
DEFAULT_STYLE = "watercolor"  # what a request without ``style`` gets (README: "watercolor by default")
LOCAL_LONG_SIDE = 512  # local.yaml's face.long_side (only used without width/height; every case sets them)
MODES = ("continuous", "static")  # the served app's denoiser batching mode
SERVED_PATHS = ("http_json", "http_multipart", "handle", "job")


# ----------------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Person:
    """One identity of a several-people case: one photo and the output region it owns (None: the layout's)."""

    photo: bytes
    region: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Case:
    """One request, in the form every path derives its own from.

    ``fields`` are the request's non-image fields as JSON sends them (every served path adds ``output_format: png``);
    the images are ``faces`` (photos of one person) or ``people`` (several), an optional ``init_image`` and uploaded
    control ``maps`` (PNG bytes by ControlNet name, for entries of ``controlnets``). ``twins``: the case without its
    distinctive feature, by name: overrides of fields (``None`` deletes one) or of ``faces``/``people``/``init_image``.
    """

    name: str
    fields: Mapping[str, Any]
    faces: tuple[bytes, ...] = ()
    people: tuple[Person, ...] = ()
    init_image: bytes | None = None
    maps: Mapping[str, bytes] = field(default_factory=dict)
    twins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    target: bytes | None = None  # an edit: the photo whose face is repainted (the output has its size)
    tolerance: int = TOLERANCE  # max |difference| from the reference, uint8

    @property
    def seed(self) -> int:
        return int(self.fields["seed"])

    @property
    def size(self) -> tuple[int, int]:
        if self.target is not None:
            height, width = decode_image(self.target).shape[:2]
            return width, height
        return int(self.fields["width"]), int(self.fields["height"])

    def twin(self, label: str) -> Case:
        change = self.twins[label]
        parts = {k: v for k, v in change.items() if k in ("faces", "people", "init_image")}
        fields = {k: v for k, v in {**self.fields, **change}.items() if v is not None and k not in parts}
        return replace(self, name=f"{self.name} {label}", fields=fields, twins={}, **parts)


def small(seed: int, steps: int = 2, **fields: Any) -> dict[str, Any]:
    """A fast request's fields: 256x256, a few steps, no style template (unless ``fields`` say otherwise)."""
    base = {"prompt": "a portrait of an astronaut", "style": "none", "seed": seed, "num_inference_steps": steps}
    return {**base, "width": 256, "height": 256, **fields}


def jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    return encode_image(np.ascontiguousarray(rgb), quality=quality)


ASTRONAUT = astronaut_jpeg()
GROUP = group_photo_jpeg()  # six people (the tiny detector finds more "faces"; index 1 is one of them)
SHIFTED_ASTRONAUT = jpeg(astronaut_rgb()[8:, 40:])  # cropped: the face moves left and up
COARSE_ASTRONAUT = jpeg(astronaut_rgb(), quality=60)
POSE_MAP = encode_image(sample_control_maps(64)["pose"], "PNG")  # another size than the output: covered and cropped
# 76-150 tokens for the tiny byte-level tokenizers (one per non-space character): two chunks. The tiny text encoders
# weigh little in the image, so the weights are large enough to show (1.3 alone moves it by 1/255).
LONG_PROMPT = (
    "(a portrait of an astronaut in a white spacesuit with a golden visor:1.6), (stars:1.3) behind him, [blurry], "
    "soft light, a flag on the left"
)
LONG_NEGATIVE = "(lowres, watermark, bad hands:1.8), [cropped]"
FIRST_PART = "(a portrait of an astronaut in a white spacesuit with a golden visor:1.6)"  # one chunk


def unweighted(text: str) -> str:
    return re.sub(r"[()\[\]]|:\d+(\.\d+)?(?=\))", "", text)


CASES: tuple[Case, ...] = (
    Case(
        "default",  # no style: watercolor, with its own negative prompt
        {k: v for k, v in small(101, steps=3).items() if k != "style"},
        faces=(ASTRONAUT,),
        twins={"style none": {"style": "none"}},
    ),
    Case(
        "lcm",  # the preset's steps (10), scheduler, guidance 0 and LoRA
        {k: v for k, v in small(102).items() if k != "num_inference_steps"} | {"mode": "lcm"},
        faces=(ASTRONAUT,),
        twins={"no mode": {"mode": None, "num_inference_steps": 2}},
    ),
    Case(
        "lora",
        small(103, loras=[{"name": "style-peft", "scale": 0.8}]),
        faces=(ASTRONAUT,),
        twins={"no lora": {"loras": None}},
    ),
    Case(
        "controls",  # pose (uploaded map), canny and depth (computed from the face photo), image-to-image
        small(
            104,
            steps=4,
            controlnets=[
                {"name": "pose", "strength": 0.7},
                {"name": "canny", "strength": 0.6},
                {"name": "depth", "strength": 0.5},
            ],
            strength=0.8,
        ),
        faces=(ASTRONAUT,),
        init_image=GROUP,
        maps={"pose": POSE_MAP},
        twins={
            "no depth": {"controlnets": [{"name": "pose", "strength": 0.7}, {"name": "canny", "strength": 0.6}]},
            "no init image": {"init_image": None, "strength": None},
        },
    ),
    Case(
        "three_photos",
        small(105, identity_combine="normalized_mean"),
        faces=(ASTRONAUT, SHIFTED_ASTRONAUT, COARSE_ASTRONAUT),
        twins={"first photo only": {"faces": (ASTRONAUT,)}},
    ),
    Case("face_index", small(106, face_index=1), faces=(GROUP,), twins={"face 0": {"face_index": None}}),
    Case(
        "two_identities",
        small(107, width=512, height=256),
        people=(Person(ASTRONAUT, (0, 0, 320, 256)), Person(GROUP, (320, 0, 512, 256))),  # not the columns
        twins={"no regions": {"people": (Person(ASTRONAUT, None), Person(GROUP, None))}},
    ),
    Case(
        "weighted_two_chunks",
        small(108, prompt=LONG_PROMPT, negative_prompt=LONG_NEGATIVE, scheduler="dpmpp_2m"),
        faces=(ASTRONAUT,),
        twins={
            "one chunk": {"prompt": FIRST_PART},
            "no weights": {"prompt": unweighted(LONG_PROMPT), "negative_prompt": unweighted(LONG_NEGATIVE)},
        },
    ),
    Case("face_noise", small(109, face_noise=0.3), faces=(ASTRONAUT,), twins={"no noise": {"face_noise": None}}),
    Case(
        "edit",  # the target's face repainted with another photo's identity, at a 256-pixel crop
        {k: v for k, v in small(110, steps=3).items() if k not in ("width", "height")}
        | {"edit_resolution": 256, "edit_strength": 0.8, "mask_blur": 8},
        faces=(SHIFTED_ASTRONAUT,),
        target=ASTRONAUT,
        twins={"weaker edit": {"edit_strength": 0.5}},
        # The paste-back matches the crop's colours to the photo around it: here it scales the tiny model's flat
        # crop by up to 4.2x per channel (the ring's spread over the crop's), and float noise with it.
        tolerance=9,
    ),
)
CASE_BY_NAME = {case.name: case for case in CASES}


# ----------------------------------------------------------------------------------------------- the reference


def reference_call(pipeline: InstantIDPipeline, case: Case) -> Any:
    """The case through the model stages, its fields mapped to their parameters right here."""
    f = dict(case.fields)
    known = {
        "prompt", "negative_prompt", "style", "seed", "num_inference_steps", "width", "height", "scheduler", "mode",
        "loras", "controlnets", "strength", "identity_combine", "face_index", "face_noise", "edit_resolution",
        "edit_strength", "mask_blur",
    }  # fmt: skip
    assert set(f) <= known, f"case {case.name}: the reference does not map {sorted(set(f) - known)}"
    preset = PRESET_MODES[f["mode"]] if "mode" in f else None

    def pick(name: str) -> Any:  # the request's value, else the mode's, else the published default
        return f.get(name, getattr(preset if preset is not None else DEFAULT_PARAMS, name))

    params = GenerationParams(
        width=f.get("width"),
        height=f.get("height"),
        seed=f["seed"],
        num_inference_steps=pick("num_inference_steps"),
        guidance_scale=pick("guidance_scale"),
        scheduler=pick("scheduler"),
        controlnets=tuple(ControlSetting(c["name"], c["strength"]) for c in f.get("controlnets", ())),
        strength=f.get("strength", 0.8) if case.init_image is not None else None,
        face_noise=f.get("face_noise", 0.0),
    )
    loras = tuple((lora["name"], lora["scale"]) for lora in f.get("loras", ()))
    if preset is not None and preset.lora is not None:
        loras += ((preset.lora, preset.lora_scale),)
    faces = [decode_image(photo) for photo in case.faces]
    if case.target is not None:
        return edit_call(pipeline, case, params, faces[0])
    people = [IdentityInput([decode_image(p.photo)], p.region) for p in case.people] or None
    return generate_with_params(
        pipeline,
        faces[0] if len(faces) == 1 else faces,
        f["prompt"],
        f.get("negative_prompt"),
        params=params,
        style=f.get("style", DEFAULT_STYLE),
        loras=loras,
        control_images={name: decode_image(data) for name, data in case.maps.items()},
        init_rgb=decode_image(case.init_image) if case.init_image is not None else None,
        face_index=f.get("face_index", 0),
        identity_combine=f.get("identity_combine", "mean"),
        identities=people,
    )


def edit_call(pipeline: InstantIDPipeline, case: Case, params: GenerationParams, photo: np.ndarray) -> Any:
    """An edit case through the model stages: the identity from the face photo, the target's face (index 0) grown by
    the default padding as the mask, the crop at ``edit_resolution`` with the target face's keypoints mapped into
    it, inpainting at ``edit_strength``, pasted back (the denoise stage's paste-back)."""
    from types import SimpleNamespace

    from deployments.generation.messages import FaceResult, PromptRequest
    from deployments.instantid.catalogue import ModelChoice
    from deployments.instantid.conditioning import prepare_face_condition
    from deployments.instantid.editing import PreparedEdit, face_mask
    from deployments.instantid.face_data import ChosenFace
    from deployments.instantid.styles import apply_style

    f = case.fields
    target = decode_image(case.target)
    height, width = target.shape[:2]
    face = pipeline.face.analyzer.detect(target)[0]
    edit = PreparedEdit.make(target, face_mask(face.bbox, width, height, 0.35), f["mask_blur"], f["edit_resolution"])
    crop = edit.region
    condition = prepare_face_condition(
        pipeline.face.analyzer, photo, None, width=crop.width, height=crop.height, long_side=pipeline.face.long_side
    )
    transform = crop.transform()
    condition = replace(
        condition,
        keypoints=transform.apply_points(face.kps),
        box=transform.apply_box(face.bbox),
        pose_face=face,
        used=[*condition.used, ChosenFace(replace(face, embedding=None), "target", 0, 0, width, height)],
    )
    params = replace(params, strength=f["edit_strength"])
    prompt, negative = apply_style(f["style"], f["prompt"], f.get("negative_prompt"))
    model = ModelChoice(pipeline.catalogue.default_base, ())
    encoded = pipeline.prompt.encode(PromptRequest(prompt, negative, params.do_classifier_free_guidance, model))
    result = pipeline.denoise.generate(params, model, FaceResult(condition, {}, edit=edit), encoded)
    return SimpleNamespace(images=result.images, condition=condition, params=result.params, edit=edit)


@pytest.fixture(scope="module")
def pipeline(tiny_weights: Path) -> InstantIDPipeline:
    """The in-process pipeline with what local.yaml deploys: the LoRAs the cases use, the three extra ControlNets
    and the depth model."""
    loras = {"style-peft": "style-peft.safetensors", "lcm-lora-sdxl": PRESET_LORA_FILES["lcm-lora-sdxl"]}
    return InstantIDPipeline.from_layout(
        WeightsLayout.from_root(tiny_weights),
        device="cpu",
        dtype="float32",
        long_side=LOCAL_LONG_SIDE,
        lora_files={name: tiny_weights / LORAS_DIR / file for name, file in loras.items()},
        controlnets={name: tiny_weights / "controlnets" / name for name in CONTROLNET_NAMES},
        depth_model=tiny_weights / "depth",
    )


@pytest.fixture(scope="module")
def reference(pipeline: InstantIDPipeline) -> Callable[[str], Any]:
    """A case's in-process output by name, made on first use and kept for the module."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = reference_call(pipeline, CASE_BY_NAME[name])
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------- the request forms


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def region_field(person: Person) -> dict[str, list[int]]:
    return {} if person.region is None else {"region": list(person.region)}


def json_body(case: Case) -> dict[str, Any]:
    """The case as the JSON body of /v1/generate (and /v1/jobs, and the handle's GenerateRequest)."""
    body: dict[str, Any] = {**case.fields, "output_format": "png"}
    if case.people:
        body["identities"] = [{"images": [{"b64": b64(p.photo)}], **region_field(p)} for p in case.people]
    elif len(case.faces) == 1:
        body["face_image_b64"] = b64(case.faces[0])
    else:
        body["face_images"] = [{"b64": b64(photo)} for photo in case.faces]
    if case.init_image is not None:
        body["init_image_b64"] = b64(case.init_image)
    if case.target is not None:
        body["target_image_b64"] = b64(case.target)
    if case.maps:
        body["controlnets"] = [
            {**c, "image_b64": b64(case.maps[c["name"]])} if c["name"] in case.maps else c
            for c in case.fields["controlnets"]
        ]
    return body


def multipart_body(case: Case) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
    """The case as a multipart form: images as file parts, list fields as one form field holding their JSON."""
    form = {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in case.fields.items()}
    form["output_format"] = "png"
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    if case.people:
        form["identities"] = json.dumps([region_field(p) for p in case.people])
        files += [(f"identity_{i}", (f"person-{i}.jpg", p.photo, "image/jpeg")) for i, p in enumerate(case.people)]
    files += [("face_image", (f"face-{i}.jpg", photo, "image/jpeg")) for i, photo in enumerate(case.faces)]
    if case.init_image is not None:
        files.append(("init_image", ("init.jpg", case.init_image, "image/jpeg")))
    if case.target is not None:
        files.append(("target_image", ("target.jpg", case.target, "image/jpeg")))
    files += [(f"control_image_{name}", (f"{name}.png", data, "image/png")) for name, data in case.maps.items()]
    return form, files


CLI_FLAGS = {  # request field -> the `instantid generate` flag taking its value as it is
    "prompt": "--prompt",
    "negative_prompt": "--negative",
    "style": "--style",
    "seed": "--seed",
    "num_inference_steps": "--steps",
    "width": "--width",
    "height": "--height",
    "scheduler": "--scheduler",
    "mode": "--mode",
    "strength": "--strength",
    "identity_combine": "--identity-combine",
    "face_index": "--face-index",
    "face_noise": "--face-noise",
    "edit_resolution": "--edit-resolution",
    "edit_strength": "--edit-strength",
    "mask_blur": "--mask-blur",
}


def cli_args(case: Case, weights: Path, folder: Path, out: Path) -> list[str]:
    """The case as `instantid generate` arguments, its images written to ``folder``."""

    def written(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        return str(path)

    args = ["generate", "--weights", str(weights), "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    for name, value in case.fields.items():
        if name == "loras":
            args += [arg for lora in value for arg in ("--lora", f"{lora['name']}:{lora['scale']}")]
        elif name == "controlnets":
            args += [arg for c in value for arg in ("--controlnet", f"{c['name']}:{c['strength']}")]
        else:
            assert name in CLI_FLAGS, f"case {case.name}: no CLI flag for {name}"
            args += [CLI_FLAGS[name], str(value)]
    for index, photo in enumerate(case.faces):
        args += ["--face", written(f"face-{index}.jpg", photo)]
    for index, person in enumerate(case.people):
        region = "" if person.region is None else ":" + ",".join(map(str, person.region))
        args += ["--identity", written(f"person-{index}.jpg", person.photo) + region]
    if case.init_image is not None:
        args += ["--init-image", written("init.jpg", case.init_image)]
    if case.target is not None:
        args += ["--target", written("target.jpg", case.target)]
    for name, data in case.maps.items():
        args += ["--control-image", f"{name}={written(f'{name}.png', data)}"]
    return args


def in_process(pipeline: InstantIDPipeline, case: Case) -> np.ndarray:
    """The case through the in-process pipeline as a request: its options and pictures, planned as served."""
    options = GenerationOptions(**case.fields, output_format="png")
    inputs = GenerationInputs(
        faces=case.faces,
        people=tuple(PersonInput((p.photo,), region=p.region) for p in case.people) or None,
        init=case.init_image,
        maps=dict(case.maps),
        target=case.target,
    )
    return pipeline(options, inputs).images[0]


# ----------------------------------------------------------------------------------------------- the served side


@pytest.fixture(scope="module")
def static_stack(serve_stack: ServeStack, tiny_weights: Path) -> Iterator[ServeStack]:
    """local.yaml's app with static batching (its other batching settings kept), beside the session's app."""
    from ray import serve as ray_serve

    from serve.app import build_app

    batching = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]["denoiser"]["batching"]
    # local_app_config merges one level deep: the batching block is replaced, so it must carry every key.
    # Its own prefix: two apps sharing one keep each other's job records, and a late lease renewal on a busy machine
    # let the other app's sweep take a job over (it then ran with the other batching mode).
    storage = {"s3": {"bucket": serve_stack.s3.bucket, "prefix": "generations-static", "create_bucket": True}}
    config = local_app_config(
        tiny_weights, serve_stack.s3.bucket, denoiser={"batching": {**batching, "mode": "static"}}, storage=storage
    )
    assert config.denoiser.batching == serve_stack.config.denoiser.batching.model_copy(update={"mode": "static"})
    ray_serve.run(build_app(config), name="static", route_prefix="/static")
    try:
        yield ServeStack(f"{serve_stack.url}/static", "static", serve_stack.s3, config, serve_stack.metrics_url)
    finally:
        ray_serve.delete("static")


@dataclass(frozen=True)
class Served:
    """What a served path answered (the generation response as JSON) and the stored image's pixels."""

    answer: dict[str, Any]
    pixels: np.ndarray


def answer_of(response: httpx.Response, expected_status: int = 200) -> dict[str, Any]:
    assert response.status_code == expected_status, f"HTTP {response.status_code}: {response.text[:2000]}"
    return response.json()


def served_answer(stack: ServeStack, case: Case, path: str) -> dict[str, Any]:
    """The generation response (as JSON) that ``path`` gets from ``stack`` for ``case``."""
    if path == "http_json":
        return answer_of(httpx.post(f"{stack.url}/v1/generate", json=json_body(case), timeout=TIMEOUT_S))
    if path == "http_multipart":
        form, files = multipart_body(case)
        return answer_of(httpx.post(f"{stack.url}/v1/generate", data=form, files=files, timeout=TIMEOUT_S))
    if path == "handle":
        from ray import serve as ray_serve

        from serve.schemas import GenerateRequest

        handle = ray_serve.get_app_handle(stack.app_name)
        result = handle.generate.remote(GenerateRequest(**json_body(case))).result(timeout_s=TIMEOUT_S)
        return result.model_dump(mode="json")
    if path == "job":
        accepted = answer_of(httpx.post(f"{stack.url}/v1/jobs", json=json_body(case), timeout=60), 202)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            job = answer_of(httpx.get(f"{stack.url}/v1/jobs/{accepted['id']}", timeout=30))
            if job["status"] in ("succeeded", "failed", "cancelled"):
                assert job["status"] == "succeeded", f"job {accepted['id']} ended {job['status']}: {job.get('error')}"
                return job["result"]
            time.sleep(0.1)
        raise AssertionError(f"job {accepted['id']} did not finish within {TIMEOUT_S} s")
    raise ValueError(f"unknown path {path}")


def serve_case(stack: ServeStack, case: Case, path: str) -> Served:
    answer = served_answer(stack, case, path)
    images = answer.get("images") or []
    pixels = stored_pixels(stack.s3.client(), images[0]["uri"]) if images else np.zeros((0,), np.uint8)
    return Served(answer, pixels)


@pytest.fixture(scope="module")
def served() -> Iterator[Callable[[str, pytest.FixtureRequest], dict[tuple[str, str], Future[Served]]]]:
    """A case's served answers, every (path, mode) by name: the first test of a case sends all of them at once (on
    2 cores the in-process reference is computed while the served graph works), later ones wait for theirs. A
    failure is raised by the test of that path and mode only."""
    cache: dict[str, dict[tuple[str, str], Future[Served]]] = {}
    with ThreadPoolExecutor(max_workers=len(SERVED_PATHS) * len(MODES)) as pool:

        def send(name: str, test: pytest.FixtureRequest) -> dict[tuple[str, str], Future[Served]]:
            if name not in cache:
                stacks = {
                    "continuous": test.getfixturevalue("serve_stack"),
                    "static": test.getfixturevalue("static_stack"),
                }
                case = CASE_BY_NAME[name]
                cache[name] = {
                    (path, mode): pool.submit(serve_case, stacks[mode], case, path)
                    for mode in MODES
                    for path in SERVED_PATHS
                }
            return cache[name]

        yield send


# --------------------------------------------------------------------------------------------------- the checks


def assert_same_image(where: str, got: np.ndarray, reference: np.ndarray, tolerance: int = TOLERANCE) -> None:
    """``got`` equals the in-process image within ``tolerance``; ``where`` names the case, path and mode."""
    assert got.dtype == np.uint8 and got.shape == reference.shape, (
        f"{where}: image {got.dtype} {got.shape}, in-process {reference.dtype} {reference.shape}"
    )
    difference = np.abs(got.astype(np.int16) - reference.astype(np.int16))
    worst = int(difference.max())
    assert worst <= tolerance, (
        f"{where}: max |difference| {worst}/255 from the in-process image (allowed {tolerance}/255; "
        f"mean {difference.mean():.2f}, {int((difference > tolerance).sum())} of {difference.size} values over)"
    )


# Served routes first: a case's first test sends its served requests, then makes the reference meanwhile.
ROUTES = (*((path, mode) for mode in MODES for path in SERVED_PATHS), ("in_process", None), ("cli", None))


@pytest.mark.parametrize(
    ("case_name", "path", "mode"),
    [(case.name, path, mode) for case in CASES for path, mode in ROUTES],
    ids=[f"{case.name}-{path}" + (f"-{mode}" if mode else "") for case in CASES for path, mode in ROUTES],
)
def test_every_path_gives_the_reference_image(
    case_name: str,
    path: str,
    mode: str | None,
    reference: Callable[[str], Any],
    served: Callable[[str, pytest.FixtureRequest], dict[tuple[str, str], Future[Served]]],
    pipeline: InstantIDPipeline,
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    case = CASE_BY_NAME[case_name]
    width, height = case.size
    where = f"case {case.name!r}, path {path!r}" + (f", {mode} batching" if mode else "")
    pending = served(case.name, request) if mode is not None else None
    expected = reference(case.name)
    assert expected.images.shape == (1, height, width, 3)
    if path == "in_process":
        got = in_process(pipeline, case)
    elif pending is None:
        from serve.tools.cli import main

        out = tmp_path / "x.png"
        code = main(cli_args(case, tiny_weights, tmp_path, out))
        printed = capsys.readouterr()
        assert code == 0, f"{where}: exit {code}: {printed.err.strip()}"
        assert f"({width}x{height}, seed {case.seed})" in printed.out, f"{where}: {printed.out}"
        with Image.open(out) as image:
            assert image.format == "PNG" and image.mode == "RGB", f"{where}: {image.format} {image.mode}"
            got = np.asarray(image)
    else:
        result = pending[path, mode].result()
        answer, got = result.answer, result.pixels
        assert answer["seed"] == case.seed, f"{where}: seed {answer['seed']}, asked {case.seed}"
        assert answer["batch"]["mode"] == mode, f"{where}: batch {answer['batch']}"
        (image,) = answer["images"]
        assert (image["width"], image["height"], image["content_type"]) == (width, height, "image/png"), image
    assert_same_image(where, got, expected.images[0], case.tolerance)
    if pending is not None:  # and the served answer reports the faces the in-process pipeline used
        used = [(f["source"], f.get("identity"), f["photo_index"], f["face_index"]) for f in answer["faces"]]
        local = [(c.source, c.identity, c.photo_index, c.face_index) for c in expected.condition.used]
        assert used == local, f"{where}: faces used {used}, in-process {local}"


def test_the_cases_use_what_they_name(reference: Callable[[str], Any]) -> None:
    """Each case exercises what its name says in the reference: the style, the mode, the maps and steps, the
    photos and faces, the layout, the chunks."""
    default = reference("default")
    assert default.prompt != CASE_BY_NAME["default"].fields["prompt"] and default.negative_prompt  # the style's
    lcm = reference("lcm").params
    assert (lcm.scheduler, lcm.num_inference_steps, lcm.guidance_scale) == ("lcm", 10, 0.0)
    controls = reference("controls")
    assert controls.controls is not None and set(controls.controls.maps) == {"pose", "canny", "depth"}
    assert controls.controls.init_image is not None and controls.params.denoising_steps == 3
    assert [c.photo_index for c in reference("three_photos").condition.used] == [0, 1, 2]
    assert [c.face_index for c in reference("face_index").condition.used] == [1]
    people = reference("two_identities").condition
    assert people.layout == "regions" and [c.identity for c in people.used] == [0, 1]
    weighted = reference("weighted_two_chunks")
    assert weighted.prompt_chunks == 2 and weighted.prompt == LONG_PROMPT and weighted.negative_prompt == LONG_NEGATIVE
    assert reference("face_noise").params.face_noise == 0.3
    edit = reference("edit")
    assert edit.condition.used[-1].source == "target" and edit.params.strength == 0.8
    assert max(edit.edit.region.width, edit.edit.region.height) == 256  # the crop at edit_resolution


@pytest.mark.parametrize(
    ("case_name", "twin"),
    [(case.name, label) for case in CASES for label in case.twins],
    ids=[f"{case.name}-{label.replace(' ', '_')}" for case in CASES for label in case.twins],
)
def test_the_case_changes_the_image(
    case_name: str, twin: str, pipeline: InstantIDPipeline, reference: Callable[[str], Any]
) -> None:
    """Without its distinctive feature a case gives another image, by more than the tolerance: a path that dropped
    the feature could not pass the comparison above."""
    case = CASE_BY_NAME[case_name]
    other = reference_call(pipeline, case.twin(twin)).images[0]
    difference = int(np.abs(other.astype(np.int16) - reference(case.name).images[0].astype(np.int16)).max())
    assert difference > case.tolerance, f"case {case.name!r} ({twin}) changes the image by only {difference}/255"
