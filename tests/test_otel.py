"""OpenTelemetry: runs as spans, alerts as span events — with the real SDK, and end to end against a real
OTLP receiver (Arize Phoenix, in .venv-phoenix from .ci/setup-phoenix.sh, started on 127.0.0.1 and read
back through its own REST API), from the library and from ``featurewatch run --otlp`` as the README shows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _langchain_helpers import lc_detectors
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import HP, make_monitor
from featurewatch import GenerationBlocked
from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.otel import ALERT_EVENT, OpenTelemetrySink, otlp_tracer_provider
from featurewatch.pack import DEFAULT_PACK, resolve_pack_path

ROOT = Path(__file__).resolve().parents[1]
PHOENIX = ROOT / ".venv-phoenix" / "bin" / "phoenix"


def spec(name: str, *, action: str = "alert", min_tokens: int = 2) -> DetectorSpec:
    """Fires once ``min_tokens`` completion tokens were read (a threshold below any score)."""
    return DetectorSpec(name=name, description="test", hookpoint=HP, threshold=-1e6, action=action,
                        features=[FeatureWeight(id=3, weight=1.0, label="three"), FeatureWeight(id=5, weight=0.5)],
                        phases=["completion"], pooling={"method": "mean", "min_tokens": min_tokens})


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_a_run_is_a_genai_span_and_each_alert_an_event_at_its_time(tiny_monitor: Any, spans: Any) -> None:
    provider, exporter = spans
    sink = OpenTelemetrySink(tracer_provider=provider, pack="tiny@0.1")
    fired: list[Any] = []
    m = tiny_monitor(detectors=[spec("demo"), spec("stop", action="block", min_tokens=3)], sinks=[sink],
                     on_alert=fired.append, shadow=["stop"], capture_text=True)
    result = m.generate("abc", max_new_tokens=6, min_new_tokens=6)
    (span,) = exporter.get_finished_spans()
    a = span.attributes
    assert span.name == f"chat {m.model_name}" and span.kind == trace.SpanKind.CLIENT
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == m.model_name
    assert a["gen_ai.usage.input_tokens"] == result.run.n_prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == len(result.token_ids) == 6
    assert a["featurewatch.pack"] == "tiny@0.1" and list(a["featurewatch.detectors"]) == ["demo", "stop"]
    assert a["featurewatch.run_id"] == result.run_id and a["featurewatch.outcome"] == "completed"
    assert a["featurewatch.degraded"] is False and a["featurewatch.alerts"] == 2 and a["featurewatch.would_block"]
    assert a["featurewatch.score.demo"] == pytest.approx(result.scores["demo"])
    assert span.end_time == int(result.run.ended_at * 1e9)
    events = [e for e in span.events if e.name == ALERT_EVENT]
    assert [e.attributes["featurewatch.detector"] for e in events] == ["demo", "stop"]
    for event, alert in zip(events, fired, strict=True):
        e = event.attributes
        assert event.timestamp == int(alert.fired_at * 1e9)
        assert (e["featurewatch.phase"], e["featurewatch.score"], e["featurewatch.threshold"]) == \
            (alert.phase, alert.score, alert.threshold)
        assert (e["featurewatch.span_start"], e["featurewatch.span_end"]) == alert.span
        assert list(e["featurewatch.evidence.features"]) == [ev.feature for ev in alert.evidence]
        assert list(e["featurewatch.evidence.labels"]) == [ev.label or "" for ev in alert.evidence]
        assert list(e["featurewatch.evidence.shares"]) == pytest.approx([ev.share for ev in alert.evidence])
        assert "featurewatch.unexplained" not in e  # an SAE readout explains itself whole
        assert "featurewatch.text" not in e  # text only when asked for, as the alert log
    assert [e.attributes["featurewatch.would_block"] for e in events] == [False, True]
    assert "three" in events[0].attributes["featurewatch.evidence.labels"] or not fired[0].evidence


def test_alert_text_only_when_asked(tiny_monitor: Any, spans: Any) -> None:
    provider, exporter = spans
    m = tiny_monitor(detectors=[spec("demo")], sinks=[OpenTelemetrySink(tracer_provider=provider, include_text=True)])
    result = m.generate("abc", max_new_tokens=4, min_new_tokens=4)
    (event,) = exporter.get_finished_spans()[0].events
    assert event.attributes["featurewatch.text"] == result.alerts[0].text


def test_an_open_span_is_enriched_and_left_open(tiny_monitor: Any, spans: Any) -> None:
    provider, exporter = spans
    m = tiny_monitor(detectors=[spec("demo")], sinks=[OpenTelemetrySink(tracer_provider=provider)])
    with provider.get_tracer("app").start_as_current_span("handle request") as app_span:
        result = m.generate("abc", max_new_tokens=4, min_new_tokens=4)
        assert exporter.get_finished_spans() == ()  # the sink did not end the app's span
        app_span.set_attribute("app.done", True)
    (span,) = exporter.get_finished_spans()
    assert span.name == "handle request" and span.attributes["featurewatch.run_id"] == result.run_id
    assert [e.name for e in span.events] == [ALERT_EVENT] and span.attributes["app.done"] is True


def test_enrich_false_nests_a_span_of_its_own_under_the_open_one(tiny_monitor: Any, spans: Any) -> None:
    provider, exporter = spans
    m = tiny_monitor(detectors=[spec("demo")], sinks=[OpenTelemetrySink(tracer_provider=provider, enrich=False)])
    with provider.get_tracer("app").start_as_current_span("handle request"):
        m.generate("abc", max_new_tokens=4, min_new_tokens=4)
    ours, app = exporter.get_finished_spans()
    assert ours.parent is not None and ours.parent.span_id == app.context.span_id
    assert ours.events and not app.events


def test_a_block_in_enforce_mode_ends_the_span_blocked(tiny_monitor: Any, spans: Any) -> None:
    provider, exporter = spans
    m = tiny_monitor(detectors=[spec("stop", action="block")], sinks=[OpenTelemetrySink(tracer_provider=provider)])
    with pytest.raises(GenerationBlocked):
        m.generate("abc", max_new_tokens=8, min_new_tokens=8)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["featurewatch.outcome"] == "blocked" and span.attributes["featurewatch.would_block"] is False
    assert span.attributes["gen_ai.usage.output_tokens"] == 3  # the pass that fired chose one more token


def test_detach_ends_the_spans_of_runs_that_never_ended(spans: Any) -> None:
    provider, exporter = spans
    sink = OpenTelemetrySink(tracer_provider=provider)
    sink.on_run_start(run_id="r1", model_name="m")
    sink.on_detach()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["featurewatch.degraded"] is True


def test_an_unknown_otlp_protocol_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurewatch.errors import ConfigError

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        otlp_tracer_provider()


# ---------------------------------------------------------------- end to end: a real OTLP receiver
@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: Any) -> Iterator[str]:
    """Arize Phoenix on 127.0.0.1 (OTLP/HTTP at /v1/traces, REST at /v1/projects/...): its base URL."""
    if not PHOENIX.exists():
        reason = "no .venv-phoenix: create it with `bash .ci/setup-phoenix.sh` (.ci/test.sh does)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason}; CI must run this test")
        pytest.skip(reason)
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    work = tmp_path_factory.mktemp("phoenix")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}
    env.update(PHOENIX_HOST="127.0.0.1", PHOENIX_PORT=str(ports[0]), PHOENIX_GRPC_PORT=str(ports[1]),
               PHOENIX_WORKING_DIR=str(work), PHOENIX_TELEMETRY_ENABLED="false")
    log = (work / "phoenix.log").open("wb")
    proc = subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"phoenix did not start:\n{(work / 'phoenix.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def phoenix_spans(url: str, predicate: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Spans of Phoenix's default project that satisfy ``predicate``, once there are any (Phoenix ingests async)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/v1/projects/default/spans?limit=100", timeout=10) as r:
            found = [s for s in json.load(r)["data"] if predicate(s)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_monitored_generation_lands_in_phoenix_with_its_alert_events(phoenix: str, smollm: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix)  # the standard variable, nothing else
    monkeypatch.setenv("OTEL_SERVICE_NAME", "featurewatch-test")
    provider = otlp_tracer_provider()
    sink = OpenTelemetrySink(tracer_provider=provider, pack=DEFAULT_PACK)
    always, stop_now = lc_detectors()  # `always` alerts on any prompt; `stop-now` blocks at 3 completion tokens
    with make_monitor(smollm, detectors=[always, stop_now], sinks=[sink], shadow=["stop-now"]) as m:
        result = m.generate("Write a short note to the team about Friday's picnic.", max_new_tokens=6)
    provider.shutdown()  # flush the batch
    (span,) = phoenix_spans(phoenix, lambda s: s["attributes"].get("featurewatch.run_id") == result.run_id)
    a = span["attributes"]
    assert span["name"] == f"chat {m.model_name}"
    assert a["gen_ai.request.model"] == m.model_name and a["gen_ai.usage.output_tokens"] == len(result.token_ids)
    assert a["gen_ai.usage.input_tokens"] == result.run.n_prompt_tokens
    assert a["featurewatch.pack"] == DEFAULT_PACK and a["featurewatch.outcome"] == "completed"
    assert a["featurewatch.score.always"] == pytest.approx(result.scores["always"], rel=1e-6)
    events = [e for e in span["events"] if e["name"] == ALERT_EVENT]
    assert [e["attributes"]["featurewatch.detector"] for e in events] == [al.detector for al in result.alerts] == \
        ["always", "stop-now"]
    stop = events[1]["attributes"]
    assert stop["featurewatch.would_block"] is True and stop["featurewatch.phase"] == "completion"
    assert stop["featurewatch.evidence.features"] == [ev.feature for ev in result.alerts[1].evidence]
    assert stop["featurewatch.evidence.labels"] == [ev.label or "" for ev in result.alerts[1].evidence]
    assert "featurewatch.text" not in stop


@pytest.mark.slow
@pytest.mark.e2e
def test_featurewatch_run_otlp_as_the_readme_shows(phoenix: str, tmp_path: Path) -> None:
    # the README's command, with a copy of the default pack whose scam-email detector alerts on anything
    pack = tmp_path / "pack"
    shutil.copytree(resolve_pack_path(DEFAULT_PACK), pack)
    scam = json.loads((pack / "scam-email.json").read_text())
    (pack / "scam-email.json").write_text(json.dumps({**scam, "threshold": -1e6, "phase_thresholds": {},
                                                      "pooling": {**scam["pooling"], "min_tokens": 1}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=phoenix, OTEL_SERVICE_NAME="featurewatch-cli-test")
    featurewatch = str(Path(sys.executable).parent / "featurewatch")
    out = subprocess.run([featurewatch, "run", "--otlp", "--pack", str(pack), "--detector", "scam-email", "--json",
                          "--max-new-tokens", "4", "--prompt", "Say hello to the team."],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"exporting traces over OTLP to {phoenix}" in out.stderr
    run = json.loads(out.stdout.splitlines()[-1])
    (span,) = phoenix_spans(phoenix, lambda s: s["attributes"].get("featurewatch.run_id") == run["run_id"])
    manifest = json.loads((pack / "pack.json").read_text())
    assert span["attributes"]["featurewatch.pack"] == f"{manifest['name']}@{manifest['version']}"
    events = [e["attributes"] for e in span["events"] if e["name"] == ALERT_EVENT]
    assert [e["featurewatch.detector"] for e in events] == [a["detector"] for a in run["alerts"]]
    assert events and events[0]["featurewatch.detector"] == "scam-email"


def test_a_dense_detectors_alert_carries_its_unexplained_part(spans: Any) -> None:
    """A probe explained in SAE features: shares on the event, and what the listed features leave out."""
    from featurewatch.alert import Alert, FeatureEvidence

    provider, exporter = spans
    sink = OpenTelemetrySink(tracer_provider=provider)
    alert = Alert(detector="probe", phase="prompt", score=3.0, threshold=1.0, run_id="r1", span=(0, 4),
                  evidence=[FeatureEvidence(feature=7, label="seven", activation=1.0, contribution=1.5, share=0.4),
                            FeatureEvidence(feature=9, activation=0.5, contribution=0.5)],
                  unexplained=2.25, unexplained_share=0.6, started_at=1.0, fired_at=2.0)
    with provider.get_tracer("t").start_as_current_span("app"):
        sink.on_alert(alert)
    [event] = [e for s in exporter.get_finished_spans() for e in s.events if e.name == ALERT_EVENT]
    e = event.attributes
    assert list(e["featurewatch.evidence.shares"])[0] == 0.4 and math.isnan(list(e["featurewatch.evidence.shares"])[1])
    assert (e["featurewatch.unexplained"], e["featurewatch.unexplained_share"]) == (2.25, 0.6)
