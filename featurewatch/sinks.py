"""Where monitor events go: the sink protocol.

The monitor never imports metrics, logging back-ends or frameworks; it is
handed sinks and calls them. A sink that raises never breaks generation: the
monitor logs the fault once per sink and kind, counts it (``on_error`` with
stage ``"sink"``), and carries on — unless the monitor is fail-closed.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from .alert import Alert, RunResult


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
    """What a sink may know of a detector at attach time (a :class:`~featurewatch.detector.DetectorSpec`)."""

    name: str
    threshold: float
    action: str
    severity: str
    phases: Sequence[str]


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
