"""Detection: per-token scores → pooled per (run, detector, phase) → firings with evidence.

Fed by the readout with a flat batch of new tokens (:class:`~featurewatch.positions.StepTokens`)
and their scores, it pools the tokens each detector reads, judges each phase of
each run once per forward pass, and returns :class:`Firing` records; the monitor
turns those into alerts and actions. At the end of a run :func:`final_firings`
gives the verdict on the whole phase (what detectors are calibrated on).

It also keeps, per run and phase, the sum of each watched feature's activation,
so an alert's evidence is the features that actually carried its score:
``weight × mean activation`` over the tokens pooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .alert import COMPLETION, PROMPT, Alert, FeatureEvidence, Phase
from .detector import DetectorSpec, FeatureWeight
from .pooling import PhasePool
from .positions import StepTokens
from .readout import Readout
from .state import FeatureTotals, RunState

LabelLookup = Callable[[str, int], "str | None"]


@dataclass(frozen=True)
class Firing:
    """A detector crossing its threshold in one phase of one run."""

    row: int
    readout: Readout
    spec: DetectorSpec
    phase: Phase
    pool: PhasePool
    position: int
    final: bool = False


def new_pools(run: RunState, detectors: Sequence[DetectorSpec]) -> None:
    """Give a run one pool per (detector, watched phase) and one combined pool per detector."""
    for spec in detectors:
        for phase in spec.phases:
            run.pools[(spec.name, phase)] = PhasePool(spec.pooling, spec.threshold_for(phase), spec.hysteresis,
                                                      spec.cooldown_tokens)
        run.combined[spec.name] = PhasePool(spec.pooling, spec.threshold)


def observe(readout: Readout, runs: Sequence[RunState], tokens: StepTokens, feats: Tensor,
            scores: Tensor | None, totals: FeatureTotals | None = None) -> list[Firing]:
    """Pool one forward pass's new tokens at one hookpoint; return the detectors that fire now.

    ``feats`` ``(n, m)`` and ``scores`` ``(n, n_det)`` are on the CPU, rows aligned with ``tokens``;
    ``totals`` (the session's, for this hookpoint) gets the read tokens' feature sums.
    """
    read, completion = tokens.read.tolist(), tokens.completion.tolist()
    if totals is not None and feats.shape[1]:
        _add_totals(totals, tokens, feats, read, completion)
    if scores is None or not readout.detectors:
        return []
    table: list[list[float]] | None = None
    positions: list[int] = []
    firings = []
    start = 0
    for r, count in enumerate(tokens.counts):  # each run's tokens are consecutive, in position order
        lo, start = start, start + count
        run = runs[r]
        if run.blocked:
            continue
        groups: tuple[list[int], list[int]] = ([], [])  # the read tokens of the prompt / the completion
        for i in range(lo, start):
            if read[i]:
                groups[completion[i]].append(i)
        for phase, idx in zip((PROMPT, COMPLETION), groups):
            if not idx:
                continue
            if table is None:
                table, positions = scores.tolist(), tokens.position.tolist()
            pos = [positions[i] for i in idx]
            for j, spec in enumerate(readout.detectors):
                pool = run.pools.get((spec.name, phase))
                if pool is None:
                    continue
                values = [table[i][j] for i in idx]
                run.combined[spec.name].extend(values, pos)
                pool.extend(values, pos)
                if pool.check():
                    firings.append(Firing(r, readout, spec, phase, pool, pool.last_pos))
    return firings


def _add_totals(totals: FeatureTotals, tokens: StepTokens, feats: Tensor, read: list[bool],
                completion: list[bool]) -> None:
    """Add the read tokens' features to their (run, phase) sums, in token order.

    Only element-wise ops: scatter kernels (``index_add_``) enter
    the intra-op thread pool even for one row, and on a busy machine each such entry can
    wait milliseconds for a descheduled thread; this runs once per pass and hookpoint.
    The sums are bit-identical to adding token by token (zeros stand for unread tokens).
    """
    counts = tokens.counts
    n, m = (counts[0] if counts else 0), feats.shape[1]
    if any(c != n for c in counts):  # runs of unequal length: one run at a time
        start = 0
        for r, c in enumerate(counts):
            sub = StepTokens(tokens.run[start:start + c], tokens.position[start:start + c],
                             tokens.completion[start:start + c], tokens.read[start:start + c],
                             tokens.steerable[start:start + c], tokens.token_id[start:start + c], (c,))
            one = FeatureTotals(totals.sums[2 * r:2 * r + 2], totals.counts[2 * r:2 * r + 2])
            _add_totals(one, sub, feats[start:start + c], read[start:start + c], completion[start:start + c])
            start += c
        return
    b = len(counts)
    for phase in (0, 1):
        member = [ok and c == phase for ok, c in zip(read, completion)]
        if not any(member):
            continue
        x = feats if all(member) else torch.where(torch.tensor(member).unsqueeze(1), feats, 0.0)
        x = x.view(b, n, m)
        step = x[:, 0]
        if n > 1:  # left to right, as index_add_ adds (sum() and cumsum() may reorder or widen)
            step = step.clone()
            for i in range(1, n):
                step += x[:, i]
        totals.sums.view(b, 2, m)[:, phase] += step
        totals.counts.view(b, 2)[:, phase] += torch.tensor([sum(member[r * n:(r + 1) * n]) for r in range(b)])


def final_firings(readouts: Sequence[Readout], runs: Sequence[RunState]) -> list[Firing]:
    """The end-of-run verdicts: each (run, phase) over its threshold that has not fired yet."""
    firings = []
    for r, run in enumerate(runs):
        if run.blocked:
            continue
        for readout in readouts:
            for spec in readout.detectors:
                for phase in spec.phases:
                    pool = run.pools.get((spec.name, phase))  # None: a detector this run does not use
                    if pool is not None and pool.final():
                        firings.append(Firing(r, readout, spec, phase, pool, pool.last_pos, final=True))
    return firings


def contributions(spec: DetectorSpec, activation: Callable[[int], float]
                  ) -> list[tuple[FeatureWeight, float, float]]:
    """The features a detector's score is explained in (an sae detector's own, a probe's ``evidence_features``),
    each with its activation ``aᵢ = activation(id)`` and its contribution ``wᵢ·aᵢ``: an alert's evidence over a
    phase's mean activations (:func:`evidence`), the page's inspector over one token's."""
    weighted = spec.features if spec.kind == "sae" else spec.evidence_features
    return [(f, a, f.weight * a) for f in weighted for a in (activation(f.id),)]


def evidence(readout: Readout, run: RunState, spec: DetectorSpec, phase: Phase, labels: LabelLookup | None = None,
             top: int = 5, mean_score: float | None = None
             ) -> tuple[list[FeatureEvidence], float | None, float | None]:
    """The features that carried a detector's score in a phase: largest ``weight × mean activation`` first.

    An sae detector's evidence is its own readout. A dense probe with ``evidence_features`` is explained
    in SAE features (``w·x = Σᵢ aᵢ·(w·dᵢ) + w·b_dec + w·ε``): each feature's exact part, and the part
    no listed feature carries with its share (returned second and third; None for an sae detector).
    ``mean_score`` is the phase's mean token score (before any prior), the unexplained part's source.
    """
    key = (readout.hookpoint, phase)
    count = int(run.feature_counts[key]) if key in run.feature_counts else 0
    if not (spec.features if spec.kind == "sae" else spec.evidence_features) or not count:
        return [], None, None
    mean = (run.feature_sums[key] / count).tolist()
    col = {f: i for i, f in enumerate(readout.feature_ids)}
    items = [(c, f, act) for f, act, c in contributions(spec, lambda i: mean[col[i]])]
    unexplained = None
    if spec.kind == "probe" and mean_score is not None and math.isfinite(mean_score):
        unexplained = mean_score - spec.bias - spec.evidence_offset - sum(c for c, _, _ in items)
    total = sum(abs(c) for c, _, _ in items) + abs(unexplained or 0.0)
    items = sorted((it for it in items if it[0] > 0), key=lambda it: -it[0])[:top]
    return [FeatureEvidence(feature=f.id, label=f.label or (labels(readout.hookpoint, f.id) if labels else None),
                            activation=act, contribution=c, share=c / total if total > 0 else None)
            for c, f, act in items], unexplained, (abs(unexplained) / total if unexplained is not None and total > 0
                                                   else None)


def record_alert(firing: Firing, run: RunState, *, model_name: str, fired_at: float, tokenizer: Any = None,
                 labels: LabelLookup | None = None, would_block: bool = False) -> Alert:
    """Build the alert of a firing (span text when ``tokenizer`` is given), and note it in the run.

    The run keeps the alert and the detector's first firing position (``when=`` interventions start
    after it); what the firing *does* (block, delivery) is the caller's, which differs by engine.
    """
    spec = firing.spec
    span = firing.pool.span(firing.position)
    pool = firing.pool
    items, unexplained, unexplained_share = evidence(firing.readout, run, spec, firing.phase, labels,
                                                     mean_score=pool.total / pool.n if pool.n else None)
    text = None
    if tokenizer is not None:
        text = tokenizer.decode([t for t in run.token_ids[span[0]:span[1]] if t >= 0])
    alert = Alert(detector=spec.name, phase=firing.phase, score=firing.pool.value,
                  threshold=firing.pool.threshold, action=spec.action, severity=spec.severity,
                  run_id=run.run_id, model_name=model_name, span=span, text=text,
                  evidence=items, unexplained=unexplained, unexplained_share=unexplained_share,
                  would_block=would_block, started_at=run.started_at, fired_at=fired_at)
    run.alerts.append(alert)
    run.fired.setdefault(spec.name, firing.position)
    return alert
