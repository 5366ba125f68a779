"""Thresholds set on the negatives that matter, and the short-text prior.

An average false-positive rate over many easy negatives hides the sources a
user cares about: 1 % FPR over Alpaca instructions says nothing about the
XSTest-style question "How do I kill a Python process?". A threshold here is
the *highest* of the per-cell thresholds, one cell per (negative group,
wrapper), each set at that group's own target FPR; so every cell meets its
target on the calibration data, and the binding cell is reported.

Scores are pooled as the runtime pools them: a mean of token scores shrunk
toward a prior (``Pooling.prior_score``, ``prior_tokens``), so a 1–3 token text
scores near the prior instead of at the extremes of its single tokens; and a
phase with fewer than ``min_tokens`` tokens never fires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .metrics import threshold_at_fpr


def shrunk(mean: np.ndarray, n: np.ndarray, prior_score: float, prior_tokens: float) -> np.ndarray:
    """Pooled score ``(Σ token scores + k·prior) / (n + k)`` from per-record means and token counts."""
    mean = np.asarray(mean, dtype=float)
    n = np.asarray(n, dtype=float)
    total = np.where(n > 0, mean * n, 0.0)
    denom = n + prior_tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (total + prior_tokens * prior_score) / denom, np.nan)


def fires(score: np.ndarray, n: np.ndarray, threshold: float, min_tokens: int) -> np.ndarray:
    """The runtime's final verdict: enough tokens and a pooled score at or over the threshold."""
    return (np.asarray(n) >= min_tokens) & (np.asarray(score) >= threshold)


@dataclass(frozen=True)
class CellThreshold:
    """The threshold one (group, wrapper) cell of negatives needs to meet its target FPR."""

    group: str
    wrapper: str
    target_fpr: float
    n: int
    threshold: float


def per_cell_thresholds(scores: np.ndarray, n_tokens: np.ndarray, groups: list[str], wrappers: list[str],
                        targets: dict[str, float], *, default_target: float, min_tokens: int
                        ) -> list[CellThreshold]:
    """Per (group, wrapper) of *negatives*: the lowest threshold meeting the group's target FPR.

    Records below ``min_tokens`` never fire, so they cannot be false positives and are left out;
    their count still sets how many false positives the cell may have (FPR is over the whole cell).
    """
    scores = np.asarray(scores, dtype=float)
    n_tokens = np.asarray(n_tokens)
    out = []
    for g, w in sorted(set(zip(groups, wrappers))):
        cell = np.array([gi == g and wi == w for gi, wi in zip(groups, wrappers)])
        target = targets.get(g, default_target)
        total = int(cell.sum())
        live = scores[cell & (n_tokens >= min_tokens)]
        if len(live) == 0:
            thr = -math.inf
        else:
            # allowed false positives are counted against the whole cell, rounded to the nearest
            # count: flooring would turn 2 % of 43 negatives into zero, i.e. "above the maximum of a
            # small sample", far stricter than 2 % and fatal to recall
            allowed_fpr = round(target * total) / len(live) if len(live) else 0.0
            thr = threshold_at_fpr(live, min(allowed_fpr + 1e-12, 1.0))
        out.append(CellThreshold(g, w, target, total, float(thr)))
    return out


def binding(cells: list[CellThreshold]) -> CellThreshold:
    """The cell with the highest threshold: the one that sets the detector's threshold."""
    return max(cells, key=lambda c: c.threshold)


def hysteresis_from(positive_scores: np.ndarray, threshold: float, *, lo: float = 0.1, hi: float = 2.0) -> float:
    """Re-arm margin: half the interquartile range of positive scores, within ``[lo, hi]``."""
    pos = np.asarray(positive_scores, dtype=float)
    pos = pos[np.isfinite(pos)]
    if len(pos) < 4:
        return lo
    q1, q3 = np.percentile(pos, [25, 75])
    return float(np.clip((q3 - q1) / 2, lo, hi))
