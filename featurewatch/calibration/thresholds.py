"""The short-text prior, the runtime's verdict, and hysteresis, as the calibration computes them.

Scores are pooled as the runtime pools them: a mean of token scores shrunk
toward a prior (``Pooling.prior_score``, ``prior_tokens``), so a 1–3 token text
scores near the prior instead of at the extremes of its single tokens; and a
phase with fewer than ``min_tokens`` tokens never fires. The thresholds
themselves are set per phase on out-of-source scores (:mod:`.loso`).
"""

from __future__ import annotations

import numpy as np


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


def hysteresis_from(positive_scores: np.ndarray, threshold: float, *, lo: float = 0.1, hi: float = 2.0) -> float:
    """Re-arm margin: half the interquartile range of positive scores, within ``[lo, hi]``."""
    pos = np.asarray(positive_scores, dtype=float)
    pos = pos[np.isfinite(pos)]
    if len(pos) < 4:
        return lo
    q1, q3 = np.percentile(pos, [25, 75])
    return float(np.clip((q3 - q1) / 2, lo, hi))
