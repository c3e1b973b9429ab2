"""Identity input in one process: several photos of one person, which face to use, and face-token noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from deployments.generation.local import InstantIDPipeline
from deployments.instantid.conditioning import prepare_face_condition
from deployments.instantid.errors import InvalidParameterError, NoFaceError
from deployments.instantid.identity import combine_embeddings
from deployments.instantid.images import decode_image
from deployments.instantid.keypoints import CropTransform
from deployments.instantid.options import IDENTITY_COMBINE_MODES
from deployments.instantid.params import GenerationParams
from tests.support import astronaut_rgb, generate_with_params, group_photo_jpeg

PARAMS = GenerationParams(width=64, height=64, seed=5, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipeline(tiny_layout) -> InstantIDPipeline:
    return InstantIDPipeline.from_layout(tiny_layout, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return astronaut_rgb()


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return decode_image(group_photo_jpeg())


def generate(pipeline: InstantIDPipeline, photos, params: GenerationParams = PARAMS, **kwargs):
    return generate_with_params(pipeline, photos, "a portrait", "blurry", params=params, **kwargs)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ----------------------------------------------------------------------------------------- combining photos


def test_combining_rules_on_hand_checkable_vectors() -> None:
    a, b = np.zeros(512, np.float32), np.zeros(512, np.float32)
    a[0], b[1] = 3.0, 5.0
    np.testing.assert_array_equal(combine_embeddings([a, b], "mean")[:3], [1.5, 2.5, 0.0])
    # Unit directions (1, 0) and (0, 1) average to (0.5, 0.5); rescaled to the mean norm 4: 4/sqrt(2) each.
    np.testing.assert_allclose(combine_embeddings([a, b], "normalized_mean")[:3], [8**0.5, 8**0.5, 0.0], rtol=1e-6)
    assert np.linalg.norm(combine_embeddings([a, b], "normalized_mean")) == pytest.approx(4.0, rel=1e-6)
    concat = combine_embeddings([a, b], "concat")
    assert concat.shape == (2, 512) and np.array_equal(concat[0], a) and np.array_equal(concat[1], b)
    for mode in IDENTITY_COMBINE_MODES:
        assert combine_embeddings([a], mode) is a  # one photo: the very array, whatever the mode
    with pytest.raises(ValueError, match="unknown identity_combine"):
        combine_embeddings([a, b], "median")
    with pytest.raises(ValueError, match="cancel out"):
        combine_embeddings([a, -a], "normalized_mean")


@pytest.mark.parametrize("mode", IDENTITY_COMBINE_MODES)
def test_one_photo_gives_todays_image_bit_for_bit_in_every_mode(pipeline, astronaut, mode) -> None:
    today = generate(pipeline, astronaut)
    listed = generate(pipeline, [astronaut], identity_combine=mode)
    assert np.array_equal(listed.condition.embedding, today.condition.embedding)
    assert listed.condition.embedding.shape == (512,)
    assert np.array_equal(listed.images, today.images)


@pytest.mark.parametrize("mode", ["mean", "normalized_mean"])
def test_copies_of_one_photo_give_the_one_photo_identity_and_image(pipeline, astronaut, mode) -> None:
    one = generate(pipeline, astronaut)
    copies = generate(pipeline, [astronaut, astronaut.copy(), astronaut.copy()], identity_combine=mode)
    np.testing.assert_allclose(copies.condition.embedding, one.condition.embedding, rtol=0, atol=1e-6)
    assert max_difference(copies.images, one.images) <= 1
    assert [(c.source, c.photo_index) for c in copies.condition.used] == [("face", 0), ("face", 1), ("face", 2)]


def test_different_photos_move_the_identity_and_each_mode_combines_its_own_way(pipeline, astronaut, group) -> None:
    """Keypoints come from the first photo; the identity from all of them, as each mode says."""
    first, second = astronaut, group
    one = generate(pipeline, first)
    results = {mode: generate(pipeline, [first, second], identity_combine=mode) for mode in IDENTITY_COMBINE_MODES}
    own = [prepare_face_condition(pipeline.face.analyzer, photo).embedding for photo in (first, second)]
    np.testing.assert_allclose(results["mean"].condition.embedding, (own[0] + own[1]) / 2, rtol=1e-6)
    assert results["concat"].condition.embedding.shape == (2, 512)
    for mode, result in results.items():
        np.testing.assert_array_equal(result.condition.keypoints, one.condition.keypoints)
        assert max_difference(result.images, one.images) > 3, mode  # the second photo's identity shows
    assert max_difference(results["concat"].images, results["mean"].images) > 0


def test_concat_hands_every_photo_to_the_resampler_as_an_input_token(pipeline, astronaut, group) -> None:
    seen: list[torch.Tensor] = []
    hook = pipeline.denoise.denoiser.resampler.register_forward_hook(
        lambda module, args, out: seen.append(args[0].clone())
    )
    try:
        result = generate(pipeline, [astronaut, group], identity_combine="concat")
    finally:
        hook.remove()
    (tokens_in,) = seen
    assert tokens_in.shape == (2, 2, 512)  # [negative, positive] x 2 photo tokens x 512
    np.testing.assert_array_equal(tokens_in[1].numpy(), result.condition.embedding)
    assert not tokens_in[0].any()  # the published zero negative


# ------------------------------------------------------------------------------------------ which face


def test_face_index_picks_the_face_listed_at_that_index(pipeline, group) -> None:
    faces = pipeline.face.analyzer.detect(group)
    assert len(faces) >= 4
    for index in (0, 2, len(faces) - 1):
        condition = prepare_face_condition(pipeline.face.analyzer, group, face_index=index, width=256, height=256)
        np.testing.assert_array_equal(condition.face.bbox, faces[index].bbox)
        np.testing.assert_array_equal(condition.embedding, pipeline.face.analyzer.embed(group, faces[index]))
        transform = CropTransform.cover(group.shape[1], group.shape[0], 256, 256)
        np.testing.assert_allclose(condition.keypoints, transform.apply_points(faces[index].kps), rtol=1e-6)
        assert (condition.used[0].face_index, condition.used[0].photo_index) == (index, 0)
    with pytest.raises(InvalidParameterError) as info:
        prepare_face_condition(pipeline.face.analyzer, group, face_index=len(faces))
    assert info.value.message == f"face_index {len(faces)} is out of range: {len(faces)} faces found in the face image"


def test_pose_face_index_picks_the_pose_photos_face_and_keeps_the_identity(pipeline, astronaut, group) -> None:
    faces = pipeline.face.analyzer.detect(group)
    plain = prepare_face_condition(pipeline.face.analyzer, astronaut)
    chosen = prepare_face_condition(pipeline.face.analyzer, astronaut, group, pose_face_index=3, width=256, height=256)
    transform = CropTransform.cover(group.shape[1], group.shape[0], 256, 256)
    np.testing.assert_allclose(chosen.keypoints, transform.apply_points(faces[3].kps), rtol=1e-6)
    np.testing.assert_array_equal(chosen.pose_face.bbox, faces[3].bbox)
    np.testing.assert_array_equal(chosen.embedding, plain.embedding)  # the identity is the face photo's
    assert [(c.source, c.face_index) for c in chosen.used] == [("face", 0), ("pose", 3)]
    with pytest.raises(InvalidParameterError, match=f"pose_face_index 99 is out of range: {len(faces)} faces found"):
        prepare_face_condition(pipeline.face.analyzer, astronaut, group, pose_face_index=99)


def test_a_photo_without_a_usable_face_is_named_by_its_index(pipeline, astronaut) -> None:
    grey = np.full((200, 240, 3), 128, dtype=np.uint8)
    with pytest.raises(NoFaceError) as info:
        prepare_face_condition(pipeline.face.analyzer, [astronaut, astronaut, grey])
    assert info.value.message == "no face detected in face photo 2" and info.value.status == 422
    found = len(pipeline.face.analyzer.detect(astronaut))
    message = f"face_index 40 is out of range: {found} faces found in face photo 0"
    with pytest.raises(InvalidParameterError, match=message):
        prepare_face_condition(pipeline.face.analyzer, [astronaut, astronaut], face_index=40)
    with pytest.raises(InvalidParameterError, match="give 1 to 8 face photos, got 9"):
        prepare_face_condition(pipeline.face.analyzer, [astronaut] * 9)


# ------------------------------------------------------------------------------------------- face noise


def test_face_noise_zero_is_todays_image_and_noise_is_seeded(pipeline, astronaut) -> None:
    today = generate(pipeline, astronaut)
    zero = generate(pipeline, astronaut, dataclasses.replace(PARAMS, face_noise=0.0))
    assert np.array_equal(zero.images, today.images)
    noisy = generate(pipeline, astronaut, dataclasses.replace(PARAMS, face_noise=0.5))
    again = generate(pipeline, astronaut, dataclasses.replace(PARAMS, face_noise=0.5))
    other_seed = generate(pipeline, astronaut, dataclasses.replace(PARAMS, face_noise=0.5, seed=6))
    assert np.array_equal(noisy.images, again.images)
    assert max_difference(noisy.images, today.images) > 3
    assert max_difference(other_seed.images, generate(pipeline, astronaut, dataclasses.replace(PARAMS, seed=6)).images)


def test_face_noise_is_the_negative_resampler_input_scaled_uniform_noise(pipeline, astronaut) -> None:
    """The negative identity input is face_noise x U(0,1) from a CPU generator seeded with the request's seed;
    the positive input and the latents' generator are untouched."""
    seen: list[torch.Tensor] = []
    hook = pipeline.denoise.denoiser.resampler.register_forward_hook(
        lambda module, args, out: seen.append(args[0].clone())
    )
    try:
        result = generate(pipeline, astronaut, dataclasses.replace(PARAMS, face_noise=0.25))
    finally:
        hook.remove()
    (tokens_in,) = seen
    expected = torch.rand((1, 1, 512), generator=torch.Generator().manual_seed(PARAMS.seed)) * 0.25
    torch.testing.assert_close(tokens_in[:1], expected, rtol=0, atol=0)
    np.testing.assert_array_equal(tokens_in[1, 0].numpy(), result.condition.embedding)
    assert float(tokens_in[0].min()) >= 0.0 and float(tokens_in[0].max()) < 0.25
