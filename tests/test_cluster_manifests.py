"""Offline checks of cluster/: KubeRay manifests, the embedded Serve config, placement and the image pin.

Nothing here needs a Kubernetes cluster, Docker or network. The manifests are validated against the KubeRay v1.7
CRDs (made strict: the API server prunes unknown fields silently, so a typo like `minReplica`
would otherwise be accepted and ignored), plus the operator's own semantic checks that the schema cannot express.
Placement is computed with Ray's KubeRay autoscaler code itself, i.e. what decides scale-ups in the cluster.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.kuberay.autoscaling_config import _HEAD_GROUP_NAME as HEAD  # autoscaler's head type

from serve.config import AppConfig, DeploymentOptions
from serve.tools import cluster
from tests.support import skip_unless_required

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
MANIFEST = CLUSTER / "rayservice.yaml"
PRODUCTION = ROOT / "serve" / "configs" / "production.yaml"
# The KubeRay v1.7 CRDs: INSTANTID_KUBERAY_CRDS, else a shared/kuberay folder beside or inside the checkout.
CRD_DIR = next(
    (
        d
        for d in (
            os.environ.get("INSTANTID_KUBERAY_CRDS"),
            ROOT.parent / "shared" / "kuberay",
            ROOT / "shared" / "kuberay",
        )
        if d and Path(d).is_dir()
    ),
    None,
)

# Which worker group each Serve deployment of AppConfig must land on (and only there).
INTENDED_GROUP = {
    "ingress": "cpu",
    "face": "cpu",
    "control_maps": "cpu",
    "store": "cpu",
    "safety": "cpu",
    "prompt": "gpu-small",
    "denoiser": "gpu-large",
}
UPGRADE_TYPES = {"NewCluster", "None", "NewClusterWithIncrementalUpgrade"}  # KubeRay's ValidateRayServiceSpec
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------------------------------- helpers


@functools.cache
def _crd(name: str) -> dict[str, Any]:
    """A KubeRay CRD, parsed once per session (18k lines: the C loader when available)."""
    path = Path(CRD_DIR) / name if CRD_DIR else None
    if path is None or not path.is_file():
        skip_unless_required("kuberay", f"KubeRay CRD {name} not found (INSTANTID_KUBERAY_CRDS or shared/kuberay)")
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _v1_schema(name: str) -> dict[str, Any]:
    version = next(v for v in _crd(name)["spec"]["versions"] if v["name"] == "v1")
    return copy.deepcopy(version["schema"]["openAPIV3Schema"])


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD openAPIV3Schema in which unknown fields are errors.

    Every object schema with ``properties`` and no ``additionalProperties`` of its own gets
    ``additionalProperties: false``; ``x-kubernetes-preserve-unknown-fields`` objects stay open; an
    ``x-kubernetes-int-or-string`` node without a type is given ``anyOf: [integer, string]``.
    """
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string") and not ({"type", "anyOf", "oneOf"} & node.keys()):
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        open_object = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
        if "properties" in node and not open_object:
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("anyOf", "allOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(out)
    # The CRD leaves top-level metadata as a bare object (the API server owns ObjectMeta): check what we write.
    out["properties"]["metadata"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": DNS1035.pattern},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    out["required"] = sorted({*out.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return out


def _crd_validator(file_name: str, kind: str) -> jsonschema.Draft4Validator:
    crd = _crd(file_name)
    assert crd["spec"]["names"]["kind"] == kind
    schema = strict_schema(_v1_schema(file_name))
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/v1"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft4Validator:
    return _crd_validator("ray.io_rayservices.yaml", "RayService")


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Draft4Validator:
    return _crd_validator("ray.io_rayclusters.yaml", "RayCluster")


def schema_errors(validator: jsonschema.Draft4Validator, doc: Any) -> list[str]:
    return sorted(
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in validator.iter_errors(doc)
    )


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in CLUSTER.glob("*.yaml") if not p.name.endswith(".patch.yaml"))


def patch_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.patch.yaml"))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as `kubectl patch --type merge` applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    (doc,) = load_docs(MANIFEST)
    return doc


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))


def groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head and every worker group of a RayCluster spec."""
    yield HEAD, spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is always the first one


def operator_errors(service: dict[str, Any]) -> list[str]:
    """The subset of KubeRay's ValidateRayServiceSpec / ValidateRayClusterSpec that a schema cannot express."""
    errors: list[str] = []
    spec = service["spec"]
    cluster_spec = spec["rayClusterConfig"]
    if not DNS1035.match(service["metadata"]["name"]):
        errors.append("metadata.name is not a DNS-1035 label")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"upgradeStrategy.type {upgrade!r} is not one of {sorted(UPGRADE_TYPES)}")
    if (cluster_spec["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("headGroupSpec.headService.metadata.name must not be set in a RayService")
    autoscaler_v2 = (cluster_spec.get("autoscalerOptions") or {}).get("version") == "v2"
    ft = cluster_spec.get("gcsFaultToleranceOptions")
    for name, group in groups(cluster_spec):
        params = group.get("rayStartParams") or {}
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{name}: no container")
            continue
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources set both in rayStartParams and in the group's resources field")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is rejected; use the group's labels field")
        for resource in group.get("resources") or {}:
            lowered = resource.lower()
            if lowered not in {"cpu", "gpu", "memory"} and lowered.endswith("gpu"):
                errors.append(f"{name}: custom resource {resource!r} ends in 'gpu': KubeRay would count it as GPUs")
        if autoscaler_v2 and pod.get("restartPolicy") not in (None, "Never"):
            errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        env_names = {e["name"] for e in ray_container(group).get("env", [])}
        if name == HEAD and "RAY_REDIS_ADDRESS" in env_names and not ft:
            errors.append("head: RAY_REDIS_ADDRESS enables GCS FT implicitly; use gcsFaultToleranceOptions")
        if name == HEAD and ft and ({"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & env_names or "redis-password" in params):
            errors.append("head: with gcsFaultToleranceOptions, set the Redis address/password there only")
    return errors


# --------------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_document_validates(
    path: Path, rayservice_validator: jsonschema.Draft4Validator, raycluster_validator: jsonschema.Draft4Validator
) -> None:
    docs = load_docs(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        kind = doc.get("kind")
        if kind == "RayService":
            assert schema_errors(rayservice_validator, doc) == []
            assert operator_errors(doc) == []
            # The embedded cluster spec must also be a valid RayCluster (same types, separate CRD file).
            as_cluster = {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": {"name": doc["metadata"]["name"]},
                "spec": doc["spec"]["rayClusterConfig"],
            }
            assert schema_errors(raycluster_validator, as_cluster) == []
        elif kind == "Secret":
            check_secret(doc)
        else:
            pytest.fail(f"{path.name}: no validation for kind {kind!r}; add one")


def check_secret(doc: dict[str, Any]) -> None:
    """Secrets are templates: v1, named, string data only, and visibly placeholder values."""
    assert doc["apiVersion"] == "v1" and doc["kind"] == "Secret"
    assert DNS1035.match(doc["metadata"]["name"]) or re.match(r"^[a-z0-9.-]+$", doc["metadata"]["name"])
    assert set(doc) <= {"apiVersion", "kind", "metadata", "type", "stringData"}, "use stringData, not data"
    assert doc.get("type", "Opaque") == "Opaque"
    data = doc["stringData"]
    assert data and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items())
    assert all(v.startswith("REPLACE-ME") for v in data.values()), "example secrets must hold placeholders only"


def test_secret_example_provides_every_required_key(rayservice: dict[str, Any]) -> None:
    """Each non-optional secretKeyRef of the manifests (patches included) names a key the template documents."""
    templates = {d["metadata"]["name"]: d["stringData"] for d in load_docs(CLUSTER / "secret.example.yaml")}
    docs = [rayservice, *(merge_patch(rayservice, load_docs(p)[0]) for p in patch_files())]
    refs = [ref for doc in docs for ref in _secret_refs(doc)]
    assert refs
    for ref in refs:
        if ref.get("optional"):
            continue
        assert ref["name"] in templates, f"Secret {ref['name']} is not in secret.example.yaml"
        assert ref["key"] in templates[ref["name"]], f"{ref['name']} lacks key {ref['key']}"


def _secret_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("secretKeyRef"), dict):
            yield node["secretKeyRef"]
        for value in node.values():
            yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)


@pytest.mark.parametrize("path", patch_files(), ids=lambda p: p.name)
def test_patches_give_a_valid_rayservice(
    path: Path, rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft4Validator
) -> None:
    (patch,) = load_docs(path)
    patched = merge_patch(rayservice, patch)
    assert patched != rayservice, f"{path.name} changes nothing"
    assert schema_errors(rayservice_validator, patched) == []
    assert operator_errors(patched) == []


def test_gcs_ft_patch_uses_redis_from_a_secret(rayservice: dict[str, Any]) -> None:
    (patch,) = load_docs(CLUSTER / "rayservice-gcs-ft.patch.yaml")
    ft = merge_patch(rayservice, patch)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith(("redis://", "rediss://"))
    assert "value" not in ft["redisPassword"], "the Redis password must come from a Secret"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    # A fixed namespace would make the old and new cluster of an upgrade share GCS state in Redis.
    assert "externalStorageNamespace" not in ft


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head_pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("bad_key", "container_of"),
    [
        ("minReplica", _worker),  # the worker group itself
        ("upgradeStrategie", lambda d: d["spec"]),  # the RayService spec
        ("nodeSelecter", _head_pod),  # a core/v1 PodSpec inside the template
        ("volumeMount", lambda d: _head_pod(d)["containers"][0]),  # a core/v1 Container
    ],
)
def test_strict_validation_rejects_misspelled_fields(
    bad_key: str, container_of: Any, rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft4Validator
) -> None:
    """Proves the strictness: the plain CRD schema accepts these (and the API server would silently prune them)."""
    broken = copy.deepcopy(rayservice)
    container_of(broken)[bad_key] = {}  # the value is irrelevant: the key itself is unknown
    errors = schema_errors(rayservice_validator, broken)
    assert any(f"'{bad_key}' was unexpected" in e for e in errors), errors
    plain = jsonschema.Draft4Validator(_v1_schema("ray.io_rayservices.yaml"))
    assert not any(bad_key in e for e in schema_errors(plain, broken)), "the unmodified CRD schema is not strict"


def test_strict_validation_rejects_bad_quantities(
    rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft4Validator
) -> None:
    broken = copy.deepcopy(rayservice)
    ray_container(broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])["resources"]["limits"]["memory"] = "26GB"
    assert schema_errors(rayservice_validator, broken)


# --------------------------------------------------------------------------------------------------- serveConfigV2


def test_serve_config_v2_is_a_valid_serve_deploy_config(rayservice: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    text = rayservice["spec"]["serveConfigV2"]
    assert text.startswith(cluster.GENERATED_HEADER)
    raw = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(raw)
    assert [app.import_path for app in schema.applications] == ["serve.app:build_app"]
    assert schema.http_options.host == "0.0.0.0", "the proxy must listen on the pod IP for the serve Service"
    assert schema.http_options.port == 8000, "KubeRay's serve Service and readiness probe use the `serve` port"


def test_serve_config_v2_builds_without_weights_or_network(
    rayservice: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import_path imports and builds the graph; replicas' constructors (weights, S3) do not run here."""
    import importlib

    import boto3
    from ray.serve import Application

    from deployments.instantid import weights

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("building the app must not touch S3, the network or weights")

    monkeypatch.setattr(boto3, "client", forbidden)
    monkeypatch.setattr(boto3.session.Session, "client", forbidden)
    monkeypatch.setattr(weights, "resolve_source", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)

    for app in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert isinstance(builder(app["args"]), Application)


# --------------------------------------------------------------------------------------------------- drift


def _render_args(**kwargs: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"config": None, "out": None, "check": False, **kwargs})


def test_committed_manifest_matches_production_config() -> None:
    assert cluster.render_main(_render_args(check=True)) == 0, "run `instantid cluster render`"


def test_cli_hook_checks_the_committed_manifest() -> None:
    from serve.tools.cli import main

    assert main(["cluster", "render", "--check"]) == 0


def test_changed_production_config_is_detected_and_rerendered(tmp_path: Path) -> None:
    config = tmp_path / "production.yaml"
    manifest = tmp_path / "rayservice.yaml"
    shutil.copy(MANIFEST, manifest)
    text = PRODUCTION.read_text(encoding="utf-8")
    assert "request_timeout_s: 660" in text
    config.write_text(text.replace("request_timeout_s: 660", "request_timeout_s: 661"), encoding="utf-8")

    assert cluster.render_main(_render_args(config=config, out=manifest, check=True)) == 1
    assert manifest.read_text(encoding="utf-8") == MANIFEST.read_text(encoding="utf-8"), "--check must not write"

    assert cluster.render_main(_render_args(config=config, out=manifest)) == 0
    assert cluster.render_main(_render_args(config=config, out=manifest, check=True)) == 0
    (before,), (after,) = load_docs(MANIFEST), load_docs(manifest)
    assert yaml.safe_load(after["spec"]["serveConfigV2"])["http_options"]["request_timeout_s"] == 661
    after["spec"]["serveConfigV2"] = before["spec"]["serveConfigV2"]
    assert after == before, "only serveConfigV2 may change"
    # Everything outside the block, comments included, is kept byte for byte.
    outside = [line for line in manifest.read_text().splitlines() if "request_timeout_s" not in line]
    assert outside == [line for line in MANIFEST.read_text().splitlines() if "request_timeout_s" not in line]


def test_render_rejects_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "production.yaml"
    config.write_text(PRODUCTION.read_text().replace("import_path: serve.app:build_app", "import_path: nope:x"))
    manifest = tmp_path / "rayservice.yaml"
    shutil.copy(MANIFEST, manifest)
    assert cluster.render_main(_render_args(config=config, out=manifest)) == 2
    assert manifest.read_text() == MANIFEST.read_text()


def test_replace_turns_any_scalar_into_a_literal_block() -> None:
    manifest = "kind: RayService\nspec:\n  serveConfigV2: ''\n\n  rayClusterConfig:\n    rayVersion: '1'\n"
    rendered = "# header\na: 1\n\nb:\n  - c\n"
    out = cluster.replace_serve_config(manifest, rendered)
    assert "  serveConfigV2: |\n    # header\n" in out
    assert yaml.safe_load(out)["spec"] == {"serveConfigV2": rendered, "rayClusterConfig": {"rayVersion": "1"}}
    assert cluster.replace_serve_config(out, rendered) == out


# --------------------------------------------------------------------------------------------------- placement


def deployment_options(config: AppConfig) -> dict[str, DeploymentOptions]:
    """Every deployment of AppConfig by its config key (a new deployment shows up here automatically)."""
    return {
        name: value.deployment
        for name, value in config
        if isinstance(getattr(value, "deployment", None), DeploymentOptions)
    }


def demand(options: DeploymentOptions) -> dict[str, float]:
    """Ray resources one replica asks for (as ray._common.utils turns actor options into resources)."""
    actor = options.ray_actor_options
    wanted: dict[str, float] = {"CPU": float(actor.get("num_cpus", 1)), "GPU": float(actor.get("num_gpus", 0))}
    if actor.get("memory"):
        wanted["memory"] = float(actor["memory"])
    wanted.update({k: float(v) for k, v in (actor.get("resources") or {}).items()})
    if actor.get("accelerator_type"):
        wanted[f"accelerator_type:{actor['accelerator_type']}"] = 0.001
    return {k: v for k, v in wanted.items() if v > 0}


def fits(options: DeploymentOptions, node_type: dict[str, Any]) -> bool:
    resources = node_type["resources"]
    if any(resources.get(k, 0) < v for k, v in demand(options).items()):
        return False
    selector = options.ray_actor_options.get("label_selector") or {}
    for key, value in selector.items():
        assert re.fullmatch(r"[\w.-]+", str(value)), f"only equality selectors are modelled here: {key}={value}"
        if node_type["labels"].get(key) != value:
            return False
    return True


@pytest.fixture(scope="module")
def node_types(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The node types Ray's KubeRay autoscaler derives from the manifest (and validates as it would)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {
        "metadata": {"name": "instantid", "namespace": "instantid"},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    return _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]


@pytest.fixture(scope="module")
def app_config(production: dict[str, Any]) -> AppConfig:
    (app,) = production["applications"]
    return AppConfig.model_validate(app["args"])


def test_each_deployment_can_land_on_exactly_its_group(
    app_config: AppConfig, node_types: dict[str, dict[str, Any]]
) -> None:
    deployments = deployment_options(app_config)
    assert set(deployments) == set(INTENDED_GROUP), "a deployment was added or removed: update INTENDED_GROUP"
    placement = {name: sorted(g for g, t in node_types.items() if fits(opts, t)) for name, opts in deployments.items()}
    assert placement == {name: [group] for name, group in INTENDED_GROUP.items()}


def test_head_hosts_nothing(node_types: dict[str, dict[str, Any]], app_config: AppConfig) -> None:
    assert node_types[HEAD]["resources"]["CPU"] == 0
    assert not any(fits(opts, node_types[HEAD]) for opts in deployment_options(app_config).values())


def test_groups_can_hold_every_replica_at_max_scale(
    app_config: AppConfig, node_types: dict[str, dict[str, Any]]
) -> None:
    """Per group and resource: max replicas x demand <= maxReplicas x node (so autoscaling bounds agree)."""
    for group in set(INTENDED_GROUP.values()):
        node = node_types[group]
        needed: dict[str, float] = {}
        for name, opts in deployment_options(app_config).items():
            if INTENDED_GROUP[name] != group:
                continue
            scaling = opts.autoscaling_config or {}
            replicas = scaling.get("max_replicas") or opts.num_replicas or 1
            for key, amount in demand(opts).items():
                needed[key] = needed.get(key, 0) + replicas * amount
        for key, amount in needed.items():
            assert amount <= node["max_workers"] * node["resources"][key], (group, key, amount)


def test_gpu_groups_declare_what_ray_will_detect(rayservice: dict[str, Any], node_types: dict[str, Any]) -> None:
    """The declared accelerator_type resource matches the group's label and a real GPU limit; CPU pods shun GPUs."""
    from ray._private.label_utils import parse_node_labels_string

    for name, group in groups(rayservice["spec"]["rayClusterConfig"]):
        pod = group["template"]["spec"]
        limits = ray_container(group)["resources"]["limits"]
        labels = group.get("labels") or {}
        # What `ray start --labels k=v,...` (built by KubeRay from the group's labels) will accept.
        assert parse_node_labels_string(",".join(f"{k}={v}" for k, v in sorted(labels.items()))) == labels
        declared = [k.split(":", 1)[1] for k in node_types[name]["resources"] if k.startswith("accelerator_type:")]
        tolerates_gpu = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        if "nvidia.com/gpu" in limits:
            assert node_types[name]["resources"]["GPU"] == int(limits["nvidia.com/gpu"]) >= 1
            assert declared == [labels["ray.io/accelerator-type"]], name
            assert tolerates_gpu, f"{name} must tolerate the nvidia.com/gpu taint"
        else:
            assert "GPU" not in node_types[name]["resources"] and not declared and not tolerates_gpu, name
    pools = [
        g["template"]["spec"]["nodeSelector"]["instantid/node-pool"]
        for _, g in groups(rayservice["spec"]["rayClusterConfig"])
    ]
    assert len(set(pools[2:])) == len(pools[2:]) == 2, "each GPU group needs its own node pool"


# --------------------------------------------------------------------------------------------------- pods


def test_every_ray_pod_has_the_runtime_contract(rayservice: dict[str, Any], app_config: AppConfig) -> None:
    cache = app_config.weights.cache_dir
    assert cache
    images = set()
    for name, group in groups(rayservice["spec"]["rayClusterConfig"]):
        pod = group["template"]["spec"]
        container = ray_container(group)
        images.add(container["image"])
        env = {e["name"]: e for e in container["env"]}
        assert env["INSTANTID_CACHE"]["value"] == cache
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert env["AWS_REGION"]["value"] == app_config.storage.s3.region
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "instantid-s3", "key": key}
        assert env["AWS_ENDPOINT_URL_S3"]["valueFrom"]["secretKeyRef"]["optional"] is True
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert resources["requests"][key] == resources["limits"][key], f"{name}: {key} requests != limits"
        # KubeRay injects raylet/GCS/Serve-proxy exec probes only where none is defined.
        assert "livenessProbe" not in container and "readinessProbe" not in container, name
        assert pod["serviceAccountName"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (cache_volume,) = [v for n, v in volumes.items() if mounts.get(n) == cache]
        if "nvidia.com/gpu" in resources["limits"]:
            assert cache_volume["hostPath"] == {"path": cache, "type": "DirectoryOrCreate"}, name
        else:
            assert "emptyDir" in cache_volume, name
    assert len(images) == 1, f"one image for every Ray pod, got {images}"


def _mounts_by_path(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there, for the Ray container of ``group``."""
    volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in ray_container(group).get("volumeMounts", [])}


def test_paths_in_the_serve_config_are_mounted_where_they_are_used(
    rayservice: dict[str, Any], app_config: AppConfig
) -> None:
    """Each filesystem path of the production config exists, writable or from its Secret, on the pods that use it.

    The image runs as uid 1000 and /mnt is root's: a path nobody mounted makes the replica's constructor fail.
    """
    by_group = dict(groups(rayservice["spec"]["rayClusterConfig"]))
    writable: dict[str, tuple[str, ...]] = {}
    if app_config.weights.cache_dir:
        writable[app_config.weights.cache_dir] = ("face", "control_maps", "prompt", "denoiser")
    if app_config.storage.spool_dir:
        writable[app_config.storage.spool_dir] = ("store",)
    for path, users in writable.items():
        for user in users:
            group = by_group[INTENDED_GROUP[user]]
            volume = _mounts_by_path(group).get(path)
            assert volume is not None, f"{path} is not mounted on {INTENDED_GROUP[user]} pods ({user} uses it)"
            assert "emptyDir" in volume or "hostPath" in volume, (path, volume)

    keys_file = app_config.api.auth.keys_file
    if keys_file:
        folder, _, name = keys_file.rpartition("/")
        templates = {d["metadata"]["name"]: d["stringData"] for d in load_docs(CLUSTER / "secret.example.yaml")}
        volume = _mounts_by_path(by_group[INTENDED_GROUP["ingress"]]).get(folder)
        assert volume is not None and "secret" in volume, f"{folder} must be a Secret volume (no subPath: live edits)"
        assert name in templates[volume["secret"]["secretName"]], f"the Secret must hold the key {name}"


def test_host_paths_are_handed_to_the_ray_user(rayservice: dict[str, Any]) -> None:
    """hostPath folders are created root-owned: an init container must chown each one for uid 1000."""
    for name, group in groups(rayservice["spec"]["rayClusterConfig"]):
        pod = group["template"]["spec"]
        assert ray_container(group)["securityContext"]["runAsUser"] == 1000, name
        for path, volume in _mounts_by_path(group).items():
            if "hostPath" not in volume:
                continue
            fixers = [
                c
                for c in pod.get("initContainers", [])
                if any(m["mountPath"] == path for m in c.get("volumeMounts", []))
                and f"chown 1000:100 {path}" in " ".join(c["command"])
            ]
            assert fixers, f"{name}: nothing chowns the hostPath {path}"


def test_head_runs_no_work_and_autoscaling_is_on(rayservice: dict[str, Any]) -> None:
    spec = rayservice["spec"]
    cluster_spec = spec["rayClusterConfig"]
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    # Deprecated and ignored since KubeRay 1.1 (ray-project/kuberay#1685): setting them would only mislead.
    assert "serviceUnhealthySecondThreshold" not in spec and "deploymentUnhealthySecondThreshold" not in spec
    prod = yaml.safe_load(spec["serveConfigV2"])
    assert spec["rayClusterDeletionDelaySeconds"] > prod["http_options"]["request_timeout_s"]


# --------------------------------------------------------------------------------------------------- image


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the image and CI run 3.11)
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_base_image_matches_the_pinned_ray(rayservice: dict[str, Any]) -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases, "no FROM line"
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<platform>gpu|cu\d+)", bases[-1])
    assert match, f"base image {bases[-1]} is not an official Ray GPU image tag"

    project = _pyproject()["project"]
    (ray_req,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    assert "serve" in ray_req.extras
    assert match["ray"] in ray_req.specifier, f"{match['ray']} is outside pyproject's {ray_req}"
    assert match["py"] == "py311"
    assert "3.11" in SpecifierSet(project["requires-python"])
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == match["ray"]
    assert f"ray=={match['ray']}" in dockerfile, "the install constraint must keep the base image's Ray"


def test_manifest_image_is_the_project_version(rayservice: dict[str, Any]) -> None:
    version = _pyproject()["project"]["version"]
    image = ray_container(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])["image"]
    assert image.endswith(f"/instantid-serve:{version}"), image
