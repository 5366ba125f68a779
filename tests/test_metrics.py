"""PrometheusMetrics and the /metrics endpoint, asserted on a fresh registry per test."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from featurewatch.errors import ConfigError, PortInUse
from featurewatch.exposition import exposition_registry, metrics_asgi_app, metrics_wsgi_app, serve_metrics
from featurewatch.metrics import DEFAULT_ERROR_STAGES, PrometheusMetrics

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def sink(registry: CollectorRegistry, make_detector: Any) -> PrometheusMetrics:
    """A metrics sink attached to model "tiny" with a warning and a critical (prompt-only) detector."""
    metrics = PrometheusMetrics(registry=registry)
    metrics.on_attach(model_name="tiny", detectors=[
        make_detector("scam-email", threshold=1.7),
        make_detector("dangerous-content", threshold=2.25, action="block", severity="critical", phases=("prompt",)),
    ])
    return metrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_attach_creates_every_child_at_zero(sink: PrometheusMetrics, registry: CollectorRegistry) -> None:
    for phase in ("prompt", "completion"):
        assert value(registry, "featurewatch_alerts_total", detector="scam-email", phase=phase,
                     action="alert", model_name="tiny") == 0
    assert value(registry, "featurewatch_alerts_total", detector="dangerous-content", phase="prompt",
                 action="block", model_name="tiny") == 0
    # A phase the detector does not watch gets no series.
    assert value(registry, "featurewatch_alerts_total", detector="dangerous-content", phase="completion",
                 action="block", model_name="tiny") is None
    for outcome in ("completed", "blocked", "error", "aborted"):
        assert value(registry, "featurewatch_generations_total", model_name="tiny", outcome=outcome) == 0
    assert value(registry, "featurewatch_tokens_scanned_total", model_name="tiny") == 0
    assert value(registry, "featurewatch_generations_in_flight", model_name="tiny") == 0
    assert value(registry, "featurewatch_monitor_duration_seconds_count", model_name="tiny") == 0
    for phase in ("prompt", "completion"):
        assert value(registry, "featurewatch_detector_score_count", detector="scam-email", phase=phase,
                     model_name="tiny") == 0
    for stage in DEFAULT_ERROR_STAGES:
        assert value(registry, "featurewatch_errors_total", stage=stage) == 0
    assert value(registry, "featurewatch_detector_threshold", detector="dangerous-content", phase="prompt",
                 model_name="tiny") == 2.25
    # the markup-injection alert (any monitor may raise it) exists at 0 with its severity
    assert value(registry, "featurewatch_alerts_total", detector="markup-injection", phase="prompt", action="alert",
                 model_name="tiny") == 0
    assert value(registry, "featurewatch_detector_info", detector="markup-injection", model_name="tiny",
                 severity="warning", action="alert") == 1
    assert value(registry, "featurewatch_detector_info", detector="dangerous-content", model_name="tiny",
                 severity="critical", action="block") == 1
    build = [s for m in registry.collect() if m.name == "featurewatch_build_info" for s in m.samples]
    assert len(build) == 1 and build[0].value == 1 and build[0].labels["version"]


def test_alert_increments_counter_with_run_id_exemplar(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                       make_alert: Any) -> None:
    sink.on_alert(make_alert(detector="dangerous-content", action="block", severity="critical", run_id="r-42"))
    labels = dict(detector="dangerous-content", phase="prompt", action="block", model_name="tiny")
    assert value(registry, "featurewatch_alerts_total", **labels) == 1
    [sample] = [s for m in registry.collect() for s in m.samples
                if s.name == "featurewatch_alerts_total" and s.labels == labels]
    assert sample.exemplar is not None and sample.exemplar.labels == {"run_id": "r-42"}
    # Run ids appear only as exemplars, never as a label.
    assert "r-42" not in generate_latest(registry).decode()


def test_score_histogram_has_a_bucket_boundary_at_each_threshold(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                                 make_result: Any) -> None:
    for i, score in enumerate((1.69, 1.71, 5.0)):
        sink.on_run_end(make_result(run_id=f"r{i}", phase_scores={"prompt": {"scam-email": score,
                                                                              "dangerous-content": 2.25}}))
    scam = dict(detector="scam-email", phase="prompt", model_name="tiny")
    assert value(registry, "featurewatch_detector_score_bucket", le="1.7", **scam) == 1
    assert value(registry, "featurewatch_detector_score_bucket", le="2.0", **scam) == 2
    assert value(registry, "featurewatch_detector_score_count", **scam) == 3
    assert value(registry, "featurewatch_detector_score_bucket", le="2.25", detector="dangerous-content",
                 phase="prompt", model_name="tiny") == 3
    assert value(registry, "featurewatch_generations_total", model_name="tiny", outcome="completed") == 3


def test_thresholds_are_published_per_phase_as_alerts_fire(registry: CollectorRegistry, make_detector: Any,
                                                           make_result: Any) -> None:
    """The gauge published the spec's bare threshold (1.898) while alerts fired at 2.60 / 2.65 (issue 26 §3)."""
    from featurewatch.pack import DEFAULT_PACK, load_pack

    sink = PrometheusMetrics(registry=registry)
    specs = load_pack(DEFAULT_PACK).select(None)
    sink.on_attach(model_name="smollm2", detectors=specs)
    split = [s for s in specs if s.phase_thresholds]
    assert split, "the default pack has a detector with per-phase thresholds"
    for spec in specs:
        for phase in spec.phases:
            labels = dict(detector=spec.name, phase=phase, model_name="smollm2")
            assert value(registry, "featurewatch_detector_threshold", **labels) == spec.threshold_for(phase)
            # a bucket boundary at the phase's threshold: le="<threshold>" counts the runs below it
            assert value(registry, "featurewatch_detector_score_bucket", le=str(spec.threshold_for(phase)),
                         **labels) == 0
        for phase in ("prompt", "completion"):
            if phase not in spec.phases:
                assert value(registry, "featurewatch_detector_threshold", detector=spec.name, phase=phase,
                             model_name="smollm2") is None
    # the gauge holds no series without a phase (the bare threshold is nobody's firing point)
    assert all(s.labels.get("phase") for m in registry.collect() if m.name == "featurewatch_detector_threshold"
               for s in m.samples)
    # the score compared with a phase's threshold is that phase's pooled score
    spec = split[0]
    phase = next(iter(spec.phase_thresholds))
    t = spec.threshold_for(phase)
    sink.on_run_end(make_result(model_name="smollm2", scores={spec.name: t + 10},
                                phase_scores={phase: {spec.name: t - 0.01}}))
    labels = dict(detector=spec.name, phase=phase, model_name="smollm2")
    assert value(registry, "featurewatch_detector_score_bucket", le=str(t), **labels) == 1


def test_second_sink_on_the_same_registry_shares_the_metrics(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                             make_detector: Any, make_alert: Any) -> None:
    second = PrometheusMetrics(registry=registry)
    second.on_attach(model_name="other", detectors=[make_detector("scam-email", threshold=1.7)])
    sink.on_alert(make_alert(detector="scam-email"))
    second.on_alert(make_alert(detector="scam-email", model_name="other"))
    assert value(registry, "featurewatch_alerts_total", detector="scam-email", phase="prompt", action="alert",
                 model_name="tiny") == 1
    assert value(registry, "featurewatch_alerts_total", detector="scam-email", phase="prompt", action="alert",
                 model_name="other") == 1
    PrometheusMetrics(registry=registry, namespace="canary")  # another namespace is another set
    assert value(registry, "canary_errors_total", stage="hook") == 0


def test_threshold_missing_from_fixed_buckets_is_logged_once(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                             make_detector: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    second = PrometheusMetrics(registry=registry)
    with caplog.at_level(logging.WARNING, logger="featurewatch.metrics"):
        for _ in range(2):
            second.on_attach(model_name="other", detectors=[make_detector("sycophancy", threshold=0.77)])
    assert [r.getMessage() for r in caplog.records if "0.77" in r.getMessage()] == [
        "detector 'sycophancy' threshold 0.77 is not a bucket boundary of featurewatch_detector_score (its buckets "
        "were fixed by an earlier attach on this registry); give this monitor its own registry or add the threshold "
        "to score_buckets"]


def test_a_foreign_collector_with_the_same_name_is_a_config_error(registry: CollectorRegistry) -> None:
    Counter("featurewatch_errors", "not ours", registry=registry)
    with pytest.raises(ConfigError, match="featurewatch_errors"):
        PrometheusMetrics(registry=registry)
    # Nothing half-registered is left behind.
    names = {m.name for m in registry.collect()}
    assert names == {"featurewatch_errors"}


def test_in_flight_gauge_counts_each_run_once(sink: PrometheusMetrics, registry: CollectorRegistry,
                                             make_result: Any) -> None:
    def in_flight() -> float | None:
        return value(registry, "featurewatch_generations_in_flight", model_name="tiny")

    sink.on_run_start(run_id="a", model_name="tiny")
    sink.on_run_start(run_id="a", model_name="tiny")
    sink.on_run_start(run_id="b", model_name="tiny")
    assert in_flight() == 2
    sink.on_run_end(make_result(run_id="a", outcome="blocked"))
    sink.on_run_end(make_result(run_id="a", outcome="blocked"))  # repeated end
    sink.on_run_end(make_result(run_id="never-started"))
    assert in_flight() == 1
    sink.on_detach()  # "b" never ended
    assert in_flight() == 0
    assert value(registry, "featurewatch_generations_total", model_name="tiny", outcome="blocked") == 2


def test_forward_counts_tokens_and_overhead(sink: PrometheusMetrics, registry: CollectorRegistry) -> None:
    sink.on_forward(model_name="tiny", seconds=3e-4, tokens=17)
    sink.on_forward(model_name="tiny", seconds=2e-3, tokens=1)
    sink.on_forward(model_name="tiny", seconds=float("nan"), tokens=0)  # ignored
    assert value(registry, "featurewatch_tokens_scanned_total", model_name="tiny") == 18
    assert value(registry, "featurewatch_monitor_duration_seconds_bucket", model_name="tiny", le="0.0005") == 1
    assert value(registry, "featurewatch_monitor_duration_seconds_bucket", model_name="tiny", le="0.0025") == 2
    assert value(registry, "featurewatch_monitor_duration_seconds_count", model_name="tiny") == 2


def test_odd_events_are_handled_and_logged_once(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                make_alert: Any, make_result: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="featurewatch.metrics"):
        for _ in range(2):
            sink.on_error(stage="made-up", error=RuntimeError("x"))
            sink.on_alert(make_alert(detector="unannounced", run_id="x" * 200))
            sink.on_run_end(make_result(phase_scores={"prompt": {"scam-email": float("inf")}}))
    assert value(registry, "featurewatch_errors_total", stage="other") == 2
    assert value(registry, "featurewatch_errors_total", stage="made-up") is None
    # An alert is never dropped, even from a detector not announced at attach.
    assert value(registry, "featurewatch_alerts_total", detector="unannounced", phase="prompt", action="alert",
                 model_name="tiny") == 2
    assert value(registry, "featurewatch_detector_score_count", detector="scam-email", phase="prompt",
                 model_name="tiny") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages  # stage, unannounced detector, long run id, non-finite score
    sink.on_error(stage="hook", error=RuntimeError("x"))
    assert value(registry, "featurewatch_errors_total", stage="hook") == 1


def test_reattach_with_a_new_severity_replaces_the_info_series(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                               make_detector: Any) -> None:
    sink.on_attach(model_name="tiny", detectors=[make_detector("scam-email", threshold=1.7, severity="critical")])
    info = dict(detector="scam-email", model_name="tiny", action="alert")
    assert value(registry, "featurewatch_detector_info", severity="warning", **info) is None
    assert value(registry, "featurewatch_detector_info", severity="critical", **info) == 1


def test_exposition_passes_promtool_check_metrics(sink: PrometheusMetrics, registry: CollectorRegistry,
                                                 make_alert: Any, make_result: Any, require_tool: Any) -> None:
    promtool = require_tool("promtool")
    sink.on_run_start(run_id="r", model_name="tiny")
    sink.on_forward(model_name="tiny", seconds=1e-3, tokens=5)
    sink.on_alert(make_alert())
    sink.on_run_end(make_result(run_id="r"))
    done = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry), capture_output=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done


def test_serve_metrics_over_http(sink: PrometheusMetrics, registry: CollectorRegistry, make_alert: Any) -> None:
    sink.on_alert(make_alert(run_id="r-7"))
    with serve_metrics(0, registry=registry) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        assert ('featurewatch_alerts_total{action="alert",detector="scam-email",model_name="tiny",phase="prompt"} 1.0'
                in text)
        request = urllib.request.Request(server.url, headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            om = resp.read().decode()
        assert '# {run_id="r-7"} 1.0' in om and om.rstrip().endswith("# EOF")
    server.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_serve_metrics_on_a_busy_port_names_the_port_and_the_fix(registry: CollectorRegistry) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"metrics port {port} on 127.0.0.1 is already in use.*or 0 to pick"):
            serve_metrics(port, registry=registry)


@pytest.mark.parametrize("port", [-1, 65536, "9464", True])
def test_serve_metrics_rejects_bad_ports(port: Any, registry: CollectorRegistry) -> None:
    with pytest.raises(ConfigError, match="0..65535"):
        serve_metrics(port, registry=registry)


def test_wsgi_and_asgi_apps_serve_the_registry(sink: PrometheusMetrics, registry: CollectorRegistry) -> None:
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    statuses: list[str] = []
    body = b"".join(metrics_wsgi_app(registry)(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"] and b"featurewatch_alerts_total" in body

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []}
    asyncio.run(metrics_asgi_app(registry)(scope, receive, send))
    assert sent[0]["status"] == 200 and b"featurewatch_alerts_total" in sent[1]["body"]


_WORKER = textwrap.dedent("""
    import os, sys
    from dataclasses import dataclass
    from featurewatch.alert import Alert
    from featurewatch.metrics import PrometheusMetrics

    @dataclass
    class Det:
        name: str = "scam-email"; threshold: float = 1.7; action: str = "alert"
        severity: str = "critical"; phases: tuple = ("prompt",)

    sink = PrometheusMetrics()  # the default registry, as in an app
    sink.on_attach(model_name="tiny", detectors=[Det()])
    sink.on_run_start(run_id=sys.argv[1], model_name="tiny")  # left in flight
    sink.on_alert(Alert(detector="scam-email", phase="prompt", score=3.0, threshold=1.7, run_id=sys.argv[1],
                        model_name="tiny", span=(0, 4), started_at=0.0, fired_at=1.0))
    print(os.getpid())
""")


def test_multiprocess_mode_merges_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, name], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for name in ("w1", "w2")]
    pids = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
        pids.append(int(out))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    merged = exposition_registry(None)
    labels = dict(detector="scam-email", phase="prompt", action="alert", model_name="tiny")
    assert value(merged, "featurewatch_alerts_total", **labels) == 2
    assert value(merged, "featurewatch_generations_in_flight", model_name="tiny") == 2
    assert value(merged, "featurewatch_detector_threshold", detector="scam-email", phase="prompt",
                 model_name="tiny") == 1.7
    assert value(merged, "featurewatch_detector_info", detector="scam-email", model_name="tiny",
                 severity="critical", action="alert") == 1
    # A dead worker's live gauges go once the app server reports it (e.g. gunicorn's child_exit).
    multiprocess.mark_process_dead(pids[0], str(tmp_path))
    assert value(merged, "featurewatch_generations_in_flight", model_name="tiny") == 1
    assert value(merged, "featurewatch_alerts_total", **labels) == 2  # counters outlive their process


def test_the_sink_names_its_registry_so_it_can_be_served(registry: CollectorRegistry) -> None:
    from prometheus_client import REGISTRY

    assert PrometheusMetrics(registry=registry).registry is registry
    assert PrometheusMetrics().registry is REGISTRY  # what `featurewatch run --metrics-port` crashed on
    with serve_metrics(0, registry=PrometheusMetrics(registry=registry).registry) as server:
        assert server.port > 0
