"""``instantid generate``: one generation in this process (no Ray), through the same plan and flow as a served request.

The flags are made from the request schema (``deployments/instantid/options.py``): every generation option is a
flag of its name (``--num-inference-steps``, ``--face-noise``, ...; three keep short aliases: ``--negative``,
``--steps``, ``--guidance``) whose help shows the schema's description, range and default, and whose value the
schema validates. The pictures and the list-valued options have flags of their own: ``--face`` (repeatable),
``--identity FACE[:X1,Y1,X2,Y2]``, ``--pose``, ``--init-image``, ``--target``, ``--mask``,
``--control-image NAME=FILE``, ``--lora NAME_OR_PATH[:SCALE]``, ``--controlnet NAME[:STRENGTH]``,
``--hires SCALE[:STRENGTH]``, ``--face-detail [STRENGTH]``; ``--base`` chooses what to load.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.instantid.options import GenerationOptions
from serve.tools import CliError

if TYPE_CHECKING:
    from deployments.storage.identities import SavedIdentity

# Options the command line spells its own way: base_model by --base (a name or a path, loaded here), loras and
# controlnets by repeatable flags, output_format by --out's suffix, hires by --hires SCALE[:STRENGTH], face_detail
# by --face-detail [STRENGTH].
OWN_FLAGS = ("base_model", "loras", "controlnets", "output_format", "hires", "face_detail")
ALIASES = {"negative_prompt": ("--negative",), "num_inference_steps": ("--steps",), "guidance_scale": ("--guidance",)}
# How this command line names what the plan's messages call a request field.
FLAG_WORDS = {
    "pose_face_index": "--pose-face-index",
    "pose_image": "--pose",
    "init_image": "--init-image",
    "target_image": "--target",
    "mask_image": "--mask",
    "strength": "--strength",
    "identities": "--identity",
    "face_image": "--face",
}
_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per generation option, typed, described and bounded by the schema (never restated here)."""
    properties = GenerationOptions.model_json_schema()["properties"]
    required = set(GenerationOptions.model_json_schema().get("required", []))
    for name, schema in properties.items():
        if name in OWN_FLAGS:
            continue
        kind = _json_type(schema)
        help_text = _help(schema)
        if kind == "boolean":
            parser.add_argument(
                flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        parser.add_argument(
            flag(name),
            *ALIASES.get(name, ()),
            dest=name,
            type={"integer": int, "number": float}.get(kind, str),
            default=None,
            required=name in required,
            metavar=name.upper(),
            help=help_text,
        )


def options_from(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The options the flags gave (absent ones are left to the schema's defaults)."""
    given = {name: getattr(args, name) for name in GenerationOptions.model_fields if name not in OWN_FLAGS}
    return {name: value for name, value in {**given, **extra}.items() if value is not None}


def in_flag_words(message: str) -> str:
    """A plan message with the request fields it names written as this command line's flags."""
    return re.sub(r"\b(" + "|".join(FLAG_WORDS) + r")\b", lambda m: FLAG_WORDS[m.group(1)], message)


def output_format(out: Path) -> str:
    try:
        return _FORMATS[out.suffix.lower()]
    except KeyError:
        raise CliError(f"--out must end in .png, .jpg or .webp (got {out.name})") from None


def _json_type(schema: dict[str, Any]) -> str:
    if "type" in schema:
        return schema["type"]
    types = [s.get("type") for s in schema.get("anyOf", []) if s.get("type") not in (None, "null")]
    if not types and any("enum" in s or "$ref" in s for s in schema.get("anyOf", [])):
        return "string"
    return types[0] if types else "string"


def _help(schema: dict[str, Any]) -> str:
    """The schema's description, its choices or range, and its default."""
    parts = [schema.get("description", "").rstrip(".")]
    bounds = schema if "type" in schema else next((s for s in schema.get("anyOf", []) if "type" in s), schema)
    if "enum" in bounds:
        parts.append("one of " + ", ".join(map(str, bounds["enum"])))
    low, high = bounds.get("minimum"), bounds.get("maximum")
    if low is not None or high is not None:
        parts.append(f"{'' if low is None else low}..{'' if high is None else high}")
    if "multipleOf" in bounds:
        parts.append(f"a multiple of {bounds['multipleOf']}")
    if "default" in schema and schema["default"] is not None:
        parts.append(f"default {schema['default']}")
    return "; ".join(p for p in parts if p).replace("%", "%%")


def add_generate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="one generation in-process (no Ray), or on a running service with --url")
    p.add_argument(
        "--weights", type=Path, default=None, help="weights folder (sdxl/, instantid/, antelopev2/); not with --url"
    )
    p.add_argument(
        "--url",
        default=None,
        help="run the request on a running service (http://host:port) through its HTTP API instead of in this "
        "process; API key from --api-key or INSTANTID_API_KEY",
    )
    p.add_argument("--api-key", default=None, help="with --url: the service's API key (default: $INSTANTID_API_KEY)")
    p.add_argument(
        "--identity-id",
        default=None,
        help="with --url: a saved identity on the service (POST /v1/identities) instead of --face",
    )
    p.add_argument(
        "--face", type=Path, action="append", default=[], help="identity photo; repeat for up to 8 photos of one person"
    )
    p.add_argument(
        "--identity",
        action="append",
        default=[],
        metavar="FACE[:X1,Y1,X2,Y2]",
        help="several people: one photo per person (repeat 2-4 times, instead of --face), optionally with the region "
        "of the output it owns in output pixels (all or none); faces come from --pose (left to right), else the "
        "regions, else equal columns",
    )
    p.add_argument(
        "--identity-file",
        type=Path,
        default=None,
        help="a saved identity exported from the service (GET /v1/identities/ID?include=embeddings, saved as JSON), "
        "instead of --face: no photo is analysed; its first photo's keypoints set the pose unless --pose is given",
    )
    p.add_argument("--pose", type=Path, default=None, help="photo whose largest face sets pose and size")
    p.add_argument("--init-image", type=Path, default=None, help="image-to-image: start from this picture")
    p.add_argument("--target", type=Path, default=None, help="edit this photo: its face (or --mask) is repainted")
    p.add_argument("--mask", type=Path, default=None, help="with --target: the repaint mask (white repaints)")
    p.add_argument(
        "--base",
        default=None,
        help="SDXL base: a diffusers folder or .safetensors file, or a name in WEIGHTS/bases/ (default: WEIGHTS/sdxl)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME_OR_PATH[:SCALE]",
        help="a LoRA file, or a name in WEIGHTS/loras/, with an optional scale (repeatable)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME[:STRENGTH]",
        help="an extra ControlNet from WEIGHTS/controlnets/ (pose, canny, depth), optional strength (repeatable)",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a ready-made map for a --controlnet (else canny/depth are computed from --pose, else --face)",
    )
    p.add_argument(
        "--hires",
        default=None,
        metavar="SCALE[:STRENGTH]",
        help="a second pass at SCALE x the size (1..2): each image upscaled and refined image-to-image at STRENGTH "
        "(default 0.35) with --steps steps",
    )
    p.add_argument(
        "--face-detail",
        nargs="?",
        const="",
        default=None,
        metavar="STRENGTH",
        help="repaint each face under 384 px of the result at portrait resolution, at STRENGTH (default 0.4)",
    )
    add_option_flags(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", required=True, type=Path, help="output file (.png, .jpg, .webp)")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    if args.url is not None:
        from serve.tools.remote import generate_remote

        return generate_remote(args)
    from pydantic import ValidationError

    from deployments.generation.local import InstantIDPipeline, local_catalogue
    from deployments.generation.messages import StageTiming
    from deployments.generation.plan import GenerationInputs, PersonInput, plan_generation
    from deployments.generation.saved import saved_faces
    from deployments.instantid.errors import InvalidParameterError
    from deployments.instantid.weights import WeightsLayout
    from serve.ingress.errors import validation_message

    if args.weights is None:
        raise CliError("give --weights (in this process) or --url (on a running service)")
    if args.identity_id is not None:
        raise CliError("--identity-id names a saved identity on a service: add --url (offline: --identity-file)")
    if sum(map(bool, (args.face, args.identity, args.identity_file))) != 1:
        raise CliError(
            "give one of --face (one person), --identity-file (one saved identity) and --identity (2-4 people)"
        )
    saved = _saved_identity(args.identity_file) if args.identity_file else None
    if saved is not None:
        if args.face_index is not None or args.identity_combine is not None:
            raise CliError(
                "--identity-file fixed its photos' faces and how they combine: drop --face-index and --identity-combine"
            )
        args.identity_combine = saved.identity_combine
    people = [_identity_item(item) for item in args.identity]
    choices = {}  # several people: each one's photo takes the single-person face choices
    if people:
        choices = {name: getattr(args, name) for name in ("face_index", "identity_combine") if getattr(args, name)}
        args.face_index = args.identity_combine = None
    loras = [_lora_item(item) for item in args.lora]
    try:
        options = GenerationOptions(
            **options_from(
                args,
                loras=[{"name": name, "scale": scale} for name, _, scale in loras] or None,
                controlnets=[_controlnet_item(item) for item in args.controlnet] or None,
                output_format=output_format(args.out),
                hires=hires_item(args.hires),
                face_detail=face_detail_item(args.face_detail),
            )
        )
    except ValidationError as exc:
        raise CliError(validation_message(exc)) from None
    control_files = _control_images(args.control_image, {c.name for c in options.controlnets})
    _check_device(args.device, args.dtype)

    inputs = GenerationInputs(
        faces=tuple(_read(path, "--face") for path in args.face),
        people=tuple(PersonInput((_read(path, "--identity"),), region=region, **choices) for path, region in people)
        or None,
        pose=_read(args.pose, "--pose") if args.pose else None,
        init=_read(args.init_image, "--init-image") if args.init_image else None,
        maps={name: _read(path, "--control-image") for name, path in control_files.items()},
        known=saved_faces(saved, StageTiming.since(time.time())) if saved is not None else (),
        saved_identity=saved.id if saved is not None else None,
        target=_read(args.target, "--target") if args.target else None,
        mask=_read(args.mask, "--mask") if args.mask else None,
    )
    layout = WeightsLayout.from_root(args.weights)
    base, lora_files = _local_models(args.weights, args.base, loras, options.mode)
    controlnets = _local_controlnets(args.weights, [c.name for c in options.controlnets])
    catalogue = local_catalogue(base.name if base is not None else "sdxl", lora_files)
    try:
        plan = plan_generation(options, inputs.given(), catalogue, sorted(controlnets))
    except InvalidParameterError as exc:
        raise CliError(in_flag_words(exc.message)) from None
    computes_depth = plan.map_sources.get("depth", "uploaded") != "uploaded"
    pipeline = InstantIDPipeline.from_layout(
        layout,
        device=args.device,
        dtype=args.dtype,
        base=base,
        lora_files=lora_files,
        controlnets=controlnets,
        depth_model=args.weights / "depth" if computes_depth else None,
    )
    output = pipeline.run(plan, inputs)
    try:
        _write_images(output.images, args.out, options.output_quality)
    except OSError as exc:
        raise CliError(f"--out: cannot write {args.out}: {exc}") from None
    print(f"wrote {args.out} ({output.params.width}x{output.params.height}, seed {plan.params.seed})")
    return 0


def _saved_identity(path: Path) -> SavedIdentity:
    """An identity export (JSON with embeddings) as the record a generation reads."""
    from deployments.storage.identities import SavedIdentity

    try:
        return SavedIdentity.from_export(json.loads(_read(path, "--identity-file")))
    except (ValueError, TypeError) as exc:  # JSON, the export's shape, pydantic's checks
        raise CliError(f"--identity-file {path}: {str(exc).splitlines()[0]}") from None


def _identity_item(item: str) -> tuple[Path, tuple[float, float, float, float] | None]:
    """``FACE[:X1,Y1,X2,Y2]``: a photo path and its optional region (a path may itself hold colons)."""
    path, sep, box = item.rpartition(":")
    if sep:
        try:
            values = tuple(float(v) for v in box.split(","))
        except ValueError:
            values = ()
        if len(values) == 4:
            return Path(path), (values[0], values[1], values[2], values[3])
    return Path(item), None


def _check_device(device: str, dtype: str) -> None:
    """Refuse an unknown or absent --device and an unknown --dtype before any weights load."""
    import torch

    from deployments.instantid.loading import pick_device, pick_dtype

    try:
        dev = pick_device(device)
    except RuntimeError as exc:
        raise CliError(f"--device: {exc}") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CliError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} available)")
    try:
        pick_dtype(dtype, dev)
    except ValueError as exc:
        raise CliError(f"--dtype: {exc}") from None


def hires_item(item: str | None) -> dict[str, float] | None:
    """``SCALE[:STRENGTH]`` -> a ``hires`` object (the schema checks the ranges); None without the flag."""
    if item is None:
        return None
    scale, _, strength = item.partition(":")
    try:
        return {"scale": float(scale), **({"strength": float(strength)} if strength else {})}
    except ValueError:
        raise CliError(f"--hires {item}: expected SCALE[:STRENGTH], e.g. 1.5 or 1.5:0.4") from None


def face_detail_item(item: str | None) -> dict[str, float] | None:
    """``--face-detail [STRENGTH]`` -> a ``face_detail`` object (the schema checks the range); None without it."""
    if item is None:
        return None
    try:
        return {"strength": float(item)} if item else {}
    except ValueError:
        raise CliError(f"--face-detail {item}: expected a strength, e.g. 0.4") from None


def _controlnet_item(item: str) -> dict[str, object]:
    """``NAME[:STRENGTH]`` -> a ``controlnets`` entry."""
    name, _, strength = item.partition(":")
    if not strength:
        return {"name": name}
    try:
        return {"name": name, "strength": float(strength)}
    except ValueError:
        raise CliError(f"--controlnet {item}: the strength must be a number") from None


def _control_images(items: list[str], listed: set[str]) -> dict[str, Path]:
    """``NAME=FILE`` pairs, each for a ControlNet that --controlnet names."""
    files: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not file:
            raise CliError(f"--control-image {item}: expected NAME=FILE")
        if name not in listed:
            raise CliError(f"--control-image {name}: add --controlnet {name} too")
        files[name] = Path(file)
    return files


def _local_controlnets(weights: Path, names: list[str]) -> dict[str, Path]:
    """The extra ControlNets the request names, from WEIGHTS/controlnets/ (only those are loaded)."""
    folders = {name: weights / "controlnets" / name for name in names}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise CliError(f"--controlnet {name}: {folder} is not a ControlNet folder (instantid weights download)")
    return folders


def _lora_item(item: str) -> tuple[str, str, float | None]:
    """``NAME_OR_PATH[:SCALE]`` -> (its catalogue name, the name or path, the scale or None for the default)."""
    spec, scale = item, None
    head, _, tail = item.rpartition(":")
    if head and tail.replace(".", "", 1).lstrip("-").isdigit():
        spec, scale = head, float(tail)
    return catalogue_name(Path(spec).stem if spec.endswith(".safetensors") else spec), spec, scale


def catalogue_name(text: str) -> str:
    """A file's name as a catalogue name (lower case letters, digits, ``._-``)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return name or "lora"


def _local_models(
    weights: Path, base: str | None, loras: list[tuple[str, str, float | None]], mode: str | None
) -> tuple[Any, dict[str, Path]]:
    """``--base``/``--lora``/``--mode`` as local files: paths as given, names in the layout's bases/ and loras/.
    Returns the base to load (None: WEIGHTS/sdxl) and every LoRA file by catalogue name (a mode's among them)."""
    from deployments.instantid.bases import SDXLBase
    from deployments.instantid.catalogue import LORAS_DIR, PRESET_LORA_FILES, PRESET_MODES

    chosen_base = None
    if base is not None:
        path = Path(base).expanduser()
        candidates = [path] if path.exists() else [weights / "bases" / base, weights / "bases" / f"{base}.safetensors"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise CliError(f"--base: {base} is neither a file or folder nor a name in {weights / 'bases'}")
        if found.is_file():  # a single-file checkpoint: the layout's SDXL folder gives its architecture
            chosen_base = SDXLBase(catalogue_name(found.stem), file=found, config=weights / "sdxl")
        else:
            chosen_base = SDXLBase(catalogue_name(found.name), folder=found)
    files: dict[str, Path] = {}
    for name, spec, _ in loras:
        path = Path(spec).expanduser()
        if not path.is_file():
            path = weights / LORAS_DIR / f"{spec}.safetensors"
        if not path.is_file():
            raise CliError(f"--lora: {spec} is neither a file nor a name in {weights / LORAS_DIR}")
        files[name] = path
    if mode is not None and mode in PRESET_MODES and (lora := PRESET_MODES[mode].lora) is not None:
        path = weights / LORAS_DIR / PRESET_LORA_FILES[lora]
        if not path.is_file():
            raise CliError(f"--mode {mode}: its LoRA {path} is missing (instantid weights download)")
        files[lora] = path
    return chosen_base, files


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _write_images(images, out: Path, quality: int) -> None:
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    for index, rgb in enumerate(images):
        path = out if index == 0 else out.with_name(f"{out.stem}-{index}{out.suffix}")
        kwargs = {} if out.suffix.lower() == ".png" else {"quality": quality}
        Image.fromarray(rgb).save(path, **kwargs)
