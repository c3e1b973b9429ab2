"""The soak's Serve config: local.yaml's application, moved into the bench's work folder and sized for chaos.

Why a derived file instead of local.yaml itself: the soak restarts the service on the *same* S3 data (so its data
folder must be the bench's, not ``~/.instantid/s3``), kills one replica of a deployment while another keeps
serving (so the deployments that can run twice do), loses a node (so every replica must also fit on the head
node alone: small ``num_cpus``), and receives webhooks on loopback (so ``api.webhooks`` allows 127.0.0.1 over
http with a secret the receiver knows). Everything else (the model catalogue, batching, limits) stays local.yaml's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Replicas and logical CPUs per deployment: twice where a second replica keeps the stage serving while one is
# killed; together at most 1 CPU so that the head node (2 logical CPUs on a 2-core machine) holds them all after
# the second node is lost.
SIZING: dict[str, tuple[int, float]] = {
    "ingress": (1, 0.05),
    "face": (2, 0.1),
    "prompt": (1, 0.1),
    "denoiser": (2, 0.2),
    "control_maps": (1, 0.05),
    "store": (2, 0.05),
}
APP_NAME = "instantid"
# The Serve deployment class behind each section (the replica actor's name carries it).
DEPLOYMENTS: dict[str, str] = {
    "ingress": "Ingress",
    "face": "FaceAnalyzer",
    "prompt": "PromptEncoder",
    "denoiser": "Denoiser",
    "control_maps": "ControlMaps",
    "store": "ResultStore",
}


def bench_config(
    local: dict[str, Any],
    *,
    work: Path,
    weights: Path,
    port: int,
    webhook_secret: str,
    request_timeout_s: float,
) -> dict[str, Any]:
    """local.yaml's document (``local``, parsed) with the soak's paths, port, sizing, webhooks and job timing."""
    document = yaml.safe_load(yaml.safe_dump(local))  # a deep copy
    document["http_options"] = {**document.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in document["applications"]:
        if app.get("name") != APP_NAME:
            continue
        args = app["args"]
        args["weights"] = {**args["weights"], "root": str(weights), "make_tiny_if_missing": True}
        storage = args["storage"]
        storage["embedded_data_dir"] = str(work / "s3")
        storage["spool_dir"] = str(work / "spool")
        storage["spool_retry_s"] = 2.0
        api = args.setdefault("api", {})
        api["request_timeout_s"] = request_timeout_s
        api["body_idle_timeout_s"] = 10.0
        api["jobs"] = {**api.get("jobs", {}), "lease_s": 6, "sweep_interval_s": 1, "heartbeat_s": 5}
        api["webhooks"] = {
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_addresses": True,
            "allow_http": True,
            "secret": webhook_secret,
            "timeout_s": 5.0,
            "max_attempts": 4,
            "backoff_s": 0.5,
            "max_backoff_s": 4.0,
        }
        for section, (replicas, cpus) in SIZING.items():
            deployment = args.setdefault(section, {}).setdefault("deployment", {})
            deployment["num_replicas"] = replicas
            deployment["ray_actor_options"] = {**deployment.get("ray_actor_options", {}), "num_cpus": cpus}
    return document


def write_bench_config(document: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
