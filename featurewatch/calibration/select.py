"""Feature selection that cannot lean on the wrapper, and readouts no single feature dominates.

Three filters shrink the candidate pool before any fitting:

* **wrapper probe** — each feature's pooled activation on near-empty contents
  ("Okay.", "hello world") in every wrapper. A feature whose activation there
  moves with the wrapper (plain vs quoted vs reply, with or without a system
  prompt) reads the context, not the content, and is dropped;
* **paired wrapper shift** — on the labelled data itself, the same content in
  two wrappers: a feature whose activation shifts with the wrapper by more than
  a fraction of its spread is dropped;
* **formatting** — a feature whose top contexts (features.json) highlight
  punctuation, whitespace, digits or chat markup is dropped.

The survivors are standardised and an L1 path picks at most ``max_features``;
an L2 refit on the chosen ones gives the weights, folded back to raw units.
Each row is fitted in every wrapper it comes in, so what is left of any
wrapper signal sees both classes everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fit import _fold, _sklearn, _standardize, feature_aurocs, l1_path

_MARK = re.compile(r"«(.*?)»")
_MARKUP = {"<|im_start|>", "<|im_end|>", "assistant", "user", "system", "⏎"}
_DEFAULT_SYSTEM = "AI assistant named SmolLM"  # SmolLM2's default system prompt, as in top contexts
_FORMAT_WORDS = ("punctuation", "newline", "whitespace", "indent", "period", "comma", "paragraph break",
                 "markup", "system prompt", "chat template", "colon", "bracket", "quote mark", "'⏎'",
                 "digits", "sentence end", "line break", "role token", "role name", "im_start")


def wrapper_gap(neutral: np.ndarray, wrappers: list[str], scale: np.ndarray) -> np.ndarray:
    """Per feature: spread (max − min) of its mean activation on neutral contents across wrappers, in ``scale`` units.

    ``neutral`` (n_records, d_sae) pooled content-phase activations of near-empty contents.
    """
    tags = sorted(set(wrappers))
    means = np.stack([neutral[np.array([w == t for w in wrappers])].mean(0) for t in tags])
    return (means.max(0) - means.min(0)) / np.maximum(scale, 1e-6)


def paired_shift(acts: np.ndarray, base_ids: list[str], families: list[str]) -> np.ndarray:
    """Per feature: the largest mean paired difference between two wrapper families, in units of its sd.

    ``acts`` (n_rows, d) pooled content-phase activations; rows sharing a base id are the same content.
    """
    fams = sorted(set(families))
    index = {(b, f): i for i, (b, f) in enumerate(zip(base_ids, families))}
    sd = acts.std(0) + 1e-6
    worst = np.zeros(acts.shape[1])
    for a in range(len(fams)):
        for b in range(a + 1, len(fams)):
            pairs = [(index[(base, fams[a])], index[(base, fams[b])]) for base in set(base_ids)
                     if (base, fams[a]) in index and (base, fams[b]) in index]
            if len(pairs) < 10:
                continue
            ia, ib = np.array(pairs).T
            worst = np.maximum(worst, np.abs((acts[ia] - acts[ib]).mean(0)) / sd)
    return worst


def is_formatting(info: dict[str, Any] | None, *, share: float = 0.6) -> bool:
    """Whether a feature's top contexts highlight mostly punctuation, whitespace, digits or markup."""
    if not info:
        return False
    label = str(info.get("label") or "").lower()
    if any(w in label for w in _FORMAT_WORDS) and not label.startswith("mixed"):
        return True
    contexts = list(info.get("top_contexts", []))
    # the highlighted token inside a system prompt: a feature of the operator's preamble
    def system_token(c: str) -> bool:
        before = c.split("«", 1)[0]
        if "<|im_start|>system" in before:
            return "<|im_end|>" not in before.split("<|im_start|>system", 1)[-1]
        return "<|im_start|>" not in before and _DEFAULT_SYSTEM in before  # a snippet cut inside it
    in_system = sum(system_token(c) for c in contexts)
    if contexts and in_system / len(contexts) >= share:
        return True
    tokens = [m.group(1) for c in contexts for m in [_MARK.search(c)] if m]
    if not tokens:
        return False
    def fmt(t: str) -> bool:
        s = t.strip()
        return s in _MARKUP or not any(ch.isalpha() for ch in s)
    return sum(fmt(t) for t in tokens) / len(tokens) >= share


@dataclass
class Readout:
    """A fitted sparse readout in raw activation units, with why each feature is there."""

    features: list[int]
    weights: np.ndarray  # (n_features,) raw units
    bias: float
    shares: np.ndarray  # (n_features,) share of |w·mean a| on the positives
    excluded: dict[str, int] = field(default_factory=dict)  # reason → number of features dropped

    def score(self, X: np.ndarray) -> np.ndarray:
        """Per-row pooled score (before the prior) from pooled activations ``X (n, d_sae)``."""
        return X[:, self.features] @ self.weights + self.bias


def contribution_shares(X_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share of each feature in ``Σ |wᵢ · mean aᵢ|`` over the positives."""
    c = np.abs(weights * X_pos.mean(0))
    return c / max(float(c.sum()), 1e-12)


def fit_readout(X: np.ndarray, y: np.ndarray, w: np.ndarray, candidates: np.ndarray, *, max_features: int = 24,
                C: float = 0.1, max_share: float = 0.35, seed: int = 0) -> Readout:
    """L1 path for ≤ ``max_features`` among ``candidates``, then an L2 refit on standardised activations.

    If one feature carries more than ``max_share`` of the score on the positives, the L2 penalty
    is raised (halving C) until it does not or C is tiny: no single feature dominates.
    """
    linear_model, _ = _sklearn()
    y = y.astype(int)
    au = feature_aurocs(X[:, candidates], y)
    pool = candidates[np.argsort(-np.abs(au - 0.5))[:400]]
    Z, _, _ = _standardize(X[:, pool])
    chosen = l1_path(Z, y, w, max_features=max_features, Cs=np.logspace(0, -3, 30), max_iter=3000, seed=seed)
    if chosen is None:
        chosen = np.argsort(-np.abs(au[np.isin(candidates, pool)] - 0.5))[:max_features]
    features = [int(f) for f in pool[chosen]]
    cols = X[:, features]
    Z, mu, sd = _standardize(cols)
    c = C
    while True:
        m = linear_model.LogisticRegression(C=c, max_iter=5000).fit(Z, y, sample_weight=w)
        weights, bias = _fold(m.coef_[0], float(m.intercept_[0]), mu, sd)
        shares = contribution_shares(cols[y == 1], weights)
        if shares.max() <= max_share or c < 1e-3:
            break
        c /= 2
    return Readout(features, weights, bias, shares)


def fit_probe(X: np.ndarray, y: np.ndarray, w: np.ndarray, *, C: float = 0.01) -> tuple[np.ndarray, float]:
    """Dense L2 logistic probe on standardised pooled residuals; raw-unit weights and bias."""
    linear_model, _ = _sklearn()
    Z, mu, sd = _standardize(X)
    m = linear_model.LogisticRegression(C=C, max_iter=5000).fit(Z, y.astype(int), sample_weight=w)
    return _fold(m.coef_[0], float(m.intercept_[0]), mu, sd)
