"""OpenTelemetry: each monitored run as a span, each alert as a span event at the time it fired.

Needs ``pip install 'featurewatch[otel]'`` (opentelemetry-api, -sdk, -exporter-otlp); importing
:mod:`featurewatch` alone never imports OpenTelemetry.

Why it is built this way:

* **A span per run, or the span already open.** At ``on_run_start`` the sink looks at the
  current span (the caller's context: an app's request span, a LangChain or agent span that
  an OpenTelemetry instrumentation opened). With ``enrich=True`` (the default) and a recording
  span there, the run's attributes and events go on *that* span, which the sink never ends;
  otherwise it starts a child span ``chat <model>`` (the GenAI conventions' ``{operation}
  {model}``) and ends it at the run's end, at the run's own end time.
* **GenAI semantic conventions where they apply** — ``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` (the prompt, markup included),
  ``gen_ai.usage.output_tokens`` (where the engine knows it: ``Monitor.generate`` does) — and
  ``featurewatch.*`` for the rest: ``pack``, ``detectors``, ``score.<detector>`` (pooled),
  ``outcome``, ``degraded``, ``alerts``, ``would_block``, ``run_id``.
* **Alerts are events** named ``featurewatch.alert``, stamped with the alert's ``fired_at``:
  detector, phase, score, threshold, action, severity, ``would_block``, the token span
  ``[span_start, span_end)``, and the evidence as parallel arrays (feature ids, labels,
  contributions, shares), with ``unexplained`` / ``unexplained_share`` for a dense detector. The
  span's text only with ``include_text=True``, as the alert log does.
* **Configured the OpenTelemetry way.** The sink takes a tracer provider (default: the global
  one your app set up). :func:`otlp_tracer_provider` builds one that exports over OTLP as the
  standard variables say: ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``), ``..._HEADERS``,
  ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

from .alert import Alert, RunResult
from .errors import ConfigError
from .sinks import BaseSink, DetectorInfo

logger = logging.getLogger(__name__)

ALERT_EVENT = "featurewatch.alert"
"""The name of the span event each alert becomes."""
INSTRUMENTATION = "featurewatch"

try:
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover — exercised where the extra is absent
    raise ImportError("featurewatch.otel needs OpenTelemetry: pip install 'featurewatch[otel]'") from exc


def _ns(seconds: float) -> int | None:
    return int(seconds * 1e9) if seconds and math.isfinite(seconds) else None


class OpenTelemetrySink(BaseSink):
    """A sink that records each monitored run as a span (or on the span already open) and alerts as events.

    Example::

        from featurewatch.otel import OpenTelemetrySink, otlp_tracer_provider
        provider = otlp_tracer_provider()          # OTLP, configured by the OTEL_* variables
        monitor = Monitor.default(sinks=[OpenTelemetrySink(tracer_provider=provider, pack="smollm2-135m-instruct")])
        ...
        provider.shutdown()                        # flush before the process exits

    ``enrich=False`` always starts a span of its own (a child of the current one).
    ``operation``: ``gen_ai.operation.name`` (``chat`` by default; ``text_completion`` for plain prompts).
    """

    def __init__(self, *, tracer_provider: Any = None, pack: Any = None, include_text: bool = False,
                 enrich: bool = True, operation: str = "chat") -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, _version(), tracer_provider=tracer_provider)
        self.pack = pack if pack is None or isinstance(pack, str) else f"{pack.name}@{pack.manifest.version}"
        self.include_text = include_text
        self.enrich = enrich
        self.operation = operation
        self._detectors: dict[str, list[str]] = {}  # model_name -> detector names, from on_attach
        self._spans: dict[str, tuple[Any, bool]] = {}  # run_id -> (span, ours: started here, so ended here)
        self._lock = threading.Lock()

    def on_attach(self, *, model_name: str, detectors: Sequence[DetectorInfo]) -> None:
        with self._lock:
            self._detectors[model_name] = [d.name for d in detectors]

    def on_run_start(self, *, run_id: str, model_name: str) -> None:
        with self._lock:
            if run_id in self._spans:
                return
        current = trace.get_current_span()
        ours = not (self.enrich and current.is_recording())
        span = self.tracer.start_span(f"{self.operation} {model_name}".strip(), kind=trace.SpanKind.CLIENT) \
            if ours else current
        attributes: dict[str, Any] = {"gen_ai.operation.name": self.operation, "gen_ai.request.model": model_name,
                                      "featurewatch.run_id": run_id,
                                      "featurewatch.detectors": self._detectors.get(model_name, [])}
        if self.pack:
            attributes["featurewatch.pack"] = self.pack
        span.set_attributes(attributes)
        with self._lock:
            self._spans[run_id] = (span, ours)

    def on_alert(self, alert: Alert) -> None:
        with self._lock:
            entry = self._spans.get(alert.run_id)
        span = entry[0] if entry else trace.get_current_span()
        attributes: dict[str, Any] = {
            "featurewatch.run_id": alert.run_id, "featurewatch.detector": alert.detector,
            "featurewatch.phase": alert.phase, "featurewatch.score": alert.score,
            "featurewatch.threshold": alert.threshold, "featurewatch.action": alert.action,
            "featurewatch.severity": alert.severity, "featurewatch.would_block": alert.would_block,
            "featurewatch.span_start": alert.span[0], "featurewatch.span_end": alert.span[1],
            "featurewatch.evidence.features": [e.feature for e in alert.evidence],
            "featurewatch.evidence.labels": [e.label or "" for e in alert.evidence],
            "featurewatch.evidence.contributions": [e.contribution for e in alert.evidence],
            # each feature's share of the score (NaN where unknown: OTel arrays hold one type, no null)
            "featurewatch.evidence.shares": [e.share if e.share is not None else math.nan for e in alert.evidence],
        }
        if alert.unexplained is not None:  # a dense detector explained in SAE features: what the listed ones leave
            attributes["featurewatch.unexplained"] = alert.unexplained
            if alert.unexplained_share is not None:
                attributes["featurewatch.unexplained_share"] = alert.unexplained_share
        if self.include_text and alert.text is not None:
            attributes["featurewatch.text"] = alert.text
        span.add_event(ALERT_EVENT, attributes, timestamp=_ns(alert.fired_at))

    def on_run_end(self, result: RunResult) -> None:
        with self._lock:
            entry = self._spans.pop(result.run_id, None)
        if entry is None:
            return
        span, ours = entry
        attributes: dict[str, Any] = {
            "gen_ai.response.model": result.model_name, "gen_ai.usage.input_tokens": result.n_prompt_tokens,
            "featurewatch.outcome": result.outcome, "featurewatch.degraded": result.degraded,
            "featurewatch.alerts": len(result.alerts),
            "featurewatch.would_block": any(a.would_block for a in result.alerts),
        }
        if result.n_output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = result.n_output_tokens
        for detector, score in result.scores.items():
            if math.isfinite(score):
                attributes[f"featurewatch.score.{detector}"] = score
        span.set_attributes(attributes)
        if result.outcome == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR, "the monitored call raised"))
        if ours:
            span.end(end_time=_ns(result.ended_at))

    def on_detach(self) -> None:
        """End the spans of runs that never reported their end (marked degraded)."""
        with self._lock:
            spans, self._spans = self._spans, {}
        for span, ours in spans.values():
            span.set_attribute("featurewatch.degraded", True)
            if ours:
                span.end()


def otlp_tracer_provider(*, service_name: str = "featurewatch", batch: bool = True) -> Any:
    """A tracer provider exporting over OTLP, configured by the standard ``OTEL_*`` variables.

    ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or ``grpc``; endpoint, headers,
    timeouts and batching as OpenTelemetry documents them. ``service_name`` is used when
    ``OTEL_SERVICE_NAME`` is not set. ``batch=False`` exports each span as it ends (demos, tests).
    Call ``provider.shutdown()`` before exiting, to flush.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    exporter: Any
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError as exc:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc: "
                              "pip install 'featurewatch[otel]'") from exc
        exporter = GrpcExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}; featurewatch exports http/protobuf or grpc")
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("featurewatch")
    except metadata.PackageNotFoundError:
        return "unknown"
