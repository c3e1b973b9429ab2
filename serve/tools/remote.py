"""``instantid generate --url URL``: the same flags as the in-process command, sent to a running service through
``serve.client`` as a job, with a progress bar from the job's events; the stored images are written to ``--out``.

Only the flags' meaning on a service differs: ``--base``, ``--lora`` and ``--controlnet`` name entries of the
service's catalogue (``GET /v1/models``), never local paths, and ``--identity-id`` names a saved identity there.
Nothing of the model stack is imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from serve.tools import CliError
from serve.tools.generate import (
    _control_images,
    _controlnet_item,
    _identity_item,
    _lora_item,
    _read,
    face_detail_item,
    hires_item,
    in_flag_words,
    options_from,
    output_format,
)


def generate_remote(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serve.client import InstantIDClient, InstantIDClientError

    body = request_body(args)
    try:
        with InstantIDClient(args.url, api_key=args.api_key) as client:
            job = client.submit(body)
            result = client.wait(job.id, progress=True)
            images = [client.image(result.id, index) for index in range(len(result.images))]
    except ValidationError as exc:
        raise CliError(in_flag_words(short_message(exc))) from None
    except InstantIDClientError as exc:
        raise CliError(f"{args.url}: {exc}") from None
    try:
        paths = write_images(images, args.out)
    except OSError as exc:
        raise CliError(f"--out: cannot write {args.out}: {exc}") from None
    first = result.images[0]
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    print(f"wrote {args.out}{more} ({first.width}x{first.height}, seed {result.seed}, generation {result.id})")
    return 0


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a ``/v1/jobs`` JSON body, as the in-process command reads them (photos as base64)."""
    import base64

    def b64(path: Path, flag: str) -> str:
        return base64.b64encode(_read(path, flag)).decode()

    if args.weights is not None:
        raise CliError("--weights is for a generation in this process: the service at --url has its own weights")
    if args.identity_file is not None:
        raise CliError("--identity-file is for a generation in this process: with --url give --identity-id")
    if args.device != "auto" or args.dtype != "auto":
        raise CliError("--device and --dtype are for a generation in this process: the service chose its own")
    if sum(map(bool, (args.face, args.identity, args.identity_id))) != 1:
        raise CliError("give one of --face (one person), --identity-id (a saved identity) and --identity (2-4 people)")
    loras = [{"name": spec, "scale": scale} for _, spec, scale in map(_lora_item, args.lora)]
    controlnets = [_controlnet_item(item) for item in args.controlnet]
    maps = _control_images(args.control_image, {str(item["name"]) for item in controlnets})
    for item in controlnets:
        if item["name"] in maps:
            item["image_b64"] = b64(maps[str(item["name"])], "--control-image")
    body: dict[str, Any] = {}
    if args.identity:
        choices = {name: getattr(args, name) for name in ("face_index", "identity_combine") if getattr(args, name)}
        args.face_index = args.identity_combine = None
        body["identities"] = [
            {"images": [{"b64": b64(path, "--identity")}], **choices, **({"region": list(region)} if region else {})}
            for path, region in map(_identity_item, args.identity)
        ]
    elif args.identity_id is not None:
        body["identity_id"] = args.identity_id
    elif len(args.face) == 1:
        body["face_image_b64"] = b64(args.face[0], "--face")
    else:
        body["face_images"] = [{"b64": b64(path, "--face")} for path in args.face]
    if args.pose is not None:
        body["pose_image_b64"] = b64(args.pose, "--pose")
    if args.init_image is not None:
        body["init_image_b64"] = b64(args.init_image, "--init-image")
    if args.target is not None:
        body["target_image_b64"] = b64(args.target, "--target")
    if args.mask is not None:
        body["mask_image_b64"] = b64(args.mask, "--mask")
    extra = {
        "base_model": args.base,
        "loras": [{k: v for k, v in lora.items() if v is not None} for lora in loras] or None,
        "controlnets": controlnets or None,
        "output_format": output_format(args.out),
        "hires": hires_item(args.hires),
        "face_detail": face_detail_item(args.face_detail),
    }
    return {**options_from(args, **extra), **body}


def short_message(exc: Any) -> str:
    """pydantic's first errors as ``field: problem; ...`` (the ingress's wording, without importing it)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def write_images(images: list[bytes], out: Path) -> list[Path]:
    """The stored images as they are (the service encoded them in ``--out``'s format): ``out``, ``out-1``, ..."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out if index == 0 else out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(len(images))]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    return paths
