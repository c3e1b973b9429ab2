"""The face stage: photos in, the face condition out; and the identity score of finished images.

The FaceAnalyzer deployment serves exactly this class (it adds only its replica id), and the in-process pipeline
calls it directly. Several photos are analysed one ``identify`` call each (a deployment spreads them over its
replicas); one ``analyze`` (one person) or ``analyze_group`` (several people) call then combines them with the pose
photo's geometry.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from deployments.instantid.conditioning import condition_from, identify, locate_pose, output_size
from deployments.instantid.errors import InstantIDError
from deployments.instantid.face_data import FaceCondition
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.group import IdentityPhotos, PoseFaces, group_condition, locate_pose_faces
from deployments.instantid.identity_score import RegionScore, identity_similarities, region_similarities
from deployments.instantid.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from deployments.instantid.keypoints import REFERENCE_LONG_SIDE, draw_keypoint_image
from deployments.instantid.regions import shared_keypoint_image

from .messages import (
    DenoiseResult,
    FaceListing,
    FaceRequest,
    FaceResult,
    GroupFaceRequest,
    GroupLayout,
    IdentityRequest,
    IdentityResult,
    timed,
)


class FaceStage:
    """Face analysis over typed messages: ``identify``, ``analyze``, ``analyze_group``, ``group_layout``, ``faces``
    and the identity scores of generated images."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        *,
        long_side: int = REFERENCE_LONG_SIDE,
        min_face_px: int = 1,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        replica: str = "",
    ) -> None:
        self.analyzer = analyzer
        self.long_side = long_side
        self.min_face_px = min_face_px
        self.limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self.replica = replica  # the Serve replica that runs this stage, for the response's ``replicas``

    def identify(self, request: IdentityRequest) -> IdentityResult:
        """One of several face photos: its chosen face and embedding."""
        timings = {}
        stage = f"face_photo_{request.photo_index}"
        if request.identity is not None:
            stage = f"face_{request.identity}_photo_{request.photo_index}"
        with timed(timings, stage):
            try:
                rgb = decode_image(request.image, **self.limits)
                chosen = identify(
                    self.analyzer,
                    rgb,
                    photo_index=request.photo_index,
                    photos=request.photos,
                    face_index=request.face_index,
                    min_face_px=self.min_face_px,
                )
            except InstantIDError as exc:
                if request.identity is None:
                    raise
                # Several people: say whose photo it was (same error type, so the same code and status).
                raise type(exc)(f"identities[{request.identity}]: {exc.message}") from exc
        if request.identity is not None:
            chosen = replace(chosen, identity=request.identity)
        return IdentityResult(chosen, timings, self.replica)

    def analyze(self, request: FaceRequest, *identified: IdentityResult) -> FaceResult:
        """The face condition: from ``request.face_image`` (one photo, analysed here) or from photos already
        analysed by :meth:`identify` (``identified``), plus the pose photo."""
        timings = {}
        identities = [result.chosen for result in identified]
        for result in identified:
            timings |= result.timings
        with timed(timings, "face"):
            if request.face_image is not None:
                rgb = decode_image(request.face_image, **self.limits)
                identities.append(
                    identify(self.analyzer, rgb, face_index=request.face_index, min_face_px=self.min_face_px)
                )
            pose = None
            if request.pose_image is not None:
                pose_rgb = decode_image(request.pose_image, **self.limits)
                pose = locate_pose(self.analyzer, pose_rgb, request.pose_face_index)
            condition = condition_from(
                identities,
                pose,
                identity_combine=request.identity_combine,
                width=request.width,
                height=request.height,
                long_side=self.long_side,
            )
        photo_replicas = {f"face_photo_{r.chosen.photo_index}": r.replica for r in identified}
        return FaceResult(condition, timings, self.replica, photo_replicas)

    def analyze_group(self, request: GroupFaceRequest, *identified: IdentityResult) -> FaceResult:
        """Several people: every photo was analysed by :meth:`identify`; this decides the layout (pose photo,
        regions or columns) and returns the condition with its ``identities``."""
        timings = {}
        for result in identified:
            timings |= result.timings
        with timed(timings, "face"):
            condition, _ = self._group(request, identified)
        photo_replicas = {f"face_{r.chosen.identity}_photo_{r.chosen.photo_index}": r.replica for r in identified}
        return FaceResult(condition, timings, self.replica, photo_replicas)

    def group_layout(
        self, request: GroupFaceRequest, include_keypoint_image: bool, *identified: IdentityResult
    ) -> GroupLayout:
        """``POST /v1/faces`` with identities: the layout :meth:`analyze_group` would decide, optionally its shared
        keypoint image (PNG), and the pose photo's faces."""
        condition, pose = self._group(request, identified)
        assert condition.identities is not None
        layout = GroupLayout(
            replace(
                condition, identities=[replace(p, embedding=np.zeros(0, np.float32)) for p in condition.identities]
            ),
            [replace(face, embedding=None) for face in pose.faces] if pose is not None else [],
        )
        if include_keypoint_image:
            canvas = shared_keypoint_image(
                [placed.keypoints for placed in condition.identities], condition.width, condition.height
            )
            layout.keypoint_image_png = encode_png(canvas)
        return layout

    def faces(
        self, image: bytes, include_keypoint_image: bool = False, width: int | None = None, height: int | None = None
    ) -> FaceListing:
        """Every face (largest first), the one generation would use, optionally its keypoint image (PNG) at the
        output size a generation of ``width`` x ``height`` (or the reference rule) would have."""
        rgb = decode_image(image, **self.limits)
        faces = self.analyzer.detect(rgb)
        listing = FaceListing(
            rgb.shape[1], rgb.shape[0], [replace(f, embedding=None) for f in faces], 0 if faces else None
        )
        if faces and include_keypoint_image:
            out_w, out_h, transform = output_size(rgb.shape[1], rgb.shape[0], width, height, self.long_side)
            listing.keypoint_image_png = encode_png(
                draw_keypoint_image(transform.apply_points(faces[0].kps), out_w, out_h)
            )
        return listing

    def score(self, output: DenoiseResult, face: FaceResult) -> list[float | None]:
        """Per generated image, how well it kept the identity: the cosine of its largest face with the identity it
        was conditioned on, None where no face is found (see
        :func:`~deployments.instantid.identity_score.identity_similarity`). Takes the denoiser's and this stage's
        results as they are, so a caller can pass both without fetching them."""
        return identity_similarities(self.analyzer, output.images, face.condition.embedding)

    def score_identities(self, output: DenoiseResult, face: FaceResult) -> list[list[RegionScore]]:
        """Several people: per generated image, each identity's best-matching face in its region and its cosine
        with that identity (see :func:`~deployments.instantid.identity_score.region_similarities`)."""
        identities = face.condition.identities
        assert identities is not None
        pairs = [(placed.embedding, placed.region) for placed in identities]
        return [region_similarities(self.analyzer, image, pairs) for image in output.images]

    def _group(
        self, request: GroupFaceRequest, identified: tuple[IdentityResult, ...]
    ) -> tuple[FaceCondition, PoseFaces | None]:
        """The multi-identity condition from the analysed photos (identity by identity, in photo order)."""
        results = iter(identified)
        identities = []
        for spec in request.identities:
            chosen = [next(results).chosen for _ in range(spec.photos)]
            identities.append(IdentityPhotos(chosen, spec.identity_combine, spec.region))
        pose = None
        if request.pose_image is not None:
            pose = locate_pose_faces(self.analyzer, decode_image(request.pose_image, **self.limits))
        condition = group_condition(
            identities, pose, width=request.width, height=request.height, long_side=self.long_side
        )
        return condition, pose


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image as PNG bytes."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
