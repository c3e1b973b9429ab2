"""``instantid bench chaos``'s command-line arguments (argparse only: nothing heavy is imported here)."""

from __future__ import annotations

import argparse
from pathlib import Path

FAULT_KINDS = ("replica", "events-actor", "node", "s3-outage", "s3-crash", "service-restart")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 2:
        raise argparse.ArgumentTypeError(f"must be in (0, 2], got {value}")
    return value


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["none"]:
        return []
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {unknown}; choose from {', '.join(FAULT_KINDS)}")
    return kinds


def add_chaos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=60.0, help="open-loop traffic duration (default 60)")
    p.add_argument("--load", type=_fraction, default=0.7, help="arrival rate as a fraction of measured capacity")
    p.add_argument("--seed", type=int, default=0, help="seeds arrivals, the request mix and the hostile share")
    p.add_argument(
        "--faults",
        type=_kinds,
        default=list(FAULT_KINDS),
        help=f"comma-separated kinds, or 'none' (default: all: {','.join(FAULT_KINDS)}); 'replica' kills one replica "
        "of each deployment in turn",
    )
    p.add_argument(
        "--fault-spacing-s",
        type=float,
        default=240.0,
        help="fault rounds repeat while they fit the duration at this spacing (default 240; a short run: one round)",
    )
    p.add_argument("--s3-outage-s", type=float, default=60.0, help="how long the S3 outage lasts (default 60)")
    p.add_argument(
        "--s3-restart-grace-s", type=float, default=30.0, help="s3-crash: how long the service has to restart its S3"
    )
    p.add_argument("--capacity-s", type=float, default=20.0, help="closed-loop capacity measurement (default 20)")
    p.add_argument("--request-timeout-s", type=float, default=180.0, help="per request (default 180)")
    p.add_argument("--job-deadline-s", type=float, default=600.0, help="an accepted job must end within (default 600)")
    p.add_argument("--drain-s", type=float, default=600.0, help="after the traffic: at most this long polling jobs")
    p.add_argument("--rss-interval-s", type=float, default=5.0, help="replica RSS sampling period (default 5)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="work folder (config, S3 data, spool, logs, client log); default: a new temp dir, kept after the run",
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="where tiny weights are kept/made (default $INSTANTID_HOME or ~/.instantid)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of latency, throughput and errors over time")
    p.add_argument(
        "--recheck",
        type=Path,
        default=None,
        metavar="WORKDIR",
        help="start nothing: check a finished run again from the records in its work folder",
    )
