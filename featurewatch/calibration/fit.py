"""Fitting detectors: sparse readouts over SAE features, dense probes, thresholds.

Both kinds are logistic regressions on *mean-pooled* activations of the
phase(s) a detector watches. Because the mean is linear, the fitted model
folds exactly into a per-token score ``bias + w·a_t`` whose running mean the
monitor pools: the live score equals the offline one.

* ``sae``: every feature that fires on the data is a candidate (pre-ranking by
  AUROC favoured features that separate the large public sets by era and
  format, and generalised worse to hand-written look-alikes); at most
  ``max_features`` are chosen with an L1 path, then refit with L2.
* ``probe``: L2 logistic regression on the pooled residual.

The threshold comes from out-of-fold scores of the fitting split (5 folds) at
the target false-positive rate; AUROC and TPR are then measured on the
held-out split, which the fit never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .metrics import auroc, rates_at, threshold_at_fpr, tpr_at_fpr


def _sklearn() -> Any:
    try:
        from sklearn import linear_model, model_selection
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        from ..errors import ConfigError

        raise ConfigError("calibration needs scikit-learn: pip install 'featurewatch[calibrate]'") from exc
    return linear_model, model_selection


@dataclass
class Fit:
    """A fitted linear detector in raw activation units."""

    kind: Literal["sae", "probe"]
    weights: np.ndarray  # (n_selected,) for sae, (d_model,) for probe
    features: list[int]  # selected feature ids (sae); empty for probes
    bias: float
    threshold: float
    train_auroc: float
    heldout: dict[str, float] = field(default_factory=dict)

    def score(self, X: np.ndarray) -> np.ndarray:
        cols = X[:, self.features] if self.kind == "sae" else X
        return cols @ self.weights + self.bias


def feature_aurocs(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column AUROC (Mann–Whitney with average ranks), vectorised."""
    from scipy.stats import rankdata

    ranks = rankdata(X, axis=0)
    n_pos, n_neg = int(y.sum()), int((~y.astype(bool)).sum())
    return (ranks[y.astype(bool)].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _standardize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = X.mean(0)
    sd = X.std(0)
    sd[sd < 1e-6] = 1.0
    return (X - mu) / sd, mu, sd


def _fold(coef: np.ndarray, intercept: float, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, float]:
    w = coef / sd
    return w, float(intercept - (coef * mu / sd).sum())


def l1_path(Z: np.ndarray, y: np.ndarray, w: np.ndarray | None, *, max_features: int, Cs: np.ndarray,
            max_iter: int = 2000, seed: int = 0) -> np.ndarray | None:
    """Columns of ``Z`` kept by the weakest L1 penalty in ``Cs`` (strongest C first) that keeps ≤ ``max_features``.

    None when no C in ``Cs`` keeps between 1 and ``max_features`` columns.
    """
    linear_model, _ = _sklearn()
    for c in Cs:
        l1 = linear_model.LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", max_iter=max_iter,
                                             random_state=seed)
        l1.fit(Z, y, sample_weight=w)
        nz = np.flatnonzero(l1.coef_[0])
        if 0 < len(nz) <= max_features:
            return nz
    return None


def fit_detector(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, *, kind: Literal["sae", "probe"],
                 max_features: int = 64, candidates: int | None = None, target_fpr: float = 0.01, C: float = 1.0,
                 seed: int = 0) -> Fit:
    """Fit on pooled activations ``X (n, width)`` with labels ``y`` and optional sample weights ``w``."""
    linear_model, model_selection = _sklearn()
    y = y.astype(int)
    w = np.ones(len(y)) if w is None else w
    if kind == "sae":
        au = feature_aurocs(X, y)
        fires = (X > 0).mean(0) > 0.002
        strength = np.where(fires, np.abs(au - 0.5), 0.0)
        cand = np.argsort(-strength)[:candidates]  # None: every feature that fires
        cand = cand[strength[cand] > 0]
        Z, mu, sd = _standardize(X[:, cand])
        chosen = l1_path(Z, y, w, max_features=max_features, Cs=np.logspace(1, -3, 25), max_iter=2000, seed=seed)
        if chosen is None:
            chosen = np.argsort(-strength[cand])[:max_features]
        features = [int(f) for f in cand[chosen]]
        cols = X[:, features]
    else:
        features = []
        cols = X
    Z, mu, sd = _standardize(cols)
    model = linear_model.LogisticRegression(C=C, max_iter=5000)
    model.fit(Z, y, sample_weight=w)
    weights, bias = _fold(model.coef_[0], float(model.intercept_[0]), mu, sd)
    # threshold from out-of-fold scores, so it is not fitted to the very negatives it is set on
    oof = np.zeros(len(y))
    folds = model_selection.StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    for tr, te in folds.split(cols, y):
        Zt, m_, s_ = _standardize(cols[tr])
        m = linear_model.LogisticRegression(C=C, max_iter=5000).fit(Zt, y[tr], sample_weight=w[tr])
        wt, bt = _fold(m.coef_[0], float(m.intercept_[0]), m_, s_)
        oof[te] = cols[te] @ wt + bt
    threshold = threshold_at_fpr(oof[y == 0], target_fpr)
    return Fit(kind, weights, features, bias, threshold, auroc(oof, y))


def measure(fit: Fit, X: np.ndarray, y: np.ndarray, target_fpr: float = 0.01) -> dict[str, float]:
    """AUROC, TPR at the target FPR, and rates at the fitted threshold on a held-out split."""
    s = fit.score(X)
    at = rates_at(s, y, fit.threshold)
    out = {"auroc": auroc(s, y), "tpr_at_target_fpr": tpr_at_fpr(s, y, target_fpr),
           "tpr": at["tpr"], "fpr": at["fpr"], "precision": at["precision"], "n_pos": int(y.sum()),
           "n_neg": int((1 - y).sum())}
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in out.items()}


def file_weights(labels_per_file: list[np.ndarray], names: list[str], relative: dict[str, float]) -> np.ndarray:
    """Sample weights over several files: class-balanced within each file, the file scaled by ``relative``.

    Each file's weights sum to its relative weight (default 1) times its size,
    so a small hand-written file can count as much as a large public one.
    The result is normalised to mean 1.
    """
    out = []
    for y, name in zip(labels_per_file, names):
        w = np.zeros(len(y))
        for label in (0, 1):
            n = int((y == label).sum())
            if n:
                w[y == label] = 0.5 / n
        if (y == 0).sum() == 0 or (y == 1).sum() == 0:
            w *= 2  # a single-class file: its one class carries the file's whole weight
        out.append(w * relative.get(name, 1.0) * len(y))
    total = np.concatenate(out)
    return total / total.mean()
