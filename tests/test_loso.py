"""Leave-one-source-out calibration: provenance features, out-of-group scores, decisions, thresholds, evidence.

Synthetic data where the trap is built in: each source carries a "tell" feature that marks it, and in
the fitting sources the tell lines up with the label. A split by record scores the tell as well as the
concept; leaving a whole source out does not.
"""

from __future__ import annotations

import numpy as np
import pytest

from featurewatch.calibration.loso import (
    Rows,
    calibrate,
    choose,
    explained_by,
    fires_at,
    fit_decision,
    out_of_fold,
    provenance,
    record_folds,
    set_thresholds,
)
from featurewatch.calibration.metrics import auroc

D_SAE, D_MODEL = 10, 10
CONCEPT, WEAK = 0, 1  # features that carry the concept in every source
SOURCES = (("a", 1), ("b", 1), ("e", 1), ("c", 0), ("d", 0), ("f", 0))
TELL = {src: 2 + i for i, (src, _) in enumerate(SOURCES)}  # a feature that marks each source


def synthetic(seed: int = 0, n: int = 60) -> Rows:
    """Sources a, b, e (all positives), c, d, f (all negatives): each source's tell separates the labels
    in-split."""
    rng = np.random.default_rng(seed)
    parts = []
    for src, label in SOURCES:
        F = np.abs(rng.normal(0, 0.3, (n, D_SAE)))
        F[:, CONCEPT] += 1.0 * label + rng.normal(0, 0.6, n).clip(-0.9, None)  # the concept, noisy
        F[:, WEAK] += 0.3 * label
        F[:, TELL[src]] += 3.0  # provenance: strong, clean, but only in this source
        R = np.zeros((n, D_MODEL))
        R[:, 0] = F[:, CONCEPT]
        R[:, 7:] = rng.normal(0, 1, (n, D_MODEL - 7))
        R[:, TELL[src] - 1] = F[:, TELL[src]]  # in the residual too, a direction per source
        parts.append(Rows(F.astype(np.float32), R.astype(np.float32), np.full(n, 20), np.full(n, "prompt"),
                          np.full(n, label), np.full(n, src, dtype=object),
                          np.full(n, "pos" if label else "neg", dtype=object), np.full(n, src, dtype=object),
                          np.array([f"{src}{i}" for i in range(n)], dtype=object), np.full(n, "f", dtype=object)))
    return Rows.concat(parts)


def test_a_feature_that_marks_one_source_and_carries_no_label_elsewhere_is_provenance() -> None:
    rows = synthetic()
    fires = (rows.feats > 0).mean(0) > 0.01
    drop = provenance(rows.feats, rows.y, rows.group, fires)
    assert set(np.flatnonzero(drop)) == set(TELL.values())
    assert not drop[CONCEPT] and not drop[WEAK]


def test_a_split_by_record_scores_the_tell_and_leaving_a_source_out_does_not() -> None:
    rows = synthetic()
    only_tells = rows.take(np.ones(len(rows), dtype=bool))
    only_tells.resid = only_tells.resid.copy()
    only_tells.resid[:, 0] = 0  # nothing but provenance left to learn from
    in_split = out_of_fold("probe", only_tells, record_folds(only_tells))
    loso = out_of_fold("probe", only_tells, only_tells.fold)
    assert auroc(in_split, only_tells.y) > 0.95
    assert auroc(loso[np.isfinite(loso)], only_tells.y[np.isfinite(loso)]) < 0.75


def test_the_sae_readout_reads_the_concept_not_the_tells() -> None:
    rows = synthetic()
    d = fit_decision("sae", rows, max_features=4)
    assert CONCEPT in d.features and not set(d.features) & set(TELL.values())
    assert d.excluded["provenance"] == len(TELL)


def test_mean_difference_weighs_every_source_once() -> None:
    rows = synthetic()
    d = fit_decision("mean-diff", rows)
    assert d.dense and abs(d.weights[0]) > abs(d.weights[7:]).max()
    assert auroc(d.score(rows), rows.y) > 0.85


def test_thresholds_meet_the_target_on_the_pool_and_short_rows_never_fire() -> None:
    rows = synthetic()
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 1, len(rows)) + 2 * rows.y
    rows.n_tokens[:10] = 2  # short rows: below min_tokens
    thr = set_thresholds(rows, scores, ["prompt"], target_fpr=0.05, min_tokens=4, prior_tokens=0.0)
    neg = rows.y == 0
    fired = fires_at(rows, scores, thr, min_tokens=4, prior_tokens=0.0)  # the runtime's verdict
    assert fired[neg].mean() <= 0.05 + 1e-9
    assert fired[neg].mean() >= 0.05 - 2 / neg.sum()  # not far stricter than asked
    assert thr.pool["prompt"]["negatives"] == int(neg.sum())


def test_calibrate_reports_each_left_out_source_and_the_in_split_gap() -> None:
    rows = synthetic()
    cal = calibrate(rows, ["prompt"], kinds=("sae", "probe"), max_features=4, min_tokens=1)
    assert cal.chosen in ("sae", "probe")
    groups = {g["group"]: g for g in cal.results["sae"]["loso"]["groups"]}
    assert set(groups) == set(TELL)
    assert groups["a"]["n_pos"] == 60 and groups["c"]["n_neg"] == 60
    assert 0.5 < groups["a"]["auroc_pos"] <= 1.0 and "fpr_neg" in groups["c"]
    assert cal.results["sae"]["in_split"]["auroc"] is not None and "gap" in cal.results["sae"]


def test_choose_prefers_the_readable_readout_within_the_margin() -> None:
    res = lambda worst, mean: {"loso": {"worst_auroc": worst, "mean_auroc": mean}}  # noqa: E731
    assert choose({"sae": res(0.90, 0.93), "probe": res(0.91, 0.95)})[0] == "sae"
    assert choose({"sae": res(0.80, 0.90), "probe": res(0.91, 0.95)})[0] == "probe"


def test_a_dense_direction_is_explained_exactly_by_features_offset_and_error() -> None:
    rng = np.random.default_rng(0)
    W_dec, b_dec = rng.normal(0, 1, (D_SAE, D_MODEL)), rng.normal(0, 1, D_MODEL)
    a = np.abs(rng.normal(0, 1, (5, D_SAE)))
    err = rng.normal(0, 0.1, (5, D_MODEL))
    x = a @ W_dec + b_dec + err
    w = rng.normal(0, 1, D_MODEL)
    ids, c, offset, carried = explained_by(w, W_dec, b_dec, a, top=D_SAE)
    assert carried == pytest.approx(1.0)
    parts = a[:, ids] @ c + offset + err @ w
    assert parts == pytest.approx(x @ w)
    ids3, _, _, carried3 = explained_by(w, W_dec, b_dec, a, top=3)
    assert len(ids3) == 3 and 0 < carried3 < 1
