"""The chaos soak, short: about 3 minutes of open-loop traffic with every fault kind but one once (a replica of each
deployment, the job event channel, a 60 s S3 outage, an S3 crash, a restart of the service), then
the report's verdicts: nothing lost, nothing duplicated, no job stuck, every error body ours, every hostile request
a 4xx. Latency recovery and replica memory are reported, not asserted here (a shared 2-core machine makes both noisy
in 3 minutes); they are asserted by reading the report of a long run.

The second node's loss is left out here: after its raylet is killed, a new node joining the same cluster on a
loaded 2-core machine sometimes fails every try ("GCS cannot find the node", the raylet's 30 s registration
missed; seen five times in a row), which fails the whole run; the 60-minute soak keeps it (its node rejoined on the
second try). It runs the command as a user would, in its own process (it starts its own stack: a service
subprocess, a second Ray node, the embedded S3), and takes 9-11 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bench.chaos.arguments import FAULT_KINDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CI_FAULTS = tuple(kind for kind in FAULT_KINDS if kind != "node")


@pytest.fixture(scope="module")
def soak(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("chaos-home")
    (home / "weights").mkdir()
    (home / "weights" / "tiny").symlink_to(tiny_weights)
    work = tmp_path_factory.mktemp("chaos-work")
    out, png = work / "report.json", work / "soak.png"
    argv = ["bench", "chaos", "--minutes", "3", "--seed", "0", "--faults", ",".join(CI_FAULTS)]
    argv += ["--home", str(home), "--workdir", str(work / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "serve.tools.cli", *argv, "--out", str(out), "--plot", str(png)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2700,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    print(done.stderr[-3000:])  # the fault log and the verdicts, for whoever reads the test's output
    return report


def _evidence(report: dict, name: str) -> str:
    check = next(c for c in report["checks"] if c["name"] == name)
    return json.dumps({"counts": check["counts"], "evidence": check["evidence"][:5]}, indent=1)[:3000]


@pytest.mark.timeout(3000)
def test_every_fault_kind_happened_once(soak: dict) -> None:
    kinds = [fault["kind"] for fault in soak["faults"]]
    assert set(kinds) == set(CI_FAULTS)
    replicas = [fault["target"] for fault in soak["faults"] if fault["kind"] == "replica"]
    assert len(replicas) == len(set(replicas)) == 6
    assert [f for f in soak["faults"] if f["error"]] == []
    assert soak["capacity"]["requests_per_s"] > 0 and soak["traffic"]["jobs_accepted"] > 0


@pytest.mark.timeout(3000)
def test_nothing_is_lost(soak: dict) -> None:
    assert soak["headline"]["lost"] == 0, _evidence(soak, "results_stored")
    assert soak["headline"]["corrupt_or_mismatched"] == 0, _evidence(soak, "results_stored")


@pytest.mark.timeout(3000)
def test_nothing_is_duplicated(soak: dict) -> None:
    assert soak["headline"]["duplicated"] == 0, _evidence(soak, "nothing_twice")


@pytest.mark.timeout(3000)
def test_no_job_is_stuck(soak: dict) -> None:
    assert soak["headline"]["stuck"] == 0, _evidence(soak, "jobs_terminal")


@pytest.mark.timeout(3000)
def test_every_error_body_is_ours_and_leaks_nothing(soak: dict) -> None:
    assert soak["headline"]["malformed_errors"] == 0, _evidence(soak, "error_bodies")
    assert soak["headline"]["leaking_errors"] == 0, _evidence(soak, "error_bodies")


@pytest.mark.timeout(3000)
def test_every_hostile_request_got_a_4xx(soak: dict) -> None:
    hostile = next(c for c in soak["checks"] if c["name"] == "hostile_4xx")
    assert hostile["counts"]["answered"] > 0
    assert soak["headline"]["hostile_not_4xx"] == 0, _evidence(soak, "hostile_4xx")
