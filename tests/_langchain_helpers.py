"""Builders shared by the LangChain tests: deterministic detectors and a forward-pass counter."""

from __future__ import annotations

from typing import Any

from featurewatch.detector import DetectorSpec
from featurewatch.pack import DEFAULT_PACK, load_pack


def lc_detectors() -> list[DetectorSpec]:
    """``always``: alerts on any prompt; ``stop-now``: blocks once 3 completion tokens were read."""
    base = load_pack(DEFAULT_PACK).select(["scam-email"])[0]
    always = base.model_copy(update={"name": "always", "threshold": -1e6, "phase_thresholds": {}, "phases": ["prompt"],
                                     "pooling": base.pooling.model_copy(update={"min_tokens": 1})})
    stop_now = base.model_copy(update={"name": "stop-now", "action": "block", "threshold": -1e6,
                                       "phase_thresholds": {}, "phases": ["completion"],
                                       "pooling": base.pooling.model_copy(update={"min_tokens": 3})})
    return [always, stop_now]


class Passes:
    """Counts the model's forward passes (a pre-hook), and the count when each alert fired."""

    def __init__(self) -> None:
        self.n = 0
        self.fired: dict[tuple[str, str], int] = {}

    def hook(self, *_: Any) -> None:
        self.n += 1

    def on_alert(self, alert: Any) -> None:
        self.fired.setdefault((alert.run_id, alert.detector), self.n)
