"""The hires pass as a stage: the first pass's result in, the second pass's inputs and, at the end, one result out.

:func:`hires_inputs` turns the first pass's images and the request's face condition and control inputs into the
second pass's: parameters at the scaled size, the condition with its keypoints and face box scaled, every first-pass
image upscaled as its own init image (one job: the denoiser starts each image from its own), and the extra
ControlNets' maps resized to the new size. :func:`hires_result` merges the two passes' results into the one the
store records: the second pass's images, size and batch; the first pass's timings beside the second's, which are
renamed ``denoise_hires*`` so the response tells the passes apart. The Denoiser deployment and the in-process
:class:`~.denoise_stage.DenoiseStage` both run these around their own denoising.
"""

from __future__ import annotations

import dataclasses

from deployments.instantid.control_inputs import ControlInputs
from deployments.instantid.hires import HiresPass, scaled_condition, upscaled
from deployments.instantid.params import GenerationParams

from .messages import ControlMapsResult, DenoiseResult, FaceResult

HIRES_STAGE = "hires"  # the job events' stage name of the second pass
_RENAMED = {"denoise": "denoise_hires", "denoise_queue": "denoise_hires_queue"}


def hires_inputs(
    hires: HiresPass, first: DenoiseResult, face: FaceResult, controls: ControlMapsResult | None
) -> tuple[GenerationParams, FaceResult, ControlMapsResult]:
    """The second pass's sized parameters, face condition and control inputs (with the upscaled init images).

    The condition keeps the first pass's identity embedding, so the resampler makes the same face tokens; an edit
    never gets here (the plan refuses one with a hires pass)."""
    params = hires.params(first.params)
    width, height = params.width, params.height
    assert width is not None and height is not None
    condition = scaled_condition(face.condition, width, height)
    maps = {} if controls is None else controls.inputs.maps
    maps = {name: upscaled(image[None], width, height)[0] for name, image in maps.items()}
    inputs = ControlInputs(
        width,
        height,
        maps=maps,
        sources={} if controls is None else dict(controls.inputs.sources),
        init_image=upscaled(first.images, width, height),
    )
    timings = {} if controls is None else controls.timings
    replica = "" if controls is None else controls.replica
    return params, dataclasses.replace(face, condition=condition), ControlMapsResult(inputs, timings, replica)


def hires_result(first: DenoiseResult, second: DenoiseResult) -> DenoiseResult:
    """One result of the two passes: the second's images, parameters (the scaled size) and batch; every timing
    of the first plus the second's denoising ones as ``denoise_hires``, ``denoise_hires_queue``, ...; the second
    pass's denoiser replica as ``denoiser_hires``."""
    hires_timings = {
        _RENAMED.get(name, name.replace("denoise_", "denoise_hires_", 1)): timing
        for name, timing in second.timings.items()
        if name.startswith("denoise")
    }
    return dataclasses.replace(
        second,
        face=first.face,
        faces=first.faces,
        layout=first.layout,
        timings={**first.timings, **hires_timings},
        replicas={**first.replicas, "denoiser_hires": second.replicas.get("denoiser", "")},
    )
