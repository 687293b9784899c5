"""deploy/: compose, Kubernetes, Prometheus and Grafana files agree with the code, and Prometheus runs them.

Static checks: every metric and label the alerts and the dashboard use exists in stream/service/metrics.py, every
SENTIMENT_* variable is a settings field, every command is a real CLI subcommand with valid arguments,
images are pinned, ports stay on 127.0.0.1. Real checks: `promtool check config|rules`, `promtool test
rules` (each alert fires on the series it is written for), and a real Prometheus server scraping a
metrics endpoint: p99 through the HTTP API, every alert rule and dashboard query evaluated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any
from unittest import mock

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from stream.cli import COMMANDS
from stream.service.events import MODALITIES
from stream.service.metrics import METRIC_NAMES, STAGES, Metrics, MetricsServer, latency_buckets, start_metrics_server
from stream.service.settings import Settings
from tests.support.prometheus import (
    PrometheusServer,
    StartPrometheus,
    expected_quantile,
    prometheus_server_fixture,  # noqa: F401 - the `prometheus_server` fixture
    require_binary,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sentiment.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"

# Labels Prometheus attaches to every scraped series (not defined by the metrics module).
TARGET_LABELS = frozenset({"instance", "job"})
WORKER_JOB = "sentiment-worker"


# --- what the code defines -------------------------------------------------------------------------


def exposed_series() -> dict[str, frozenset[str]]:
    """Every sample name the service exposes -> its label names, from a rendered ``Metrics`` registry.

    Labelled metrics get one child each so they appear in the exposition (histograms with ``le``).
    """
    metrics = Metrics(Settings(), process_metrics=False)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*["x"] * len(value._labelnames))
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


# Series of kafka_exporter (compose service `kafka-exporter`), which the broker-side lag alert and panels use.
EXPORTER_SERIES = {"kafka_consumergroup_lag": frozenset({"consumergroup", "topic", "partition"})}
SERIES = {**exposed_series(), **EXPORTER_SERIES}
SETTINGS_FIELDS = frozenset(Settings.model_fields)
# The settings' defaults, whatever SENTIMENT_* variables this test run has.
DEFAULTS = Settings.model_construct()


def setting_name(env: str) -> str:
    return env.removeprefix("SENTIMENT_").lower()


# --- PromQL, parsed just enough to check names and labels -------------------------------------------

_IDENT = re.compile(r"(?<![A-Za-z0-9_:$])(sentiment_[A-Za-z0-9_]+|kafka_consumergroup_lag)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*[\"'`]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(sentiment_[A-Za-z0-9_]+)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")


@dataclass(frozen=True)
class PromQLUse:
    metrics: frozenset[str]
    matchers: dict[str, frozenset[str]]  # metric -> label names matched on
    grouping: frozenset[str]  # labels in by/without/on/ignoring/group_left/group_right


def parse_promql(expr: str) -> PromQLUse:
    metrics: set[str] = set()
    matchers: dict[str, set[str]] = {}
    for match in _IDENT.finditer(expr):
        name = match.group(1)
        metrics.add(name)
        matchers.setdefault(name, set()).update(_MATCHER.findall(match.group(2) or ""))
    outside_strings = _STRING.sub('""', expr)
    grouping = {
        label.strip()
        for _, labels in _GROUPING.findall(outside_strings)
        for label in labels.split(",")
        if label.strip()
    }
    return PromQLUse(frozenset(metrics), {m: frozenset(ls) for m, ls in matchers.items()}, frozenset(grouping))


def metric_problems(expr: str) -> list[str]:
    """What in ``expr`` does not exist in stream/service/metrics.py (names, matcher labels, grouping labels)."""
    use = parse_promql(expr)
    problems = []
    for name in sorted(use.metrics):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in METRIC_NAMES and family not in METRIC_NAMES and name not in EXPORTER_SERIES:
            problems.append(f"{name}: not in stream.service.metrics.METRIC_NAMES")
        elif name not in SERIES:
            problems.append(f"{name}: no such series is exposed (exposed: {sorted(n for n in SERIES if family in n)})")
        else:
            for label in sorted(use.matchers[name] - SERIES[name] - TARGET_LABELS):
                problems.append(f"{name}{{{label}=...}}: {name} has no label {label!r}")
    available = set(TARGET_LABELS)
    for name in use.metrics:
        available |= SERIES.get(name, frozenset())
    for label in sorted(use.grouping - available):
        problems.append(f"grouping label {label!r} is on none of {sorted(use.metrics)}")
    for labels, inner in aggregations(expr):
        inner_metrics = parse_promql(inner).metrics
        on_inner = set(TARGET_LABELS).union(*(SERIES.get(m, frozenset()) for m in inner_metrics))
        for label in sorted(labels - on_inner):
            problems.append(f"aggregation by {label!r} over {sorted(inner_metrics)}, which have no such label")
    return problems


_AGGREGATION = re.compile(
    r"\b(?:sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:(?:by|without)\s*\(([^)]*)\)\s*)?\("
)
_POSTFIX_GROUPING = re.compile(r"\s*(?:by|without)\s*\(([^)]*)\)")


def aggregations(expr: str) -> list[tuple[frozenset[str], str]]:
    """(by/without labels, argument) of every aggregation in ``expr``, prefix or postfix form."""
    found = []
    for match in _AGGREGATION.finditer(expr):
        depth, start = 1, match.end()
        end = start
        while depth and end < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            end += 1
        labels_text = match.group(1)
        if labels_text is None:
            postfix = _POSTFIX_GROUPING.match(expr, end)
            labels_text = postfix.group(1) if postfix else ""
        labels = frozenset(label.strip() for label in labels_text.split(",") if label.strip())
        if labels:
            found.append((labels, expr[start : end - 1]))
    return found


def load_alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, plus the template variables' queries."""
    dash = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"${var['name']}", query))
    return queries


def as_instant_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, ready for /api/v1/query."""
    query_result = re.fullmatch(r"query_result\((.*)\)", expr)
    if query_result:
        expr = query_result.group(1)
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
        .replace("$slo", f"{DEFAULTS.latency_slo_s:g}")
        .replace("$consumergroup", DEFAULTS.consumer_group)
    )


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def load_k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in load_k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def check_cli(argv: list[str]) -> None:
    """``argv`` (after ``sentiment-stream``) names a real subcommand whose parser accepts the arguments."""
    assert argv, "empty command"
    command, *rest = argv
    assert command in COMMANDS, f"{command!r} is not a sentiment-stream subcommand ({sorted(COMMANDS)})"
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only while the command's module is not in the tree yet; any other import error fails.
        if exc.name and exc.name.split(".")[0] in {"stream", "models", "export"}:
            pytest.skip(f"cannot check the arguments of `{command}`: {exc.name} is not in the tree yet")
        raise
    parser = argparse.ArgumentParser(prog=f"sentiment-stream {command}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        _, unknown = parser.parse_known_args(rest)
    except (SystemExit, argparse.ArgumentError) as exc:  # argparse exits on a missing required argument
        pytest.fail(f"`sentiment-stream {' '.join(argv)}` is rejected by its parser: {exc}")
    assert unknown == [], f"`sentiment-stream {command}` does not accept {unknown}"


# --- alerts and dashboard against stream/service/metrics.py -------------------------------------------------


def test_promql_checker_catches_unknown_metrics_and_labels() -> None:
    assert metric_problems('sum by (le) (rate(sentiment_e2e_latency_seconds_bucket{instance="a"}[5m]))') == []
    assert metric_problems("rate(sentiment_no_such_metric_total[5m])")
    assert metric_problems("rate(sentiment_events[5m])")  # a counter is exposed as sentiment_events_total
    assert metric_problems("sentiment_e2e_latency_seconds")  # a histogram only as _bucket/_sum/_count
    assert metric_problems('sentiment_events_total{reason="x"}')
    assert metric_problems("sentiment_events_total{reason='x'}")
    assert metric_problems("sum by (modality) (rate(sentiment_events_total[5m]))")
    assert metric_problems("sum by (le) (rate(sentiment_events_total[5m]))")
    # a label of another metric in the same expression does not make it valid here
    assert metric_problems(
        "sum by (modality) (rate(sentiment_events_total[5m])) / sum(rate(sentiment_missing_pattern_posts_total[5m]))"
    )
    assert metric_problems(
        "sum(rate(sentiment_events_total[5m])) by (stage) / sum(rate(sentiment_stage_latency_seconds_count[5m]))"
    ) == ["aggregation by 'stage' over ['sentiment_events_total'], which have no such label"]
    assert aggregations("max by (instance, model) (sentiment_onnx_session_info{requested='cuda'})") == [
        (frozenset({"instance", "model"}), "sentiment_onnx_session_info{requested='cuda'}")
    ]


def test_every_alert_uses_only_metrics_and_labels_the_service_exposes() -> None:
    rules = load_alert_rules()
    assert rules
    problems = {rule["alert"]: metric_problems(rule["expr"]) for rule in rules}
    assert {alert: p for alert, p in problems.items() if p} == {}


def test_alert_annotations_use_labels_the_alert_carries() -> None:
    for rule in load_alert_rules():
        use = parse_promql(rule["expr"])
        aggregated = re.search(r"\b(sum|max|min|avg|count|histogram_quantile)\b", rule["expr"])
        carried = set(rule.get("labels", {}))
        if aggregated:
            carried |= use.grouping
        else:
            carried |= TARGET_LABELS | {label for m in use.metrics for label in SERIES.get(m, ())}
            carried |= set(_MATCHER.findall(rule["expr"]))
        text = " ".join(rule["annotations"].values())
        used = set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text))
        assert used <= carried, f"{rule['alert']}: annotations use {sorted(used - carried)}, not on the alert"


def test_every_alert_has_a_runbook_section_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.M)
    }
    for rule in load_alert_rules():
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "deploy/README.md"
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no section #{anchor}"


def test_the_slo_is_a_gauge_the_alert_and_dashboard_read_and_a_bucket_boundary() -> None:
    """No copy of the 0.25 s: the alert compares with sentiment_latency_slo_seconds, the dashboard picks the
    bucket through its `slo` variable (the gauge's value) and draws the gauge."""
    (rule,) = [r for r in load_alert_rules() if r["alert"] == "SentimentLatencyP99OverSLO"]
    assert re.search(r">\s*scalar\(max\(sentiment_latency_slo_seconds\)\)\s*$", rule["expr"].strip())
    assert "0.25" not in rule["expr"] + json.dumps(rule["annotations"]) and "250" not in rule["annotations"]["summary"]
    slo = DEFAULTS.latency_slo_s
    assert slo in latency_buckets(slo)
    dash = DASHBOARD.read_text().replace('\\"', '"')
    assert 'le="$slo"' in dash and 'le="0.25"' not in dash
    (var,) = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "slo"]
    assert var["query"]["query"] == "query_result(max(sentiment_latency_slo_seconds))"
    # Grafana's query_result text is "<labels> <value> <ms timestamp>"; the regex must take the value
    regex = re.compile(var["regex"].strip("/"))
    assert regex.search("{} 0.25 1700000000000").group(1) == "0.25"  # type: ignore[union-attr]


def test_every_dashboard_query_uses_only_metrics_and_labels_the_service_exposes() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    problems = {}
    for title, expr in queries:
        found = metric_problems(expr)
        for metric, label in _LABEL_VALUES.findall(expr):
            if label not in SERIES.get(metric, frozenset()) | TARGET_LABELS:
                found.append(f"label_values: {metric} has no label {label!r}")
        if found:
            problems[f"{title}: {expr}"] = found
    assert problems == {}


def test_dashboard_covers_every_metric_and_uses_the_provisioned_datasource() -> None:
    used = set()
    for _, expr in dashboard_queries():
        used |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in parse_promql(expr).metrics}
    assert used - set(EXPORTER_SERIES) == set(METRIC_NAMES), f"without a panel: {sorted(set(METRIC_NAMES) - used)}"
    dash = json.loads(DASHBOARD.read_text())
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    # The datasource is a variable (an imported dashboard works with any Prometheus), of the provisioned type.
    (variable,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == datasource["type"]
    refs = [p["datasource"] for p in dash["panels"] if p["type"] != "row"]
    refs += [t["datasource"] for p in dash["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dash["templating"]["list"] if "datasource" in v]
    assert refs and all(r == {"type": datasource["type"], "uid": f"${{{variable['name']}}}"} for r in refs)
    assert '"uid": "prometheus"' not in DASHBOARD.read_text()
    assert dash["uid"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# --- compose ----------------------------------------------------------------------------------------


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\bSENTIMENT_[A-Z0-9_]+\b", text))


def test_every_sentiment_variable_in_deploy_is_a_settings_field() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    unknown = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in files
        for name in _env_names(p.read_text(errors="replace"))
        if setting_name(name) not in SETTINGS_FIELDS
    }
    assert unknown == set()


def test_compose_images_are_pinned_and_ports_bound_to_localhost() -> None:
    services = load_compose()["services"]
    assert {"kafka", "kafka-init", "redis", "worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if "build" not in service:
            assert re.search(r"\d", tag), f"{name}: tag {tag!r} is not a version"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} is published beyond 127.0.0.1"
    assert services["kafka"]["image"].startswith("apache/kafka:")


def test_compose_kafka_runs_kraft_and_init_creates_the_topics_with_partitions() -> None:
    services = load_compose()["services"]
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    script = "\n".join(services["kafka-init"]["command"])
    settings = DEFAULTS
    for topic in settings.topics:
        assert re.search(rf"\b{re.escape(topic)}\b", script), f"kafka-init does not create {topic}"
    assert "--partitions" in script and "--if-not-exists" in script
    worker_env = services["worker"]["environment"]
    assert (
        worker_env["SENTIMENT_TOPIC_POSTS"],
        worker_env["SENTIMENT_TOPIC_SENTIMENT"],
        worker_env["SENTIMENT_TOPIC_DLQ"],
    ) == settings.topics
    assert worker_env["SENTIMENT_PARTITIONS"] == services["kafka-init"]["environment"]["PARTITIONS"]
    assert services["worker"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_compose_worker_scales_and_is_scraped_by_prometheus() -> None:
    services = load_compose()["services"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "fixed names or host ports break --scale"
    env = worker["environment"]
    Settings(**{setting_name(k): v for k, v in env.items() if "${" not in str(v)})  # values validate
    assert worker["cpus"] == 1.0 and env["SENTIMENT_INTRA_OP_THREADS"] == "1", "one worker per core"
    assert env["SENTIMENT_METRICS_HOST"] == "0.0.0.0" and env["SENTIMENT_WEB_HOST"] == "0.0.0.0"
    (model,) = [v for v in worker["volumes"] if isinstance(v, dict) and v["target"] == env["SENTIMENT_MODEL_DIR"]]
    assert model["read_only"] is True
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == WORKER_JOB]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == int(env["SENTIMENT_METRICS_PORT"])
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    for rule_file in scrape["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_compose_variables_are_documented_in_the_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    documented = set(re.findall(r"^#? ?([A-Z_][A-Z0-9_]*)=", (DEPLOY / ".env.example").read_text(), re.M))
    assert used == documented


def test_compose_grafana_mounts_match_provisioning() -> None:
    grafana = load_compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sentiment.yml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_dockerfile_builds_the_service_only_as_non_root_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), "base must be a pinned 3.11 slim"
    assert re.search(r"pip install \.$", text, re.M), "the service is installed without extras (no torch)"
    assert "torch" not in text.replace("no torch", "").replace("torch-free", "")
    assert re.search(r"^ARG EXTRA=$", text, re.M)
    gpu = text[text.index("gpu)") :]
    assert gpu.index("pip uninstall -y onnxruntime") < gpu.index('pip install "${spec}"')
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/livez", text, re.M)
    assert json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)) == ["sentiment-stream"]  # type: ignore[union-attr]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'gpu = \["onnxruntime-gpu==[0-9.]+"\]', pyproject), "the Dockerfile reads this pin"


def deploy_commands() -> dict[str, list[str]]:
    """Every `sentiment-stream` invocation in deploy/: the arguments after the executable."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint == ["sentiment-stream"]
    (container,) = k8s_object("Deployment", "sentiment-worker")["spec"]["template"]["spec"]["containers"]
    k8s_argv = container.get("command", entrypoint)[1:] + container.get("args", [])
    return {
        "Dockerfile CMD": json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)),  # type: ignore[union-attr]
        "compose worker": load_compose()["services"]["worker"]["command"],
        "k8s worker": k8s_argv,
    }


@pytest.mark.parametrize("source", ["Dockerfile CMD", "compose worker", "k8s worker"])
def test_deploy_commands_are_real_cli_invocations(source: str) -> None:
    check_cli(deploy_commands()[source])


# --- Kubernetes ---------------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    docs = load_k8s()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Kustomization"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_worker_deployment_probes_health_limits_one_cpu_and_reads_settings_from_the_configmap() -> None:
    deployment = k8s_object("Deployment", "sentiment-worker")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    (env_from,) = container["envFrom"]
    config = k8s_object("ConfigMap", env_from["configMapRef"]["name"])["data"]
    assert {setting_name(k) for k in config} <= SETTINGS_FIELDS
    settings = Settings(**{setting_name(k): v for k, v in config.items()})
    assert settings.metrics_host == "0.0.0.0" and settings.web_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": settings.metrics_port, "web": settings.web_port}
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "web"}
    (redis_url,) = [e for e in container["env"] if e["name"] == "SENTIMENT_REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"], "the Redis URL carries a password: from a Secret"
    resources = container["resources"]
    assert str(resources["requests"]["cpu"]) == str(resources["limits"]["cpu"]) == "1"
    assert settings.intra_op_threads == 1
    assert resources["limits"]["memory"]
    (model,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(settings.model_dir)]
    assert model["readOnly"] is True
    assert model["name"] in {v["name"] for v in pod["spec"]["volumes"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout_s, "the kubelet must not kill a worker still finishing its batch"


def test_k8s_metrics_service_selects_the_workers_and_is_annotated_for_prometheus() -> None:
    deployment = k8s_object("Deployment", "sentiment-worker")
    service = k8s_object("Service", "sentiment-worker-metrics")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = int(k8s_object("ConfigMap", "sentiment-worker")["data"]["SENTIMENT_METRICS_PORT"])
    assert {"name": "metrics", "port": port, "targetPort": "metrics"} in service["spec"]["ports"]
    for notes in (service["metadata"]["annotations"], deployment["spec"]["template"]["metadata"]["annotations"]):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(port)
        assert notes["prometheus.io/path"] == "/metrics"


def test_k8s_hpa_never_scales_past_the_partitions() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "sentiment-worker")
    partitions = int(k8s_object("ConfigMap", "sentiment-worker")["data"]["SENTIMENT_PARTITIONS"])
    assert hpa["spec"]["maxReplicas"] <= partitions
    assert k8s_object("Deployment", "sentiment-worker")["spec"]["replicas"] <= partitions


K8S_VERSION = "1.33.0"  # the oldest Kubernetes these manifests target; kubernetes-validate ships its schemas
CRD_KINDS = frozenset({"Kustomization", "ScaledObject", "ServiceMonitor", "PrometheusRule"})


def all_k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest under deploy/k8s, overlays included."""
    return [
        (path, doc)
        for path in sorted(K8S.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and "$patch" not in doc
    ]


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    """kubeconform's check without kubeconform: the JSON schemas inside the kubernetes-validate wheel (strict:
    unknown fields fail), no download. Custom resources are checked field by field in the tests below."""
    import kubernetes_validate

    checked = []
    for path, doc in all_k8s_documents():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{doc['kind']} {doc['metadata']['name']}"
            pytest.fail(f"{path.relative_to(ROOT)}: {name}: {exc.message} at {list(exc.path)}")
        checked.append(f"{doc['kind']}/{doc['metadata']['name']}")
    print(f"\nvalid against Kubernetes {K8S_VERSION} (strict): {', '.join(checked)}")
    assert {"Deployment/sentiment-worker", "Job/sentiment-topics", "HorizontalPodAutoscaler/sentiment-worker"} <= set(
        checked
    )


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    """`docker compose config` without an engine: the compose-spec JSON schema vendored in check-jsonschema."""
    import importlib.util

    import jsonschema

    # Located, not imported: only the schema file of the package is used.
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec and spec.submodule_search_locations, "pip install the dev extra (check-jsonschema)"
    package = Path(next(iter(spec.submodule_search_locations)))
    schema = json.loads((package / "builtin_schemas" / "vendor" / "compose-spec.json").read_text())
    jsonschema.validate(load_compose(), schema)
    # ... and the same with every ${VAR:-default} replaced by its default, as compose would interpolate it
    defaults = re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", r"\2", COMPOSE.read_text())
    jsonschema.validate(yaml.safe_load(defaults), schema)


def test_topics_job_creates_every_topic_with_the_partitions_and_message_size_of_the_configmap() -> None:
    job = k8s_object("Job", "sentiment-topics")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == load_compose()["services"]["kafka-init"]["image"]
    env = {e["name"]: e.get("valueFrom", {}).get("configMapKeyRef", {}).get("key") for e in container["env"]}
    config = k8s_object("ConfigMap", "sentiment-worker")["data"]
    for var, key in env.items():
        assert key is None or key in config, f"{var}: configmap has no {key}"
    assert env["PARTITIONS"] == "SENTIMENT_PARTITIONS" and env["MAX_MESSAGE_BYTES"] == "SENTIMENT_MAX_MESSAGE_BYTES"
    script = "\n".join(container["args"])
    for var in ("TOPIC_POSTS", "TOPIC_SENTIMENT", "TOPIC_DLQ"):
        assert f'"${var}"' in script
    assert '--partitions "$PARTITIONS"' in script and 'max.message.bytes="$MAX_MESSAGE_BYTES"' in script
    assert "--if-not-exists" in script


def test_message_size_chain_fits_a_post_at_every_payload_limit() -> None:
    """Broker, topics, producer and consumer are all set from one number that a post at the limits fits."""
    services = load_compose()["services"]
    default = re.compile(r"\$\{MAX_MESSAGE_BYTES:-(\d+)\}")
    compose_values = {
        "broker message.max.bytes": services["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"],
        "broker replica.fetch.max.bytes": services["kafka"]["environment"]["KAFKA_REPLICA_FETCH_MAX_BYTES"],
        "topics max.message.bytes": services["kafka-init"]["environment"]["MAX_MESSAGE_BYTES"],
        "worker": services["worker"]["environment"]["SENTIMENT_MAX_MESSAGE_BYTES"],
    }
    sizes = {name: int(default.fullmatch(v).group(1)) for name, v in compose_values.items()}  # type: ignore[union-attr]
    sizes["k8s configmap"] = int(k8s_object("ConfigMap", "sentiment-worker")["data"]["SENTIMENT_MAX_MESSAGE_BYTES"])
    sizes["settings default"] = DEFAULTS.max_message_bytes
    assert len(set(sizes.values())) == 1, sizes
    assert "max.message.bytes" in "\n".join(services["kafka-init"]["command"])
    assert DEFAULTS.max_post_bytes <= DEFAULTS.max_message_bytes
    assert DEFAULTS.max_image_bytes < DEFAULTS.max_post_bytes
    with pytest.raises(ValueError, match="below the largest valid post"):
        Settings(max_image_bytes=7_000_000)


def test_keda_overlay_scales_on_lag_and_cpu_within_the_partitions_instead_of_the_hpa() -> None:
    overlay = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert ".." in overlay["resources"] and "scaledobject.yaml" in overlay["resources"]
    (patch,) = overlay["patches"]
    deleted = yaml.safe_load(patch["patch"])
    assert deleted["$patch"] == "delete" and deleted["kind"] == "HorizontalPodAutoscaler"
    assert deleted["metadata"]["name"] == k8s_object("HorizontalPodAutoscaler", "sentiment-worker")["metadata"]["name"]
    scaled = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s_object("Deployment", "sentiment-worker")["metadata"]["name"]
    config = k8s_object("ConfigMap", "sentiment-worker")["data"]
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= int(config["SENTIMENT_PARTITIONS"])
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"kafka", "cpu"}
    kafka = triggers["kafka"]["metadata"]
    assert kafka["bootstrapServers"] == config["SENTIMENT_BOOTSTRAP_SERVERS"]
    assert kafka["consumerGroup"] == config["SENTIMENT_CONSUMER_GROUP"]
    assert kafka["topic"] == config["SENTIMENT_TOPIC_POSTS"]
    assert int(kafka["lagThreshold"]) > 0 and kafka["allowIdleConsumers"] == "false"


def test_kube_prometheus_overlay_scrapes_the_metrics_service_and_carries_the_alert_rules() -> None:
    overlay = yaml.safe_load((K8S / "kube-prometheus" / "kustomization.yaml").read_text())
    assert set(overlay["resources"]) == {"servicemonitor.yaml", "prometheusrule.yaml"}
    monitor = yaml.safe_load((K8S / "kube-prometheus" / "servicemonitor.yaml").read_text())
    service = k8s_object("Service", "sentiment-worker-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # the job label becomes the Service's app.kubernetes.io/name, which is the job alerts.yml matches
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == WORKER_JOB
    rule = yaml.safe_load((K8S / "kube-prometheus" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), "run `python scripts/prometheusrule.py`"


# --- promtool ------------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_compose_scrape_config_and_its_rules() -> None:
    result = promtool("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_kubernetes_scrape_config(tmp_path: Path) -> None:
    source = DEPLOY / "prometheus" / "prometheus-k8s.yml"
    result = promtool("check", "config", source.name, cwd=source.parent)
    if result.returncode != 0 and "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes discovery; check everything else (relabelling,
        # rule files) with the discovery swapped for a static target.
        config = yaml.safe_load(source.read_text())
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:9108"]}]
        (tmp_path / source.name).write_text(yaml.safe_dump(config))
        shutil.copy(ALERTS, tmp_path / ALERTS.name)
        result = promtool("check", "config", source.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_alert_rules())} rules found" in result.stdout


def test_each_alert_fires_on_the_series_it_is_written_for() -> None:
    """`promtool test rules`: deploy/prometheus/alerts_test.yml pins when each alert fires and when not."""
    cases = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())["tests"]
    firing = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert firing == {rule["alert"] for rule in load_alert_rules()}, "every alert needs a case where it fires"
    result = promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a metrics endpoint ----------------------------------------------------

# Realistic end-to-end latencies: log-normal, median 40 ms, p99 ~ 200 ms (under the 250 ms SLO).
# Deterministic quantile points, so every tick adds the same counts to every bucket.
POSTS_PER_TICK = 200
LATENCIES_S = tuple(
    0.04 * math.exp(0.7 * NormalDist().inv_cdf((i + 0.5) / POSTS_PER_TICK)) for i in range(POSTS_PER_TICK)
)


@dataclass
class LiveEndpoint:
    server: MetricsServer
    metrics: Metrics
    settings: Settings

    @property
    def target(self) -> str:
        return f"{self.server.host}:{self.server.port}"


def record_tick(m: Metrics, settings: Settings) -> None:
    """One tick of a healthy worker: 200 posts in micro-batches, every metric family touched."""
    for latency in LATENCIES_S:
        m.e2e_latency.observe(latency)
    m.events.labels("scored").inc(POSTS_PER_TICK)
    m.events.labels("dead_letter").inc(1)
    m.dead_letters.labels("image_undecodable").inc(1)
    for size in (settings.max_batch,) * 6 + (8,):
        m.batch_size.observe(size)
        for i, stage in enumerate(STAGES):
            m.stage_latency.labels(stage).observe(0.001 * (i + 1))
    for i, pattern in enumerate(("none", "image", "transcript", "image+transcript")):
        m.missing_pattern.labels(pattern).inc(i * 10 + 1)
        m.missing_pattern_share.labels(pattern).set(0.25)
    m.rebalances.inc(0)
    m.rebalance_duration.observe(0.5)
    m.commit_latency.observe(0.004)
    m.produced.labels(settings.topic_sentiment).inc(POSTS_PER_TICK)
    m.produce_errors.labels(settings.topic_sentiment).inc(0)
    m.produce_retries.inc(0)
    for i, modality in enumerate(MODALITIES):
        m.recovered_modalities.labels(modality, settings.recovery).inc(i * 10)
        m.queue_mean_shift.labels(modality).set(0.05)
        m.queue_variance_ratio.labels(modality).set(1.02)
        m.quality_mean.labels(modality).set(0.7)
        m.quality.labels(modality).observe(0.9 - 0.2 * i)
        m.queue_length.labels(modality).set(settings.queue_length)
    m.redis_errors.labels("read")
    m.queue_degraded_events.labels("queue_stale")
    m.queue_dropped_vectors.labels("not_finite")
    m.batch_plan.set(settings.max_batch)
    for i, modality in enumerate(MODALITIES):
        m.encode_cache.labels(modality, "hit").inc(10 * i)
        m.encode_cache.labels(modality, "miss").inc(10)
    for partition in range(settings.partitions):
        m.set_consumer_lag(settings.topic_posts, partition, highwater=1000 + partition, position=990)
    m.mark_processed()


@pytest.fixture
def live_endpoint() -> Iterator[LiveEndpoint]:
    """stream.service.metrics served on a free loopback port, fed by a thread that records a tick every 100 ms.

    Stands in for a worker until the integration tests run a real one against the same fixture.
    """
    settings = Settings(metrics_host="127.0.0.1", metrics_port=0)
    metrics = Metrics(settings)
    metrics.set_onnx_session("head", settings.providers, "CPUExecutionProvider")
    metrics.set_build_info(version="0.1.0", model_version="m", recovery="fsrf", text_encoder="fp32", provider="CPU")
    # A scrape never sees half a tick, so every scrape's buckets hold whole copies of LATENCIES_S.
    tick_lock = threading.Lock()
    collect = metrics.registry.collect

    def whole_ticks_only() -> Iterator[Any]:
        with tick_lock:
            yield from collect()

    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            with tick_lock:
                record_tick(metrics, settings)
            stop.wait(0.1)

    with mock.patch.object(metrics.registry, "collect", whole_ticks_only):
        server = start_metrics_server(settings, metrics, port=0)
        thread = threading.Thread(target=traffic, name="traffic", daemon=True)
        thread.start()
        try:
            yield LiveEndpoint(server, metrics, settings)
        finally:
            stop.set()
            thread.join(timeout=5)
            server.close()


@pytest.fixture
def kafka_exporter_endpoint() -> Iterator[str]:
    """A stand-in for kafka_exporter: ``kafka_consumergroup_lag`` of the default group (small, steady lag)."""
    registry = CollectorRegistry()
    lag = Gauge("kafka_consumergroup_lag", "lag", ["consumergroup", "topic", "partition"], registry=registry)
    for partition in range(DEFAULTS.partitions):
        lag.labels(DEFAULTS.consumer_group, DEFAULTS.topic_posts, str(partition)).set(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


P99_QUERY = "histogram_quantile(0.99, sum by (le) (rate(sentiment_e2e_latency_seconds_bucket[1m])))"


@pytest.mark.slow
def test_real_prometheus_computes_p99_end_to_end_latency(
    prometheus_server: StartPrometheus, live_endpoint: LiveEndpoint
) -> None:
    prom: PrometheusServer = prometheus_server([live_endpoint.target])
    p99 = prom.wait_for_value(P99_QUERY, timeout=60)
    (target,) = prom.targets()
    assert target["health"] == "up" and target["labels"]["job"] == WORKER_JOB
    buckets = latency_buckets(live_endpoint.settings.latency_slo_s)
    expected = expected_quantile(0.99, LATENCIES_S, buckets)
    print(f"\nPrometheus p99 end-to-end latency: {p99:.6f} s (expected {expected:.6f} s from the buckets)")
    assert 0.1 < p99 <= 0.25, "the p99 of the generated latencies lies in the (100 ms, 250 ms] bucket"
    assert p99 == pytest.approx(expected, rel=0.02)
    assert p99 < live_endpoint.settings.latency_slo_s
    within_slo = prom.wait_for_value(
        'sum(rate(sentiment_e2e_latency_seconds_bucket{le="0.25"}[1m]))'
        " / sum(rate(sentiment_e2e_latency_seconds_count[1m]))"
    )
    assert within_slo == pytest.approx(sum(v <= 0.25 for v in LATENCIES_S) / POSTS_PER_TICK, rel=0.01)


@pytest.mark.slow
def test_real_prometheus_evaluates_every_alert_rule_and_dashboard_query(
    prometheus_server: StartPrometheus, live_endpoint: LiveEndpoint, kafka_exporter_endpoint: str
) -> None:
    prom: PrometheusServer = prometheus_server(
        [live_endpoint.target], rule_files=[ALERTS], extra_jobs={"kafka-exporter": [kafka_exporter_endpoint]}
    )
    prom.wait_for_value(P99_QUERY, timeout=60)  # rate() has data: two scrapes at least

    # Every rule loaded and evaluated without error; a healthy worker fires nothing.
    (group,) = prom.rule_groups()
    assert {r["name"] for r in group["rules"]} == {r["alert"] for r in load_alert_rules()}
    bad = {r["name"]: r.get("lastError") for r in group["rules"] if r["health"] != "ok"}
    assert bad == {}
    # absent()-based rules go pending until the first scrape of their job: give evaluation a few rounds
    prom.wait_for_value('up{job="kafka-exporter"}', timeout=30)
    deadline = time.monotonic() + 10
    while prom.query("ALERTS") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert prom.query("ALERTS") == []

    # Every dashboard query parses and returns data from a worker-shaped endpoint.
    empty, errors = [], []
    for title, expr in dashboard_queries():
        if expr.startswith("label_values("):
            metric, label = _LABEL_VALUES.fullmatch(expr).groups()  # type: ignore[union-attr]
            if not prom.label_values(label, metric):
                empty.append(f"{title}: {expr}")
            continue
        try:
            if not prom.query(as_instant_query(expr)):
                empty.append(f"{title}: {expr}")
        except Exception as exc:
            errors.append(f"{title}: {expr}: {exc}")
    assert errors == []
    assert empty == []
