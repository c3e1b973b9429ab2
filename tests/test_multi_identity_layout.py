"""Several people: the layout rules (pose faces left to right, explicit regions, automatic columns) on real photos
with several faces, each identity's score in its region, and the 422s of the request model and the face stage."""

from __future__ import annotations

import base64
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.instantid.conditioning import ChosenFace, identify
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.group import IdentityPhotos, PoseFaces, group_condition, locate_pose_faces
from deployments.instantid.identity_score import RegionScore, region_similarities
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import CropTransform
from deployments.instantid.regions import (
    FACE_HEIGHT_SHARE,
    FACE_WIDTH_SHARE,
    HEAD_HEIGHT,
    check_regions,
    identity_masks,
    shared_keypoint_image,
)
from deployments.tiny.faces import write_tiny_antelopev2
from serve.schemas import FacesRequest, GenerateRequest
from tests.support import astronaut_rgb, group_photo_jpeg

pytestmark = pytest.mark.filterwarnings("ignore:.*`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    directory: Path = tmp_path_factory.mktemp("faces") / "antelopev2"
    write_tiny_antelopev2(directory, seed=0)
    return FaceAnalyzer(directory, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return decode_image(group_photo_jpeg())


@pytest.fixture(scope="module")
def people(analyzer: FaceAnalyzer, group: np.ndarray) -> list[ChosenFace]:
    """Four different identities: the astronaut and three faces of the group photo (by /v1/faces index)."""
    astronaut = identify(analyzer, astronaut_rgb())
    return [astronaut] + [identify(analyzer, group, face_index=i) for i in (4, 5, 6)]


def centre(box: np.ndarray) -> tuple[float, float]:
    return float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2


# --------------------------------------------------------------------------------------------- pose layout


def test_pose_photo_faces_are_matched_to_identities_left_to_right(analyzer, group, people) -> None:
    pose = locate_pose_faces(analyzer, group)
    assert len(pose.faces) >= 6  # the group photo really holds several faces
    condition = group_condition([IdentityPhotos([p]) for p in people], pose, width=1024, height=768)
    assert condition.layout == "pose" and condition.identities is not None
    # The four largest faces (indices 0..3 in /v1/faces order), ordered by box centre x.
    largest = list(range(4))
    expected = sorted(largest, key=lambda i: centre(pose.faces[i].bbox)[0])
    assert expected == [3, 0, 1, 2]  # the tiny detector's four largest faces in the group photo, left to right
    assert [c.face_index for c in condition.used if c.source == "pose"] == expected
    assert [c.identity for c in condition.used if c.source == "pose"] == [0, 1, 2, 3]
    transform = CropTransform.cover(group.shape[1], group.shape[0], 1024, 768)
    xs = []
    for placed, face_index, person in zip(condition.identities, expected, people, strict=True):
        face = pose.faces[face_index]
        assert np.array_equal(placed.keypoints, transform.apply_points(face.kps))
        assert np.array_equal(placed.box, transform.apply_box(face.bbox))
        assert np.array_equal(placed.embedding, person.face.embedding)  # identity i keeps its own vector
        cx, cy = centre(placed.box)
        assert placed.region[0] <= cx < placed.region[2] and placed.region[1] <= cy < placed.region[3]
        xs.append(cx)
    assert xs == sorted(xs)
    # Automatic regions: full-height columns cut halfway between neighbouring faces, covering the image.
    regions = [p.region for p in condition.identities]
    assert regions[0][0] == 0 and regions[-1][2] == 1024
    for (left, right), (x_left, x_right) in zip(pairwise(regions), pairwise(xs), strict=True):
        assert left[2] == right[0] == round((x_left + x_right) / 2)
    assert all(r[1] == 0 and r[3] == 768 for r in regions)


def test_pose_photo_with_explicit_regions_keeps_pose_faces(analyzer, group, people) -> None:
    pose = locate_pose_faces(analyzer, group)
    regions = [(0, 0, 400, 768), (400, 0, 1024, 768)]
    # Two identities take the two largest faces: 0 (centre x 480 of 1280) and 1 (800), left to right.
    condition = group_condition(
        [IdentityPhotos([people[0]], region=regions[0]), IdentityPhotos([people[1]], region=regions[1])],
        pose,
        width=1024,
        height=768,
    )
    assert condition.identities is not None
    assert [list(p.region) for p in condition.identities] == [list(r) for r in regions]
    assert [c.face_index for c in condition.used if c.source == "pose"] == [0, 1]
    with pytest.raises(InvalidParameterError, match=r"identities\[1\]'s face in the pose image .* not inside"):
        group_condition(
            [
                IdentityPhotos([people[0]], region=(0, 0, 900, 768)),
                IdentityPhotos([people[1]], region=(900, 0, 1024, 768)),
            ],
            pose,
            width=1024,
            height=768,
        )


def test_more_identities_than_pose_faces_is_refused(analyzer, people) -> None:
    top = np.ascontiguousarray(astronaut_rgb()[:256])
    pose = locate_pose_faces(analyzer, top)
    assert len(pose.faces) == 1
    with pytest.raises(InvalidParameterError, match="the pose image holds 1 face but the request has 2 identities"):
        group_condition([IdentityPhotos([people[0]]), IdentityPhotos([people[1]])], pose)


# --------------------------------------------------------------------------------- regions and columns


def check_placed(placed, own_face, region) -> None:
    """The identity's own face, scaled uniformly into the upper middle of its region."""
    rx1, ry1, rx2, ry2 = region
    width, height = placed.box[2] - placed.box[0], placed.box[3] - placed.box[1]
    own_w, own_h = own_face.bbox[2] - own_face.bbox[0], own_face.bbox[3] - own_face.bbox[1]
    scale = min(FACE_WIDTH_SHARE * (rx2 - rx1) / own_w, FACE_HEIGHT_SHARE * (ry2 - ry1) / own_h)
    assert width == pytest.approx(own_w * scale, rel=1e-4) and height == pytest.approx(own_h * scale, rel=1e-4)
    cx, cy = centre(placed.box)
    assert cx == pytest.approx((rx1 + rx2) / 2, abs=1e-3)
    assert cy == pytest.approx(ry1 + HEAD_HEIGHT * (ry2 - ry1), abs=1e-3)
    own_centre = np.array(centre(own_face.bbox))
    expected = (own_face.kps - own_centre) * scale + np.array([cx, cy])
    assert np.allclose(placed.keypoints, expected, atol=1e-3)
    assert rx1 <= placed.box[0] and placed.box[2] <= rx2 and ry1 <= placed.box[1] and placed.box[3] <= ry2


def test_automatic_layout_is_equal_columns_with_faces_at_head_height(people) -> None:
    condition = group_condition([IdentityPhotos([p]) for p in people[:3]], width=768, height=512)
    assert condition.layout == "columns" and condition.identities is not None
    regions = [list(p.region) for p in condition.identities]
    assert regions == [[0, 0, 256, 512], [256, 0, 512, 512], [512, 0, 768, 512]]
    for placed, person, region in zip(condition.identities, people[:3], regions, strict=True):
        check_placed(placed, person.face, region)
    assert [c.identity for c in condition.used] == [0, 1, 2] and all(c.source == "face" for c in condition.used)


def test_explicit_regions_place_each_identity_in_its_own_box(people) -> None:
    regions = [(0, 128, 320, 512), (384, 0, 768, 256)]
    condition = group_condition(
        [IdentityPhotos([people[2]], region=regions[0]), IdentityPhotos([people[3]], region=regions[1])],
        width=768,
        height=512,
    )
    assert condition.layout == "regions" and condition.identities is not None
    for placed, person, region in zip(condition.identities, people[2:], regions, strict=True):
        check_placed(placed, person.face, region)
    image = shared_keypoint_image([p.keypoints for p in condition.identities], 768, 512)
    for region in regions:  # each face is drawn in its own box
        x1, y1, x2, y2 = region
        assert image[y1:y2, x1:x2].any()
    masks = identity_masks(
        [p.region for p in condition.identities], [p.box for p in condition.identities], 768, 512, False
    )
    assert masks is not None and masks[0].sum() == 320 * 384 and masks[1].sum() == 384 * 256
    assert masks.sum(axis=0).max() == 1  # no pixel belongs to two identities


def test_several_photos_of_one_identity_combine_as_for_one_person(analyzer, group, people) -> None:
    second = identify(analyzer, group, face_index=7, photo_index=1, photos=2)
    condition = group_condition(
        [IdentityPhotos([people[0], second], "mean"), IdentityPhotos([people[1]])], width=512, height=512
    )
    assert condition.identities is not None
    expected = (people[0].face.embedding.astype(np.float64) + second.face.embedding) / 2
    assert np.allclose(condition.identities[0].embedding, expected, atol=1e-5)
    assert [(c.identity, c.photo_index) for c in condition.used] == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([(0, 0, 300, 512), (256, 0, 512, 512)], r"identities\[0\].region \[0, 0, 300, 512\] and identities\[1\]"),
        ([(0, 0, 256, 512), (256, 0, 600, 512)], r"identities\[1\].region \[256, 0, 600, 512\] lies outside the 512"),
        ([(-10, 0, 256, 512), (256, 0, 512, 512)], r"identities\[0\].region .* lies outside"),
        ([(0, 0, 40, 512), (256, 0, 512, 512)], r"at least 64 px"),
        ([(100, 0, 50, 512), (256, 0, 512, 512)], r"x1 < x2"),
    ],
)
def test_bad_regions_are_422s_with_a_clear_message(people, regions, match) -> None:
    with pytest.raises(InvalidParameterError, match=match) as caught:
        group_condition(
            [IdentityPhotos([people[0]], region=regions[0]), IdentityPhotos([people[1]], region=regions[1])],
            width=512,
            height=512,
        )
    assert caught.value.status == 422


def test_touching_regions_do_not_overlap() -> None:
    check_regions([(0, 0, 256, 512), (256, 0, 512, 512)], 512, 512)


def test_identity_counts_and_mixed_regions_are_refused(people) -> None:
    with pytest.raises(InvalidParameterError, match="1 to 4 people here, got 5"):
        group_condition([IdentityPhotos([people[0]])] * 5, width=1024, height=512)
    with pytest.raises(InvalidParameterError, match="a region for every identity or for none"):
        group_condition(
            [IdentityPhotos([people[0]], region=(0, 0, 256, 512)), IdentityPhotos([people[1]])], width=512, height=512
        )


# ----------------------------------------------------------------------------------------- per-region score


def test_each_region_scores_its_best_matching_face(analyzer, group) -> None:
    faces = analyzer.detect(group)
    left, right = faces[3], faces[1]  # centres x 224 and 800 of 1280
    references = [analyzer.embed(group, left), analyzer.embed(group, right)]
    scores = region_similarities(
        analyzer,
        group,
        [(references[0], np.array([0, 0, 640, 886])), (references[1], np.array([640, 0, 1280, 886]))],
    )
    assert [s.index for s in scores] == [0, 1]
    assert scores[0].similarity == pytest.approx(1.0) and scores[1].similarity == pytest.approx(1.0)
    assert scores[0].box == [float(v) for v in left.bbox] and scores[1].box == [float(v) for v in right.bbox]
    swapped = region_similarities(
        analyzer, group, [(references[1], np.array([0, 0, 640, 886])), (references[0], np.array([640, 0, 1280, 886]))]
    )
    assert all(s.similarity < 0.999 for s in swapped)  # the other person is not themselves
    empty = region_similarities(analyzer, group, [(references[0], np.array([0, 0, 64, 64]))])
    assert empty == [RegionScore(0, None, None)]


# ----------------------------------------------------------------------------------------- request model


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PHOTO = {"b64": "aGVsbG8="}


def request(**fields) -> GenerateRequest:
    return GenerateRequest(prompt="two people", **fields)


def test_request_takes_identities_or_single_face_fields_never_both() -> None:
    two = [{"images": [PHOTO]}, {"images": [PHOTO, PHOTO], "face_index": 1, "region": [0, 0, 128, 128]}]
    with pytest.raises(ValidationError, match="a region for every identity or for none"):
        request(identities=two)
    ok = request(identities=[{"images": [PHOTO]}, {"images": [PHOTO, PHOTO], "identity_combine": "concat"}])
    assert len(ok.face_photos()) == 3 and ok.identities is not None and ok.identities[1].identity_combine == "concat"
    for single in ({"face_image_b64": "aGVsbG8="}, {"face_index": 1}, {"identity_combine": "mean"}):
        with pytest.raises(ValidationError, match="either identities or the single-person face fields"):
            request(identities=[{"images": [PHOTO]}] * 2, **single)
    with pytest.raises(ValidationError, match="pose_face_index is for one person"):
        request(identities=[{"images": [PHOTO]}] * 2, pose_face_index=1, pose_image_b64="aGVsbG8=")


@pytest.mark.parametrize("count", [1, 5])
def test_request_holds_two_to_four_identities(count: int) -> None:
    with pytest.raises(ValidationError, match=f"identities holds 2 to 4 people, got {count}"):
        request(identities=[{"images": [PHOTO]}] * count)


def test_request_checks_regions_when_the_size_is_known() -> None:
    regions = [[0, 0, 300, 512], [256, 0, 512, 512]]
    with pytest.raises(ValidationError, match="overlap"):
        request(identities=[{"images": [PHOTO], "region": r} for r in regions], width=512, height=512)
    with pytest.raises(ValidationError, match="lies outside the 512x512"):
        request(
            identities=[{"images": [PHOTO], "region": [0, 0, 600, 512]}, {"images": [PHOTO], "region": [0, 0, 1, 1]}],
            width=512,
            height=512,
        )


def test_multipart_identity_parts_fill_each_identitys_images() -> None:
    form = {
        "prompt": "two people",
        "identities": '[{"face_index": 1}, {"region": null}]',
        "identity_0_b64": "aGVsbG8=",
        "identity_1_images": [{"b64": "aGk="}, {"b64": "aG8="}],
    }
    parsed = GenerateRequest(**form)
    assert parsed.identities is not None
    assert [len(i.images) for i in parsed.identities] == [1, 2] and parsed.identities[0].face_index == 1
    assert parsed.identities[1].images[1].b64 == "aG8="
    without_json = GenerateRequest(prompt="x", identity_0_b64="aGk=", identity_1_b64="aG8=")
    assert without_json.identities is not None and len(without_json.identities) == 2
    with pytest.raises(ValidationError, match="numbered from 0 without gaps: identity_1 missing"):
        GenerateRequest(prompt="x", identity_0_b64="aGk=", identity_2_b64="aG8=")
    with pytest.raises(ValidationError, match=r"identities\[0\]: its images were given twice"):
        GenerateRequest(
            prompt="x", identities='[{"images": [{"b64": "aGk="}]}]', identity_0_b64="aGk=", identity_1_b64="aGk="
        )
    with pytest.raises(ValidationError, match="2 to 4 people, got 5"):
        GenerateRequest(prompt="x", **{f"identity_{i}_b64": "aGk=" for i in range(5)})


def test_faces_request_with_identities_takes_an_optional_pose_photo() -> None:
    layout = FacesRequest(identities=[{"images": [PHOTO]}] * 2)
    assert layout.image_b64 is None and layout.identities is not None
    FacesRequest(identities=[{"images": [PHOTO]}] * 2, image_b64="aGk=")
    with pytest.raises(ValidationError, match="exactly one of image_b64 and image_uri"):
        FacesRequest()


def test_pose_faces_dataclass_records_the_match(analyzer, group, people) -> None:
    pose = PoseFaces(analyzer.detect(group), group.shape[1], group.shape[0])
    group_condition([IdentityPhotos([p]) for p in people[:2]], pose)
    assert pose.chosen == [0, 1]
