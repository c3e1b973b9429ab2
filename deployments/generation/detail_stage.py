"""The face detail pass as a stage: the first pass's result and the small faces found on it in, one result out.

:func:`detail_inputs` turns one small face of one image into an edit of that image: the repaint mask (the face's
box grown by the padding), the crop generated at portrait resolution, and a face condition with the request's
identity and the detector's keypoints for that face mapped into the crop. Each face is its own denoiser job (crops
differ in size) and starts from the image as the faces before it left it, so overlapping masks compose.
:func:`detail_result` merges the passes into the one result the store records: the first pass's record with the
repaired images, the faces repaired, and the detail jobs' denoising timings as ``denoise_detail``. The Denoiser
deployment and the in-process :class:`~.denoise_stage.DenoiseStage` both run these around their own denoising.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deployments.instantid.editing import PreparedEdit
from deployments.instantid.face_detail import FaceDetailPass, SmallFace, detail_mask
from deployments.instantid.params import GenerationParams

from .messages import DenoiseResult, FaceResult, StageTiming

DETAIL_STAGE = "detail"  # the job events' stage name of the face detail pass


def detail_inputs(
    detail: FaceDetailPass, image: np.ndarray, small: SmallFace, face: FaceResult, first: GenerationParams
) -> tuple[GenerationParams, FaceResult]:
    """One face's job: its parameters (the first pass's prompt, guidance and scheduler at the crop's size, one
    image, ``detail.strength`` of ``detail.steps``, seed + the image's index, IdentityNet alone) and its face
    condition (the identity of the first pass, with several people the face's owner's; this face's keypoints and
    box in crop pixels; the crop's edit for the paste-back)."""
    height, width = image.shape[:2]
    within = face.edit.alpha > 0 if face.edit is not None else None  # an edit's faces stay inside its mask
    mask = detail_mask(small, width, height, detail.padding, within)
    resolution = detail.resolution or max(first.width or width, first.height or height)
    edit = PreparedEdit.make(image, mask, detail.blur, resolution)
    transform = edit.region.transform()
    condition = face.condition
    if small.identity is not None:  # several people: this face is repainted as the person whose region it is in
        owner = condition.identities[small.identity]
        condition = dataclasses.replace(condition, embedding=owner.embedding, identities=None, layout=None)
    condition = dataclasses.replace(
        condition,
        keypoints=transform.apply_points(small.keypoints),
        box=transform.apply_box(small.box),
        width=edit.region.width,
        height=edit.region.height,
    )
    params = dataclasses.replace(
        first,
        width=edit.region.width,
        height=edit.region.height,
        num_images=1,
        identities=1,
        seed=first.seed + small.image,
        num_inference_steps=detail.steps,
        strength=detail.strength,
        controlnets=(),  # the extra ControlNets' maps are of the whole picture, not of a face's crop
    )
    return params, dataclasses.replace(face, condition=condition, edit=edit)


def detail_result(
    first: DenoiseResult, images: np.ndarray, passes: list[DenoiseResult], repaired: list[SmallFace]
) -> DenoiseResult:
    """One result: ``first`` with the repaired ``images``, the faces repaired, and ``denoise_detail`` spanning the
    detail jobs (``denoise_detail_queue``: their summed waits); the denoiser replica of the last as
    ``denoiser_detail``."""
    timings = dict(first.timings)
    if passes:
        runs = [result.timings["denoise"] for result in passes]
        waits = [result.timings["denoise_queue"] for result in passes]
        start, end = runs[0].start, runs[-1].end
        timings["denoise_detail"] = StageTiming(start=start, end=end, seconds=end - start)
        timings["denoise_detail_queue"] = StageTiming(
            start=waits[0].start, end=waits[-1].end, seconds=sum(wait.seconds for wait in waits)
        )
    replicas = dict(first.replicas)
    if passes:
        replicas["denoiser_detail"] = passes[-1].replicas.get("denoiser", "")
    return dataclasses.replace(first, images=images, timings=timings, replicas=replicas, repaired=repaired)
