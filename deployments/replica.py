"""The id of the Serve replica running this code, for responses' ``replicas`` and batch records."""

from __future__ import annotations

from ray import serve as ray_serve
from ray.serve.exceptions import RayServeException


def replica_id() -> str:
    """This replica's id; "local" when a deployment's class runs outside Serve (its health checks are tested so)."""
    try:
        return ray_serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return "local"
