"""Operations without a cluster: metric definitions, the request log line, S3 retry counting, the spool's age, and
cluster/monitoring's Grafana dashboard, alert rules and scrape setup checked against the metrics that exist."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments import metrics
from deployments.storage.generations import PreparedGeneration, new_generation_id
from deployments.storage.s3 import S3Settings, make_client, on_retry
from deployments.storage.spool import Spool
from serve.ingress.errors import ApiError, install_error_handlers
from serve.ingress.request_log import EVENT, RequestLogMiddleware, note, note_prompt, seconds_by_stage

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "cluster" / "monitoring"
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
# What a tag value may be drawn from: bounded sets only (never request ids, prompts or generation ids).
BOUNDED_TAGS = {
    *("application", "deployment", "stage", "route", "status", "code", "reason", "kind", "model", "operation"),
    "policy",  # the safety policy: off, flag, blur, refuse
}
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
SERIES_IN_QUERY = re.compile(r"\bray_[a-zA-Z0-9_]+")


# ------------------------------------------------------------------------------------------------ definitions


def test_metrics_are_defined_once_with_bounded_tags() -> None:
    names = [spec.name for spec in metrics.ALL_METRICS]
    assert len(names) == len(set(names)) == 17
    specs = {value for value in vars(metrics).values() if isinstance(value, metrics.MetricSpec)}
    assert specs == set(metrics.ALL_METRICS)  # every definition is exported (and nothing is defined twice)
    for spec in metrics.ALL_METRICS:
        assert PROMETHEUS_NAME.match(spec.name) and spec.name.startswith("instantid_"), spec.name
        assert set(spec.tags) <= BOUNDED_TAGS, spec
        assert (spec.kind == "histogram") == bool(spec.buckets), spec
        assert list(spec.buckets) == sorted(set(spec.buckets)), spec
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec
    assert "ray_instantid_stage_seconds_bucket" in metrics.exported_series_names()
    assert "ray_instantid_requests_total" in metrics.exported_series_names()
    assert "ray_instantid_stage_seconds" not in metrics.exported_series_names()  # a histogram's base is no series


def test_ray_accepts_every_definition() -> None:
    """Ray checks names, tag keys and boundaries when a metric object is made (in a replica, at its first
    recording, where a refusal would only be logged): make each one here, and record through it."""
    for spec in metrics.ALL_METRICS:
        made = metrics._metric(spec)
        assert type(made).__name__ == spec.kind.capitalize(), spec
        tags = {key: "x" for key in spec.tags}
        if spec.kind == "counter":
            made.inc(1, tags=tags)
        elif spec.kind == "gauge":
            made.set(1, tags=tags)
        else:
            made.observe(0.5, tags=tags)


def test_stage_names_are_a_bounded_set() -> None:
    assert [metrics.stage_name(key) for key in ("face", "face_photo_3", "denoise", "total")] == [
        "face",
        "face_photo",
        "denoise",
        "total",
    ]
    assert metrics.stage_name("denoise_model_load") is None  # model loads have their own metrics
    assert metrics.stage_name("anything-a-client-sent") is None


def test_a_metric_gets_exactly_its_own_tags() -> None:
    """Outside a Serve replica application and deployment are empty; a tag the spec lacks is never sent."""
    assert metrics.tags_for(metrics.REQUESTS, route="/v1/generate", status="200", code="ok") == {
        "application": "",
        "route": "/v1/generate",
        "status": "200",
        "code": "ok",
    }
    assert metrics.tags_for(metrics.MODEL_LOADS, kind="base", model="sdxl") == {
        "application": "",
        "deployment": "",
        "kind": "base",
        "model": "sdxl",
    }
    with pytest.raises(KeyError):
        metrics.tags_for(metrics.REQUESTS, route="/v1/generate")  # a missing tag is a bug, not an empty value


# ----------------------------------------------------------------------------------------------- request log


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _app(log_prompts: bool) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestLogMiddleware)

    @app.post("/v1/generate/{name}")
    async def generate(name: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        note(request, owner="alice")
        note_prompt(request, body["prompt"], None, log_prompts)
        if name == "refuse":
            raise ApiError(503, "overloaded", "busy", {"Retry-After": "5"})
        note(request, timings=seconds_by_stage({"face": {"seconds": 0.12345}, "denoise": {"seconds": 2.0}}))
        return {"ok": True}

    return app


@pytest.fixture
def log_lines() -> list[str]:
    handler = _Lines()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith('{"event":"' + EVENT)]


def test_request_log_line_has_id_status_timings_sizes_and_no_prompt(log_lines: list[str]) -> None:
    client = TestClient(_app(log_prompts=False))
    raw = json.dumps({"prompt": "a secret-lighthouse-4242 portrait"}).encode()
    ok = client.post("/v1/generate/x", content=raw, headers={"X-Request-ID": "req-ok-1"})
    refused = client.post("/v1/generate/refuse", content=raw, headers={"X-Request-ID": "req-busy-2"})
    assert (ok.status_code, refused.status_code) == (200, 503)
    first, second = _records(log_lines)
    assert first == {
        "event": EVENT,
        "request_id": "req-ok-1",
        "method": "POST",
        "route": "/v1/generate/{name}",
        "path": "/v1/generate/x",
        "status": 200,
        "code": "ok",
        "seconds": first["seconds"],
        "request_bytes": len(raw),
        "response_bytes": len(ok.content),
        "owner": "alice",
        "timings": {"face": 0.123, "denoise": 2.0},
    }
    assert 0 <= first["seconds"] < 5
    assert (second["request_id"], second["status"], second["code"]) == ("req-busy-2", 503, "overloaded")
    assert "timings" not in second and not any("secret-lighthouse-4242" in line for line in log_lines)


def test_prompts_are_logged_only_when_switched_on(log_lines: list[str]) -> None:
    client = TestClient(_app(log_prompts=True))
    assert client.post("/v1/generate/x", json={"prompt": "a red hat"}).status_code == 200
    (record,) = _records(log_lines)
    assert (record["prompt"], record["negative_prompt"]) == ("a red hat", None)


def test_ingress_config_keeps_prompts_out_of_logs_by_default() -> None:
    from serve.config import IngressConfig

    assert IngressConfig().log_prompts is False
    production = yaml.safe_load((ROOT / "serve" / "configs" / "production.yaml").read_text())
    assert production["applications"][0]["args"]["ingress"]["log_prompts"] is False


# ------------------------------------------------------------------------------------------- S3 and spool


def test_s3_retries_are_reported_per_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against an endpoint that refuses connections, 3 attempts are 2 retries (the first try is no retry)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    settings = S3Settings(
        bucket="unreachable", endpoint_url="http://127.0.0.1:9", connect_timeout_s=0.2, max_attempts=3
    )
    client = make_client(settings)
    seen: list[str] = []
    on_retry(client, seen.append)
    with pytest.raises(Exception, match="Could not connect"):
        client.head_object(Bucket="unreachable", Key="k")
    assert seen == ["HeadObject", "HeadObject"]


def test_spool_reports_the_age_of_its_oldest_entry(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.oldest_time() is None and metrics.age_since(spool.oldest_time()) == 0.0
    first = new_generation_id()
    spool.put(PreparedGeneration(first, [("a/meta.json", b"{}", "application/json")], []))
    time.sleep(0.05)
    spool.put(PreparedGeneration(new_generation_id(), [("b/meta.json", b"{}", "application/json")], []))
    oldest = spool.oldest_time()
    assert oldest is not None and abs(oldest - (tmp_path / first / "manifest.json").stat().st_mtime) < 1e-6
    assert 0.0 < metrics.age_since(oldest) < 5.0
    spool.remove(first)
    assert spool.oldest_time() is not None and spool.oldest_time() > oldest


def test_spool_readers_skip_an_entry_still_being_written(tmp_path: Path) -> None:
    """A staging folder holds its manifest before its rename: the gauges and the drain, listing the spool from
    another thread meanwhile, neither take it for a generation nor fail on its name (a failure there once turned a
    stored generation's 200 into a 500)."""
    spool = Spool(tmp_path)
    done = new_generation_id()
    spool.put(PreparedGeneration(done, [("a/meta.json", b"{}", "application/json")], []))
    staging = tmp_path / ".spool-abc123"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    assert spool.pending() == [done]
    assert spool.oldest_time() == (tmp_path / done / "manifest.json").stat().st_mtime


# ------------------------------------------------------------------------------------ dashboard and alerts


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # Grafana keeps many optional fields


class GridPos(BaseModel):
    h: int = Field(ge=1)
    w: int = Field(ge=1, le=24)
    x: int = Field(ge=0, le=23)
    y: int = Field(ge=0)

    @model_validator(mode="after")
    def _inside_the_grid(self) -> GridPos:
        assert self.x + self.w <= 24, "a panel wider than Grafana's 24-column grid"
        return self


class Target(_Open):
    refId: str = Field(pattern=r"^[A-Z]$")
    expr: str = Field(min_length=1)
    legendFormat: str | None = None


class Panel(_Open):
    id: int = Field(ge=1)
    type: Literal["row", "timeseries", "stat", "gauge", "heatmap", "bargauge", "table", "text"]
    title: str = Field(min_length=1)
    gridPos: GridPos
    datasource: dict[str, str] | None = None
    targets: list[Target] = Field(default_factory=list)
    panels: list[Panel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _queries(self) -> Panel:
        if self.type != "row":
            assert self.targets and self.datasource is not None, f"panel {self.title} queries nothing"
            assert len({t.refId for t in self.targets}) == len(self.targets)
        return self


class Variable(_Open):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["datasource", "query", "custom", "constant", "interval", "textbox"]


class Templating(_Open):
    list: list[Variable]


class Dashboard(_Open):
    """The fields Grafana's dashboard model requires (and what makes a dashboard importable): uid, title,
    schemaVersion, panels with unique ids on the 24-column grid, variables that the queries use."""

    uid: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    title: str = Field(min_length=1)
    schemaVersion: int = Field(ge=30)
    version: int = Field(ge=0)
    time: dict[str, str]
    templating: Templating
    panels: list[Panel]
    tags: list[str] = Field(default_factory=list)
    refresh: str | None = None


def _dashboard() -> Dashboard:
    return Dashboard.model_validate(json.loads((MONITORING / "grafana-dashboard.json").read_text()))


def _series(expr: str) -> set[str]:
    return set(SERIES_IN_QUERY.findall(expr))


def _known_series() -> frozenset[str]:
    return metrics.exported_series_names() | metrics.SERVE_SERIES


def test_dashboard_is_a_valid_grafana_model_over_metrics_that_exist() -> None:
    dashboard = _dashboard()
    ids = [panel.id for panel in dashboard.panels]
    assert len(ids) == len(set(ids))
    variables = {variable.name for variable in dashboard.templating.list}
    assert variables == {"datasource", "application"}
    queried: set[str] = set()
    for panel in dashboard.panels:
        assert panel.type == "row" or panel.datasource == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel.targets:
            assert '$application"' in target.expr, target.expr  # every query is filtered by the chosen app
            assert target.expr.count("(") == target.expr.count(")"), target.expr
            used = _series(target.expr)
            assert used, target.expr
            assert used <= _known_series(), (panel.title, used - _known_series())
            queried |= used
    # Every application metric is on the dashboard (a histogram through one of its series).
    for spec in metrics.ALL_METRICS:
        assert any(name.startswith(metrics.exported_name(spec)) for name in queried), spec.name
    assert queried & metrics.SERVE_SERIES == metrics.SERVE_SERIES - {"ray_serve_num_http_error_requests_total"}


def test_serve_series_we_use_are_defined_by_ray_serve() -> None:
    """Serve's metric names as its source defines them (Prometheus adds _total to counters, _bucket to
    histograms); tests/test_operations_serving.py checks that a live cluster exports each one."""
    import ray.serve

    source = "\n".join(path.read_text() for path in Path(ray.serve.__file__).parent.rglob("*.py"))
    defined = set(re.findall(r'"(serve_[a-z_]+)"', source))
    defined |= {name.replace("{protocol_name}", "http") for name in re.findall(r'f"(serve_[a-z_{}]+)"', source)}
    for series in metrics.SERVE_SERIES:
        base = re.sub(r"_(total|bucket|sum|count)$", "", series.removeprefix("ray_"))
        assert base in defined, series


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alert: str = Field(pattern=r"^[A-Z][A-Za-z0-9]+$")
    expr: str
    for_: str = Field(alias="for", pattern=r"^\d+[smh]$")
    labels: dict[Literal["severity"], Literal["warning", "critical"]]
    annotations: dict[Literal["summary", "description"], str]


class RuleGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rules: list[Rule]


def test_alert_rules_cover_errors_latency_spool_and_restarts_over_metrics_that_exist() -> None:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    assert (document["apiVersion"], document["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    groups = [RuleGroup.model_validate(group) for group in document["spec"]["groups"]]
    rules = {rule.alert: rule for group in groups for rule in group.rules}
    assert set(rules) == {
        "InstantIDHighErrorRate",
        "InstantIDOverloaded",
        "InstantIDSlowRequests",
        "InstantIDSpoolNotDraining",
        "InstantIDReplicaRestarts",
        "InstantIDReplicaUnhealthy",
    }
    for rule in rules.values():
        used = _series(rule.expr)
        assert used and used <= _known_series(), (rule.alert, used - _known_series())
        assert rule.expr.count("(") == rule.expr.count(")"), rule.alert
    assert "ray_serve_num_http_requests_total" in _series(rules["InstantIDHighErrorRate"].expr)
    assert "0.95" in rules["InstantIDSlowRequests"].expr
    assert "ray_instantid_spool_oldest_age_seconds" in _series(rules["InstantIDSpoolNotDraining"].expr)
    assert "ray_serve_deployment_replica_starts_total" in _series(rules["InstantIDReplicaRestarts"].expr)


def test_every_ray_pod_exposes_the_port_the_pod_monitor_scrapes() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}  # KubeRay labels every pod
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(groups) == 4
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"]) == 8080


def test_cluster_readme_points_to_the_monitoring_files() -> None:
    readme = (ROOT / "cluster" / "README.md").read_text()
    for name in ("grafana-dashboard.json", "alerts.yaml", "podmonitor.yaml"):
        assert f"monitoring/{name}" in readme, name
