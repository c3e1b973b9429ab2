"""Production topology on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) on one machine.

Run by tests/test_cluster_sim.py in a subprocess (a ``Cluster`` cannot share a process with the suite's own
single-node Ray): ``python -m tests.cluster_sim_driver --weights DIR --bucket NAME --workdir DIR``. S3 endpoint
and credentials come from the environment (the standard AWS chain, as on Kubernetes).

One Ray node (its own raylet, object store and worker processes) per node type of cluster/rayservice.yaml: the
head with ``num-cpus: 0`` and one node per worker group, each started with the CPUs, GPUs, custom resources and
labels that Ray's KubeRay autoscaler derives from the group (the GPUs are logical: no CUDA here). The app is
serve/configs/production.yaml's, every deployment's ``ray_actor_options`` untouched, with tiny weights, the
embedded S3, CPU devices and one replica per deployment. The scenario:

1. ``placement``: every replica's node type, then one HTTP generation and its objects in S3;
2. ``large_gpu_loss``: the large-GPU node is killed (no graceful shutdown, as a lost machine), one request is
   sent while it is gone, a fresh large-GPU node joins (as the autoscaler would start one), the app must be
   RUNNING again with the Denoiser on the new node, and two more generations must succeed;
3. ``cpu_loss`` (``--cycle-cpu``): the same for the CPU node (ingress, face analysis, result store).

Prints exactly one line ``CLUSTER_SIM_RESULT <json>`` (also on failure, with ``error``), then exits 0 when the
scenario ran to the end. The test makes the assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
PRODUCTION = ROOT / "serve" / "configs" / "production.yaml"
APP_NAME = "instantid"
MARKER = "CLUSTER_SIM_RESULT "
HEAD = "head"
# Small requests: tiny weights at 256x256, two steps, PNG.
FAST = {"num_inference_steps": 2, "width": 256, "height": 256, "style": "none", "output_format": "png"}


class Deadline(Exception):
    """The driver's own time limit: raised in the main thread so that the cluster is always shut down."""


# --------------------------------------------------------------------------------------------- topology


def node_types_from_manifest(manifest: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    """Node types as Ray's KubeRay autoscaler derives them from the RayService: CPU, GPU, custom resources, labels.

    Keys: ``head`` and each worker group's name. ``memory`` is dropped: it is accounting only and the
    manifest's values (up to 160 GiB) are far beyond this machine.
    """
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    spec = yaml.safe_load(manifest.read_text())["spec"]["rayClusterConfig"]
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "sim", "namespace": "sim"}, "spec": spec})
    head_type = derived["head_node_type"]
    types: dict[str, dict[str, Any]] = {}
    for name, node_type in derived["available_node_types"].items():
        resources = {k: v for k, v in node_type["resources"].items() if k != "memory"}
        types[HEAD if name == head_type else name] = {
            "num_cpus": int(resources.pop("CPU", 0)),
            "num_gpus": int(resources.pop("GPU", 0)),
            "resources": resources,
            "labels": dict(node_type.get("labels") or {}),
        }
    return types


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, already dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SimCluster:
    """A ``ray.cluster_utils.Cluster`` whose nodes are the manifest's node types."""

    def __init__(self, types: dict[str, dict[str, Any]], temp_dir: str) -> None:
        from ray.cluster_utils import Cluster

        self.types = types
        self.temp_dir = temp_dir
        self.cluster = Cluster(shutdown_at_exit=True)
        self.nodes: dict[str, Any] = {}  # type -> the live ray._private.node.Node of that type
        self.type_of: dict[str, str] = {}  # node id (hex) -> type, for every node ever started

    def add(self, type_name: str) -> str:
        spec = self.types[type_name]
        kwargs: dict[str, Any] = {
            "num_cpus": spec["num_cpus"],
            "num_gpus": spec["num_gpus"],
            "resources": dict(spec["resources"]),
            "labels": dict(spec["labels"]),
            "object_store_memory": 100 * 1024 * 1024,
            "temp_dir": self.temp_dir,
        }
        if type_name == HEAD:
            # Explicit free ports: the defaults (6379, 52365...) may be held by another local Ray instance.
            kwargs.update(
                gcs_server_port=free_port(),
                include_dashboard=False,
                dashboard_agent_listen_port=free_port(),
                runtime_env_agent_port=free_port(),
            )
        node = self.cluster.add_node(wait=True, **kwargs)
        self.nodes[type_name] = node
        self.type_of[node.node_id] = type_name
        return node.node_id

    def kill(self, type_name: str) -> dict[str, Any]:
        """Remove a worker node the way a lost machine goes: its processes are killed, nothing drains.

        ``remove_node`` kills the node's own processes (raylet, agents); its worker processes (replicas, the
        Serve proxy) only exit once they notice their raylet is gone, and meanwhile an orphaned proxy would still
        accept connections on the shared port. A lost machine takes them along at once, so they are waited for
        briefly and then killed by pid.
        """
        from ray._private import state

        node = self.nodes.pop(type_name)
        pids = [
            actor["Pid"]
            for actor in state.actors().values()
            if actor.get("State") == "ALIVE" and actor["Address"]["NodeID"] == node.node_id and actor.get("Pid")
        ]
        self.cluster.remove_node(node, allow_graceful=False)
        alive_after_remove = [pid for pid in pids if _alive(pid)]
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout_s=5, period_s=0.1)
        stragglers = [pid for pid in pids if _alive(pid)]
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout_s=10, period_s=0.1)
        return {
            "node_id": node.node_id,
            "actor_processes": len(pids),
            "alive_after_remove_node": len(alive_after_remove),
            "killed_by_pid": len(stragglers),
        }

    def shutdown(self) -> None:
        self.cluster.shutdown()


# --------------------------------------------------------------------------------------------- app config


def sim_app_args(weights: Path, bucket: str, workdir: Path, request_timeout_s: float) -> dict[str, Any]:
    """production.yaml's app args with tiny weights, the embedded S3, CPU devices and one replica each.

    Every deployment keeps its production ``ray_actor_options`` (num_cpus, num_gpus, accelerator_type,
    resources), queue limits and health checks: placement is what is under test.
    """
    (app,) = yaml.safe_load(PRODUCTION.read_text())["applications"]
    args = app["args"]
    args["weights"] = {"root": str(weights)}
    s3 = dict(args["storage"]["s3"])
    s3.update(
        bucket=bucket,
        prefix="cluster-sim",
        addressing_style="path",
        region=os.environ.get("AWS_REGION", s3.get("region", "us-east-1")),
        create_bucket=True,
    )
    args["storage"] = {"s3": s3, "spool_dir": str(workdir / "spool"), "spool_retry_s": 2}
    args["api"].update(request_timeout_s=request_timeout_s, auth={"required": False})
    for stage in ("prompt", "denoiser"):
        args[stage].update(device="cpu", dtype="float32")
    args["face"]["providers"] = ["CPUExecutionProvider"]
    for options in (args[k]["deployment"] for k in ("ingress", "face", "prompt", "denoiser", "control_maps", "store")):
        options.pop("autoscaling_config", None)
        options["num_replicas"] = 1
    return args


# --------------------------------------------------------------------------------------------- observation


def nodes_report(sim: SimCluster) -> dict[str, dict[str, Any]]:
    """What the GCS says about every live node: its type, resources and labels."""
    import ray

    report = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        labels = node.get("Labels") or {}
        report[node["NodeID"]] = {
            "type": sim.type_of.get(node["NodeID"], "unknown"),
            "resources": node["Resources"],
            "labels": {k: v for k, v in labels.items() if k in _manifest_label_keys(sim)},
        }
    return report


def _manifest_label_keys(sim: SimCluster) -> set[str]:
    return {key for spec in sim.types.values() for key in spec["labels"]}


def node_type_by_resources(resources: dict[str, float], types: dict[str, dict[str, Any]]) -> str:
    """The node type whose custom resources a node advertises (the head advertises none of them)."""
    matches = [
        name
        for name, spec in types.items()
        if spec["resources"] and all(resources.get(k, 0) >= v for k, v in spec["resources"].items())
    ]
    return matches[0] if len(matches) == 1 else (HEAD if not matches else "ambiguous")


def placement(sim: SimCluster) -> dict[str, list[dict[str, str]]]:
    """Deployment -> its live replicas' nodes: node id, type (by resources) and type (by the node we started)."""
    import ray
    from ray._private import state

    resources_of = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    found: dict[str, list[dict[str, str]]] = {}
    for actor in state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") != "ALIVE" or not name.startswith(f"SERVE_REPLICA::{APP_NAME}#"):
            continue
        deployment = name.split("#")[1]
        node_id = actor["Address"]["NodeID"]
        found.setdefault(deployment, []).append(
            {
                "node_id": node_id,
                "type": node_type_by_resources(resources_of.get(node_id, {}), sim.types),
                "started_as": sim.type_of.get(node_id, "unknown"),
            }
        )
    return found


def proxy_nodes() -> list[str]:
    """Node ids of the live Serve proxies (actors named ``SERVE_PROXY_ACTOR-<node id>``)."""
    from ray._private import state

    return sorted(
        actor["Address"]["NodeID"]
        for actor in state.actors().values()
        if actor.get("State") == "ALIVE" and "SERVE_PROXY_ACTOR" in (actor.get("Name") or "")
    )


def app_status() -> dict[str, Any]:
    from ray import serve as ray_serve

    app = ray_serve.status().applications.get(APP_NAME)
    if app is None:
        return {"status": "MISSING", "deployments": {}}
    deployments = {
        name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status), "replicas": d.replica_states}
        for name, d in app.deployments.items()
    }
    return {"status": str(app.status.value if hasattr(app.status, "value") else app.status), "deployments": deployments}


def wait_for(predicate: Callable[[], bool], timeout_s: float, period_s: float = 1.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if predicate():
                return True
        except Exception:  # state APIs may fail transiently while nodes come and go
            pass
        time.sleep(period_s)
    return False


# --------------------------------------------------------------------------------------------- requests


class Client:
    def __init__(self, url: str, bucket: str) -> None:
        from deployments.storage.s3 import S3Settings, make_client
        from tests.support import astronaut_jpeg

        self.url = url
        self.bucket = bucket
        self.face = astronaut_jpeg()
        settings = S3Settings(
            bucket=bucket,
            endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"],
            region=os.environ.get("AWS_REGION", "us-east-1"),
            max_attempts=2,
        )
        self.s3 = make_client(settings)  # the project's client: bounded timeouts, the standard credential chain

    def generate(self, seed: int, timeout_s: float) -> dict[str, Any]:
        """One multipart generation; status, error code, seconds, and whether every image is in S3."""
        import httpx

        fields = {"prompt": "an astronaut in a cluster", "seed": str(seed), **{k: str(v) for k, v in FAST.items()}}
        started = time.monotonic()
        result: dict[str, Any] = {"seed": seed}
        try:
            response = httpx.post(
                f"{self.url}/v1/generate",
                data=fields,
                files={"face_image": ("face.jpg", self.face, "image/jpeg")},
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            result.update(status=None, error=type(exc).__name__, seconds=round(time.monotonic() - started, 2))
            return result
        result.update(status=response.status_code, seconds=round(time.monotonic() - started, 2))
        try:
            body = response.json()
        except ValueError:
            result.update(json=False, text=response.text[:300])
            return result
        result["json"] = True
        if response.status_code != 200:
            result["error"] = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            return result
        result["uris"] = [image["uri"] for image in body["images"]]
        result["in_s3"] = bool(result["uris"]) and all(self.exists(uri) for uri in result["uris"])
        return result

    def exists(self, uri: str) -> bool:
        bucket, key = uri[len("s3://") :].split("/", 1)
        try:
            return self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
        except Exception as exc:  # only a 404 is "not there"; any other failure must not pass for it
            from deployments.storage.s3 import is_not_found

            if is_not_found(exc):
                return False
            raise


# --------------------------------------------------------------------------------------------- scenario


def recover(
    sim: SimCluster, client: Client, type_name: str, deployments: list[str], seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Kill the node of ``type_name``, probe while it is gone, add a fresh one, wait for RUNNING, probe again.

    Two probes run in the background while the node is gone: one sent right after the kill (routers may still
    hold the dead replicas), one once Serve has noticed the loss (no replica of the lost stage exists). Each
    must end (any status, but bounded); both are collected once the service has recovered.
    """
    report: dict[str, Any] = {"node_type": type_name}
    started = time.monotonic()
    killed = sim.kill(type_name)
    report["removed_node"] = killed.pop("node_id")
    report["kill"] = killed
    probe_timeout_s = args.request_timeout_s + 40  # beyond http_options.request_timeout_s (request_timeout_s + 20)
    with ThreadPoolExecutor(max_workers=2) as pool:
        probe = pool.submit(client.generate, seed, probe_timeout_s)
        # The controller notices dead replicas through their health checks (health_check_period_s) and starts
        # replacements, which stay pending until a node of the right type joins: the autoscaler's cue.
        report["noticed"] = wait_for(lambda: app_status()["status"] != "RUNNING", timeout_s=60, period_s=0.5)
        report["noticed_after_s"] = round(time.monotonic() - started, 1)
        report["status_while_gone"] = app_status()
        late_probe = pool.submit(client.generate, seed + 50, probe_timeout_s)
        report["probe_done_before_new_node"] = probe.done()
        report["new_node"] = sim.add(type_name)
        added = time.monotonic()

        def recovered() -> bool:
            if app_status()["status"] != "RUNNING":
                return False
            where = placement(sim)
            return all(len(where.get(d, [])) == 1 and where[d][0]["node_id"] == report["new_node"] for d in deployments)

        report["recovered"] = wait_for(recovered, timeout_s=args.recovery_timeout_s)
        report["recovered_after_s"] = round(time.monotonic() - added, 1)
        report["during_outage"] = probe.result()
        report["during_outage_after_notice"] = late_probe.result()
    report["status_after"] = app_status()
    report["placement_after"] = placement(sim)
    report["after"] = [client.generate(seed + 1 + i, timeout_s=120) for i in range(2)] if report["recovered"] else []
    return report


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import ray
    from ray import serve as ray_serve

    from serve.app import build_app
    from serve.config import AppConfig

    workdir = Path(args.workdir)
    types = node_types_from_manifest()
    result["node_types"] = types
    temp_dir = tempfile.mkdtemp(prefix="ray-sim-", dir="/tmp")  # short: Ray's socket paths live under it
    sim = SimCluster(types, temp_dir)
    try:
        t0 = time.monotonic()
        sim.add(HEAD)
        ray.init(address=sim.cluster.address, log_to_driver=False, include_dashboard=False)
        for name in types:
            if name != HEAD:
                sim.add(name)
        result["nodes"] = nodes_report(sim)
        port = free_port()
        ray_serve.start(
            proxy_location=args.proxy_location,
            http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": args.request_timeout_s + 20},
            logging_config={"enable_access_log": False},
        )
        config = AppConfig.model_validate(
            sim_app_args(Path(args.weights), args.bucket, workdir, args.request_timeout_s)
        )
        result["actor_options"] = {
            k: getattr(config, k).deployment.ray_actor_options
            for k in ("ingress", "face", "prompt", "denoiser", "control_maps", "store")
        }
        ray_serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        result["deploy_s"] = round(time.monotonic() - t0, 1)
        result["status"] = app_status()
        result["placement"] = placement(sim)
        result["proxy_nodes"] = sorted(sim.type_of.get(n, "unknown") for n in proxy_nodes())

        client = Client(f"http://127.0.0.1:{port}", args.bucket)
        result["first"] = client.generate(1, timeout_s=120)

        result["large_gpu_loss"] = recover(sim, client, "gpu-large", ["Denoiser"], 100, args)
        if args.cycle_cpu:
            result["cpu_loss"] = recover(sim, client, "cpu", ["Ingress", "FaceAnalyzer", "ResultStore"], 200, args)
        result["final_placement"] = placement(sim)
        result["finished"] = True
    finally:
        t1 = time.monotonic()
        if ray.is_initialized():  # ray_serve.shutdown() would otherwise start a local Ray just to find nothing
            try:
                ray_serve.shutdown()
            except Exception as exc:  # shut the cluster down regardless
                result.setdefault("cleanup_errors", []).append(repr(exc))
            ray.shutdown()
        sim.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        result["shutdown_s"] = round(time.monotonic() - t1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="tiny weights root")
    parser.add_argument("--bucket", required=True, help="results bucket on the S3 of AWS_ENDPOINT_URL_S3")
    parser.add_argument("--workdir", required=True, help="scratch folder (spool)")
    parser.add_argument("--cycle-cpu", action="store_true", help="also kill and replace the CPU node")
    parser.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"])
    parser.add_argument("--request-timeout-s", type=float, default=20.0, help="api.request_timeout_s")
    parser.add_argument("--recovery-timeout-s", type=float, default=180.0)
    parser.add_argument("--deadline-s", type=float, default=540.0, help="give up (and shut down) after this")
    args = parser.parse_args(argv)

    # Inherited by every node's raylet and so by every replica. The GPUs are logical: the GPU stages run on
    # ``device: cpu``. A raylet refuses ``num_gpus=1`` beside an empty CUDA_VISIBLE_DEVICES, so it is left unset
    # for the nodes and Ray is told not to set it for GPU replicas (it would name a device that is not there).
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Raylets prestart idle workers up to their logical CPUs (22 here): on 2 real cores that only slows startup.
    # (Ray's own config variables: RAY_ + the lower-case flag name.)
    os.environ.update({"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"})
    os.environ.pop("RAY_ADDRESS", None)

    def _expired(signum: int, frame: Any) -> None:
        raise Deadline(f"cluster simulation did not finish within {args.deadline_s:.0f} s (signal {signum})")

    signal.signal(signal.SIGALRM, _expired)
    signal.signal(signal.SIGTERM, _expired)
    signal.alarm(int(args.deadline_s))
    result: dict[str, Any] = {"finished": False}
    started = time.monotonic()
    code = 0
    try:
        run(args, result)
    except BaseException as exc:  # always report
        result["error"] = "".join(traceback.format_exception(exc))[-4000:]
        code = 1
    finally:
        signal.alarm(0)
        result["seconds"] = round(time.monotonic() - started, 1)
        sys.stdout.write(MARKER + json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
