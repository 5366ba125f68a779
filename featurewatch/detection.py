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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .alert import COMPLETION, PROMPT, FeatureEvidence, Phase
from .detector import DetectorSpec
from .pooling import PhasePool
from .positions import StepTokens
from .readout import Readout
from .session import RunState

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
            scores: Tensor | None) -> list[Firing]:
    """Pool one forward pass's new tokens at one hookpoint; return the detectors that fire now.

    ``feats`` ``(n, m)`` and ``scores`` ``(n, n_det)`` are on the CPU, rows aligned with ``tokens``.
    """
    hp = readout.hookpoint
    read = tokens.read
    if bool(read.any()) and feats.shape[1]:
        group = tokens.run[read] * 2 + tokens.completion[read].long()  # (run, phase) of each read token
        sums = torch.zeros(len(runs) * 2, feats.shape[1]).index_add_(0, group, feats[read])
        counts = torch.bincount(group, minlength=len(runs) * 2).tolist()
        for g, count in enumerate(counts):
            if count:
                run = runs[g // 2]
                key = (hp, COMPLETION if g % 2 else PROMPT)
                run.feature_sums[key] = run.feature_sums[key] + sums[g] if key in run.feature_sums else sums[g]
                run.feature_counts[key] = run.feature_counts.get(key, 0) + count
    if scores is None or not readout.detectors:
        return []
    # the read tokens of each (run, phase), in position order
    groups: dict[tuple[int, Phase], list[int]] = {}
    for i, (r, completion, ok) in enumerate(zip(tokens.run.tolist(), tokens.completion.tolist(), read.tolist())):
        if ok and not runs[r].blocked:
            groups.setdefault((r, COMPLETION if completion else PROMPT), []).append(i)
    if not groups:
        return []
    table = scores.tolist()
    positions = tokens.position.tolist()
    firings = []
    for (r, phase), idx in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] == COMPLETION)):
        run = runs[r]
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


def final_firings(readouts: Sequence[Readout], runs: Sequence[RunState]) -> list[Firing]:
    """The end-of-run verdicts: each (run, phase) over its threshold that has not fired yet."""
    firings = []
    for r, run in enumerate(runs):
        if run.blocked:
            continue
        for readout in readouts:
            for spec in readout.detectors:
                for phase in spec.phases:
                    pool = run.pools[(spec.name, phase)]
                    if pool.final():
                        firings.append(Firing(r, readout, spec, phase, pool, pool.last_pos, final=True))
    return firings


def evidence(readout: Readout, run: RunState, spec: DetectorSpec, phase: Phase, labels: LabelLookup | None = None,
             top: int = 5) -> list[FeatureEvidence]:
    """The features that carried a detector's score in a phase: largest ``weight × mean activation`` first."""
    key = (readout.hookpoint, phase)
    if spec.kind != "sae" or key not in run.feature_sums:
        return []
    mean = (run.feature_sums[key] / max(1, run.feature_counts[key])).tolist()
    col = {f: i for i, f in enumerate(readout.feature_ids)}
    items = [(f.weight * mean[col[f.id]], f, mean[col[f.id]]) for f in spec.features]
    items = sorted((it for it in items if it[0] > 0), key=lambda it: -it[0])[:top]
    return [FeatureEvidence(feature=f.id, label=f.label or (labels(readout.hookpoint, f.id) if labels else None),
                            activation=act, contribution=c) for c, f, act in items]
