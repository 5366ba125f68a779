"""Calibration maths: exact metrics, thresholds at a target FPR, sparse fits that fold exactly."""

import math

import numpy as np
import pytest

from featurewatch.calibration.fit import feature_aurocs, fit_detector, measure
from featurewatch.calibration.keywords import keyword_score
from featurewatch.calibration.metrics import auroc, rates_at, threshold_at_fpr, tpr_at_fpr


def test_auroc_exact_values_including_ties() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0
    assert math.isnan(auroc([1, 2], [1, 1]))


def test_threshold_at_fpr_allows_exactly_the_target_share_of_negatives() -> None:
    neg = np.arange(100, dtype=float)  # 0..99
    t = threshold_at_fpr(neg, 0.01)
    assert (neg >= t).sum() == 1 and t > 98
    t0 = threshold_at_fpr(neg, 0.0)
    assert (neg >= t0).sum() == 0
    assert rates_at([1, 2, 3, 4], [0, 0, 1, 1], 2.5) == {"tpr": 1.0, "fpr": 0.0, "precision": 1.0, "recall": 1.0}
    assert tpr_at_fpr([0, 1, 2, 3], [0, 0, 1, 1], 0.0) == 1.0


def synthetic(n: int = 3000, d: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative 'features'; features 7 and 42 carry the label, the rest is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < 0.1)
    X[:, 7] += 1.5 * y * rng.random(n)
    X[:, 42 % d] += 1.0 * y * rng.random(n)
    return X, y


def test_sae_fit_selects_the_informative_features_and_hits_the_target_fpr() -> None:
    X, y = synthetic()
    fit = fit_detector(X[:2000], y[:2000], kind="sae", max_features=8, target_fpr=0.05)
    assert {7, 42} <= set(fit.features) and len(fit.features) <= 8
    held = measure(fit, X[2000:], y[2000:], target_fpr=0.05)
    assert held["auroc"] > 0.8
    assert held["fpr"] <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / held["n_neg"])  # within sampling noise
    # the fit folds to raw units: score = X[:, features] @ weights + bias, exactly what the monitor computes
    manual = X[2000:, fit.features] @ fit.weights + fit.bias
    assert np.allclose(fit.score(X[2000:]), manual)


def test_probe_fit_uses_every_dimension() -> None:
    X, y = synthetic(d=40)
    fit = fit_detector(X, y, kind="probe", target_fpr=0.01)
    assert fit.weights.shape == (40,) and fit.features == []
    assert fit.train_auroc > 0.8


def test_feature_aurocs_matches_the_scalar_auroc() -> None:
    X, y = synthetic(n=200, d=9)
    vec = feature_aurocs(X, y)
    assert np.allclose(vec, [auroc(X[:, j], y) for j in range(9)])


def test_keyword_baseline_counts_matches_per_100_words() -> None:
    assert keyword_score("scam-email", "Click here to verify your account immediately") == pytest.approx(300 / 7)
    assert keyword_score("sycophancy", "The capital of France is Paris.") == 0.0
    assert keyword_score("unknown-detector", "anything") == 0.0


def test_cached_activations_past_the_fp16_range_stay_finite(tmp_path) -> None:
    """Gemma 3's massive activations put one residual dimension past 65,504 on a few tokens; the
    calibration cache keeps such a file in fp32 (fp16 would make them inf, and the features NaN)."""
    import torch

    from featurewatch.calibration.extract import TokenActs, _compact

    small = torch.randn(5, 4) * 100
    assert _compact(small).dtype == torch.float16
    big = small.clone()
    big[2, 1] = 70_000.0
    kept = _compact(big)
    assert kept.dtype == torch.float32 and torch.equal(kept, big)
    acts = TokenActs(kept, torch.tensor([0, 2, 5]), torch.tensor([False, True, False, False, True]), ["a", "b"])
    acts.save(tmp_path / "acts.pt")
    pooled, has = TokenActs.load(tmp_path / "acts.pt").pooled(None)
    assert torch.isfinite(pooled).all() and has.all()
    assert torch.allclose(pooled[1], big[2:5].mean(0))
