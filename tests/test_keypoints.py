"""The IdentityNet condition image, the reference size rule and source->output geometry, checked by hand.

Expected values are computed by hand from the published rules (InstantID's draw_kps), not by re-running the
code under test, so a wrong colour order, rounding or offset shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest

from deployments.instantid.keypoints import CropTransform, draw_keypoint_image, face_region_mask, reference_size

# A frontal-face layout on a 300x260 canvas: eyes at y=100, nose at (150,160), mouth corners at y=220.
KPS = np.array([[100, 100], [200, 100], [150, 160], [110, 220], [190, 220]], dtype=np.float32)
RED, GREEN, BLUE, YELLOW, MAGENTA = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)
KEYPOINT_COLOURS_RGB = (RED, GREEN, BLUE, YELLOW, MAGENTA)  # keypoints 0..4, as published


@pytest.fixture(scope="module")
def canvas() -> np.ndarray:
    return draw_keypoint_image(KPS, 300, 260)


def test_keypoint_image_shape_and_dtype(canvas: np.ndarray) -> None:
    assert canvas.shape == (260, 300, 3)
    assert canvas.dtype == np.uint8
    assert canvas.flags["C_CONTIGUOUS"]


def test_circle_centres_have_full_rgb_colour(canvas: np.ndarray) -> None:
    # Indexing is [row=y, column=x]; channel 0 is red (RGB, not BGR).
    for (x, y), colour in zip(KPS.astype(int), (RED, GREEN, BLUE, YELLOW, MAGENTA), strict=True):
        assert tuple(canvas[y, x]) == colour
        # radius 10, filled: 9 px away along x is still inside, 12 px away along the diagonal is not full colour
        assert tuple(canvas[y, x + 9]) == colour
    assert tuple(canvas[100, 100]) == RED  # left eye (image left) is red
    assert canvas[100, 100, 2] == 0


def test_limb_midpoints_are_dimmed_to_153(canvas: np.ndarray) -> None:
    # Midpoints of eye->nose and mouth->nose limbs, ~39 px from both ends (outside the radius-10 circles).
    assert tuple(canvas[130, 125]) == (153, 0, 0)  # (100,100)-(150,160): colour of keypoint 0
    assert tuple(canvas[130, 175]) == (0, 153, 0)  # (200,100)-(150,160): keypoint 1
    assert tuple(canvas[190, 130]) == (153, 153, 0)  # (110,220)-(150,160): keypoint 3
    assert tuple(canvas[190, 170]) == (153, 0, 153)  # (190,220)-(150,160): keypoint 4


def test_limbs_are_thin_and_background_is_black(canvas: np.ndarray) -> None:
    # 7 px perpendicular to limb 0 (direction (50, 60)/78.1) is beyond its half-width of 4.
    assert tuple(canvas[134, 120]) == (0, 0, 0)
    for y, x in ((0, 0), (10, 10), (259, 299), (50, 150), (240, 20)):
        assert tuple(canvas[y, x]) == (0, 0, 0)
    colours = {tuple(int(c) for c in px) for px in canvas.reshape(-1, 3)}
    dimmed = {(153, 0, 0), (0, 153, 0), (153, 153, 0), (153, 0, 153)}
    assert colours <= {(0, 0, 0), RED, GREEN, BLUE, YELLOW, MAGENTA} | dimmed
    assert dimmed <= colours  # every limb drew something


def test_no_blue_limb_and_circle_order(canvas: np.ndarray) -> None:
    # The nose is only a limb end: no limb carries blue; the nose circle itself is blue.
    assert not np.any((canvas[:, :, 2] == 153) & (canvas[:, :, 0] == 0))
    # Circles are drawn in order 0..4 on top of the limbs: the nose circle covers the limbs' meeting point.
    assert tuple(canvas[160, 150]) == BLUE


def test_keypoint_image_truncates_like_the_reference() -> None:
    # int() truncation of the coordinates: a keypoint at x=40.9 puts the circle centre at column 40.
    kps = KPS.copy()
    kps[0] = (40.9, 40.9)
    img = draw_keypoint_image(kps, 300, 260)
    assert tuple(img[40, 30]) == RED and tuple(img[40, 50]) == RED
    assert tuple(img[40, 51]) != RED  # 11 px right of column 40


def test_keypoint_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        draw_keypoint_image(np.zeros((4, 2)), 10, 10)
    with pytest.raises(ValueError):
        draw_keypoint_image(np.full((5, 2), np.nan), 10, 10)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 1280x886: 1024/886 -> (1479, 1024); 1280/1479 -> (1280, round(886.22)=886) -> 886//64*64 = 832
        ((1280, 886), (1280, 832)),
        ((886, 1280), (832, 1280)),
        # 512x512: -> 1024x1024 -> 1280x1280 (already a multiple of 64)
        ((512, 512), (1280, 1280)),
        # 1000x750: -> (1365, 1024); 1280/1365 -> (1280, round(960.23)=960)
        ((1000, 750), (1280, 960)),
        # 100x300: -> (1024, 3072); 1280/3072 -> (round(426.67)=427 -> 384, 1280)
        ((100, 300), (384, 1280)),
        # 420x600: -> (1024, round(1462.86)=1463); 1280/1463 -> (round(895.91)=896, 1280). Truncating instead
        # of rounding would give 895 -> 832.
        ((420, 600), (896, 1280)),
        # 664x886: -> (1024, round(1366.36)=1366); 1280/1366 -> (round(959.53)=960, 1280). Scaling the long
        # side directly (one step) would give round(959.28)=959 -> 896: the demo's two steps matter.
        ((664, 886), (960, 1280)),
    ],
)
def test_reference_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert reference_size(*size) == expected


def test_reference_size_multi_controlnet_long_side() -> None:
    # long side 1024: (1479, 1024) * 1024/1479 -> (1024, round(708.98)=709 -> 704)
    assert reference_size(1280, 886, long_side=1024) == (1024, 704)


def test_reference_size_rejects_empty() -> None:
    with pytest.raises(ValueError):
        reference_size(0, 10)


def test_resize_transform() -> None:
    t = CropTransform.resize(1280, 886, 1280, 832)
    assert (t.scale_x, t.offset_x, t.offset_y) == (1.0, 0.0, 0.0)
    np.testing.assert_allclose(t.apply_points(np.array([[640.0, 443.0]])), [[640.0, 416.0]], atol=1e-4)
    np.testing.assert_allclose(t.apply_box(np.array([0.0, 0.0, 1280.0, 886.0])), [0, 0, 1280, 832], atol=1e-3)


def test_cover_transform_portrait_to_landscape() -> None:
    # 400x800 portrait into 800x400: scale max(2, 0.5) = 2 -> 800x1600, centre-cropped: offset_y = -600.
    t = CropTransform.cover(400, 800, 800, 400)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y) == (2.0, 2.0, 0.0, -600.0)
    pts = t.apply_points(np.array([[200.0, 400.0], [0.0, 300.0], [400.0, 500.0]]))
    np.testing.assert_allclose(pts, [[400, 200], [0, 0], [800, 400]])
    assert pts.dtype == np.float32
    # A box partly above the crop is clipped to it: (100,250,300,350) -> (200,-100,600,100) -> (200,0,600,100).
    np.testing.assert_allclose(t.apply_box([100.0, 250.0, 300.0, 350.0]), [200, 0, 600, 100])
    # Uniform scale: a square stays a square.
    box = t.apply_box([150.0, 350.0, 250.0, 450.0])
    assert box[2] - box[0] == pytest.approx(box[3] - box[1])


def test_cover_transform_landscape_to_portrait() -> None:
    t = CropTransform.cover(1000, 500, 400, 400)  # scale 0.8 -> 800x400, offset_x = -200
    assert (t.scale_x, t.offset_x, t.offset_y) == (0.8, -200.0, 0.0)
    np.testing.assert_allclose(t.apply_points([[500.0, 250.0]]), [[200.0, 200.0]])


def test_apply_image_matches_apply_points() -> None:
    # A white 20x20 square centred at (200, 400) of a 400x800 image must land centred on the mapped point.
    src = np.zeros((800, 400, 3), dtype=np.uint8)
    src[390:410, 190:210] = 255
    t = CropTransform.cover(400, 800, 800, 400)
    out = t.apply_image(src)
    assert out.shape == (400, 800, 3)
    ys, xs = np.nonzero(out[:, :, 0] > 127)
    cx, cy = t.apply_points([[200.0, 400.0]])[0]
    assert abs(xs.mean() + 0.5 - cx) < 0.75 and abs(ys.mean() + 0.5 - cy) < 0.75
    assert xs.max() - xs.min() + 1 == pytest.approx(40, abs=2)


def test_apply_image_survives_float_rounding_at_the_crop_edge() -> None:
    """1280x886 covered to 64x64: the vertical offset rounds to +3.6e-15, the crop's top edge to a hair below 0."""
    t = CropTransform.cover(1280, 886, 64, 64)
    assert 0 < t.offset_y < 1e-12  # the case: Pillow refuses a negative box edge
    out = t.apply_image(np.full((886, 1280, 3), 200, dtype=np.uint8))
    assert out.shape == (64, 64, 3) and (out == 200).all()


def test_face_region_mask() -> None:
    mask = face_region_mask(np.array([10.7, 20.2, 30.9, 40.5]), 64, 48)
    assert mask.shape == (48, 64) and mask.dtype == np.float32
    expected = np.zeros((48, 64), dtype=np.float32)
    expected[20:40, 10:30] = 1.0  # int() of each bound
    np.testing.assert_array_equal(mask, expected)


def test_face_region_mask_clamps_instead_of_wrapping() -> None:
    mask = face_region_mask([-5.5, -3.0, 10.0, 10.0], 64, 48)
    assert mask.sum() == 100.0 and mask[:10, :10].all()
    assert not mask[:, -8:].any() and not mask[-8:, :].any()
    assert not face_region_mask([70.0, 50.0, 90.0, 60.0], 64, 48).any()  # entirely outside


# Off-grid keypoints: every limb midpoint has a .5 (or other fractional) part in x and y, and the limbs are
# diagonal, so truncating the centre (the published int()) and rounding it put the limb edges on different pixels.
OFF_GRID = np.array([[91.3, 97.8], [208.6, 102.4], [150.7, 171.2], [104.2, 221.9], [197.5, 226.6]], dtype=np.float32)


def published_limb(p0: np.ndarray, p1: np.ndarray, width: int, height: int, centre_rule=int) -> np.ndarray:
    """The published limb as a boolean mask: OpenCV's ellipse polygon centred at int() of the midpoint, half-axes
    (int(length / 2), 4), rotated by int(degrees(atan2(y0 - y1, x0 - x1))), filled. The keypoints' float32
    arithmetic is kept, as the reference computes on insightface's float32 arrays."""
    import cv2

    (x0, y0), (x1, y1) = p0, p1
    centre = (centre_rule((x0 + x1) / 2), centre_rule((y0 + y1) / 2))
    length = ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5
    angle = int(np.degrees(np.arctan2(y0 - y1, x0 - x1)))
    polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), angle, 0, 360, 1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, polygon, 1)
    return mask.astype(bool)


def outside_circles(points: np.ndarray, width: int, height: int, radius: float = 11.5) -> np.ndarray:
    """Pixels farther than ``radius`` from every keypoint (the circles, drawn last, cover the rest)."""
    ys, xs = np.mgrid[0:height, 0:width]
    far = np.ones((height, width), bool)
    for x, y in points.astype(int):
        far &= (xs - x) ** 2 + (ys - y) ** 2 > radius**2
    return far


def test_off_grid_limbs_are_drawn_exactly_as_published() -> None:
    width, height = 300, 260
    canvas = draw_keypoint_image(OFF_GRID, width, height)
    expected = np.zeros((height, width, 3), np.uint8)
    rounded = np.zeros((height, width), bool)
    for start in (0, 1, 3, 4):  # every limb runs from keypoint `start` to the nose (2)
        limb = published_limb(OFF_GRID[start], OFF_GRID[2], width, height)
        expected[limb] = np.array(KEYPOINT_COLOURS_RGB[start]) * 153 // 255
        rounded |= published_limb(OFF_GRID[start], OFF_GRID[2], width, height, centre_rule=round)
    far = outside_circles(OFF_GRID, width, height)
    np.testing.assert_array_equal(canvas[far], expected[far])
    drawn = expected.any(axis=2)
    # The points discriminate: a rounded centre would move limb pixels that lie outside every circle.
    assert (rounded[far] != drawn[far]).sum() >= 10


def test_limb_ends_meet_the_circles_in_the_limb_colour() -> None:
    canvas = draw_keypoint_image(OFF_GRID, 300, 260)
    nose = OFF_GRID[2]
    for start in (0, 1, 3, 4):
        point = OFF_GRID[start]
        direction = (nose - point) / np.linalg.norm(nose - point)
        dimmed = tuple(c * 153 // 255 for c in KEYPOINT_COLOURS_RGB[start])
        for distance in (13.0, 15.0):  # just past this keypoint's circle, and just before the nose's circle
            x, y = (point + distance * direction).astype(int)
            assert tuple(canvas[y, x]) == dimmed, (start, distance)
            x, y = (nose - distance * direction).astype(int)
            assert tuple(canvas[y, x]) == dimmed, (start, -distance)
        x, y = point.astype(int)
        assert tuple(canvas[y, x]) == KEYPOINT_COLOURS_RGB[start]  # the circle on top, at full colour
