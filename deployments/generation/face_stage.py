"""The face stage: photos in, the face condition out; and the identity score of finished images.

The FaceAnalyzer deployment serves exactly this class (it adds only its replica id), and the in-process pipeline
calls it directly. Several photos are analysed one ``identify`` call each (a deployment spreads them over its
replicas); one ``analyze`` (one person) or ``analyze_group`` (several people) call then combines them with the pose
photo's geometry.
"""

from __future__ import annotations

import io
from dataclasses import replace

import cv2
import numpy as np
from PIL import Image

from deployments.instantid.conditioning import choose_face, condition_from, identify, output_size, pose_face
from deployments.instantid.editing import PreparedEdit, face_mask, uploaded_mask
from deployments.instantid.errors import InstantIDError, NoFaceError
from deployments.instantid.face_data import ChosenFace, FaceCondition
from deployments.instantid.face_detail import FaceDetailPass, Owners, SmallFace, scored_after, small_faces
from deployments.instantid.faces import FaceAnalyzer
from deployments.instantid.group import IdentityPhotos, PoseFaces, group_condition
from deployments.instantid.hires import hires_size
from deployments.instantid.identity import combine_embeddings
from deployments.instantid.identity_score import RegionScore, identity_similarities, region_similarities
from deployments.instantid.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from deployments.instantid.keypoints import REFERENCE_LONG_SIDE, draw_keypoint_image
from deployments.instantid.regions import shared_keypoint_image

from .face_cache import FaceCache
from .messages import (
    DenoiseResult,
    EditRequest,
    Enrolment,
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
        cache: FaceCache | None = None,
    ) -> None:
        self.analyzer = analyzer
        self.long_side = long_side
        self.min_face_px = min_face_px
        self.limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self.replica = replica  # the Serve replica that runs this stage, for the response's ``replicas``
        self.cache = cache if cache is not None else FaceCache(max_entries=0)  # recent photos' analyses

    def identify(self, request: IdentityRequest) -> IdentityResult:
        """One of several face photos: its chosen face and embedding."""
        timings = {}
        stage = f"face_photo_{request.photo_index}"
        if request.identity is not None:
            stage = f"face_{request.identity}_photo_{request.photo_index}"
        thumbnail = None
        with timed(timings, stage):
            try:
                chosen, rgb = self._identified(request.image, request.photo_index, request.photos, request.face_index)
                if request.thumbnail:
                    rgb = rgb if rgb is not None else decode_image(request.image, **self.limits)
                    thumbnail = face_thumbnail(rgb, chosen.face.bbox)
            except InstantIDError as exc:
                if request.identity is None:
                    raise
                # Several people: say whose photo it was (same error type, so the same code and status).
                raise type(exc)(f"identities[{request.identity}]: {exc.message}") from exc
        if request.identity is not None:
            chosen = replace(chosen, identity=request.identity)
        return IdentityResult(chosen, timings, self.replica, thumbnail)

    def enrol(self, identity_combine: str, *identified: IdentityResult) -> Enrolment:
        """A saved identity's analysis: the photos (analysed by :meth:`identify`, the first with a thumbnail) and
        their combined embedding, as a generation from the same photos would combine them."""
        chosen = [result.chosen for result in identified]
        embedding = combine_embeddings([c.face.embedding for c in chosen], identity_combine)
        thumbnail = identified[0].thumbnail
        assert thumbnail is not None, "the first photo is analysed with its thumbnail"
        return Enrolment(chosen, np.asarray(embedding, dtype=np.float32), thumbnail)

    def _identified(self, image: bytes, photo_index: int, photos: int, face_index: int) -> tuple:
        """The chosen face (with its embedding) of one identity photo, from the cache when the same photo was
        analysed with the same options recently; and the decoded photo when it had to be decoded."""
        key = ("identify", self.cache.photo_key(image), face_index, self.min_face_px)
        found = self.cache.get(key)
        if found is not None:
            return replace(found, photo_index=photo_index, cached=True), None
        rgb = decode_image(image, **self.limits)
        chosen = identify(
            self.analyzer,
            rgb,
            photo_index=photo_index,
            photos=photos,
            face_index=face_index,
            min_face_px=self.min_face_px,
        )
        self.cache.put(key, replace(chosen, photo_index=0))
        return chosen, rgb

    def _detected(self, image: bytes) -> PoseFaces:
        """Every face of a photo (largest first) and its size, from the cache when the photo was seen recently."""
        key = ("detect", self.cache.photo_key(image))
        found = self.cache.get(key)
        if found is None:
            rgb = decode_image(image, **self.limits)
            found = PoseFaces(self.analyzer.detect(rgb), rgb.shape[1], rgb.shape[0])
            self.cache.put(key, PoseFaces(list(found.faces), found.width, found.height))
        return PoseFaces(list(found.faces), found.width, found.height)

    def analyze(self, request: FaceRequest, *identified: IdentityResult) -> FaceResult:
        """The face condition: from ``request.face_image`` (one photo, analysed here) or from photos already
        analysed by :meth:`identify` (``identified``), plus the pose photo."""
        timings = {}
        identities = [result.chosen for result in identified]
        for result in identified:
            timings |= result.timings
        with timed(timings, "face"):
            if request.face_image is not None:
                identities.append(self._identified(request.face_image, 0, 1, request.face_index)[0])
            pose = None
            if request.pose_image is not None:
                detected = self._detected(request.pose_image)
                pose = pose_face(detected.faces, detected.width, detected.height, request.pose_face_index)
            edit, target_face = self._edit(request.edit) if request.edit is not None else (None, None)
            condition = condition_from(
                identities,
                pose,
                identity_combine=request.identity_combine,
                width=request.width if edit is None else edit.region.width,
                height=request.height if edit is None else edit.region.height,
                long_side=self.long_side,
            )
            if edit is not None and target_face is not None and pose is None:  # the target's face sets the pose
                transform = edit.region.transform()
                condition = replace(
                    condition,
                    keypoints=transform.apply_points(target_face.face.kps),
                    box=transform.apply_box(target_face.face.bbox),
                    pose_face=target_face.face,
                    used=[*condition.used, target_face],
                )
        if request.hires_scale is not None:  # refused here, before the first pass spends its steps
            hires_size(condition.width, condition.height, request.hires_scale)
        photo_replicas = {f"face_photo_{r.chosen.photo_index}": r.replica for r in identified}
        return FaceResult(condition, timings, self.replica, photo_replicas, edit)

    def _edit(self, request: EditRequest) -> tuple[PreparedEdit, ChosenFace]:
        """An edit's target: its chosen face (a 422 without one, or for an index out of range), the repaint mask
        (the uploaded one, else the face's box grown by the padding) and the crop generated at portrait size."""
        target = decode_image(request.target_image, **self.limits)
        height, width = target.shape[:2]
        faces = self.analyzer.detect(target)
        face = choose_face(faces, request.target_face_index, "the target image", "target_face_index")
        chosen = ChosenFace(replace(face, embedding=None), "target", 0, request.target_face_index, width, height)
        if request.mask_image is not None:
            mask = uploaded_mask(decode_image(request.mask_image, **self.limits), width, height)
        else:
            mask = face_mask(face.bbox, width, height, request.mask_padding)
        return PreparedEdit.make(target, mask, request.mask_blur, request.edit_resolution), chosen

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

    def keypoint_image(
        self, kps: np.ndarray, photo_width: int, photo_height: int, width: int | None = None, height: int | None = None
    ) -> bytes:
        """The keypoint image (PNG) of stored keypoints ``kps`` of a ``photo_width`` x ``photo_height`` photo, as
        :meth:`faces` draws it for a photo: a saved identity's, without the photo."""
        out_w, out_h, transform = output_size(photo_width, photo_height, width, height, self.long_side)
        return encode_png(draw_keypoint_image(transform.apply_points(np.asarray(kps, np.float32)), out_w, out_h))

    def score(self, output: DenoiseResult, face: FaceResult) -> list[float | None]:
        """Per generated image, how well it kept the identity: the cosine of its largest face with the identity it
        was conditioned on, None where no face is found (see
        :func:`~deployments.instantid.identity_score.identity_similarity`). Takes the denoiser's and this stage's
        results as they are, so a caller can pass both without fetching them."""
        return identity_similarities(self.analyzer, output.images, face.condition.embedding)

    def find_small_faces(self, detail: FaceDetailPass, output: DenoiseResult, face: FaceResult) -> list[SmallFace]:
        """The face detail pass's faces: each face of the first pass's images smaller than ``detail.min_face`` (for
        an edit, whose box overlaps its repaint mask), with its identity score before the repair."""
        within = face.edit.alpha > 0 if face.edit is not None else None
        return small_faces(self.analyzer, output.images, owners(face.condition), detail, within)

    def score_repaired(self, output: DenoiseResult, face: FaceResult) -> list[dict]:
        """Each face the detail pass repainted, with its identity score in the finished image (as JSON)."""
        repaired = scored_after(self.analyzer, output.images, owners(face.condition), output.repaired or [])
        return [small.to_dict() for small in repaired]

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
            pose = self._detected(request.pose_image)
            if not pose.faces:
                raise NoFaceError("no face detected in the pose image")
        condition = group_condition(
            identities, pose, width=request.width, height=request.height, long_side=self.long_side
        )
        return condition, pose


def owners(condition: FaceCondition) -> Owners:
    """Whose the faces of a generation can be: its one identity, or each person's with the region they own."""
    if condition.identities is None:
        return Owners([condition.embedding])
    return Owners([p.embedding for p in condition.identities], [p.region for p in condition.identities])


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image as PNG bytes."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


THUMBNAIL_PX = 128


def face_thumbnail(rgb: np.ndarray, box: np.ndarray) -> bytes:
    """A square ``THUMBNAIL_PX`` WebP of the face in ``box`` with some context (1.6 x the box), for a saved
    identity's listing: small enough to say who it is, nothing more of the photo."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = 1.6 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    height, width = rgb.shape[:2]
    left, top = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    right, bottom = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    crop = Image.fromarray(np.ascontiguousarray(rgb[top:bottom, left:right]))
    crop.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.LANCZOS)
    buffer = io.BytesIO()
    crop.save(buffer, format="WEBP", quality=85)
    return buffer.getvalue()
