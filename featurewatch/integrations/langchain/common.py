"""What both LangChain surfaces share: routing alerts to runs, message conversion, result metadata.

Alerts leave the monitor through its ``on_alert`` callbacks, one list per
monitor, called in whichever thread runs the forward pass. Rather than adding
and removing a callback per call (a list mutated while another thread iterates
it can skip an entry, and so lose another run's alert), each monitor gets one
:class:`AlertRouter`, added once, that hands every alert to whoever registered
its run id — so concurrent calls each see only their own alerts.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from ...alert import Alert, RunResult
from ...errors import ConfigError

if TYPE_CHECKING:
    from ...monitor import Monitor

T = TypeVar("T")

ALERT_EVENT = "featurewatch.alert"
"""The name of the LangChain custom event each alert is dispatched as."""


class AlertRouter:
    """Delivers a monitor's alerts to the listener registered for the alert's run id."""

    def __init__(self) -> None:
        self._listeners: dict[str, Callable[[Alert], Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, alert: Alert) -> None:
        with self._lock:
            listener = self._listeners.get(alert.run_id)
        if listener is not None:
            listener(alert)

    def listen(self, run_id: str, listener: Callable[[Alert], Any]) -> None:
        with self._lock:
            self._listeners[run_id] = listener

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._listeners.pop(run_id, None)


class PerMonitor(Generic[T]):
    """One ``T`` per monitor, made on first use and shared by every caller (it goes with the monitor)."""

    def __init__(self, make: Callable[[Monitor], T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[Monitor, T] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, monitor: Monitor) -> T:
        with self._lock:
            if monitor not in self._made:
                self._made[monitor] = self._make(monitor)
            return self._made[monitor]


def _new_router(monitor: Monitor) -> AlertRouter:
    router = AlertRouter()
    monitor.on_alert.append(router)
    return router


router_for = PerMonitor(_new_router)
"""The monitor's router, added to ``monitor.on_alert`` on first use."""


_ROLES: dict[type, str] = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


def to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the chat template (text parts only)."""
    out = []
    for m in messages:
        role = next((r for cls, r in _ROLES.items() if isinstance(m, cls)), None)
        if isinstance(m, ChatMessage) and m.role in ("system", "user", "assistant"):
            role = m.role
        if role is None:
            raise ConfigError(f"a {type(m).__name__} cannot be rendered for the model; featurewatch's chat models "
                              "take system, human and AI messages (no tool calling)")
        out.append({"role": role, "content": str(m.text)})
    return out


def run_metadata(run: RunResult) -> dict[str, Any]:
    """The ``response_metadata["featurewatch"]`` of a run: ids, scores, alerts (as dicts), outcome."""
    return {"run_id": run.run_id, "scores": dict(run.scores), "phase_scores": {k: dict(v) for k, v in
                                                                          run.phase_scores.items()},
            "alerts": [a.model_dump(mode="json") for a in run.alerts], "outcome": run.outcome,
            "degraded": run.degraded}
