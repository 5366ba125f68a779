"""Where monitor events go: the sink protocol.

The monitor never imports metrics, logging back-ends or frameworks; it is
handed sinks and calls them. A sink that raises never breaks generation: the
monitor logs the fault once per sink and kind, counts it (``on_error`` with
stage ``"sink"``), and carries on — unless the monitor is fail-closed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .alert import Alert, RunResult
from .errors import MonitorError

logger = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """Receives monitor events. Subclass :class:`BaseSink` to implement only what you need."""

    def on_attach(self, *, model_name: str, detectors: Sequence["DetectorInfo"]) -> None: ...
    def on_run_start(self, *, run_id: str, model_name: str) -> None: ...
    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None: ...
    def on_alert(self, alert: Alert) -> None: ...
    def on_run_end(self, result: RunResult) -> None: ...
    def on_error(self, *, stage: str, error: BaseException) -> None: ...
    def on_detach(self) -> None: ...


class DetectorInfo(Protocol):
    """What a sink may know of a detector at attach time (a :class:`~featurewatch.detector.DetectorSpec`).

    A phase fires at its own threshold when the detector has one (``phase_thresholds``, read with
    :func:`phase_threshold`), else at ``threshold``.
    """

    name: str
    threshold: float
    action: str
    severity: str
    phases: Sequence[str]


def phase_threshold(detector: DetectorInfo, phase: str) -> float:
    """The threshold a detector's alerts of ``phase`` fire at: its ``phase_thresholds`` entry, else ``threshold``."""
    own = getattr(detector, "phase_thresholds", None) or {}
    return float(own.get(phase, detector.threshold))


class BaseSink:
    """A sink that ignores every event; override the ones you need."""

    def on_attach(self, *, model_name: str, detectors: Sequence[DetectorInfo]) -> None:
        pass

    def on_run_start(self, *, run_id: str, model_name: str) -> None:
        pass

    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        pass

    def on_alert(self, alert: Alert) -> None:
        pass

    def on_run_end(self, result: RunResult) -> None:
        pass

    def on_error(self, *, stage: str, error: BaseException) -> None:
        pass

    def on_detach(self) -> None:
        pass


class Fanout:
    """Delivers monitor events to every sink and callback under the fault policy.

    Fail-open (default): a sink or callback that raises is logged once per (stage, kind of
    error), reported to the other sinks as ``on_error(stage="sink"|"callback")``, and the
    delivery returns False so the caller can mark its run degraded. Fail-closed: the fault
    is raised as :class:`~featurewatch.errors.MonitorError`.
    """

    def __init__(self, sinks: Sequence[Sink], callbacks: Sequence[Callable[[Alert], Any]], *,
                 fail_closed: bool) -> None:
        self.sinks = list(sinks)
        self.callbacks = list(callbacks)
        self.fail_closed = fail_closed
        self._warned: set[tuple[str, str]] = set()

    def emit(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """Call ``method`` on every sink that has it; False when one of them failed (fail-open)."""
        ok = True
        for sink in self.sinks:
            fn = getattr(sink, method, None)
            if fn is None:
                continue
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 — sinks never break generation (fail-open)
                ok = False
                self.fault(f"sink {type(sink).__name__}.{method}", exc, stage="sink", skip=sink)
        return ok

    def alert(self, alert: Alert) -> bool:
        """Deliver an alert to the callbacks, then the sinks."""
        ok = True
        for callback in self.callbacks:
            try:
                callback(alert)
            except Exception as exc:  # noqa: BLE001 — a user callback must not kill generation
                ok = False
                self.fault("on_alert callback", exc, stage="callback")
        return self.emit("on_alert", alert) and ok

    def fault(self, where: str, exc: BaseException, *, stage: str, skip: Any = None) -> None:
        """Apply the fault policy to an exception raised in ``where``."""
        if self.fail_closed:
            raise MonitorError(f"featurewatch fault in {where}: {type(exc).__name__}: {exc}") from exc
        key = (where, type(exc).__name__)
        if key not in self._warned:
            self._warned.add(key)
            logger.error("featurewatch fault in %s (the run goes on, marked degraded): %s", where, exc,
                         exc_info=exc)
        for sink in self.sinks:
            if sink is not skip and hasattr(sink, "on_error"):
                with contextlib.suppress(Exception):  # reporting a fault must not raise another
                    sink.on_error(stage=stage, error=exc)
