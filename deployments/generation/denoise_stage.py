"""The denoise stage: a face condition, prompt embeddings and control inputs in, images out.

:func:`denoise_job` turns the upstream stages' results into the denoiser's job and :func:`denoise_result` the
images back into the message the store records; the Denoiser deployment runs them around its batching, and
:class:`DenoiseStage` around one in-process generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.denoiser import DenoiseJob, InstantIDDenoiser
from deployments.instantid.face_detail import FaceDetailPass, SmallFace
from deployments.instantid.hires import HiresPass
from deployments.instantid.loras import LoraAdapters
from deployments.instantid.params import GenerationParams

from .detail_stage import detail_inputs, detail_result
from .hires_stage import hires_inputs, hires_result
from .messages import (
    ControlMapsResult,
    DenoiseBatch,
    DenoiseResult,
    FaceResult,
    JobTicket,
    PromptResult,
    StageTiming,
    Timings,
    group_layout,
    timed,
)


def denoise_job(
    params: GenerationParams,
    face: FaceResult,
    prompt: PromptResult,
    controls: ControlMapsResult | None = None,
    on_step: Callable[..., bool] | None = None,
) -> DenoiseJob:
    """The denoiser's job for one request; ``params`` are sized to the face condition's output size."""
    condition = face.condition
    edit = face.edit
    init_image = controls.inputs.init_image if controls is not None else None
    return DenoiseJob(
        params,
        condition.embedding,
        condition.keypoints,
        condition.box,
        prompt.embeddings,
        control_maps=controls.inputs.maps if controls is not None else {},
        init_image=edit.init_image if edit is not None else init_image,
        inpaint_mask=edit.mask_image if edit is not None else None,
        on_step=on_step,
        identities=condition.identities,
    )


def denoise_result(
    params: GenerationParams,
    model: ModelChoice,
    face: FaceResult,
    prompt: PromptResult,
    controls: ControlMapsResult | None,
    images: Any,
    timings: Timings,
    *,
    arrived: float,
    batch: DenoiseBatch | None = None,
    replica: str = "",
) -> DenoiseResult:
    """What the store records about a finished job: its images, every stage's timing (``arrived``: when the job
    reached the denoiser, the start of its queue wait) and replica, the faces used and the batch it shared. An
    edit's generated crops are pasted back into its target here, so its images (and reported size) are the
    target's."""
    if face.edit is not None:
        images = np.stack([face.edit.paste(image) for image in images])
        params = params.sized(face.edit.target.shape[1], face.edit.target.shape[0])
    started = timings["denoise"].start
    waited = max(0.0, started - arrived)
    return DenoiseResult(
        images=images,
        params=params,
        model=model,
        face=replace(face.condition.face, embedding=None),
        faces=face.condition.used,
        prompt_chunks=prompt.embeddings.chunks,
        timings={
            **face.timings,
            **prompt.timings,
            **(controls.timings if controls is not None else {}),
            "denoise_queue": StageTiming(start=started - waited, end=started, seconds=waited),
            **timings,
        },
        replicas={
            "face": face.replica,
            **face.photo_replicas,
            "prompt": prompt.replica,
            **({"control_maps": controls.replica} if controls is not None else {}),
            "denoiser": replica,
        },
        batch=batch,
        layout=group_layout(face.condition),
    )


class DenoiseStage:
    """One base's denoiser and its UNet LoRA adapters, generating one request at a time."""

    def __init__(self, denoiser: InstantIDDenoiser, adapters: LoraAdapters) -> None:
        self.denoiser = denoiser
        self.adapters = adapters

    def generate(
        self,
        params: GenerationParams,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: ControlMapsResult | None = None,
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """The images of one request (``job`` is for the served stage's progress events; unused here)."""
        arrived = time.time()
        sized = params.sized(face.condition.width, face.condition.height)
        self.adapters.activate(model.loras)
        timings: Timings = {}
        with timed(timings, "denoise"):
            images = self.denoiser.generate([denoise_job(sized, face, prompt, controls)])[0]
        return denoise_result(sized, model, face, prompt, controls, images, timings, arrived=arrived)

    def refine(
        self,
        hires: HiresPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        controls: ControlMapsResult | None,
        first: DenoiseResult,
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """The hires pass over ``first``'s images: one image-to-image job at the scaled size, each image starting
        from its own upscaled first-pass image; the result carries both passes' timings."""
        params, scaled, inputs = hires_inputs(hires, first, face, controls)
        second = self.generate(params, model, scaled, prompt, inputs, job)
        return hires_result(first, second)

    def detail(
        self,
        detail: FaceDetailPass,
        model: ModelChoice,
        face: FaceResult,
        prompt: PromptResult,
        first: DenoiseResult,
        found: list[SmallFace],
        job: JobTicket | None = None,
    ) -> DenoiseResult:
        """The face detail pass over ``first``'s images: one edit job per face in ``found``, in order, each pasted
        back before the next starts; the result lists the faces repaired."""
        images = first.images.copy()
        passes = []
        for small in found:
            params, cropped = detail_inputs(detail, images[small.image], small, face, first.params)
            result = self.generate(params, model, cropped, prompt, None, job)
            images[small.image] = result.images[0]
            passes.append(result)
        return detail_result(first, images, passes, found)
