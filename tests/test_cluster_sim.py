"""The production topology on a simulated multi-node Ray cluster: placement per node type, then node loss.

``ray.cluster_utils.Cluster`` starts one Ray node per node type of cluster/rayservice.yaml on this machine (the head
with no CPUs, a CPU node, a small-GPU node, a large-GPU node; CPUs, logical GPUs, custom resources and labels as
Ray's KubeRay autoscaler derives them from the worker groups) and serves production.yaml's app on it: every
deployment's ``ray_actor_options`` as in production, tiny weights, the session's SeaweedFS, one replica each.

A ``Cluster`` cannot share a process with the suite's own single-node Ray (tests/serve_fixtures.py), so the
scenario runs once per module in a subprocess (tests/cluster_sim_driver.py), which reports one JSON line and
always shuts its cluster down; the tests below assert on that report and on the objects in S3.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.cluster_sim_driver import HEAD, MARKER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INTENDED = {
    "Ingress": "cpu",
    "FaceAnalyzer": "cpu",
    "ResultStore": "cpu",
    "ControlMaps": "cpu",
    "SafetyChecker": "cpu",
    "PromptEncoder": "gpu-small",
    "Denoiser": "gpu-large",
}
DRIVER_DEADLINE_S = 420  # the driver gives up (and shuts its cluster down) after this
SUBPROCESS_TIMEOUT_S = DRIVER_DEADLINE_S + 60


def _run_driver(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any] | None, str, str]:
    cmd = [sys.executable, "-m", "tests.cluster_sim_driver", *args, "--deadline-s", str(DRIVER_DEADLINE_S)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the driver's handler raises, its `finally` shuts the cluster down
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # the nodes' reaper processes still take Ray down with it
            out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    report = json.loads(lines[-1][len(MARKER) :]) if lines else None
    return report, out, err


@pytest.fixture(scope="module")
def sim(tiny_weights: Path, embedded_s3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("cluster-sim")
    env = {**os.environ, **embedded_s3.env(), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # the driver starts its own cluster; never the suite's
    args = ["--weights", str(tiny_weights), "--bucket", embedded_s3.bucket, "--workdir", str(workdir), "--cycle-cpu"]
    report, out, err = _run_driver(args, env)
    # Kept beside the test's tmp folder for post-mortems (pytest keeps the last few).
    (workdir / "driver.stdout").write_text(out)
    (workdir / "driver.stderr").write_text(err)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    context = f"\n--- driver stderr (tail) ---\n{err[-3000:]}\n--- stdout (tail) ---\n{out[-2000:]}"
    assert report is not None, f"the cluster driver printed no report{context}"
    assert report.get("finished"), f"the cluster scenario failed:\n{report.get('error')}{context}"
    return report


def _in_s3(s3, uri: str) -> bytes:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _assert_generated(result: dict[str, Any], s3) -> None:
    assert result["status"] == 200, result
    assert result["in_s3"] and result["uris"], result
    for uri in result["uris"]:
        assert Image.open(io.BytesIO(_in_s3(s3, uri))).size == (256, 256)


# ----------------------------------------------------------------------------------------------- placement (A)


def test_nodes_carry_the_manifest_groups_resources_and_labels(sim: dict[str, Any]) -> None:
    types = sim["node_types"]
    assert set(types) == {HEAD, "cpu", "gpu-small", "gpu-large"}
    assert types[HEAD]["num_cpus"] == 0
    assert types["cpu"]["resources"] == {"cpu_pool": 100}
    assert types["gpu-small"]["resources"] == {"small_gpu_pool": 100, "accelerator_type:L4": 1}
    assert types["gpu-large"]["resources"] == {"large_gpu_pool": 100, "accelerator_type:H100": 1}
    by_type = {node["type"]: node for node in sim["nodes"].values()}
    assert set(by_type) == set(types)
    for name, spec in types.items():
        advertised = by_type[name]["resources"]
        assert advertised.get("CPU", 0) == spec["num_cpus"], name
        assert advertised.get("GPU", 0) == spec["num_gpus"], name
        for key, amount in spec["resources"].items():
            assert advertised.get(key) == amount, (name, key)
        assert by_type[name]["labels"] == spec["labels"], name
    assert by_type["gpu-small"]["labels"] == {"ray.io/accelerator-type": "L4"}
    assert by_type["gpu-large"]["labels"] == {"ray.io/accelerator-type": "H100"}


def test_production_actor_options_are_kept(sim: dict[str, Any]) -> None:
    options = sim["actor_options"]
    assert options["ingress"]["resources"] == {"cpu_pool": 0.01}
    assert options["prompt"] == {
        "num_cpus": 2,
        "num_gpus": 1,
        "accelerator_type": "L4",
        "resources": {"small_gpu_pool": 0.01},
    }
    assert options["denoiser"] == {
        "num_cpus": 4,
        "num_gpus": 1,
        "accelerator_type": "H100",
        "resources": {"large_gpu_pool": 0.01},
    }


def test_each_deployment_runs_on_its_intended_node_type(sim: dict[str, Any]) -> None:
    assert sim["status"]["status"] == "RUNNING", sim["status"]
    placement = sim["placement"]
    assert set(placement) == set(INTENDED)
    head_ids = {node_id for node_id, node in sim["nodes"].items() if node["type"] == HEAD}
    for deployment, node_type in INTENDED.items():
        replicas = placement[deployment]
        assert len(replicas) == 1, (deployment, replicas)
        for replica in replicas:
            # Classified by the resources the node advertises, and by which node the simulation started.
            assert replica["type"] == replica["started_as"] == node_type, (deployment, replica)
            assert replica["node_id"] not in head_ids, deployment
    # With proxy_location EveryNode the head runs a proxy (and the controller), but no replica.
    assert HEAD in sim["proxy_nodes"]


def test_a_generation_goes_through_every_node_type_and_lands_in_s3(sim: dict[str, Any], embedded_s3) -> None:
    _assert_generated(sim["first"], embedded_s3)


# ----------------------------------------------------------------------------------------------- node loss (B)


def _bounded(probe: dict[str, Any], context: str) -> None:
    """A request sent while a node is gone ended: it got an HTTP answer before the client's timeout."""
    assert probe["status"] is not None, f"a request during the outage hung or lost its connection: {probe}{context}"


def test_losing_the_large_gpu_node_is_noticed_and_recovered_on_a_fresh_node(sim: dict[str, Any], embedded_s3) -> None:
    loss = sim["large_gpu_loss"]
    context = f"\n{json.dumps(loss, indent=1)}"
    # While the node is gone Serve reports the Denoiser (and so the app) as not healthy.
    assert loss["noticed"], context
    assert loss["status_while_gone"]["deployments"]["Denoiser"]["status"] != "HEALTHY", context
    # Requests sent during the outage end: served late, or a JSON error from the (alive) ingress.
    for probe in (loss["during_outage"], loss["during_outage_after_notice"]):
        _bounded(probe, context)
        if probe["status"] != 200:
            assert probe["status"] >= 500 and probe["json"], context
            assert probe["error"] in {"timeout", "replica_unavailable", "overloaded"}, context
    # A fresh large-GPU node joins: the Denoiser is re-placed there, the app is RUNNING, requests succeed.
    assert loss["recovered"], context
    assert loss["status_after"]["status"] == "RUNNING", context
    assert loss["new_node"] != loss["removed_node"]
    (denoiser,) = loss["placement_after"]["Denoiser"]
    assert denoiser["node_id"] == loss["new_node"] and denoiser["type"] == "gpu-large", context
    assert len(loss["after"]) == 2, context
    for result in loss["after"]:
        _assert_generated(result, embedded_s3)


def test_losing_the_cpu_node_moves_ingress_face_and_store_to_a_fresh_cpu_node(sim: dict[str, Any], embedded_s3) -> None:
    loss = sim["cpu_loss"]
    context = f"\n{json.dumps(loss, indent=1)}"
    assert loss["noticed"], context
    # The ingress itself is gone, so Serve's proxies (head and GPU nodes) answer on their own, without the API's
    # JSON envelope: a plain 500 when routed to the dead replica, 408 after http_options.request_timeout_s while
    # no replica exists, or 200 once the new node's ingress is up. Never a hang.
    for probe in (loss["during_outage"], loss["during_outage_after_notice"]):
        _bounded(probe, context)
        assert probe["status"] in (200, 408) or probe["status"] >= 500, context
    assert loss["recovered"], context
    for deployment in ("Ingress", "FaceAnalyzer", "ResultStore"):
        (replica,) = loss["placement_after"][deployment]
        assert replica["node_id"] == loss["new_node"] and replica["type"] == "cpu", (deployment, context)
    assert len(loss["after"]) == 2, context
    for result in loss["after"]:
        _assert_generated(result, embedded_s3)
    # Nothing moved onto the head or across node types along the way.
    for deployment, replicas in sim["final_placement"].items():
        assert [r["type"] for r in replicas] == [INTENDED[deployment]], (deployment, sim["final_placement"])
