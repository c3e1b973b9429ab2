"""Face analysis on real onnxruntime sessions, with the tiny antelopev2 pack written into a temp folder.

Real photos (scikit-image's astronaut, insightface's own t1.jpg group photo), real insightface routing,
real error paths for the folder mistakes users make. No fakes.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from insightface.app import FaceAnalysis
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD
from PIL import Image

from deployments.instantid.errors import NoFaceError, WeightsError
from deployments.instantid.faces import ANTELOPEV2_FILES, DetectedFace, FaceAnalyzer
from deployments.instantid.images import decode_image
from deployments.tiny.faces import write_tiny_antelopev2
from tests.support import astronaut_rgb, group_photo_jpeg

CPU = ["CPUExecutionProvider"]
# insightface 2.1's norm_crop uses a scikit-image API deprecated in 0.26; faces.py silences it at import, but
# pytest resets warning filters around collection, so say it again here.
pytestmark = pytest.mark.filterwarnings("ignore:.*`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "antelopev2"
    write_tiny_antelopev2(directory, seed=0)
    return directory


@pytest.fixture(scope="module")
def analyzer(pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer(pack, providers=CPU)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return astronaut_rgb()


@pytest.fixture(scope="module")
def group_photo() -> np.ndarray:
    return decode_image(group_photo_jpeg())


# --- the tiny pack --------------------------------------------------------------------------------------


def test_tiny_pack_is_deterministic_and_small(pack: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in pack.iterdir()) == sorted(ANTELOPEV2_FILES)
    write_tiny_antelopev2(tmp_path / "again", seed=0)
    write_tiny_antelopev2(tmp_path / "other", seed=1)
    for name in ANTELOPEV2_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (pack / name).read_bytes()
    assert (tmp_path / "other" / "glintr100.onnx").read_bytes() != (pack / "glintr100.onnx").read_bytes()
    assert sum((pack / name).stat().st_size for name in ANTELOPEV2_FILES) < 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "cls", "task"),
    [
        ("scrfd_10g_bnkps.onnx", SCRFD, "detection"),
        ("glintr100.onnx", ArcFaceONNX, "recognition"),
        ("2d106det.onnx", Landmark, "landmark_2d_106"),
        ("1k3d68.onnx", Landmark, "landmark_3d_68"),
        ("genderage.onnx", Attribute, "genderage"),
    ],
)
def test_insightface_routes_each_file(pack: Path, name: str, cls: type, task: str) -> None:
    model = get_model(str(pack / name), providers=CPU)
    assert type(model) is cls
    assert model.taskname == task


def test_insightface_face_analysis_loads_all_five_and_runs(pack: Path, tmp_path: Path, astronaut: np.ndarray) -> None:
    root = tmp_path / "insightface-root"
    app = FaceAnalysis(name=str(pack), root=str(root), allowed_modules=None, providers=CPU)
    assert sorted(app.models) == ["detection", "genderage", "landmark_2d_106", "landmark_3d_68", "recognition"]
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(np.ascontiguousarray(astronaut[:, :, ::-1]))  # insightface wants BGR
    assert faces
    face = faces[0]
    assert face.embedding.shape == (512,)
    assert face.landmark_2d_106.shape == (106, 2)
    assert face.landmark_3d_68.shape == (68, 3)
    assert face.gender in (0, 1) and isinstance(face.age, int)
    assert np.all(np.isfinite(face.pose))
    assert not root.exists()  # the folder was used directly: nothing looked up or downloaded under root


# --- detection and recognition --------------------------------------------------------------------------


def test_analyze_astronaut(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    face = analyzer.analyze(astronaut)
    assert face.embedding is not None
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(face.embedding)) - 1.0) > 0.1  # raw, not L2-normalised
    assert face.bbox.dtype == np.float32 and face.kps.shape == (5, 2)
    again = analyzer.analyze(astronaut.copy())
    np.testing.assert_array_equal(again.embedding, face.embedding)
    np.testing.assert_array_equal(again.bbox, face.bbox)


def test_embedding_matches_insightface_own_pipeline(pack: Path, analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    # Same crop alignment and normalisation as insightface's FaceAnalysis (which recognises every face).
    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"], providers=CPU)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(np.ascontiguousarray(astronaut[:, :, ::-1]))
    largest_ref = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    ours = analyzer.analyze(astronaut)
    np.testing.assert_allclose(ours.bbox, largest_ref.bbox, atol=1e-4)
    np.testing.assert_allclose(ours.embedding, largest_ref.embedding, rtol=1e-5, atol=1e-5)


def test_different_faces_give_different_embeddings(analyzer: FaceAnalyzer, group_photo: np.ndarray) -> None:
    faces = analyzer.detect(group_photo)
    a, b = (analyzer.embed(group_photo, f) for f in faces[:2])
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine < 0.99


def test_group_photo_largest_face_is_chosen(analyzer: FaceAnalyzer, group_photo: np.ndarray) -> None:
    faces = analyzer.detect(group_photo)
    assert 3 <= len(faces) <= 30  # several faces, not thousands
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert len({round(a) for a in areas}) > 1  # sizes vary with content: "largest" means something
    assert faces and all(f.embedding is None for f in faces)
    chosen = analyzer.analyze(group_photo)
    np.testing.assert_array_equal(chosen.bbox, faces[0].bbox)
    assert chosen.area == max(areas)
    # Not the highest-scoring and not the last detection: the rule is the box area.
    best_score = max(faces, key=lambda f: f.det_score)
    assert not np.array_equal(best_score.bbox, chosen.bbox)
    assert not np.array_equal(faces[-1].bbox, chosen.bbox)


def test_keypoints_are_laid_out_like_a_face(analyzer: FaceAnalyzer, group_photo: np.ndarray) -> None:
    for face in analyzer.detect(group_photo):
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.kps
        assert lx < nx < rx and mlx < mrx  # left (image left) before right
        assert max(ly, ry) < ny < min(mly, mry)  # eyes above nose above mouth
        x1, y1, x2, y2 = face.bbox
        assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2))
        assert np.all((face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))


def test_uniform_image_has_no_face(analyzer: FaceAnalyzer) -> None:
    grey = np.full((480, 640, 3), 128, dtype=np.uint8)  # not square: the detector's zero padding shows
    assert analyzer.detect(grey) == []
    with pytest.raises(NoFaceError) as info:
        analyzer.analyze(grey)
    assert info.value.status == 422
    assert info.value.message == "no face detected in the face image"
    with pytest.raises(NoFaceError, match="no face detected in the pose image"):
        analyzer.analyze(grey, which="pose")


def test_exif_rotated_photo_is_analysed_upright(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    upright = Image.fromarray(astronaut)
    exif = Image.Exif()
    exif[0x0112] = 6

    def jpeg(image: Image.Image, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95, **options)
        return buffer.getvalue()

    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    expected = analyzer.analyze(decode_image(jpeg(upright)))
    rotated = analyzer.analyze(decode_image(jpeg(sideways, exif=exif)))
    ignored = analyzer.analyze(decode_image(jpeg(sideways)))  # what happens if the tag is not honoured
    np.testing.assert_allclose(rotated.bbox, expected.bbox, atol=3.0)
    assert np.abs(ignored.bbox - expected.bbox).max() > 20


def test_detected_face_value_object(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    face = analyzer.analyze(astronaut)
    payload = face.to_dict()
    json.dumps(payload)
    assert set(payload) == {"bbox", "kps", "det_score", "area"}
    x1, y1, x2, y2 = payload["bbox"]
    assert payload["area"] == pytest.approx((x2 - x1) * (y2 - y1))
    with pytest.raises(ValueError):
        face.bbox[0] = 0.0  # read-only arrays
    assert DetectedFace([0, 0, 4, 2], np.zeros((5, 2)), 0.9).area == 8.0
    with pytest.raises(ValueError):
        DetectedFace([0, 0, 4], np.zeros((5, 2)), 0.9)


def test_detected_face_pickles_for_ray(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    face = analyzer.analyze(astronaut)
    copy = pickle.loads(pickle.dumps(face))
    np.testing.assert_array_equal(copy.embedding, face.embedding)
    np.testing.assert_array_equal(copy.kps, face.kps)
    assert copy.det_score == face.det_score


def test_check_health(analyzer: FaceAnalyzer) -> None:
    analyzer.check_health()


def test_rejects_non_rgb_input(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(ValueError):
        analyzer.detect(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        analyzer.detect(np.zeros((10, 10, 3), dtype=np.float32))


# --- folder mistakes ------------------------------------------------------------------------------------


def _assert_names_expected(message: str) -> None:
    for name in ANTELOPEV2_FILES:
        assert name in message


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "antelopev2"
    with pytest.raises(WeightsError) as info:
        FaceAnalyzer(missing, providers=CPU)
    assert str(missing) in info.value.message and "does not exist" in info.value.message
    _assert_names_expected(info.value.message)
    assert not missing.exists()  # nothing created, nothing downloaded


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        FaceAnalyzer(tmp_path, providers=CPU)
    assert "is empty" in info.value.message and str(tmp_path) in info.value.message
    _assert_names_expected(info.value.message)


def test_nested_folder_names_the_path_to_use(pack: Path, tmp_path: Path) -> None:
    outer = tmp_path / "antelopev2"
    shutil.copytree(pack, outer / "antelopev2")
    with pytest.raises(WeightsError) as info:
        FaceAnalyzer(outer, providers=CPU)
    message = info.value.message
    assert f"Use {outer / 'antelopev2'} as the antelopev2 folder" in message
    assert "antelopev2/" in message  # what was found: the inner folder
    _assert_names_expected(message)
    FaceAnalyzer(outer / "antelopev2", providers=CPU)  # and the suggestion works


def test_doubly_nested_folder(pack: Path, tmp_path: Path) -> None:
    inner = tmp_path / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(pack, inner)
    with pytest.raises(WeightsError) as info:
        FaceAnalyzer(tmp_path / "models", providers=CPU)
    assert f"Use {inner} as the antelopev2 folder" in info.value.message


def test_folder_lacking_recognizer(pack: Path, tmp_path: Path) -> None:
    partial = tmp_path / "antelopev2"
    partial.mkdir()
    shutil.copy(pack / "scrfd_10g_bnkps.onnx", partial)
    with pytest.raises(WeightsError) as info:
        FaceAnalyzer(partial, providers=CPU)
    message = info.value.message
    assert "lacks glintr100.onnx" in message
    assert "Found: scrfd_10g_bnkps.onnx" in message
    _assert_names_expected(message)


def test_path_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "antelopev2.zip"
    target.write_bytes(b"PK\x03\x04")
    with pytest.raises(WeightsError, match="is not a folder"):
        FaceAnalyzer(target, providers=CPU)


def test_swapped_files_are_refused(pack: Path, tmp_path: Path) -> None:
    swapped = tmp_path / "antelopev2"
    swapped.mkdir()
    shutil.copy(pack / "scrfd_10g_bnkps.onnx", swapped / "glintr100.onnx")
    shutil.copy(pack / "glintr100.onnx", swapped / "scrfd_10g_bnkps.onnx")
    with pytest.raises(WeightsError, match="should be the face detector but insightface routed it to ArcFaceONNX"):
        FaceAnalyzer(swapped, providers=CPU)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 16923827\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html>Not Found</html>", "HTML"),
        (b"", "empty"),
        (b"\x08\x07garbage that is not a protobuf model", "could not load the face recognizer"),
    ],
)
def test_non_model_files_are_refused(pack: Path, tmp_path: Path, content: bytes, match: str) -> None:
    broken = tmp_path / "antelopev2"
    shutil.copytree(pack, broken)
    (broken / "glintr100.onnx").write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        FaceAnalyzer(broken, providers=CPU)


def test_det_size_must_fit_the_strides(pack: Path) -> None:
    with pytest.raises(ValueError):
        FaceAnalyzer(pack, providers=CPU, det_size=600)


def test_group_photo_fixture_is_the_real_photo(group_photo: np.ndarray) -> None:
    # Guard: the group-photo tests above are only meaningful on insightface's real 1280x886 picture.
    assert group_photo.shape == (886, 1280, 3)
    assert cv2.Laplacian(cv2.cvtColor(group_photo, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() > 50
