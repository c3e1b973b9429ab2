"""The ``instantid`` command line: demo, serve, generate, weights."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from serve.tools import HOME_ENV, CliError, instantid_home
from serve.tools.generate import add_generate_parser  # argparse definitions; the command imports the rest


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from deployments.tiny.weights import write_tiny_weights

    try:
        write_tiny_weights(args.dir, seed=args.seed)
    except OSError as exc:
        raise CliError(f"cannot write tiny weights to {args.dir}: {exc}") from None
    print(f"wrote tiny weights to {args.dir} (random: the pictures they make are meaningless)")
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from serve.tools.download import download_real_weights

    download_real_weights(args.dir, sdxl_repo=args.sdxl, antelopev2_repo=args.antelopev2, depth_repo=args.depth)
    print(f"downloaded real weights to {args.dir}")
    return 0


def cmd_weights_licenses(args: argparse.Namespace) -> int:
    from serve.tools.licenses import print_licenses

    folder = args.weights if args.weights is not None else instantid_home() / "weights" / "tiny"
    return print_licenses(folder)


def _log_to_stderr() -> None:
    """Warnings of the long-running commands (the embedded S3 died and was restarted) with a time and a level."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _before_exit() -> None:
    """Everything is stopped and the process is about to exit: skip the garbage collector's final passes.

    The process holds torch, diffusers, transformers and Ray (about 5,000 modules): Python's finalization
    walks every object of them in its last collections, 3-15 s on 2 busy cores, during which ``instantid
    serve`` looks hung to whoever sent SIGTERM. ``gc.freeze`` moves them out of the collector's reach; the
    rest of finalization (``atexit``, flushing, module teardown) still runs.
    """
    gc.disable()  # no collection may start between here and the exit
    gc.freeze()


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.tools.runner import run_config

    _log_to_stderr()
    run_config(args.config, port=args.port, metrics_port=args.metrics_port)
    _before_exit()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from serve.tools.demo import run_demo

    _log_to_stderr()
    run_demo(instantid_home() if args.home is None else args.home)
    _before_exit()
    return 0


def cmd_cluster_render(args: argparse.Namespace) -> int:
    from serve.tools.cluster import render_main

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
    serve_p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port of the Ray it starts (on 127.0.0.1; default: a free one, printed at start)",
    )
    serve_p.set_defaults(func=cmd_serve)

    add_generate_parser(sub)

    weights = sub.add_parser("weights", help="write tiny weights, download real ones, or list their licences")
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
    licenses = wsub.add_parser("licenses", help="the licence of every weight source in a weights folder")
    licenses.add_argument(
        "--weights", type=Path, default=None, help=f"weights folder (default ${HOME_ENV}/weights/tiny, the demo's)"
    )
    licenses.set_defaults(func=cmd_weights_licenses)

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
