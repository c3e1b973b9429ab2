"""A generation, top to bottom: the one description of the flow, run by the ingress on deployment handles and by
the in-process pipeline on local stage objects.

:func:`generate` reads like a diffusers pipeline's ``__call__``, in numbered steps. It never waits between steps:
each stage is started with the previous stages' results as :class:`Stages` returns them (a Serve response that the
next deployment resolves itself, or a plain value in process), so face analysis, prompt encoding and the control
maps run side by side when served, and no image passes through the ingress.
"""

from __future__ import annotations

from typing import Any, Protocol

from deployments.instantid.catalogue import ModelChoice
from deployments.instantid.face_detail import FaceDetailPass
from deployments.instantid.hires import HiresPass
from deployments.instantid.params import GenerationParams

from .messages import (
    ControlMapsRequest,
    FaceRequest,
    GenerationRecord,
    GroupFaceRequest,
    IdentityRequest,
    JobTicket,
    PromptRequest,
)
from .plan import GenerationInputs, GenerationPlan


class Stages(Protocol):
    """Where each stage runs. Every method starts its stage and returns its result, or something the next stage
    accepts in its place (a Serve ``DeploymentResponse``)."""

    def identify(self, request: IdentityRequest) -> Any: ...

    def analyze(self, request: FaceRequest, *identified: Any) -> Any: ...

    def analyze_group(self, request: GroupFaceRequest, *identified: Any) -> Any: ...

    def encode(self, request: PromptRequest) -> Any: ...

    def prepare_controls(self, request: ControlMapsRequest) -> Any: ...

    def denoise(
        self, params: GenerationParams, model: ModelChoice, face: Any, prompt: Any, controls: Any, job: JobTicket | None
    ) -> Any: ...

    def refine(
        self,
        hires: HiresPass,
        model: ModelChoice,
        face: Any,
        prompt: Any,
        controls: Any,
        first: Any,
        job: JobTicket | None,
    ) -> Any: ...

    def find_small_faces(self, detail: FaceDetailPass, output: Any, face: Any) -> Any: ...

    def detail(
        self,
        detail: FaceDetailPass,
        model: ModelChoice,
        face: Any,
        prompt: Any,
        first: Any,
        found: Any,
        job: JobTicket | None,
    ) -> Any: ...

    def score(self, output: Any, face: Any) -> Any: ...

    def score_repaired(self, output: Any, face: Any) -> Any: ...

    def score_regions(self, output: Any, face: Any) -> Any: ...

    def check_safety(self, output: Any) -> Any: ...

    def store(
        self,
        plan: GenerationPlan,
        record: GenerationRecord,
        output: Any,
        scores: Any,
        region_scores: Any,
        kept: dict[str, bytes] | None,
        safety: Any = None,
        repaired: Any = None,
    ) -> Any: ...


def generate(
    plan: GenerationPlan,
    inputs: GenerationInputs,
    stages: Stages,
    record: GenerationRecord,
    *,
    keep_inputs: bool = False,
) -> Any:
    """Run ``plan`` on ``inputs``: what ``stages.store`` returns (served: the stored generation; in process: the
    images). ``keep_inputs``: store the request's pictures beside the images."""
    # 1. The face condition: photos are identified one call each (served: spread over the replicas), then one call
    #    combines them with the pose photo's geometry and fixes the output size.
    identified = [
        stages.identify(item) if isinstance(item, IdentityRequest) else item for item in plan.identified(inputs)
    ]
    face_request = plan.face_request(inputs)
    if isinstance(face_request, GroupFaceRequest):
        face = stages.analyze_group(face_request, *identified)
    else:
        face = stages.analyze(face_request, *identified)

    # 2. The prompt embeddings, beside the face stage (served: routed to a replica that holds the base warm).
    prompt = stages.encode(plan.prompt_request())

    # 3. The extra ControlNets' maps and the image-to-image start, beside both, only when the request uses them.
    controls_request = plan.control_maps_request(inputs)
    controls = stages.prepare_controls(controls_request) if controls_request is not None else None

    # 4. Denoising, fed with the three as they come; the output size is the face stage's.
    output = stages.denoise(plan.params, plan.model, face, prompt, controls, record.job)

    # 4b. The hires pass, when asked for: a second denoising job that starts once the first has finished (it needs
    #     the first pass's images), each image upscaled and refined image-to-image at the larger size.
    if plan.hires is not None:
        output = stages.refine(plan.hires, plan.model, face, prompt, controls, output, record.job)

    # 4c. The face detail pass, when asked for: the face stage finds the small faces of the images so far, then
    #     the denoiser repaints each at portrait resolution as an edit of its image (one job per face, in order).
    if plan.face_detail is not None:
        found = stages.find_small_faces(plan.face_detail, output, face)
        output = stages.detail(plan.face_detail, plan.model, face, prompt, output, found, record.job)

    # 5. Each image's identity score, by the face stage's recognition model (several people: per region); with a
    #    face detail pass, each repaired face's score after the repair too.
    scores = stages.score(output, face) if plan.people is None else None
    region_scores = stages.score_regions(output, face) if plan.people is not None else None
    repaired = stages.score_repaired(output, face) if plan.face_detail is not None else None

    # 6. Each image's safety verdict, beside the scores (None when the deployment's policy is off); the store applies
    #    it before encoding anything, so a blurred or refused image's original is never stored.
    safety = stages.check_safety(output)

    # 7. The images, their scores, verdicts and meta.json, stored (served: confirmed in S3 before anyone is told).
    kept = plan.kept_inputs(inputs) if keep_inputs else None
    return stages.store(plan, record, output, scores, region_scores, kept, safety, repaired)
