"""The chaos soak's setup, without a stack: its Serve config is valid and fits one node, a short run plans every fault
kind once, the request mix is made of valid requests, and the command line parses."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import yaml

from deployments.generation.plan import plan_generation
from serve.bench.chaos.config import APP_NAME, DEPLOYMENTS, SIZING, bench_config
from serve.bench.chaos.faults import KINDS, plan
from serve.bench.chaos.mix import draw_spec, warmup_specs
from serve.bench.chaos.ray_ops import parse_replica_name
from serve.config import AppConfig
from serve.schemas import GenerateRequest
from serve.tools.cli import build_parser

LOCAL = Path(__file__).resolve().parents[1] / "serve" / "configs" / "local.yaml"


def test_the_bench_config_is_local_yaml_moved_to_the_work_folder_and_sized_for_two_nodes(tmp_path: Path) -> None:
    document = bench_config(
        yaml.safe_load(LOCAL.read_text()),
        work=tmp_path,
        weights=tmp_path / "w",
        port=18000,
        webhook_secret="s" * 32,
        request_timeout_s=120,
    )
    app = next(a for a in document["applications"] if a["name"] == APP_NAME)
    config = AppConfig.model_validate(app["args"])
    assert config.storage.embedded_data_dir == str(tmp_path / "s3") and config.storage.spool_dir == str(
        tmp_path / "spool"
    )
    assert document["http_options"] == {"host": "127.0.0.1", "port": 18000}
    hooks = config.api.webhooks
    assert hooks.allowed_hosts == ["127.0.0.1"] and hooks.allow_http and hooks.allow_private_addresses
    cpus = 0.0
    for section, (replicas, num_cpus) in SIZING.items():
        deployment = getattr(config, section).deployment
        assert (deployment.num_replicas, deployment.ray_actor_options["num_cpus"]) == (replicas, num_cpus)
        cpus += replicas * num_cpus
    assert cpus <= 1.0, "after losing the second node every replica must fit the head node's 2 logical CPUs"
    assert (
        config.models == AppConfig.model_validate(yaml.safe_load(LOCAL.read_text())["applications"][0]["args"]).models
    )


def test_a_short_run_plans_every_fault_kind_once_and_a_long_one_repeats_them() -> None:
    short = plan(list(KINDS), 180.0, 240.0)
    assert [f.target for f in short if f.kind == "replica"] == list(DEPLOYMENTS.values())
    assert {f.kind for f in short} == set(KINDS) and len(short) == len(DEPLOYMENTS) + len(KINDS) - 1
    assert all(0 < a.at_s < b.at_s < 180 for a, b in itertools.pairwise(short))
    long = plan(list(KINDS), 3600.0, 60.0)  # 3420 s between lead-in and tail hold 5 rounds of 11 at 60 s
    assert len(long) == 5 * len(short) and min(b.at_s - a.at_s for a, b in itertools.pairwise(long)) >= 60
    assert plan([], 600.0, 60.0) == []


def test_the_mix_is_made_of_valid_requests_and_covers_every_feature(tmp_path: Path) -> None:
    """Every drawn request passes the schema and the plan (every rule a 422 comes from) against local.yaml's
    catalogue and ControlNets, so that a 4xx in the soak is never the mix's own fault."""
    args = yaml.safe_load(LOCAL.read_text())["applications"][0]["args"]
    config = AppConfig.model_validate({**args, "weights": {"root": str(tmp_path)}})
    catalogue = config.weights.catalogue(config.models)
    rng = random.Random(0)
    specs = [draw_spec(rng) for _ in range(300)] + warmup_specs()
    for spec in specs:
        request = GenerateRequest.model_validate(spec.json_body())
        plan_generation(request.options(), request.inputs_given(), catalogue, sorted(config.denoiser.controlnets))
    labels = ",".join(spec.label for spec in specs)
    for feature in ("base=tiny-alt", "lora=style-peft", "lora=style-kohya", "mode=lcm", "mode=lightning", "mode=hyper"):
        assert feature in labels
    for feature in ("canny", "depth", "pose", "img2img", "two-people", "photos=", "images=2"):
        assert feature in labels
    assert [draw_spec(random.Random(7)).json_body() for _ in range(2)] == [
        draw_spec(random.Random(7)).json_body() for _ in range(2)
    ]


def test_the_mix_encodes_multipart_with_a_file_part_per_picture() -> None:
    spec = next(s for s in warmup_specs() if s.label == "two-people")
    fields, files = spec.multipart()
    assert [name for name, _ in files] == ["identity_0", "identity_1", "pose_image"]
    assert '"face_index": 4' in fields["identities"]
    controls = next(s for s in warmup_specs() if s.label == "controls")
    assert "control_image_pose" in [name for name, _ in controls.multipart()[1]]


@pytest.mark.parametrize(
    ("name", "deployment"),
    [
        ("SERVE_REPLICA::instantid#Denoiser#ab12cd34", "Denoiser"),
        ("SERVE_REPLICA::other#Denoiser#ab12cd34", None),
        ("SERVE_CONTROLLER_ACTOR", None),
        ("instantid-job-events", None),
    ],
)
def test_replica_actor_names_are_parsed_for_our_app_only(name: str, deployment: str | None) -> None:
    assert parse_replica_name(name, "instantid") == deployment


def test_the_command_line_parses_the_soak_and_refuses_unknown_fault_kinds(capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["bench", "chaos", "--minutes", "3", "--faults", "replica,node", "--seed", "4"])
    assert (args.bench_command, args.minutes, args.faults, args.seed, args.load) == (
        "chaos",
        3.0,
        ["replica", "node"],
        4,
        0.7,
    )
    assert build_parser().parse_args(["bench", "chaos", "--faults", "none"]).faults == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "chaos", "--faults", "meteor"])
    assert "unknown fault kind" in capsys.readouterr().err
