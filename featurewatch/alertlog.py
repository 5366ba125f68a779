"""A structured audit log of alerts: one JSON line per alert on a logger.

Why a logger and not a file: deployments already route logs (journald, a
JSON shipper, a SIEM). Emitting on the ``featurewatch.alerts`` logger lets them
choose handlers, rotation and retention with the tools they have; a handler
with the format ``%(message)s`` writes plain JSONL. The parsed fields also ride
on the record as ``record.featurewatch_alert`` for structured handlers.

Text is personal data more often than not, so the span's text is logged only
when asked for (``include_text=True``); everything else is positions, scores
and feature evidence.

Context a framework knows about a run (LangChain tags and metadata, a
request id) is not part of an :class:`~featurewatch.alert.Alert`; a
``context`` callable looks it up by run id and the log writes it under
``"context"``, so one line carries both.

The level follows the detector's severity (info → INFO, warning → WARNING,
critical → CRITICAL), so a handler at INFO gets every alert and one at
CRITICAL only the critical ones.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from .alert import Alert
from .sinks import BaseSink

ALERT_LOGGER = "featurewatch.alerts"

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}


def _finite_or_none(value: float) -> float | None:
    # json.dumps would write NaN/Infinity, which is not JSON.
    return value if math.isfinite(value) else None


class JsonAlertLog(BaseSink):
    """A sink that logs each alert as one JSON line.

    Example::

        logging.getLogger("featurewatch.alerts").addHandler(logging.FileHandler("alerts.jsonl"))
        monitor = Monitor.default(sinks=[JsonAlertLog()])

    ``context``: called with a run id, returns extra fields for that run's lines (or None),
    e.g. ``JsonAlertLog(context=handler.context)`` with the LangChain handler.

    A line looks like::

        {"event": "alert", "run_id": "5f0c…", "model_name": "SmolLM2-135M-Instruct",
         "detector": "scam-email", "phase": "prompt", "score": 3.1, "threshold": 1.7,
         "action": "alert", "severity": "warning", "span": [12, 40],
         "started_at": 1764355200.1, "fired_at": 1764355200.4, "evidence": [...]}
    """

    def __init__(self, *, logger: logging.Logger | None = None, include_text: bool = False,
                 context: Callable[[str], Mapping[str, Any] | None] | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger(ALERT_LOGGER)
        self.include_text = include_text
        self.context = context

    def record(self, alert: Alert) -> dict[str, Any]:
        """The fields logged for ``alert`` (``text`` only when ``include_text``)."""
        fields: dict[str, Any] = {
            "event": "alert",
            "run_id": alert.run_id,
            "model_name": alert.model_name,
            "detector": alert.detector,
            "phase": alert.phase,
            "score": _finite_or_none(alert.score),
            "threshold": _finite_or_none(alert.threshold),
            "action": alert.action,
            "would_block": alert.would_block,
            "severity": alert.severity,
            "span": list(alert.span),
            "started_at": alert.started_at,
            "fired_at": alert.fired_at,
            "evidence": [{"feature": e.feature, "label": e.label,
                          "activation": _finite_or_none(e.activation),
                          "contribution": _finite_or_none(e.contribution)} for e in alert.evidence],
        }
        if self.include_text:
            fields["text"] = alert.text
        extra = self.context(alert.run_id) if self.context is not None else None
        if extra:
            fields["context"] = dict(extra)
        return fields

    def on_alert(self, alert: Alert) -> None:
        """Log ``alert`` as one JSON line at the level of its severity."""
        fields = self.record(alert)
        level = _LEVELS.get(alert.severity, logging.WARNING)
        if self.logger.isEnabledFor(level):
            line = json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(", ", ": "),
                              default=str)  # context values a framework passes may not be JSON
            self.logger.log(level, "%s", line, extra={"featurewatch_alert": fields})
