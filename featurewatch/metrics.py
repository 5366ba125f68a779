"""Prometheus metrics: a sink that turns monitor events into time series.

This module records; :mod:`featurewatch.exposition` serves what is recorded
(``serve_metrics``, WSGI/ASGI apps, the multiprocess registry).

Why it is built this way:

- **Registry injection.** Every metric lives in the registry handed in
  (default ``prometheus_client.REGISTRY``); tests use a fresh
  ``CollectorRegistry()``. Nothing is created at import time.
- **One set of metric objects per (registry, namespace).** prometheus_client
  refuses a second collector with the same name, so a second
  :class:`PrometheusMetrics` (a second monitor) on the same registry reuses the
  first one's metrics instead of crashing. The cache is keyed weakly by the
  registry, so it holds no state beyond the registries' own lives.
- **Closed label sets.** Labels are ``detector``, ``phase``, ``action``,
  ``model_name``, ``severity``, ``outcome`` and ``stage``: all fixed at attach
  time (docs/architecture.md, "Metrics"). Run ids ride on OpenMetrics *exemplars*, never labels;
  feature ids and text never reach metrics at all.
- **Children born at 0.** A counter that first appears at 1 never trips
  ``increase()``, so every alert child (detector × watched phase) and every
  generation outcome exists at 0 from ``on_attach``.
- **Severity is not an alert label.** A detector has one severity, so it is
  published once in the ``featurewatch_detector_info`` gauge (value 1) and
  alert rules join on it (``* on (...) group_left (severity)``), the usual
  Prometheus "info metric" pattern.
- **One meaning for a threshold.** A detector fires per phase, each phase at
  its own threshold (``phase_thresholds``, else the spec's ``threshold``), so
  ``featurewatch_detector_threshold`` and ``featurewatch_detector_score`` both
  carry a ``phase`` label: the gauge is the threshold alerts of that phase fire
  at, the histogram the pooled score of that phase (``RunResult.phase_scores``)
  — what the threshold is compared with. The combined score of a run
  (``RunResult.scores``) is compared with no threshold and is not published.
- **Score buckets.** Histogram buckets are fixed when a histogram is created,
  so ``featurewatch_detector_score`` is created at the first ``on_attach`` on a
  registry with the sorted union of ``score_buckets`` and every phase threshold
  then known: ``le="<threshold>"`` counts the runs below a phase's threshold
  exactly. A detector attached later with a threshold that is not a boundary
  is logged (once); give it its own registry or list the threshold in
  ``score_buckets``.
- **Markup injection.** The ``markup-injection`` alert (chat markup typed into
  a prompt that reached the model as markup, :mod:`featurewatch.markup`) can
  come from any monitor, so its alert child and info series exist from attach.
- **Multiprocess mode.** With ``PROMETHEUS_MULTIPROC_DIR`` set before
  prometheus_client is imported, values go to per-process files; every gauge
  declares how processes combine (``livesum`` for in-flight runs,
  ``livemostrecent`` for thresholds, ``livemax`` for info gauges). Exemplars
  are not kept in that mode (a prometheus_client limitation).
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .alert import MARKUP_INJECTION, OUTCOMES, PROMPT, Alert, RunResult
from .errors import ConfigError
from .sinks import BaseSink, DetectorInfo, phase_threshold

logger = logging.getLogger(__name__)

DEFAULT_ERROR_STAGES = ("pre_hook", "hook", "callback", "sink", "other")
"""The monitor's fault stages, created at 0 in ``featurewatch_errors_total``; any other stage counts as ``other``."""

DEFAULT_SCORE_BUCKETS = (-8.0, -4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
"""Pooled scores are logits for calibrated detectors: boundaries dense around 0..4."""

DURATION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Monitor time per forward pass spans 10 µs (a decode step on a GPU) to ~1 s (a long CPU prefill)."""

_EXEMPLAR_MAX_CHARS = 128  # OpenMetrics limit on an exemplar's label names + values


def _version() -> str:
    try:
        return metadata.version("featurewatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def _register(kind: Callable[..., Any], name: str, doc: str, labels: Sequence[str], namespace: str,
              registry: CollectorRegistry, **kw: Any) -> Any:
    try:
        return kind(name, doc, labels, namespace=namespace, registry=registry, **kw)
    except ValueError as exc:  # a collector not made by featurewatch holds the name
        raise ConfigError(f"cannot register {namespace}_{name}: {exc}; use another registry= or namespace= "
                          f"than the one that already holds it") from exc


@dataclass
class _Metrics:
    """The metric objects of one (registry, namespace), shared by every sink on it."""

    registry: CollectorRegistry
    namespace: str
    alerts: Counter
    generations: Counter
    tokens: Counter
    duration: Histogram
    errors: Counter
    in_flight: Gauge
    threshold: Gauge
    detector_info: Gauge
    build_info: Gauge
    would_block: Counter
    score: Histogram | None = None
    score_bounds: frozenset[float] = frozenset()
    info_labels: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, registry: CollectorRegistry, namespace: str) -> "_Metrics":
        made: list[Any] = []

        def make(kind: Callable[..., Any], name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
            try:
                metric = _register(kind, name, doc, labels, namespace, registry, **kw)
            except ConfigError:
                for m in made:  # leave nothing half-registered
                    registry.unregister(m)
                raise
            made.append(metric)
            return metric

        return cls(
            registry=registry, namespace=namespace,
            alerts=make(Counter, "alerts", "Detector alerts fired.", ("detector", "phase", "action", "model_name")),
            generations=make(Counter, "generations", "Monitored runs finished, by outcome.",
                             ("model_name", "outcome")),
            tokens=make(Counter, "tokens_scanned", "Tokens whose activations the monitor read.", ("model_name",)),
            duration=make(Histogram, "monitor_duration_seconds",
                          "Time the monitor added to one forward pass.", ("model_name",), buckets=DURATION_BUCKETS),
            errors=make(Counter, "errors", "Monitoring faults (fail-open), by stage.", ("stage",)),
            in_flight=make(Gauge, "generations_in_flight", "Monitored runs in progress.", ("model_name",),
                           multiprocess_mode="livesum"),
            threshold=make(Gauge, "detector_threshold", "Pooled score of a phase at which a detector's alerts "
                           "of that phase fire.", ("detector", "phase", "model_name"),
                           multiprocess_mode="livemostrecent"),
            detector_info=make(Gauge, "detector_info", "Attached detectors (value 1) with their severity and action.",
                               ("detector", "model_name", "severity", "action"), multiprocess_mode="livemax"),
            build_info=make(Gauge, "build_info", "featurewatch version (value 1).", ("version",),
                            multiprocess_mode="livemax"),
            would_block=make(Counter, "would_block", "Block alerts in shadow mode: runs enforcing would have "
                             "stopped.", ("detector", "model_name")),
        )

    def score_histogram(self, buckets: Sequence[float], thresholds: Sequence[float]) -> Histogram:
        """The score histogram, created on first use with a boundary at every threshold known then."""
        with self.lock:
            if self.score is None:
                bounds = sorted({float(b) for b in (*buckets, *thresholds) if math.isfinite(b)})
                self.score = _register(Histogram, "detector_score", "Pooled per-run detector scores, per phase.",
                                       ("detector", "phase", "model_name"), self.namespace, self.registry,
                                       buckets=bounds)
                self.score_bounds = frozenset(bounds)
            return self.score


_SHARED: "weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Metrics]]" = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _metrics_for(registry: CollectorRegistry, namespace: str) -> _Metrics:
    with _SHARED_LOCK:
        per_ns = _SHARED.setdefault(registry, {})
        if namespace not in per_ns:
            per_ns[namespace] = _Metrics.create(registry, namespace)
        return per_ns[namespace]


class PrometheusMetrics(BaseSink):
    """A sink that exports monitor events as Prometheus metrics.

    Example::

        from prometheus_client import CollectorRegistry
        registry = CollectorRegistry()
        metrics = PrometheusMetrics(registry=registry)
        monitor = Monitor.default(sinks=[metrics])
        server = serve_metrics(9464, registry=metrics.registry)   # featurewatch.exposition

    Odd but possible events (an alert from a detector never announced, a
    non-finite score, a run that ends without starting, a run id too long for
    an exemplar) are handled and logged once; they never raise.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None, namespace: str = "featurewatch",
                 score_buckets: Sequence[float] = DEFAULT_SCORE_BUCKETS,
                 error_stages: Sequence[str] = DEFAULT_ERROR_STAGES) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        """The registry the metrics live in: serve this one (``serve_metrics(port, registry=sink.registry)``)."""
        self._m = _metrics_for(self.registry, namespace)
        self._score_buckets = tuple(score_buckets)
        self._stages = frozenset(error_stages) | {"other"}
        self._known: set[tuple[str, str]] = set()  # (model_name, detector) announced in on_attach
        self._runs: dict[str, str] = {}  # run_id -> model_name, runs in flight started by this sink
        self._warned: set[tuple[str, ...]] = set()
        self._per_forward: dict[str, tuple[Any, Any]] = {}  # model_name -> (duration, tokens) children
        self._lock = threading.Lock()
        self._m.build_info.labels(_version()).set(1)
        for stage in sorted(self._stages):
            self._m.errors.labels(stage)

    def on_attach(self, *, model_name: str, detectors: Sequence[DetectorInfo]) -> None:
        """Create every child at 0 and publish thresholds, severities and actions."""
        m = self._m
        score = m.score_histogram(self._score_buckets, [phase_threshold(d, p) for d in detectors for p in d.phases])
        for outcome in OUTCOMES:
            m.generations.labels(model_name, outcome)
        m.tokens.labels(model_name)
        m.duration.labels(model_name)
        m.in_flight.labels(model_name)
        for d in detectors:
            for phase in d.phases:
                threshold = phase_threshold(d, phase)
                m.alerts.labels(d.name, phase, d.action, model_name)
                if d.action == "block":
                    m.would_block.labels(d.name, model_name)
                m.threshold.labels(d.name, phase, model_name).set(threshold)
                score.labels(d.name, phase, model_name)
                if math.isfinite(threshold) and float(threshold) not in m.score_bounds:
                    self._warn_once(("bucket", d.name, str(threshold)),
                                    "detector %r threshold %s is not a bucket boundary of %s_detector_score (its "
                                    "buckets were fixed by an earlier attach on this registry); give this monitor its "
                                    "own registry or add the threshold to score_buckets", d.name, threshold,
                                    m.namespace)
            self._publish_info(model_name, d.name, d.severity, d.action)
            with self._lock:
                self._known.add((model_name, d.name))
        m.alerts.labels(MARKUP_INJECTION, PROMPT, "alert", model_name)
        self._publish_info(model_name, MARKUP_INJECTION, "warning", "alert")
        with self._lock:
            self._known.add((model_name, MARKUP_INJECTION))

    def _publish_info(self, model_name: str, name: str, severity: str, action: str) -> None:
        # A re-attach may change severity or action: drop the old info child so the
        # rules' join on (detector, model_name) never sees two series.
        m = self._m
        key, new = (model_name, name), (severity, action)
        with m.lock:
            old = m.info_labels.get(key)
            if old is not None and old != new:
                m.detector_info.remove(name, model_name, *old)
            m.info_labels[key] = new
            m.detector_info.labels(name, model_name, *new).set(1)

    def on_run_start(self, *, run_id: str, model_name: str) -> None:
        """Count the run as in flight (once, however often it is announced)."""
        with self._lock:
            if run_id in self._runs:
                return
            self._runs[run_id] = model_name
        self._m.in_flight.labels(model_name).inc()

    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        """Record the monitor's time for one forward pass and the tokens it read."""
        # Called once per decode step: the children are looked up once per model, not per call.
        children = self._per_forward.get(model_name)
        if children is None:
            children = (self._m.duration.labels(model_name), self._m.tokens.labels(model_name))
            self._per_forward[model_name] = children
        duration, scanned = children
        if math.isfinite(seconds) and seconds >= 0:
            duration.observe(seconds)
        if tokens > 0:
            scanned.inc(tokens)

    def on_alert(self, alert: Alert) -> None:
        """Count the alert (and, in shadow mode, the block it would have been), with its run id as the exemplar."""
        self._check_known(alert.model_name, alert.detector)
        child = self._m.alerts.labels(alert.detector, alert.phase, alert.action, alert.model_name)
        child.inc(exemplar=self._exemplar(alert.run_id))
        if alert.would_block:
            self._m.would_block.labels(alert.detector, alert.model_name).inc(exemplar=self._exemplar(alert.run_id))

    def on_run_end(self, result: RunResult) -> None:
        """Count the outcome, observe each detector's pooled score per phase and end the in-flight run."""
        m = self._m
        m.generations.labels(result.model_name, result.outcome).inc()
        with self._lock:
            started_as = self._runs.pop(result.run_id, None)
        if started_as is not None:
            m.in_flight.labels(started_as).dec()
        score = m.score_histogram(self._score_buckets, ())
        exemplar = self._exemplar(result.run_id)
        for phase, scores in result.phase_scores.items():
            for detector, value in scores.items():
                if not math.isfinite(value):
                    self._warn_once(("score", detector), "detector %r pooled a non-finite score (%s); not observed",
                                    detector, value)
                    continue
                self._check_known(result.model_name, detector)
                score.labels(detector, phase, result.model_name).observe(value, exemplar=exemplar)

    def on_error(self, *, stage: str, error: BaseException) -> None:
        """Count a monitoring fault by stage (unknown stages as ``other``, keeping the label set closed)."""
        if stage not in self._stages:
            self._warn_once(("stage", stage), "error stage %r is not one of %s; counted as 'other'",
                            stage, sorted(self._stages))
            stage = "other"
        self._m.errors.labels(stage).inc()

    def on_detach(self) -> None:
        """End the in-flight count of runs that never reported their end."""
        with self._lock:
            runs, self._runs = self._runs, {}
        for model_name in runs.values():
            self._m.in_flight.labels(model_name).dec()

    def _exemplar(self, run_id: str) -> dict[str, str] | None:
        if len("run_id") + len(run_id) > _EXEMPLAR_MAX_CHARS:
            self._warn_once(("exemplar",), "run ids longer than %d characters are not attached as exemplars",
                            _EXEMPLAR_MAX_CHARS - len("run_id"))
            return None
        return {"run_id": run_id} if run_id else None

    def _check_known(self, model_name: str, detector: str) -> None:
        with self._lock:
            known = (model_name, detector) in self._known
        if not known:
            self._warn_once(("unknown", model_name, detector),
                            "detector %r on model %r was not announced in on_attach; its series were not "
                            "created at 0, so the first increase() after a restart may be missed",
                            detector, model_name)

    def _warn_once(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(msg, *args)
