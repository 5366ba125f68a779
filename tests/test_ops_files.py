"""The shipped Prometheus, Alertmanager and Grafana files: valid for the real
tools, every alert unit-tested, every query naming metrics that exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from featurewatch.metrics import PrometheusMetrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMETHEUS = EXAMPLES / "prometheus"
RULES = PROMETHEUS / "featurewatch-rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "featurewatch-rules.test.yml"
ALERTMANAGER = EXAMPLES / "alertmanager" / "alertmanager.yml"
DASHBOARD = EXAMPLES / "grafana" / "featurewatch-dashboard.json"
METRIC = re.compile(r"(?<![:\w])featurewatch_[a-z_]+(?![:\w])")
RECORDED = re.compile(r"\b[a-z_]+:featurewatch_[a-z_]+:[a-z0-9_]+")


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


@pytest.fixture
def exported_names(registry: CollectorRegistry, make_detector: Any) -> set[str]:
    """Every sample name an attached sink exports (histogram suffixes included)."""
    PrometheusMetrics(registry=registry).on_attach(model_name="m", detectors=[
        make_detector("scam-email"), make_detector("dangerous-content", action="block")])
    names = {s.name for m in registry.collect() for s in m.samples}
    assert "featurewatch_detector_score_bucket" in names and "featurewatch_alerts_total" in names
    return names | {line.split()[2] for line in generate_latest(registry).decode().splitlines()
                    if line.startswith("# TYPE")}


def test_prometheus_config_and_rules_pass_promtool(require_tool: Any) -> None:
    promtool = require_tool("promtool")
    assert "SUCCESS" in run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "SUCCESS: 14 rules found" in run(promtool, "check", "rules", str(RULES))


def test_rule_unit_tests_pass(require_tool: Any) -> None:
    assert "SUCCESS" in run(require_tool("promtool"), "test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts == tested == {"FeatureWatchCriticalDetection", "FeatureWatchHighDetectionRate",
                                "FeatureWatchMonitorSlow", "FeatureWatchMonitorErrors", "FeatureWatchExporterDown",
                                "FeatureWatchWouldBlock"}


def test_every_alert_is_routable_and_explained() -> None:
    for rule in (r for r in rules() if "alert" in r):
        assert rule["labels"]["service"] == "featurewatch", rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_prometheus_scrapes_the_job_the_rules_expect() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "featurewatch" and 'job="featurewatch"' in RULES.read_text()
    assert config["rule_files"] == [RULES.name]


def test_rules_and_dashboard_name_only_exported_metrics(exported_names: set[str]) -> None:
    queries = [r["expr"] for r in rules()] + [t["expr"] for p in panels() for t in p["targets"]]
    used = {m for q in queries for m in METRIC.findall(q)}
    assert used and used <= exported_names, used - exported_names
    recorded = {r["record"] for r in rules() if "record" in r}
    assert {m for q in queries for m in RECORDED.findall(q)} <= recorded


def test_alertmanager_config_routes_critical_featurewatch_alerts_to_the_webhook(require_tool: Any) -> None:
    amtool = require_tool("amtool")
    run(amtool, "check-config", str(ALERTMANAGER))

    def receiver(*labels: str) -> str:
        return run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels).strip()

    assert receiver("service=featurewatch", "severity=critical", "alertname=FeatureWatchCriticalDetection") == \
        "featurewatch-critical"
    assert receiver("service=featurewatch", "severity=warning", "alertname=FeatureWatchMonitorSlow") == \
        "featurewatch-warnings"
    assert receiver("service=other", "severity=critical") == "default"
    config = yaml.safe_load(ALERTMANAGER.read_text())
    [hook] = next(r for r in config["receivers"] if r["name"] == "featurewatch-critical")["webhook_configs"]
    assert hook["url"].startswith("http://127.0.0.1:")


def test_dashboard_uses_the_datasource_variable_and_model_filter() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query" and variables["model_name"]["includeAll"]
    assert dashboard["uid"] == "featurewatch"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("alerts by detector and phase", "alert rate vs generations", "score distribution",
                   "p50 / p99", "tokens scanned", "errors", "in flight", "would have blocked (shadow)"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'model_name=~"$model_name"' in target["expr"], (panel["title"], target["expr"])


def test_grafana_provisioning_files() -> None:
    provisioning = EXAMPLES / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "featurewatch-prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    [provider] = yaml.safe_load((provisioning / "dashboards" / "featurewatch.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
