"""Detection metrics: AUROC, TPR at a target FPR, thresholds, precision/recall.

Small and dependency-free (numpy only) so tests can check them exactly.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (ties count half); ``nan`` when a class is missing."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_at_fpr(negative_scores: ArrayLike, target_fpr: float) -> float:
    """The lowest threshold (``score >= threshold`` fires) whose FPR on these negatives is ≤ ``target_fpr``."""
    neg = np.sort(np.asarray(negative_scores, dtype=float))[::-1]
    if len(neg) == 0:
        raise ValueError("threshold_at_fpr needs at least one negative score")
    allowed = int(math.floor(target_fpr * len(neg)))  # negatives allowed at or above the threshold
    if allowed >= len(neg):
        return float(neg[-1])
    # fire strictly above the (allowed)-th highest negative
    return float(np.nextafter(neg[allowed], math.inf))


def rates_at(scores: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """TPR, FPR, precision and recall when ``score >= threshold`` fires."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    fire = s >= threshold
    tp, fp = int((fire & y).sum()), int((fire & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "tpr": tp / n_pos if n_pos else math.nan,
        "fpr": fp / n_neg if n_neg else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / n_pos if n_pos else math.nan,
    }


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, target_fpr: float = 0.01) -> float:
    """TPR at the threshold that gives at most ``target_fpr`` on these negatives."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return math.nan
    return rates_at(s, y, threshold_at_fpr(s[~y], target_fpr))["tpr"]


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded for a report; ``None`` for a missing or NaN value (JSON has no NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)
