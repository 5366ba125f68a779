"""Plain records that leave the monitor: alerts and run results.

These are the objects sinks (callbacks, logs, metrics, LangChain) receive, so
they are pydantic models that serialise to the JSON shapes in docs/architecture.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["prompt", "completion"]
Action = Literal["alert", "suppress", "block"]
Severity = Literal["info", "warning", "critical"]
Outcome = Literal["completed", "blocked", "error", "aborted"]

# The one source of truth for phases and outcomes (metrics labels, record rendering, pools).
PROMPT: Phase = "prompt"
COMPLETION: Phase = "completion"
PHASES: tuple[Phase, ...] = (PROMPT, COMPLETION)
OUTCOMES: tuple[Outcome, ...] = ("completed", "blocked", "error", "aborted")
"""``aborted``: the client gave up on the run (a closed stream, a cancelled request); no end-of-run verdicts."""
MARKUP_INJECTION = "markup-injection"
"""The detector name of the alert for chat markup typed into a prompt's content that reached the model as
markup (see :mod:`featurewatch.markup`): action ``alert``, severity ``warning``, phase ``prompt``."""


class FeatureEvidence(BaseModel):
    """One feature's part in an alert: its mean activation over the span and its share of the score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: int
    label: str | None = None
    activation: float
    contribution: float
    share: float | None = Field(default=None, description=(
        "contribution / Σ |contribution| over every watched feature of the detector (and the unexplained "
        "part of a dense detector's score)"))


class Alert(BaseModel):
    """A detector whose pooled score crossed its threshold in a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    phase: Phase
    score: float
    threshold: float
    action: Action = "alert"
    severity: Severity = "warning"
    run_id: str
    model_name: str = ""
    span: tuple[int, int] = Field(description="token positions [start, end) that drove the alert")
    text: str | None = Field(default=None, description="the span's text; None when text capture is off")
    evidence: list[FeatureEvidence] = Field(default_factory=list)
    would_block: bool = Field(default=False, description=(
        "a block detector fired in shadow mode: enforcing would have stopped the run here (it went on)"))
    unexplained: float | None = Field(default=None, description=(
        "dense (probe) detectors explained in SAE features: the part of the mean token score that no "
        "evidence feature carries (the SAE's error and unwatched features), bias and decoder bias excluded"))
    unexplained_share: float | None = Field(default=None, description=(
        "|unexplained| / (Σ |contributions| + |unexplained|)"))
    started_at: float = Field(description="unix time the run started")
    fired_at: float = Field(description="unix time the alert fired")


class RunResult(BaseModel):
    """What one monitored run (a generation, or one scored record) ends with."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    model_name: str = ""
    outcome: Outcome = "completed"
    scores: dict[str, float] = Field(default_factory=dict, description="pooled score per detector")
    phase_scores: dict[str, dict[str, float]] = Field(default_factory=dict)
    alerts: list[Alert] = Field(default_factory=list)
    n_tokens: int = 0
    n_prompt_tokens: int = Field(default=0, description="of n_tokens, the prompt's (markup included)")
    n_output_tokens: int | None = Field(default=None, description=(
        "tokens generated, where the engine knows it (Monitor.generate does; the monitor reads one less: "
        "the last generated token is never fed back)"))
    degraded: bool = Field(default=False, description="a monitoring fault happened (fail-open)")
    started_at: float = 0.0
    ended_at: float = 0.0


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None (in dicts, lists and tuples too): standard JSON has
    no such numbers. What the CLI writes and the page answers goes through it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
