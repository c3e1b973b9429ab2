"""``POST /v1/faces``: what face analysis sees in a photo (every face, the one a generation would use, its keypoint
image and control maps), or, for several people, the layout a generation would use; the same stage calls as a
generation makes, without generating."""

from __future__ import annotations

import base64
import uuid

from deployments.generation.messages import (
    ControlMapsRequest,
    GroupFaceRequest,
    GroupLayout,
    IdentityRequest,
    group_layout,
)
from deployments.generation.plan import identify_people, people_specs
from deployments.instantid.errors import InvalidParameterError
from deployments.instantid.options import COMPUTED_MAPS
from serve.schemas import FaceInfo, FacesRequest, FacesResponse, LayoutInfo

from .auth import ANONYMOUS
from .generation import StageHandles
from .identities import Identities
from .inputs import ImageInputs


class FaceQueries:
    def __init__(
        self, handles: StageHandles, images: ImageInputs, controlnets: list[str], identities: Identities
    ) -> None:
        self.handles = handles
        self.images = images
        self.controlnets = controlnets  # the extra ControlNets the denoiser loaded
        self.identities = identities  # saved identities a layout of several people may use

    async def analyze(
        self, request: FacesRequest, request_id: str | None = None, owner: str = ANONYMOUS
    ) -> FacesResponse:
        if request.identities is not None:
            return await self._layout(request, request_id, owner)
        if request.identity_id is not None:
            return await self._saved(request, request_id, owner)
        image = await self.images.load(request.image_b64, request.image_uri, "image")
        maps = None
        if request.include_control_maps:
            computable = [name for name in self.controlnets if name in COMPUTED_MAPS]
            if not computable:
                have = ", ".join(self.controlnets) or "none"
                raise InvalidParameterError(f"this deployment computes no control maps (its extra ControlNets: {have})")
            maps = self.handles.control_maps.preview.remote(
                ControlMapsRequest(
                    image,
                    "face_image",
                    request.width,
                    request.height,
                    compute=tuple(computable),
                    canny_low=request.canny_low,
                    canny_high=request.canny_high,
                )
            )
        listing = await self.handles.face.faces.remote(
            image, request.include_keypoint_image, request.width, request.height
        )
        keypoint_png = listing.keypoint_image_png
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=listing.width,
            height=listing.height,
            faces=[FaceInfo.of(face) for face in listing.faces],
            chosen=listing.chosen,
            keypoint_image_png_b64=_b64(keypoint_png),
            control_maps_png_b64=None if maps is None else {name: _b64(png) for name, png in (await maps).items()},
        )

    async def _saved(self, request: FacesRequest, request_id: str | None, owner: str) -> FacesResponse:
        """A saved identity's stored faces, one per enrolled photo; no photo is analysed."""
        assert request.identity_id is not None
        record = await self.identities.record(owner, request.identity_id)
        first = record.photos[0]
        keypoint_png = None
        if request.include_keypoint_image:
            keypoint_png = await self.handles.face.keypoint_image.remote(
                first.keypoints, first.width, first.height, request.width, request.height
            )
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=first.width,
            height=first.height,
            faces=[FaceInfo(box=p.box, keypoints=p.keypoints, score=p.score) for p in record.photos],
            chosen=0,
            keypoint_image_png_b64=_b64(keypoint_png),
        )

    async def _layout(self, request: FacesRequest, request_id: str | None, owner: str) -> FacesResponse:
        """The layout a multi-identity generation with these identities (and this pose photo) would use."""
        assert request.identities is not None
        pose = None
        if request.image_b64 is not None or request.image_uri is not None:
            pose = await self.images.load(request.image_b64, request.image_uri, "image")
        saved = {
            i: await self.identities.faces(owner, choice.identity_id, i)
            for i, choice in enumerate(request.identities)
            if choice.identity_id is not None
        }
        people = await self.images.people(request.identities, saved)
        identified = [
            self.handles.face.identify.remote(item) if isinstance(item, IdentityRequest) else item
            for item in identify_people(people)
        ]
        specs = people_specs(tuple(person.given() for person in people))
        layout: GroupLayout = await self.handles.face.group_layout.remote(
            GroupFaceRequest(specs, pose, request.width, request.height), request.include_keypoint_image, *identified
        )
        return FacesResponse(
            request_id=request_id or uuid.uuid4().hex,
            width=layout.condition.width,
            height=layout.condition.height,
            faces=[FaceInfo.of(face) for face in layout.pose_faces],
            chosen=None,
            keypoint_image_png_b64=_b64(layout.keypoint_image_png),
            layout=LayoutInfo.model_validate(group_layout(layout.condition)),
        )


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()
