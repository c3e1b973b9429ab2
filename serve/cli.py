"""The ``instantid`` command line: demo, serve, generate, weights."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

HOME_ENV = "INSTANTID_HOME"


def instantid_home() -> Path:
    """Where the CLI keeps tiny weights, the embedded S3 data and demo outputs (``INSTANTID_HOME``)."""
    return Path(os.environ.get(HOME_ENV, Path.home() / ".instantid")).expanduser()


class CliError(Exception):
    """A one-line reason to exit non-zero."""


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="one generation in-process (no Ray)")
    p.add_argument("--weights", required=True, type=Path, help="weights folder (sdxl/, instantid/, antelopev2/)")
    p.add_argument(
        "--face",
        type=Path,
        action="append",
        default=[],
        help="identity photo; repeat for up to 8 photos of the same person",
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
        "--identity-combine",
        default=None,
        help="several --face photos: mean (default), normalized_mean or concat",
    )
    p.add_argument("--face-index", type=int, default=None, help="which face of each --face photo (0: largest)")
    p.add_argument("--pose-face-index", type=int, default=None, help="which face of the --pose photo (0: largest)")
    p.add_argument(
        "--face-noise", type=float, default=None, help="0..1: noise as the negative identity input (default 0)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--style", default=None, help="style preset (default: the API's default)")
    p.add_argument("--pose", type=Path, default=None, help="photo whose largest face sets pose and size")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--identitynet-strength", type=float, default=None)
    p.add_argument("--adapter-strength", type=float, default=None)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--no-enhance-face-region", action="store_true")
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
    p.add_argument("--mode", default=None, help="fast mode preset: lcm, lightning or hyper (LoRAs from WEIGHTS/loras/)")
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
    p.add_argument("--canny-low", type=int, default=None, help="Canny's lower threshold (default 100)")
    p.add_argument("--canny-high", type=int, default=None, help="Canny's upper threshold (default 200)")
    p.add_argument("--init-image", type=Path, default=None, help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=None, help="with --init-image: how far it is noised (default 0.8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", required=True, type=Path, help="output file (.png, .jpg, .webp)")


def cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.instantid.params import MAX_FACE_PHOTOS, MAX_IDENTITIES, MIN_IDENTITIES
    from serve.schemas import GenerationOptions

    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "style": args.style,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "identitynet_strength": args.identitynet_strength,
        "adapter_strength": args.adapter_strength,
        "scheduler": args.scheduler,
        "width": args.width,
        "height": args.height,
    }
    if args.no_enhance_face_region:
        given["enhance_face_region"] = False
    given["mode"] = args.mode
    given |= {
        "identity_combine": args.identity_combine,
        "face_index": args.face_index,
        "pose_face_index": args.pose_face_index,
        "face_noise": args.face_noise,
    }
    if bool(args.face) == bool(args.identity):
        raise CliError("give --face (one person) or --identity (2-4 people), not both and not neither")
    identities = [_identity_item(item) for item in args.identity]
    if identities and not MIN_IDENTITIES <= len(identities) <= MAX_IDENTITIES:
        raise CliError(f"--identity: give {MIN_IDENTITIES} to {MAX_IDENTITIES} people, got {len(identities)}")
    if identities and args.pose_face_index is not None:
        raise CliError(
            "--pose-face-index is for one person: with --identity the --pose faces are matched left to right"
        )
    regions = [region for _, region in identities]
    if any(r is not None for r in regions) and any(r is None for r in regions):
        raise CliError("--identity: give a region for every identity or for none")
    if regions and all(r is not None for r in regions) and args.width is not None and args.height is not None:
        from deployments.instantid.regions import check_regions

        check_regions(regions, args.width, args.height)  # type: ignore[arg-type]
    if len(args.face) > MAX_FACE_PHOTOS:
        raise CliError(f"--face: at most {MAX_FACE_PHOTOS} photos of one person, got {len(args.face)}")
    if args.pose_face_index is not None and args.pose is None:
        raise CliError("--pose-face-index is for the pose photo: give --pose too")
    given |= {"canny_low": args.canny_low, "canny_high": args.canny_high, "strength": args.strength}
    given["controlnets"] = [_controlnet_item(item) for item in args.controlnet] or None
    if args.strength is not None and args.init_image is None:
        raise CliError("--strength is for image-to-image: give --init-image too")
    try:
        options = GenerationOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        from serve.errors import validation_message

        raise CliError(validation_message(exc)) from None
    control_files = _control_images(args.control_image, {c.name for c in options.controlnets})
    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CliError(f"--out must end in .png, .jpg or .webp (got {args.out.name})")

    _check_device(args.device, args.dtype)

    from deployments.instantid.images import decode_image
    from deployments.instantid.weights import WeightsLayout

    faces = [decode_image(_read(path, "--face")) for path in args.face]
    from deployments.instantid.group import IdentityInput

    people = [
        IdentityInput(
            [decode_image(_read(path, "--identity"))],
            region,
            face_index=options.face_index,
            identity_combine=options.identity_combine,
        )
        for path, region in identities
    ] or None
    pose = decode_image(_read(args.pose, "--pose")) if args.pose else None
    init = decode_image(_read(args.init_image, "--init-image")) if args.init_image else None
    control_images = {name: decode_image(_read(path, "--control-image")) for name, path in control_files.items()}
    layout = WeightsLayout.from_root(args.weights)
    base, lora_files, loras, preset = _local_models(args.weights, args.base, args.lora, args.mode)
    seed = options.resolved_seed()
    params = options.sampling_params(seed, preset, img2img=init is not None)
    if params.strength is not None and params.denoising_steps == 0:
        raise CliError(f"--strength {params.strength} leaves no step of {params.num_inference_steps} to run")
    controlnets = _local_controlnets(args.weights, [c.name for c in params.active_controlnets])
    needs_depth = any(c.name == "depth" for c in params.active_controlnets) and "depth" not in control_images
    pipeline = _pipeline(layout, args, base, lora_files, controlnets, args.weights / "depth" if needs_depth else None)
    output = pipeline(
        (faces[0] if len(faces) == 1 else faces) if faces else [],
        options.prompt,
        options.negative_prompt,
        params=params,
        style=options.style,
        pose_rgb=pose,
        loras=loras,
        control_images=control_images,
        canny_thresholds=(options.canny_low, options.canny_high),
        init_rgb=init,
        face_index=options.face_index,
        pose_face_index=options.pose_face_index,
        identity_combine=options.identity_combine,
        identities=people,
    )
    try:
        _write_images(output.images, args.out, options.output_quality)
    except OSError as exc:
        raise CliError(f"--out: cannot write {args.out}: {exc}") from None
    print(f"wrote {args.out} ({output.params.width}x{output.params.height}, seed {seed})")
    return 0


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


def _pipeline(layout, args, base, lora_files, controlnets, depth_model):
    from deployments.instantid.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_layout(
        layout,
        device=args.device,
        dtype=args.dtype,
        base=base,
        lora_files=lora_files,
        controlnets=controlnets,
        depth_model=depth_model,
    )


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
    folders = {name: weights / "controlnets" / name for name in names}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise CliError(f"--controlnet {name}: {folder} is not a ControlNet folder (instantid weights download)")
    return folders


def _local_models(weights: Path, base: str | None, loras: list[str], mode: str | None):
    """``--base``/``--lora``/``--mode`` as local files: paths as given, names in the layout's bases/ and loras/.

    Returns ``(SDXLBase or None, {name: file}, ((name, scale), ...), the mode's preset or None)``.
    """
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
            chosen_base = SDXLBase(found.stem, file=found, config=weights / "sdxl")
        else:
            chosen_base = SDXLBase(found.name, folder=found)
    files: dict[str, Path] = {}
    chosen: list[tuple[str, float]] = []
    for item in loras:
        spec, scale = item, 1.0
        head, _, tail = item.rpartition(":")
        if head and tail.replace(".", "", 1).lstrip("-").isdigit():
            spec, scale = head, float(tail)
        path = Path(spec).expanduser()
        if not path.is_file():
            path = weights / LORAS_DIR / f"{spec}.safetensors"
        if not path.is_file():
            raise CliError(f"--lora: {spec} is neither a file nor a name in {weights / LORAS_DIR}")
        files[path.stem] = path
        chosen.append((path.stem, scale))
    preset = None
    if mode is not None:
        if mode not in PRESET_MODES:
            raise CliError(f"--mode: choose one of {', '.join(PRESET_MODES)}")
        preset = PRESET_MODES[mode]
        if preset.lora is not None:
            path = weights / LORAS_DIR / PRESET_LORA_FILES[preset.lora]
            if not path.is_file():
                raise CliError(f"--mode {mode}: its LoRA {path} is missing (instantid weights download)")
            files[preset.lora] = path
            chosen.append((preset.lora, preset.lora_scale))
    return chosen_base, files, tuple(chosen), preset


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


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from deployments.instantid.tiny import write_tiny_weights

    try:
        write_tiny_weights(args.dir, seed=args.seed)
    except OSError as exc:
        raise CliError(f"cannot write tiny weights to {args.dir}: {exc}") from None
    print(f"wrote tiny weights to {args.dir} (random: the pictures they make are meaningless)")
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from serve.download import download_real_weights

    download_real_weights(args.dir, sdxl_repo=args.sdxl, antelopev2_repo=args.antelopev2, depth_repo=args.depth)
    print(f"downloaded real weights to {args.dir}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.runner import run_config

    run_config(args.config, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from serve.demo import run_demo

    run_demo(instantid_home() if args.home is None else args.home)
    return 0


def cmd_cluster_render(args: argparse.Namespace) -> int:
    from serve.cluster import render_main

    return render_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``instantid bench serve|face|denoise|events``: only the chosen benchmark's module (and its deps) is imported."""
    from serve.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instantid", description="InstantID on Ray Serve")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="local Ray + embedded S3 + tiny weights + one request through HTTP")
    demo.add_argument("--home", type=Path, default=None, help=f"state folder (default ${HOME_ENV} or ~/.instantid)")
    demo.set_defaults(func=cmd_demo)

    serve_p = sub.add_parser("serve", help="run a Serve config file (local or production)")
    serve_p.add_argument("config", type=Path)
    serve_p.add_argument("--port", type=int, default=None, help="override http_options.port")
    serve_p.set_defaults(func=cmd_serve)

    _add_generate(sub)
    sub.choices["generate"].set_defaults(func=cmd_generate)

    weights = sub.add_parser("weights", help="write tiny weights or download real ones")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    tiny = wsub.add_parser("tiny", help="tiny random weights in the published formats")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_weights_tiny)
    download = wsub.add_parser("download", help="InstantX/InstantID + an SDXL base + antelopev2 from the hub")
    download.add_argument("dir", type=Path)
    download.add_argument("--sdxl", default="stabilityai/stable-diffusion-xl-base-1.0", help="SDXL base repo id")
    download.add_argument("--antelopev2", default="DIAMONIK7777/antelopev2", help="hub repo with the 5 .onnx files")
    download.add_argument(
        "--depth",
        default="depth-anything/Depth-Anything-V2-Small-hf",
        help="transformers depth-estimation repo for the depth ControlNet's maps (e.g. Intel/dpt-hybrid-midas)",
    )
    download.set_defaults(func=cmd_weights_download)

    cluster = sub.add_parser("cluster", help="KubeRay manifests")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    render = csub.add_parser("render", help="write cluster/rayservice.yaml's serveConfigV2 from production.yaml")
    render.add_argument("--config", type=Path, default=None, help="Serve config (default: packaged production.yaml)")
    render.add_argument("--out", type=Path, default=None, help="manifest to update (default: cluster/rayservice.yaml)")
    render.add_argument("--check", action="store_true", help="exit 1 if the manifest is out of date")
    render.set_defaults(func=cmd_cluster_render)

    from serve.bench import add_bench_parser  # argparse definitions only: nothing heavy is imported

    bench = add_bench_parser(sub)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deployments.instantid.errors import InstantIDError

    try:
        return args.func(args)
    except (CliError, InstantIDError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
