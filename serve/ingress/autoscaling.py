"""The ingress's autoscaling policy: scale on generations, not on open requests.

Serve's default policy counts every ongoing request, and an open job event stream is one: fifty subscribers
would scale the ingress out although they cost it almost nothing. Each ingress replica reports the generations
it has admitted or queued (``Ingress.record_autoscaling_stats``), and this policy sizes the deployment so that
each replica carries ``target_ongoing_requests`` of those.

Use it in an ingress ``autoscaling_config``:
``policy: {policy_function: serve.ingress.autoscaling:generation_slots_policy}``.
"""

from __future__ import annotations

import math
from typing import Any

GENERATIONS_METRIC = "generations"  # admitted + queued generations of one ingress replica


def generation_slots_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Replicas for the reported generations (``ctx`` is Serve's AutoscalingContext), within the bounds."""
    reported = (ctx.aggregated_metrics or {}).get(GENERATIONS_METRIC) or {}
    if not reported:  # no report yet (replicas starting): keep what there is
        return ctx.target_num_replicas, ctx.policy_state
    target = ctx.config.get_target_ongoing_requests()
    desired = math.ceil(sum(reported.values()) / target) if target > 0 else ctx.target_num_replicas
    bounded = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
    return bounded, ctx.policy_state
