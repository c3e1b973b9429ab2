"""The soak's own stack and every operation a fault performs on it.

One work folder holds everything that must survive a restart of the service: the derived Serve config, the
embedded S3's data and credentials, the spool, and the logs of the service and the second node. The stack knows the
processes it started (the service, the second node) and finds the rest below them (the Ray head's processes, the
replicas, the embedded S3), so every signal it sends goes to a process it owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from serve.bench import BenchError, progress
from serve.tools.local_ray import SINGLE_MACHINE_ENV

from .node import WorkerNode
from .ray_ops import RayOps
from .s3_audit import find_weed, s3_client, weed_ports
from .service import ServiceProcess

SPREAD = ("FaceAnalyzer", "Denoiser", "ResultStore")  # the deployments with a replica on each node
CHANNEL = ("instantid-job-events", "instantid")  # the job event channel actor's name and namespace


@dataclass
class StackPaths:
    work: Path
    config: Path

    @property
    def s3_data(self) -> Path:
        return self.work / "s3"


class ChaosStack:
    """The service (a subprocess), its second Ray node, and handles on its S3; started by :meth:`start`."""

    def __init__(self, paths: StackPaths, bucket: str, prefix: str) -> None:
        self.paths = paths
        self.bucket = bucket
        self.prefix = prefix
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",) and not k.startswith("AWS_")}
        self.env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": self.env.get("RAY_AUTH_MODE", "token")}
        # The service's Ray listens on 127.0.0.1 only (Ray's single-machine mode): the soak's own Ray drivers
        # connect to it in the same mode, or Ray would replace the loopback address with the machine's.
        self.env[SINGLE_MACHINE_ENV] = "0"
        self.service = ServiceProcess(paths.config, paths.work / "service.log", self.env)
        self.node = WorkerNode(paths.work / "node.log", self.env)
        self.url = ""
        self.ops: RayOps | None = None
        self.markers: set[str] = {str(paths.work)}  # what no error message may show
        self.placement: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, spread: bool = True) -> None:
        """The service, the second node joining its Ray head before the applications deploy, and (``spread``) a
        replica of each of SPREAD on the second node, killing replicas until Serve places one there."""
        started = time.monotonic()
        serving = self.service.start(on_ray=self._join_second_node)
        self.url = serving.url
        self.ops = RayOps(serving.gcs_address, self.env)
        self.markers.add(serving.gcs_address)
        if self.node.pid is None:  # the head was up before we saw it: join now
            self._join_second_node(serving.gcs_address)
        if spread:
            self.placement = self.spread()
        self.note_s3_ports()
        progress(f"stack ready after {time.monotonic() - started:.0f} s: {self.url}, Ray at {serving.gcs_address}")

    def _join_second_node(self, gcs_address: str) -> None:
        """Start the second node with the embedded S3's endpoint and credentials in its environment: the service
        hands them to its head node's workers through its own environment, which a node started apart from it
        does not share (its ResultStore replicas would have no S3)."""
        node_id = self.node.start(gcs_address, self.s3_env())
        progress(f"second Ray node {node_id[:12]} joined {gcs_address} on 127.0.0.1")

    def spread(self, timeout_s: float = 240.0) -> dict[str, Any]:
        """Make sure each of SPREAD has a replica on the second node (bounded); where every replica runs."""
        node_id = self.node.node_id()
        if self.ops is None or node_id is None:
            return {}
        placed = self.ops.spread(node_id, list(SPREAD), timeout_s)
        on_second = dict(placed["on_node"])
        progress(f"replicas on the second node: {on_second} (kills to get there: {placed['kills']})")
        return {"second_node": node_id, "on_second_node": on_second, "kills": placed["kills"]}

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.node.stop()
        with contextlib.suppress(Exception):
            self.service.stop()

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack (for RSS sampling): the service's tree and the second node's."""
        return self.service.descendants() + self.node.processes()

    # ------------------------------------------------------------------------------------------ S3

    def weed(self) -> psutil.Process | None:
        return find_weed(self.service.descendants(), self.paths.s3_data)

    def note_s3_ports(self) -> dict[str, int]:
        """The running store's ports, remembered as markers no error message may show."""
        weed = self.weed()
        ports = weed_ports(weed) if weed is not None else {}
        if "s3.port" in ports:
            self.markers.add(f"127.0.0.1:{ports['s3.port']}")
        return ports

    def s3_env(self) -> dict[str, str]:
        """What ``EmbeddedS3.env()`` gives the service's workers: the running store's endpoint and credentials."""
        ports = self.note_s3_ports()
        if "s3.port" not in ports:
            raise BenchError("the embedded S3 is not running")
        creds = json.loads((self.paths.s3_data / "credentials.json").read_text())
        return {
            "AWS_ACCESS_KEY_ID": creds["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{ports['s3.port']}",
        }

    def s3(self) -> Any:
        """A boto3 client for the store as it runs now (its port changes when the service restarts it)."""
        ports = self.note_s3_ports()
        if "s3.port" not in ports:
            raise BenchError("the embedded S3 is not running")
        return s3_client(self.paths.s3_data, f"http://127.0.0.1:{ports['s3.port']}", self.bucket)

    def s3_answers(self) -> bool:
        try:
            self.s3().list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            return True
        except Exception:
            return False

    # ------------------------------------------------------------------------------------------ faults

    def kill_replica(self, deployment: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """Kill one replica of ``deployment`` (no restart by Ray: Serve must replace it) and wait (bounded) until
        the deployment has as many live replicas as before, none of them the killed one."""
        assert self.ops is not None
        return self.ops.run("kill-replica", deployment, "--timeout", str(timeout_s))

    def kill_channel(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Kill the job event channel (Ray restarts it: it has ``max_restarts=-1``) and wait until it is back."""
        assert self.ops is not None
        return self.ops.run("kill-channel", CHANNEL[0], CHANNEL[1], "--timeout", str(timeout_s))

    def lose_node(self, timeout_s: float = 240.0) -> dict[str, Any]:
        """SIGKILL the second node's raylet; wait (bounded) until Serve runs every deployment's replicas again
        (on the head node); then start a fresh second node. What ran where, and how long each part took."""
        assert self.ops is not None
        node_id = self.node.node_id()
        before = [a for a in self.ops.actors() if a.deployment]
        lost = sorted(f"{a.deployment}:{a.name.rsplit('#', 1)[-1]}" for a in before if a.node_id == node_id)
        wanted = {d: sum(1 for a in before if a.deployment == d) for d in {a.deployment for a in before}}
        started = time.monotonic()
        pid = self.node.kill_raylet()
        detail: dict[str, Any] = {"raylet_pid": pid, "node_id": node_id, "replicas_lost": lost}
        moved = self.ops.run(
            "wait-replicas", *(f"{d}={n}" for d, n in sorted(wanted.items())), "--timeout", str(timeout_s)
        )
        detail["replaced"] = moved["complete"]
        detail["replaced_after_s"] = round(time.monotonic() - started, 1)
        detail["head_only"] = moved["complete"] and all(a["node_id"] != node_id for a in moved["actors"])
        self.node.stop()
        new_id = self.node.start(self.ops.address, self.s3_env())
        detail["new_node_id"] = new_id
        return detail

    def stall_s3(self, seconds: float) -> dict[str, Any]:
        """SIGSTOP the embedded S3's process group for ``seconds``, then SIGCONT: a 60 s outage on the same data
        and port that no supervisor restarting a *dead* store can shorten (the process is alive, just stopped)."""
        weed = self.weed()
        if weed is None:
            raise BenchError("no embedded S3 process to stop")
        group = os.getpgid(weed.pid)
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(group, signal.SIGCONT)
        return {"pid": weed.pid, "signal": "SIGSTOP/SIGCONT", "seconds": seconds}

    def crash_s3(self, grace_s: float) -> dict[str, Any]:
        """SIGKILL the embedded S3 and wait ``grace_s`` for the service to start it again; if it does not, restart
        the service (an operator's remedy) so that the soak can go on. What happened."""
        weed = self.weed()
        if weed is None:
            raise BenchError("no embedded S3 process to kill")
        weed.kill()
        started = time.monotonic()
        detail: dict[str, Any] = {"pid": weed.pid, "signal": "SIGKILL"}
        while time.monotonic() - started < grace_s:
            time.sleep(1.0)
            restarted = self.weed()
            if restarted is not None and restarted.pid != weed.pid and self.s3_answers():
                detail |= {"restarted_by_service": True, "after_s": round(time.monotonic() - started, 1)}
                return detail
        detail["restarted_by_service"] = False
        progress(f"the service did not restart its S3 within {grace_s:.0f} s; restarting the service to go on")
        detail["service_restart"] = self.restart_service()
        return detail

    def restart_service(self) -> dict[str, Any]:
        """SIGTERM the service (it stops Serve, Ray and its S3), stop the second node (its cluster is gone), start
        both again on the same S3 data (replicas where Serve puts them: no kills to spread them, which would be
        faults of their own). How long each part took."""
        stopped_s = self.service.stop()
        self.node.stop()
        started = time.monotonic()
        self.start(spread=False)
        return {"stop_s": round(stopped_s, 1), "start_s": round(time.monotonic() - started, 1), "url": self.url}
