"""A request resolved once: the plan that every path runs (HTTP, handle, jobs, the CLI, the in-process pipeline).

:func:`plan_generation` takes the request's options, what pictures it brings (before they are loaded) and what the
deployment offers, checks every rule that spans fields, pictures, the catalogue and the deployment, and returns a
:class:`GenerationPlan`: the denoiser's parameters, the models, the styled prompts, where each control map comes
from and the effective parameters the response and ``meta.json`` report. The plan then maps the loaded pictures to
each stage's input message; ``flow.py`` runs those stages in order.

No Ray and nothing heavy: the ingress builds plans without the model stack.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from deployments.instantid.catalogue import ModelCatalogue, ModelChoice
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.face_detail import FaceDetailPass
from deployments.instantid.hires import HiresPass
from deployments.instantid.options import (
    COMPUTED_MAPS,
    DEFAULT_IDENTITY_COMBINE,
    EDIT_OPTIONS,
    MAX_FACE_PHOTOS,
    MAX_IDENTITIES,
    MAX_SEED,
    MIN_IDENTITIES,
    GenerationOptions,
    IdentityCombine,
)
from deployments.instantid.params import GenerationParams
from deployments.instantid.regions import Box, check_regions
from deployments.instantid.styles import apply_style

from .messages import (
    ControlMapsRequest,
    EditRequest,
    FaceRequest,
    GenerationRecord,
    GroupFaceRequest,
    IdentityRequest,
    IdentityResult,
    IdentitySpec,
    PromptRequest,
)

CONTROL_IMAGE_PART = "control_image_{}"  # how a ready-made map is named where it was given (multipart part)
# Options that describe one person's photos: with several people each identity has its own.
SINGLE_PERSON_OPTIONS = ("face_index", "identity_combine", "pose_face_index")


@dataclass(frozen=True)
class PersonGiven:
    """One person of a multi-identity request: how many photos, which face of each, how they combine, and the
    region of the output they own (output pixels), if given."""

    photos: int
    face_index: int = 0
    identity_combine: IdentityCombine = DEFAULT_IDENTITY_COMBINE
    region: Box | None = None
    saved_identity: str | None = None  # a saved identity's id instead of photos


@dataclass(frozen=True)
class InputsGiven:
    """Which pictures a request brings: what the rules need to know before any picture is loaded."""

    face_photos: int = 0  # one person's photos (0 with several people)
    people: tuple[PersonGiven, ...] | None = None  # several people
    pose: bool = False
    init: bool = False
    maps: frozenset[str] = frozenset()  # extra ControlNets with a ready-made map
    saved_identity: str | None = None  # one person, as a saved identity's id instead of photos
    target: bool = False  # an edit: the photo to edit
    mask: bool = False  # ... and its repaint mask

    @property
    def saved_identities(self) -> list[str]:
        """The saved identities the request uses, in order."""
        if self.people is not None:
            return [p.saved_identity for p in self.people if p.saved_identity is not None]
        return [self.saved_identity] if self.saved_identity is not None else []


@dataclass(frozen=True)
class PersonInput:
    """One person of a multi-identity request: their photos (encoded bytes) and the choices :class:`PersonGiven`
    describes."""

    photos: tuple[bytes, ...]
    face_index: int = 0
    identity_combine: IdentityCombine = DEFAULT_IDENTITY_COMBINE
    region: Box | None = None
    known: tuple[IdentityResult, ...] = ()  # a saved identity's faces, analysed when it was enrolled
    saved_identity: str | None = None

    def given(self) -> PersonGiven:
        photos = len(self.photos) + len(self.known)
        return PersonGiven(photos, self.face_index, self.identity_combine, self.region, self.saved_identity)


@dataclass(frozen=True)
class GenerationInputs:
    """A request's pictures as encoded bytes (PNG, JPEG or WebP), by role; each stage decodes what it reads."""

    faces: tuple[bytes, ...] = ()  # one person's photos
    people: tuple[PersonInput, ...] | None = None  # several people
    pose: bytes | None = None
    init: bytes | None = None
    maps: Mapping[str, bytes] = field(default_factory=dict)  # ready-made maps, by ControlNet
    known: tuple[IdentityResult, ...] = ()  # one person as a saved identity: the faces its record holds
    saved_identity: str | None = None
    target: bytes | None = None  # an edit: the photo to edit
    mask: bytes | None = None  # ... and its repaint mask (white repaints), the target's size

    def given(self) -> InputsGiven:
        """What these inputs bring."""
        people = None if self.people is None else tuple(person.given() for person in self.people)
        return InputsGiven(
            len(self.faces) + len(self.known),
            people,
            self.pose is not None,
            self.init is not None,
            frozenset(self.maps),
            self.saved_identity,
            self.target is not None,
            self.mask is not None,
        )

    @property
    def photos(self) -> list[bytes]:
        """Every identity photo in order (with several people: identity by identity)."""
        if self.people is not None:
            return [photo for person in self.people for photo in person.photos]
        return list(self.faces)


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request, mapped once to every stage's input; built by :func:`plan_generation`."""

    options: GenerationOptions
    given: InputsGiven
    params: GenerationParams  # the output size is fixed later, by the face stage
    model: ModelChoice
    prompt: str  # after the style template
    negative_prompt: str | None
    map_sources: dict[str, str]  # active extra ControlNet -> "uploaded" or "computed from <photo>"
    hires: HiresPass | None = None  # a second, image-to-image pass at a larger size
    face_detail: FaceDetailPass | None = None  # each small face of the result repainted at portrait resolution

    @property
    def people(self) -> tuple[PersonGiven, ...] | None:
        return self.given.people

    def loaded(self, inputs: GenerationInputs, identity_combine: str | None = None) -> GenerationPlan:
        """The plan with what loading the pictures found: each saved identity's photo count, and, for one person
        as a saved identity, how its record combines the photos (the request could not say)."""
        options = self.options
        if identity_combine is not None:
            options = options.model_copy(update={"identity_combine": identity_combine})
        return replace(self, options=options, given=inputs.given())

    @property
    def source_name(self) -> str:
        """The photo the keypoints (and computed maps) come from."""
        return "pose_image" if self.given.pose else "face_image"

    @property
    def uses_control_inputs(self) -> bool:
        """Whether the control-maps stage runs: an active extra ControlNet or an init image."""
        return bool(self.map_sources) or self.given.init

    # ------------------------------------------------------------------------------------ what is reported
    def effective_parameters(self) -> dict[str, Any]:
        """The request's parameters as they ran: defaults and the mode's preset filled in, the seed drawn, each
        extra ControlNet with its window and where its map came from (the size is the face stage's; the response
        adds it)."""
        params = self.params
        effective = {
            **self.options.model_dump(),
            "seed": params.seed,
            "base_model": self.model.base,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "scheduler": params.scheduler,
            "controlnets": [{**asdict(c), "map": self.map_sources[c.name]} for c in params.active_controlnets],
            "strength": params.strength,
            "denoising_steps": params.denoising_steps,
            "hires": None if self.hires is None else self.hires.describe(),
            "face_detail": None if self.face_detail is None else self.face_detail.describe(),
        }
        if self.people is not None:  # the single-person face fields do not apply: each identity has its own
            for name in SINGLE_PERSON_OPTIONS:
                effective.pop(name, None)
            effective["identities"] = [
                {
                    "index": i,
                    "photos": person.photos,
                    "face_index": person.face_index,
                    "identity_combine": person.identity_combine,
                    "region": None if person.region is None else list(person.region),
                    **({"identity_id": person.saved_identity} if person.saved_identity is not None else {}),
                }
                for i, person in enumerate(self.people)
            ]
        elif self.given.saved_identity is not None:  # the record fixed each photo's face and how they combine
            effective.pop("face_index", None)
            effective["identity_id"] = self.given.saved_identity
        return effective

    def record(
        self,
        generation_id: str,
        request_id: str,
        owner: str,
        *,
        models: dict[str, Any],
        inputs_stored: bool,
        job_id: str | None = None,
        job_attempt: int = 1,
    ) -> GenerationRecord:
        """What meta.json records about the request (the store adds what the stages made)."""
        return GenerationRecord(
            id=generation_id,
            request_id=request_id,
            owner=owner,
            created_at=datetime.now(timezone.utc).isoformat(),
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            parameters=self.effective_parameters(),
            pose_image_given=self.given.pose,
            face_photos=self.given.face_photos if self.people is None else sum(p.photos for p in self.people),
            identity_ids=self.given.saved_identities,
            job_id=job_id,
            job_attempt=job_attempt,
            inputs_stored=inputs_stored,
            models=models,
            init_image_given=self.given.init,
        )

    # ------------------------------------------------------------------------------------ each stage's input
    def identified(self, inputs: GenerationInputs) -> list[IdentityRequest | IdentityResult]:
        """What the face condition is made of, in photo order: photos to analyse one by one (spread over the face
        stage's replicas) and faces already analysed (a saved identity's); a single photo is analysed inside
        ``face_request`` instead."""
        if inputs.people is not None:
            return identify_people(inputs.people)
        if inputs.known:
            return list(inputs.known)
        if len(inputs.faces) == 1:
            return []
        return [
            IdentityRequest(image, i, len(inputs.faces), self.options.face_index)
            for i, image in enumerate(inputs.faces)
        ]

    def face_request(self, inputs: GenerationInputs) -> FaceRequest | GroupFaceRequest:
        """The face condition's request; what :meth:`identified` lists comes with it."""
        options = self.options
        if self.people is not None:
            return GroupFaceRequest(people_specs(self.people), inputs.pose, options.width, options.height)
        edit = None
        if inputs.target is not None:
            edit = EditRequest(
                inputs.target,
                inputs.mask,
                options.target_face_index,
                options.mask_padding,
                options.mask_blur,
                options.edit_resolution,
            )
        return FaceRequest(
            inputs.faces[0] if len(inputs.faces) == 1 and not inputs.known else None,
            inputs.pose,
            options.width,
            options.height,
            face_index=options.face_index,
            pose_face_index=options.pose_face_index,
            identity_combine=options.identity_combine,
            edit=edit,
            hires_scale=None if self.hires is None else self.hires.scale,
        )

    def prompt_request(self) -> PromptRequest:
        return PromptRequest(self.prompt, self.negative_prompt, self.params.do_classifier_free_guidance, self.model)

    def control_maps_request(self, inputs: GenerationInputs) -> ControlMapsRequest | None:
        """The maps to compute, the uploaded ones and the init image, or None when the request uses none."""
        if not self.uses_control_inputs:
            return None
        uploaded = {name: inputs.maps[name] for name, source in self.map_sources.items() if source == "uploaded"}
        return ControlMapsRequest(
            inputs.pose if inputs.pose is not None else inputs.photos[0],
            self.source_name,
            self.options.width,
            self.options.height,
            compute=tuple(name for name in sorted(self.map_sources) if name not in uploaded),
            uploaded=uploaded,
            canny_low=self.options.canny_low,
            canny_high=self.options.canny_high,
            init_image=inputs.init,
        )

    def kept_inputs(self, inputs: GenerationInputs) -> dict[str, bytes]:
        """The request's pictures under the names ``store_inputs`` keeps them as."""
        if inputs.people is not None:
            kept = {
                f"identity-{i}-{j}": data for i, photos in enumerate(inputs.people) for j, data in enumerate(photos)
            }
        elif len(inputs.faces) == 1:
            kept = {"face": inputs.faces[0]}
        else:
            kept = {f"face-{i}": data for i, data in enumerate(inputs.faces)}
        kept |= {"pose": inputs.pose} if inputs.pose is not None else {}
        kept |= {"init": inputs.init} if inputs.init is not None else {}
        kept |= {"target": inputs.target} if inputs.target is not None else {}
        kept |= {"mask": inputs.mask} if inputs.mask is not None else {}
        kept |= {f"control-{name}": inputs.maps[name] for name, src in self.map_sources.items() if src == "uploaded"}
        return kept


def identify_people(people: tuple[PersonInput, ...]) -> list[IdentityRequest | IdentityResult]:
    """Several people's faces, identity by identity in photo order: an ``identify`` request per photo sent, or the
    faces of a saved identity as its record holds them."""
    identified: list[IdentityRequest | IdentityResult] = []
    for i, person in enumerate(people):
        identified += [replace(result, chosen=replace(result.chosen, identity=i)) for result in person.known]
        identified += [
            IdentityRequest(image, j, len(person.photos), person.face_index, identity=i)
            for j, image in enumerate(person.photos)
        ]
    return identified


def people_specs(people: tuple[PersonGiven, ...]) -> list[IdentitySpec]:
    """What the face stage needs of each person to combine their analysed photos."""
    return [IdentitySpec(p.photos, p.identity_combine, p.region) for p in people]


def resolved_seed(options: GenerationOptions) -> int:
    """The given seed, or a fresh random one (returned to the client so it can reproduce the image)."""
    return options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)


def plan_generation(
    options: GenerationOptions,
    given: InputsGiven,
    catalogue: ModelCatalogue,
    controlnets: tuple[str, ...] | list[str],
) -> GenerationPlan:
    """Check every rule that spans the options, the pictures given, the catalogue and the deployment (its loaded
    extra ``controlnets``), then resolve the request (a seed is drawn when it has none): the one place these rules
    live."""
    check_inputs(options, given)
    model, preset = catalogue.choose(options.base_model, [(c.name, c.scale) for c in options.loras], options.mode)
    if catalogue.base_models[model.base].inpainting and not given.target:
        raise InvalidParameterError(
            f"base_model {model.base!r} is an inpainting model: it only edits a photo (give target_image)"
        )
    people = len(given.people) if given.people is not None else 1
    params = GenerationParams.from_options(
        options, resolved_seed(options), preset, img2img=given.init, edit=given.target, identities=people
    )
    for setting in params.controlnets:
        if setting.name not in controlnets:
            available = ", ".join(controlnets) or "none"
            raise InvalidParameterError(f"this deployment has no {setting.name} ControlNet; available: {available}")
    source = "pose_image" if given.pose else "face_image"
    map_sources = {
        c.name: "uploaded" if c.name in given.maps else f"computed from {source}" for c in params.active_controlnets
    }
    for name, where in map_sources.items():
        if where != "uploaded" and name not in COMPUTED_MAPS:
            raise InvalidParameterError(
                f"the {name} ControlNet needs a ready-made map ({CONTROL_IMAGE_PART.format(name)} "
                f"or controlnets[].image_b64/image_uri): only {' and '.join(COMPUTED_MAPS)} maps are computed"
            )
    if given.saved_identity is not None and not given.pose and any(w != "uploaded" for w in map_sources.values()):
        raise InvalidParameterError(
            "with identity_id, computed control maps need a pose_image (a saved identity keeps no photo to compute "
            "them from); give pose_image or upload the maps"
        )
    if given.people is not None and not given.pose and any(w != "uploaded" for w in map_sources.values()):
        raise InvalidParameterError(
            "with identities, computed control maps need a pose_image (the faces are placed by the layout, not "
            "where they are in the identity photos); give pose_image or upload the maps"
        )
    if given.target and params.active_controlnets:
        raise InvalidParameterError("extra ControlNets are not available with target_image (an edit) yet")
    if params.strength is not None and params.denoising_steps == 0:
        name = "edit_strength" if given.target else "strength"
        raise InvalidParameterError(
            f"{name} {params.strength} leaves no denoising step of {params.num_inference_steps}: "
            "int(num_inference_steps x strength) must be at least 1"
        )
    prompt, negative = apply_style(options.style, options.prompt, options.negative_prompt)
    hires, detail = hires_pass(options, params), face_detail_pass(options, params, given)
    return GenerationPlan(options, given, params, model, prompt, negative, map_sources, hires, detail)


def hires_pass(options: GenerationOptions, params: GenerationParams) -> HiresPass | None:
    """The request's hires pass resolved (its steps default to the first pass's, a mode's preset included), or
    None; a 422 when it would run no step, or when the request's own size scaled is over the limit (a size the face
    stage chooses is checked there, before the first pass runs)."""
    if options.hires is None:
        return None
    choice = options.hires
    hires = HiresPass(choice.scale, choice.strength, choice.steps or params.num_inference_steps)
    if hires.denoising_steps == 0:
        raise InvalidParameterError(
            f"hires.strength {hires.strength} leaves no denoising step of {hires.steps}: "
            "int(hires.steps x hires.strength) must be at least 1"
        )
    if options.width is not None and options.height is not None:
        hires.size(options.width, options.height)
    return hires


def face_detail_pass(options: GenerationOptions, params: GenerationParams, given: InputsGiven) -> FaceDetailPass | None:
    """The request's face detail pass resolved, or None: the request's steps and feather; an edit's faces are
    generated at its ``edit_resolution``, a generation's at its own long side. A 422 when it would run no step."""
    if options.face_detail is None:
        return None
    choice = options.face_detail
    resolution = options.edit_resolution if given.target else None
    detail = FaceDetailPass(
        choice.strength, choice.min_face, choice.padding, params.num_inference_steps, options.mask_blur, resolution
    )
    if detail.denoising_steps == 0:
        raise InvalidParameterError(
            f"face_detail.strength {detail.strength} leaves no denoising step of {detail.steps}: "
            "int(num_inference_steps x face_detail.strength) must be at least 1"
        )
    return detail


def check_inputs(options: GenerationOptions, given: InputsGiven) -> None:
    """The rules between the options and the pictures given, which need neither the catalogue nor the deployment
    (the request model runs them too, so a handle caller's request fails where it is made): one person (1-8 photos)
    or 2-4 people, each with 1-8 photos and regions for all or none, inside the image; pose_face_index needs a pose
    photo and strength an init image; a hires pass is for one person's generation, not an edit."""
    if given.people is not None:
        _check_people(options, given.people, given.face_photos)
    elif given.saved_identity is None and not 1 <= given.face_photos <= MAX_FACE_PHOTOS:
        raise InvalidParameterError(f"give 1 to {MAX_FACE_PHOTOS} face photos, got {given.face_photos}")
    if "pose_face_index" in options.model_fields_set and not given.pose:
        raise InvalidParameterError("pose_face_index is for the pose photo: give pose_image too")
    if "strength" in options.model_fields_set and not given.init:
        raise InvalidParameterError("strength is for image-to-image: give init_image too")
    _check_edit(options, given)
    if options.hires is not None and given.target:
        raise InvalidParameterError("hires is not available with target_image: an edit has the target's size")
    if options.hires is not None and given.people is not None:
        raise InvalidParameterError("hires is not available with identities (several people) yet")


def _check_edit(options: GenerationOptions, given: InputsGiven) -> None:
    """An edit (target_image) repaints part of the target at the target's size, from one person's identity."""
    if given.mask and not given.target:
        raise InvalidParameterError("mask_image is for editing: give target_image too")
    edit_fields = sorted(set(EDIT_OPTIONS) & options.model_fields_set)
    if edit_fields and not given.target:
        raise InvalidParameterError(f"{', '.join(edit_fields)} are for editing: give target_image too")
    if not given.target:
        return
    if given.init:
        raise InvalidParameterError("give either target_image (an edit) or init_image (image-to-image), not both")
    if given.people is not None:
        raise InvalidParameterError("an edit repaints one face: identities (several people) are not available with it")
    if options.width is not None or options.height is not None:
        raise InvalidParameterError("an edit has the target's size: drop width and height (see edit_resolution)")
    if given.mask and "mask_padding" in options.model_fields_set:
        raise InvalidParameterError("mask_padding grows the target face's box: it does not apply with mask_image")


def _check_people(options: GenerationOptions, people: tuple[PersonGiven, ...], face_photos: int) -> None:
    if face_photos:
        raise InvalidParameterError("give either identities or the single-person face photos, not both")
    if not MIN_IDENTITIES <= len(people) <= MAX_IDENTITIES:
        raise InvalidParameterError(f"identities holds {MIN_IDENTITIES} to {MAX_IDENTITIES} people, got {len(people)}")
    for index, person in enumerate(people):
        if person.saved_identity is None and not 1 <= person.photos <= MAX_FACE_PHOTOS:
            raise InvalidParameterError(f"identities[{index}]: give 1 to {MAX_FACE_PHOTOS} photos, got {person.photos}")
    if "pose_face_index" in options.model_fields_set:
        raise InvalidParameterError(
            "pose_face_index is for one person: with identities the pose photo's faces are matched to the "
            "identities left to right"
        )
    regions = [person.region for person in people]
    if any(r is not None for r in regions) and any(r is None for r in regions):
        raise InvalidParameterError("give a region for every identity or for none")
    if options.width is not None and options.height is not None and all(r is not None for r in regions):
        check_regions(regions, options.width, options.height)  # type: ignore[arg-type]
