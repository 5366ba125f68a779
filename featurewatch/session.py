"""Per-run state: readings, pooled scores, alerts, interventions in force.

The hook owns only the hot path; everything a run accumulates lives here, one
:class:`Session` per monitored call (one :class:`RunState` per batch row), so
concurrent runs never mix. The monitor finds the active session through a
context variable: each thread (and each asyncio task) has its own.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .alert import Alert, RunResult
from .pooling import PhasePool


class TokenReading(NamedTuple):
    """What the SAE saw at one position of one run."""

    position: int
    token_id: int
    text: str
    phase: str
    excluded: bool
    """Attention sink, special token or padding: kept out of detection."""
    features: dict[int, float]
    """Watched features' activations (non-zero only)."""
    top: list[tuple[int, float]]
    """Strongest features at this position (only when the session asked for ``top_k``)."""


@dataclass
class RunState:
    """One batch row's run."""

    run_id: str
    started_at: float
    n_prompt: int | None = None
    token_ids: list[int] = field(default_factory=list)
    excluded: list[bool] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    watched: dict[str, list[Tensor]] = field(default_factory=dict)  # hookpoint -> (new, m) chunks
    top: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    pools: dict[tuple[str, str], PhasePool] = field(default_factory=dict)  # (detector, phase)
    combined: dict[str, PhasePool] = field(default_factory=dict)  # detector -> all watched phases
    feature_sums: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (hookpoint, phase) -> (m,)
    feature_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    suppressed: dict[str, Tensor] = field(default_factory=dict)  # hookpoint -> bool (m,) features to ablate
    blocked: bool = False
    degraded: bool = False


class Session:
    """State of one monitored call: a generation (batch rows) or a batch of scored records.

    Use it through :meth:`Monitor.session` when driving the model yourself::

        with monitor.session(top_k=5) as session:
            model(**inputs)
        results = session.results()
    """

    def __init__(self, batch_size: int, *, top_k: int = 0, capture_text: bool = True,
                 stop_after_deepest: bool = False, n_prompt: list[int] | None = None,
                 run_ids: list[str] | None = None, clock: Any = time.time) -> None:
        now = clock()
        ids = run_ids or [uuid.uuid4().hex for _ in range(batch_size)]
        self.rows = [RunState(run_id=r, started_at=now) for r in ids]
        if n_prompt is not None:
            for row, n in zip(self.rows, n_prompt):
                row.n_prompt = n
        self.top_k = top_k
        self.capture_text = capture_text
        self.stop_after_deepest = stop_after_deepest
        self.clock = clock
        self.n_seen = 0
        self.step_start = 0
        self.step_new = 0
        self.step_excluded = torch.zeros(batch_size, 0, dtype=torch.bool)
        self.step_seconds = 0.0
        self.first_real: Tensor | None = None
        self.outcome_error = False
        self._monitor: Any = None
        self._token: Any = None

    # -- context management (wired by the monitor) -----------------------------------
    def __enter__(self) -> "Session":
        if self._monitor is None:
            raise RuntimeError("create sessions with Monitor.session()")
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _current.reset(self._token)
        self._monitor._end_session(self, error=exc_type is not None)

    # -- reading results -------------------------------------------------------------
    def results(self) -> list[RunResult]:
        """One :class:`RunResult` per batch row."""
        return [self._monitor._run_result(self, row) for row in self.rows]

    def readings(self, row: int = 0, hookpoint: str | None = None) -> list[TokenReading]:
        """Token-by-token readings of one batch row at one hookpoint (the first by default)."""
        return self._monitor._readings(self, self.rows[row], hookpoint)


_current: ContextVar[Session | None] = ContextVar("featurewatch_session", default=None)


def current_session() -> Session | None:
    """The session active in this thread / task, if any."""
    return _current.get()


def concat(chunks: list[Tensor], width: int) -> Tensor:
    return torch.cat(chunks) if chunks else torch.zeros(0, width)
