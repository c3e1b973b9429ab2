"""The face stage's cache of recent analyses, on real onnxruntime sessions (the tiny antelopev2 pack): a photo sent
again is not detected again, other options are not served from its entry, entries expire and are bounded; and a
saved identity's faces are the analysis its photos gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deployments.generation.face_cache import FaceCache
from deployments.generation.face_stage import FaceStage, face_thumbnail
from deployments.generation.messages import FaceRequest, IdentityRequest, StageTiming
from deployments.generation.saved import saved_faces, saved_photos
from deployments.instantid.faces import FaceAnalyzer
from deployments.storage.identities import SavedIdentity, SavedPhoto
from deployments.tiny.faces import write_tiny_antelopev2
from tests.support import astronaut_jpeg, encode_image, group_photo_jpeg

pytestmark = pytest.mark.filterwarnings("ignore:.*`estimate` is deprecated:FutureWarning")


class CountingAnalyzer:
    """The real analyzer, counting its detection and recognition calls."""

    def __init__(self, analyzer: FaceAnalyzer) -> None:
        self.analyzer = analyzer
        self.detections = self.embeddings = 0

    def detect(self, rgb: np.ndarray) -> list:
        self.detections += 1
        return self.analyzer.detect(rgb)

    def embed(self, rgb: np.ndarray, face) -> np.ndarray:
        self.embeddings += 1
        return self.analyzer.embed(rgb, face)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    pack: Path = tmp_path_factory.mktemp("models") / "antelopev2"
    write_tiny_antelopev2(pack, seed=0)
    return FaceAnalyzer(pack, providers=["CPUExecutionProvider"])


def stage_with(analyzer: FaceAnalyzer, **cache: object) -> tuple[FaceStage, CountingAnalyzer, Clock]:
    counting = CountingAnalyzer(analyzer)
    clock = Clock()
    stage = FaceStage(counting, cache=FaceCache(clock=clock, **cache))  # type: ignore[arg-type]
    return stage, counting, clock


def test_a_photo_sent_again_is_neither_detected_nor_recognised_again(analyzer: FaceAnalyzer) -> None:
    stage, counting, _ = stage_with(analyzer, max_entries=8)
    photo = astronaut_jpeg()
    first = stage.identify(IdentityRequest(photo, 0, 2, 0))
    second = stage.identify(IdentityRequest(photo, 1, 2, 0))
    assert (counting.detections, counting.embeddings) == (1, 1)
    assert (first.chosen.cached, second.chosen.cached) == (False, True)
    assert second.chosen.photo_index == 1  # the entry is the analysis; the request says where the photo stands
    np.testing.assert_array_equal(first.chosen.face.embedding, second.chosen.face.embedding)
    np.testing.assert_array_equal(first.chosen.face.kps, second.chosen.face.kps)
    assert second.chosen.to_dict()["cached"] is True and "cached" not in first.chosen.to_dict()

    # The one-photo path (the photo analysed inside the face request) shares the entry.
    result = stage.analyze(FaceRequest(photo, None, 256, 256))
    assert counting.detections == 1
    assert result.condition.used[0].cached
    # Other bytes of the same picture are another photo.
    stage.identify(IdentityRequest(encode_image(np.asarray(first_rgb(photo)), "PNG"), 0, 1, 0))
    assert counting.detections == 2


def first_rgb(photo: bytes) -> np.ndarray:
    from deployments.instantid.images import decode_image

    return decode_image(photo)


def test_another_face_index_is_not_served_from_the_first_entry(analyzer: FaceAnalyzer) -> None:
    stage, counting, _ = stage_with(analyzer, max_entries=8)
    group = group_photo_jpeg()
    largest = stage.identify(IdentityRequest(group, 0, 1, 0))
    second = stage.identify(IdentityRequest(group, 0, 1, 1))
    assert counting.detections == 2 and not second.chosen.cached
    assert second.chosen.face_index == 1
    assert not np.array_equal(largest.chosen.face.bbox, second.chosen.face.bbox)
    again = stage.identify(IdentityRequest(group, 0, 1, 1))
    assert counting.detections == 2 and again.chosen.cached
    np.testing.assert_array_equal(again.chosen.face.bbox, second.chosen.face.bbox)


def test_entries_expire_and_the_cache_is_bounded(analyzer: FaceAnalyzer) -> None:
    stage, counting, clock = stage_with(analyzer, max_entries=1, ttl_s=60)
    photo, group = astronaut_jpeg(), group_photo_jpeg()
    stage.identify(IdentityRequest(photo, 0, 1, 0))
    clock.now += 61
    assert not stage.identify(IdentityRequest(photo, 0, 1, 0)).chosen.cached  # expired: analysed afresh
    assert counting.detections == 2
    stage.identify(IdentityRequest(group, 0, 1, 0))  # one entry at most: the astronaut's is pushed out
    assert len(stage.cache) == 1
    assert not stage.identify(IdentityRequest(photo, 0, 1, 0)).chosen.cached
    assert counting.detections == 4


def test_a_cache_of_no_entries_keeps_nothing(analyzer: FaceAnalyzer) -> None:
    stage, counting, _ = stage_with(analyzer, max_entries=0)
    photo = astronaut_jpeg()
    for _ in range(2):
        assert not stage.identify(IdentityRequest(photo, 0, 1, 0)).chosen.cached
    assert counting.detections == 2 and len(stage.cache) == 0


def test_the_pose_photo_is_detected_once(analyzer: FaceAnalyzer) -> None:
    stage, counting, _ = stage_with(analyzer, max_entries=8)
    photo, pose = astronaut_jpeg(), group_photo_jpeg()
    first = stage.analyze(FaceRequest(photo, pose, 256, 256, pose_face_index=0))
    second = stage.analyze(FaceRequest(photo, pose, 256, 256, pose_face_index=1))
    assert counting.detections == 2  # the face photo once, the pose photo once
    assert not np.array_equal(first.condition.keypoints, second.condition.keypoints)  # another pose face, one entry


def test_a_saved_identity_gives_the_condition_its_photos_give(analyzer: FaceAnalyzer) -> None:
    """Enrolment's record (through its JSON) read back as face results: the same condition as the photos, bit for
    bit, with no detection."""
    stage, counting, _ = stage_with(analyzer, max_entries=0)
    photos = [astronaut_jpeg(), group_photo_jpeg()]
    identified = [stage.identify(IdentityRequest(p, i, 2, 0, thumbnail=i == 0)) for i, p in enumerate(photos)]
    enrolment = stage.enrol("mean", *identified)
    record = SavedIdentity(
        id="idt-20261207T120000Z-0123456789abcdef",
        owner="alice",
        created_at="2026-12-07T12:00:00+00:00",
        identity_combine="mean",
        embedding=enrolment.embedding.tolist(),
        photos=[SavedPhoto(sha256="0" * 64, **entry) for entry in saved_photos(enrolment.chosen)],
    )
    record = SavedIdentity.model_validate_json(record.model_dump_json())
    from_photos = stage.analyze(FaceRequest(None, None, 256, 256, identity_combine="mean"), *identified)
    detections = counting.detections
    known = saved_faces(record, StageTiming.since(0.0))
    from_record = stage.analyze(FaceRequest(None, None, 256, 256, identity_combine="mean"), *known)
    assert counting.detections == detections
    np.testing.assert_array_equal(from_record.condition.embedding, from_photos.condition.embedding)
    np.testing.assert_array_equal(from_record.condition.keypoints, from_photos.condition.keypoints)
    np.testing.assert_array_equal(from_record.condition.box, from_photos.condition.box)
    assert (from_record.condition.width, from_record.condition.height) == (256, 256)
    np.testing.assert_array_equal(np.asarray(record.embedding, np.float32), enrolment.embedding)
    assert all(c.saved_identity == record.id for c in from_record.condition.used)


def test_the_thumbnail_is_a_small_webp_of_the_face(analyzer: FaceAnalyzer) -> None:
    from PIL import Image

    from deployments.instantid.images import decode_image

    rgb = decode_image(group_photo_jpeg())
    box = analyzer.detect(rgb)[0].bbox
    data = face_thumbnail(rgb, box)
    import io

    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP" and max(image.size) == 128 and abs(image.size[0] - image.size[1]) <= 2
