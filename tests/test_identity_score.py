"""The identity score of generated images, on the tiny antelopev2 pack's real onnxruntime sessions (no Ray).

Expected values are computed here with plain numpy from ``FaceAnalyzer.detect``/``embed``, so the tests pin the
math (largest face, float64 cosine, the concat rule) rather than restating the implementation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deployments.face_analyzer import FaceAnalyzerDeployment
from deployments.generation.messages import DenoiseResult, FaceResult
from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.conditioning import FaceCondition
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.identity_score import identity_similarities, identity_similarity
from deployments.instantid.images import decode_image
from deployments.instantid.params import GenerationParams
from deployments.tiny.faces import write_tiny_antelopev2
from tests.support import astronaut_rgb, group_photo_jpeg

CPU = ["CPUExecutionProvider"]
# insightface 2.1's norm_crop uses a scikit-image API deprecated in 0.26 (see tests/test_faces.py).
pytestmark = pytest.mark.filterwarnings("ignore:.*`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    pack: Path = tmp_path_factory.mktemp("models") / "antelopev2"
    write_tiny_antelopev2(pack, seed=0)
    return FaceAnalyzer(pack, providers=CPU)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": astronaut_rgb(), "group": decode_image(group_photo_jpeg())}


def own_embedding(analyzer: FaceAnalyzer, rgb: np.ndarray, which: int = 0) -> np.ndarray:
    """The raw embedding of the ``which``-th largest face, as the face stage would compute the reference."""
    return analyzer.embed(rgb, analyzer.detect(rgb)[which])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def grey(height: int = 512, width: int = 512) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


# --- (a) a photo against its own identity ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "group"])
def test_a_photo_scored_against_its_own_embedding_is_one(
    analyzer: FaceAnalyzer, photos: dict[str, np.ndarray], name: str
) -> None:
    photo = photos[name]
    reference = own_embedding(analyzer, photo)
    score = identity_similarity(analyzer, photo, reference)
    assert type(score) is float
    assert score == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= score <= 1.0
    # Raw embeddings: the reference's length plays no part.
    assert identity_similarity(analyzer, photo, reference * 7.5) == pytest.approx(score, abs=1e-12)


def test_the_largest_face_is_the_one_scored(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]) -> None:
    group = photos["group"]
    faces = analyzer.detect(group)
    assert len(faces) >= 3
    largest = analyzer.embed(group, faces[0])
    for which in (1, len(faces) - 1):  # another face, and the smallest one, as the reference
        other = own_embedding(analyzer, group, which)
        expected = cosine(largest, other)
        assert expected < 0.99
        assert identity_similarity(analyzer, group, other) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --- (b) no face --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 128, 255])
def test_a_uniform_image_has_no_score(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray], value: int) -> None:
    reference = own_embedding(analyzer, photos["astronaut"])
    blank = np.full((480, 640, 3), value, dtype=np.uint8)
    assert identity_similarity(analyzer, blank, reference) is None


# --- (c) another face ---------------------------------------------------------------------------------------


def test_a_different_face_scores_the_numpy_cosine(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]) -> None:
    astronaut_identity = own_embedding(analyzer, photos["astronaut"])
    group_largest = own_embedding(analyzer, photos["group"])
    expected = cosine(group_largest, astronaut_identity)
    score = identity_similarity(analyzer, photos["group"], astronaut_identity)
    assert type(score) is float
    assert score == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert -1.0 <= score < 0.99
    # Symmetric in meaning: the astronaut photo against the group photo's identity gives the same cosine.
    assert identity_similarity(analyzer, photos["astronaut"], group_largest) == pytest.approx(expected, rel=1e-9)


def test_a_batch_is_scored_image_by_image(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]) -> None:
    astronaut = photos["astronaut"]
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    reference = own_embedding(analyzer, astronaut)
    scores = identity_similarities(analyzer, np.stack([astronaut, grey(), mirrored]), reference)
    assert len(scores) == 3
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] is None
    assert scores[2] == pytest.approx(cosine(own_embedding(analyzer, mirrored), reference), rel=1e-9)
    assert all(type(s) is float for s in (scores[0], scores[2]))
    assert identity_similarities(analyzer, np.zeros((0, 64, 64, 3), dtype=np.uint8), reference) == []


# --- (d) concat references ----------------------------------------------------------------------------------


def test_a_concat_reference_is_compared_with_the_mean_of_its_unit_rows(
    analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]
) -> None:
    astronaut = photos["astronaut"]
    a = own_embedding(analyzer, astronaut)
    b = own_embedding(analyzer, photos["group"]) * 10.0  # a long row must not dominate
    reference = np.stack([a, b])
    assert reference.shape == (2, 512)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    rule = (a64 / np.linalg.norm(a64) + b64 / np.linalg.norm(b64)) / 2
    expected = cosine(a, rule)
    assert abs(expected - cosine(a, (a64 + b64) / 2)) > 0.05  # guard: the raw mean would give another value
    assert abs(expected - cosine(a, a)) > 0.05  # and so would the first row alone
    score = identity_similarity(analyzer, astronaut, reference)
    assert score == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert identity_similarities(analyzer, astronaut[None], reference) == [pytest.approx(expected, rel=1e-9)]
    # One row is the (512,) case; rows of one direction (any lengths) are that direction.
    assert identity_similarity(analyzer, astronaut, a[None]) == pytest.approx(1.0, abs=1e-6)
    assert identity_similarity(analyzer, astronaut, np.stack([a, 3 * a])) == pytest.approx(1.0, abs=1e-6)


# --- (e) bad references -------------------------------------------------------------------------------------


def test_a_reference_of_norm_zero_is_a_value_error(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]) -> None:
    astronaut = photos["astronaut"]
    zero = np.zeros(512, dtype=np.float32)
    with pytest.raises(ValueError, match="norm 0"):
        identity_similarity(analyzer, astronaut, zero)
    with pytest.raises(ValueError, match="norm 0"):
        identity_similarities(analyzer, astronaut[None], zero)
    with pytest.raises(ValueError, match="norm 0"):  # checked even when no image would be analysed
        identity_similarities(analyzer, np.zeros((0, 64, 64, 3), dtype=np.uint8), zero)
    with pytest.raises(ValueError, match="norm 0"):  # one zero row of a concat reference
        identity_similarity(analyzer, astronaut, np.stack([own_embedding(analyzer, astronaut), zero]))


def test_other_bad_inputs_are_value_errors(analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]) -> None:
    astronaut = photos["astronaut"]
    a = own_embedding(analyzer, astronaut)
    with pytest.raises(ValueError, match="cancel out"):
        identity_similarity(analyzer, astronaut, np.stack([a, -2 * a]))
    with pytest.raises(ValueError, match="shape"):
        identity_similarity(analyzer, astronaut, a.reshape(1, 2, 256))
    with pytest.raises(ValueError, match="non-finite"):
        identity_similarity(analyzer, astronaut, np.full(512, np.nan))
    with pytest.raises(ValueError, match="same recognition model"):
        identity_similarity(analyzer, astronaut, a[:256])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        identity_similarities(analyzer, astronaut, a)  # one image, not a batch


# --- (f) the Serve deployment's method ---------------------------------------------------------------------


def test_the_deployment_scores_a_denoise_result_against_the_face_result(
    analyzer: FaceAnalyzer, photos: dict[str, np.ndarray]
) -> None:
    cls = FaceAnalyzerDeployment.func_or_class  # the user class: constructed without Ray, given the analyzer
    deployment = cls.__new__(cls)
    deployment.analyzer = analyzer
    astronaut = photos["astronaut"]
    face = analyzer.detect(astronaut)[0]
    identity = analyzer.embed(astronaut, face)
    images = np.stack([astronaut, grey(), np.ascontiguousarray(astronaut[:, ::-1])])
    images.setflags(write=False)  # as Ray hands arrays over
    output = DenoiseResult(images, GenerationParams(), ModelChoice("sdxl"), face, [], 1)

    def face_result(embedding: np.ndarray) -> FaceResult:
        condition = FaceCondition(embedding, face.kps, face.bbox, 512, 512, face)
        return FaceResult(condition, {})

    mirrored = cosine(own_embedding(analyzer, images[2]), identity)
    scores = deployment.score(output, face_result(identity))
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] is None
    assert scores[2] == pytest.approx(mirrored, rel=1e-9)
    # A concat identity (the group photo's largest face beside the astronaut's) follows the unit-rows rule.
    other = own_embedding(analyzer, photos["group"])
    rule = identity / np.linalg.norm(identity.astype(np.float64)) + other / np.linalg.norm(other.astype(np.float64))
    concat = deployment.score(output, face_result(np.stack([identity, other])))
    assert concat[0] == pytest.approx(cosine(identity, rule), rel=1e-9)
    assert concat[1] is None
    assert concat[2] == pytest.approx(cosine(own_embedding(analyzer, images[2]), rule), rel=1e-9)
