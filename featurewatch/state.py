"""A run's state: what one monitored run accumulates, written by every engine the same way.

The bottom layer of the runtime core: it imports records (:mod:`~featurewatch.alert`), pools
and token batches, never a driver (session, detection, run book, monitor). A
:class:`~featurewatch.session.Session` keeps one :class:`RunState` per batch row, vLLM's
:class:`~featurewatch.integrations.vllm.engine.EngineMonitor` one per request; both write a
forward pass's tokens with :func:`record_tokens` and keep a hookpoint's feature sums with
:class:`FeatureTotals` (:meth:`~FeatureTotals.bind`, :meth:`~FeatureTotals.add_to`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .alert import PHASES, Alert, Outcome, RunResult
from .pooling import PhasePool
from .positions import StepTokens


@dataclass
class RunState:
    """One run's state: its tokens, readings, pools, feature sums, alerts and how it stands."""

    run_id: str
    started_at: float
    token_ids: list[int] = field(default_factory=list)
    read: list[bool] = field(default_factory=list)
    completion: list[bool] = field(default_factory=list)
    watched: dict[str, list[Tensor]] = field(default_factory=dict)  # hookpoint -> (new, m) chunks
    residuals: dict[str, list[Tensor]] = field(default_factory=dict)  # hookpoint -> (new, d) fp16 chunks
    scores: dict[str, list[Tensor]] = field(default_factory=dict)  # hookpoint -> (new, n_det) per-token scores
    pools: dict[tuple[str, str], PhasePool] = field(default_factory=dict)  # (detector, phase)
    combined: dict[str, PhasePool] = field(default_factory=dict)  # detector -> all watched phases
    # (hookpoint, phase) -> views into a FeatureTotals (:meth:`FeatureTotals.bind`): (m,) sums and 0-d token counts
    feature_sums: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    feature_counts: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)  # detector -> position of its first alert
    blocked: bool = False
    degraded: bool = False
    generated: int | None = None  # tokens generated, set by an engine that knows it before the run closes

    def outcome(self, *, error: bool = False, aborted: bool = False) -> Outcome:
        """How the run ended: an error in its call, a block, the client gone (``aborted``), or completed."""
        return "error" if error else "blocked" if self.blocked else "aborted" if aborted else "completed"

    def result(self, *, model_name: str, outcome: Outcome, ended_at: float) -> RunResult:
        """The run's :class:`RunResult`: pooled scores (combined and per phase), alerts, tokens, faults."""
        scores = {name: pool.value for name, pool in self.combined.items() if pool.n}
        phase_scores: dict[str, dict[str, float]] = {}
        for (name, phase), pool in self.pools.items():
            if pool.n:
                phase_scores.setdefault(phase, {})[name] = pool.value
        return RunResult(run_id=self.run_id, model_name=model_name, outcome=outcome, scores=scores,
                         phase_scores=phase_scores, alerts=list(self.alerts), n_tokens=len(self.token_ids),
                         n_prompt_tokens=len(self.completion) - sum(self.completion), n_output_tokens=self.generated,
                         degraded=self.degraded, started_at=self.started_at, ended_at=ended_at)


def record_tokens(runs: Sequence[RunState], tokens: StepTokens) -> None:
    """Append a forward pass's new tokens (ids, read flags, phases) to their runs: ``tokens.counts[r]``
    consecutive rows are run ``r``'s (runs past ``counts`` got no token)."""
    ids, read, completion = tokens.token_id.tolist(), tokens.read.tolist(), tokens.completion.tolist()
    start = 0
    for run, count in zip(runs, tokens.counts):
        end = start + count
        run.token_ids.extend(ids[start:end])
        run.read.extend(read[start:end])
        run.completion.extend(completion[start:end])
        start = end


@dataclass
class FeatureTotals:
    """Per (run, phase) sums of one hookpoint's watched features over the tokens detectors read.

    Row ``2·run + phase`` (phase 0 = prompt, 1 = completion); one tensor for the whole batch,
    so a forward pass adds its tokens at once instead of a loop over runs
    (:func:`~featurewatch.detection.observe`).
    """

    sums: Tensor  # (2 · batch, m) float32
    counts: Tensor  # (2 · batch,) long

    @classmethod
    def zeros(cls, n_runs: int, m: int) -> FeatureTotals:
        """Empty totals for ``n_runs`` runs of ``m`` watched features."""
        return cls(torch.zeros(2 * n_runs, m), torch.zeros(2 * n_runs, dtype=torch.long))

    def bind(self, runs: Sequence[RunState], hookpoint: str) -> FeatureTotals:
        """Make these rows the runs' own sums at ``hookpoint`` (``run.feature_sums`` are views into them,
        so what :func:`~featurewatch.detection.observe` adds here is the runs')."""
        for r, run in enumerate(runs):
            for p, phase in enumerate(PHASES):
                run.feature_sums[(hookpoint, phase)] = self.sums[2 * r + p]
                run.feature_counts[(hookpoint, phase)] = self.counts[2 * r + p]
        return self

    def add_to(self, runs: Sequence[RunState], hookpoint: str) -> None:
        """Add these totals (a step's, row ``2·r + phase`` for ``runs[r]``) to the runs' own sums at
        ``hookpoint``; a run with none there (not bound) is left out, as are runs past these rows."""
        for r, run in enumerate(runs[:len(self.counts) // 2]):
            for p, phase in enumerate(PHASES):
                key = (hookpoint, phase)
                if key in run.feature_sums:
                    run.feature_sums[key] += self.sums[2 * r + p]
                    run.feature_counts[key] += self.counts[2 * r + p]
