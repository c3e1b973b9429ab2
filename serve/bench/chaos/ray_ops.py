"""Ray operations of the soak (list replicas and where they run, kill one, spread replicas over both nodes), each
in a short-lived driver process: ``python -m serve.bench.chaos.ray_ops GCS_ADDRESS COMMAND ...`` prints JSON.

Why not a driver inside the bench: the soak stops the service, and with it the Ray cluster; a driver connected to a
cluster whose GCS is gone ends its own process after a while (the core worker gives up), which would end the bench.
A driver per operation costs a few seconds and can never outlive its cluster. A driver on a machine with two nodes
attaches to the head node's raylet (Ray prefers the head), so killing the second node never takes it down.

Serve names each replica actor ``SERVE_REPLICA::<app>#<deployment>#<id>`` in the ``serve`` namespace; the job
event channel is ``instantid-job-events`` in ``instantid`` (deployments/job_events.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

REPLICA_PREFIX = "SERVE_REPLICA::"
SERVE_NAMESPACE = "serve"


@dataclass(frozen=True)
class ActorInfo:
    """A live actor of interest: a Serve replica (``deployment`` set) or the job event channel."""

    name: str
    deployment: str | None
    state: str
    pid: int
    node_id: str
    restarts: int


def parse_replica_name(name: str, app: str) -> str | None:
    """The deployment of ``SERVE_REPLICA::app#Deployment#id`` (None for any other name or another app)."""
    if not name.startswith(REPLICA_PREFIX):
        return None
    parts = name[len(REPLICA_PREFIX) :].split("#")
    return parts[1] if len(parts) == 3 and parts[0] == app else None


# ------------------------------------------------------------------------------------------ inside the driver


def _actors(app: str, channel: str) -> list[ActorInfo]:
    from ray._private import state

    found = []
    for info in state.actors().values():
        name = info.get("Name") or ""
        deployment = parse_replica_name(name, app)
        if deployment is None and name != channel:
            continue
        if info["State"] == "DEAD":
            continue
        found.append(
            ActorInfo(name, deployment, info["State"], int(info["Pid"]), info["Address"]["NodeID"], info["NumRestarts"])
        )
    return found


def _nodes() -> list[dict[str, Any]]:
    import ray

    return [
        {"node_id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU")}
        for n in ray.nodes()
    ]


def _kill_replica(app: str, channel: str, deployment: str, timeout_s: float) -> dict[str, Any]:
    """Kill one live replica of ``deployment`` (Ray must not restart it: replacing it is Serve's job), then wait
    until the deployment has as many live replicas as before, none of them the killed one."""
    import ray

    replicas = [a for a in _actors(app, channel) if a.deployment == deployment and a.state == "ALIVE"]
    if not replicas:
        raise RuntimeError(f"no live replica of {deployment}")
    victim = replicas[0]
    ray.kill(ray.get_actor(victim.name, namespace=SERVE_NAMESPACE), no_restart=True)
    started = time.monotonic()
    replaced = False
    while time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        alive = [a for a in _actors(app, channel) if a.deployment == deployment and a.state == "ALIVE"]
        if len(alive) >= len(replicas) and all(a.name != victim.name for a in alive):
            replaced = True
            break
    return {
        "killed": victim.name,
        "pid": victim.pid,
        "node_id": victim.node_id,
        "replicas": len(replicas),
        "replaced": replaced,
        "replaced_after_s": round(time.monotonic() - started, 1),
    }


def _kill_channel(app: str, name: str, namespace: str, timeout_s: float) -> dict[str, Any]:
    """Kill the named actor letting Ray restart it (it has max_restarts=-1); wait until it is alive again."""
    import ray

    before = next((a for a in _actors(app, name) if a.name == name), None)
    if before is None:
        raise RuntimeError(f"no live actor {name}")
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
    started = time.monotonic()
    back = False
    while time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        now = next((a for a in _actors(app, name) if a.name == name), None)
        if now is not None and now.state == "ALIVE" and (now.restarts > before.restarts or now.pid != before.pid):
            back = True
            break
    return {"killed": name, "pid": before.pid, "restarted": back, "after_s": round(time.monotonic() - started, 1)}


def _wait_replicas(app: str, channel: str, wanted: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """Wait until every deployment in ``wanted`` has that many live replicas; whether it happened, and where all run."""
    started = time.monotonic()
    complete = False
    while time.monotonic() - started < timeout_s:
        alive = [a for a in _actors(app, channel) if a.state == "ALIVE"]
        if all(sum(1 for a in alive if a.deployment == d) >= n for d, n in wanted.items()):
            complete = True
            break
        time.sleep(1.0)
    actors = [a.__dict__ for a in _actors(app, channel)]
    return {"complete": complete, "after_s": round(time.monotonic() - started, 1), "actors": actors}


def _spread(app: str, channel: str, node_id: str, deployments: list[str], timeout_s: float) -> dict[str, Any]:
    """Put one replica of each of ``deployments`` on ``node_id``, within ``timeout_s`` in all: while none is there,
    kill one elsewhere and wait for Serve's replacement (Serve places replicas with Ray's SPREAD strategy, which
    takes the nodes in turn, so a few tries land one there). What was done, and where everything ended."""
    import ray

    deadline = time.monotonic() + timeout_s
    tries: dict[str, int] = {}
    done: dict[str, bool] = {}
    while time.monotonic() < deadline:
        alive = [a for a in _actors(app, channel) if a.state == "ALIVE"]
        waiting = False
        for deployment in deployments:
            replicas = [a for a in alive if a.deployment == deployment]
            if any(a.node_id == node_id for a in replicas):
                done[deployment] = True
                continue
            done[deployment] = False
            if len(replicas) < 2:  # one replica: wait for the replacement of the last kill (or leave it)
                waiting = waiting or deployment in tries
                continue
            ray.kill(ray.get_actor(replicas[0].name, namespace=SERVE_NAMESPACE), no_restart=True)
            tries[deployment] = tries.get(deployment, 0) + 1
            waiting = True
        if not waiting:
            break
        time.sleep(2.0)
    return {"on_node": done, "kills": tries, "actors": [a.__dict__ for a in _actors(app, channel)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--app", default="instantid")
    parser.add_argument("--channel", default="instantid-job-events")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("actors")
    kill = sub.add_parser("kill-replica")
    kill.add_argument("deployment")
    kill.add_argument("--timeout", type=float, default=180.0)
    channel = sub.add_parser("kill-channel")
    channel.add_argument("name")
    channel.add_argument("namespace")
    channel.add_argument("--timeout", type=float, default=120.0)
    wait = sub.add_parser("wait-replicas")
    wait.add_argument("wanted", nargs="+", help="DEPLOYMENT=COUNT")
    wait.add_argument("--timeout", type=float, default=240.0)
    spread = sub.add_parser("spread")
    spread.add_argument("node_id")
    spread.add_argument("deployments", nargs="+")
    spread.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)

    import ray

    ray.init(address=args.address, log_to_driver=False, logging_level=logging.ERROR, namespace="instantid-chaos")
    try:
        if args.command == "actors":
            result: dict[str, Any] = {
                "nodes": _nodes(),
                "actors": [a.__dict__ for a in _actors(args.app, args.channel)],
            }
        elif args.command == "kill-replica":
            result = _kill_replica(args.app, args.channel, args.deployment, args.timeout)
        elif args.command == "kill-channel":
            result = _kill_channel(args.app, args.name, args.namespace, args.timeout)
        elif args.command == "wait-replicas":
            wanted = {item.split("=")[0]: int(item.split("=")[1]) for item in args.wanted}
            result = _wait_replicas(args.app, args.channel, wanted, args.timeout)
        else:
            result = _spread(args.app, args.channel, args.node_id, args.deployments, args.timeout)
    finally:
        ray.shutdown()
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------ from the bench


class RayOps:
    """Runs one command of this module in a fresh driver process against the cluster at ``address``."""

    def __init__(self, address: str, env: dict[str, str], timeout_s: float = 180.0) -> None:
        self.address = address
        self.env = env
        self.timeout_s = timeout_s

    def run(self, *argv: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "serve.bench.chaos.ray_ops", self.address, *argv]
        timeout_s = self.timeout_s
        if "--timeout" in argv:  # the command's own wait, plus the driver's start and stop
            timeout_s = float(argv[argv.index("--timeout") + 1]) + 90.0
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ray_ops {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def actors(self) -> list[ActorInfo]:
        return [ActorInfo(**a) for a in self.run("actors")["actors"]]

    def spread(self, node_id: str, deployments: list[str], timeout_s: float = 90.0) -> dict[str, Any]:
        return self.run("spread", node_id, *deployments, "--timeout", str(timeout_s))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
