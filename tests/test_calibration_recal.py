"""Wrapper-invariant calibration: wrappers, per-source thresholds, the short-text prior, feature exclusion, reports."""

import math

import numpy as np
import pytest

from featurewatch.calibration.metrics import auroc
from featurewatch.calibration.report import Task, evaluate, explain
from featurewatch.calibration.rows import PhaseRows
from featurewatch.calibration.select import fit_readout, is_formatting, paired_shift, wrapper_gap
from featurewatch.calibration.thresholds import binding, fires, hysteresis_from, per_cell_thresholds, shrunk
from featurewatch.calibration.wrappers import content_of, phase_of_content, truncate, wrap
from featurewatch.records import parse_record

# --- wrappers ---------------------------------------------------------------------------------

def _contents(rec: dict) -> list[str]:
    return [m["content"] for m in rec.get("messages", [])] or [rec["text"]]


@pytest.mark.parametrize("source", [
    {"id": "a1", "text": "Dear customer, your account is locked. Click here.", "label": 1, "source": "s"},
    {"id": "a2", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Here is how."}],
     "label": 0, "source": "s"},
])
def test_every_wrapper_holds_the_same_content_text(source: dict) -> None:
    content = content_of(source)
    wrappers = ["plain", "quoted", "request", "reply"] + (["native"] if "messages" in source else [])
    for system in (False, True):
        out = wrap(source, wrappers, system=system)
        assert [r["wrapper"].split("+")[0] for r in out] == wrappers
        for r in out:
            parse_record(r, line=1)  # a valid record
            assert r["label"] == source["label"] and r["source"] == "s" and r["base_id"] == source["id"]
            assert any(content in c for c in _contents(r))
            assert r["wrapper"].endswith("+sys") == (system and r["wrapper"] != "plain")
            assert ("messages" in r and r["messages"][0]["role"] == "system") == r["wrapper"].endswith("+sys")
    reply = wrap(source, ["reply"], system=False)[0]
    assert reply["messages"][-1] == {"role": "assistant", "content": content}
    assert phase_of_content(reply["wrapper"]) == "completion" and phase_of_content("quoted+sys") == "prompt"


def test_wrapping_is_deterministic_and_truncates_the_content_once() -> None:
    rec = {"id": "x", "text": "word " * 100, "label": 1}
    a, b = wrap(rec, ["plain", "reply"], max_chars=50), wrap(rec, ["plain", "reply"], max_chars=50)
    assert a == b
    assert a[0]["text"] == a[1]["messages"][-1]["content"] == truncate("word " * 100, 50)
    assert len(a[0]["text"]) <= 50 and not a[0]["text"].endswith(" ")
    with pytest.raises(ValueError, match="valid: plain"):
        wrap(rec, ["letter"])


# --- thresholds -------------------------------------------------------------------------------

def test_shrinkage_formula_and_short_texts_stay_near_the_prior() -> None:
    s = shrunk(np.array([10.0, 10.0, -2.0]), np.array([1, 100, 0]), prior_score=-2.0, prior_tokens=4)
    assert s[0] == pytest.approx((10 + 4 * -2) / 5)
    assert s[1] == pytest.approx((1000 - 8) / 104)
    assert s[2] == -2.0
    assert shrunk(np.array([3.0]), np.array([5]), 0.0, 0.0)[0] == 3.0  # no prior: the plain mean
    assert fires(np.array([5.0, 5.0, 1.0]), np.array([3, 8, 8]), 2.0, 4).tolist() == [False, True, False]


def test_threshold_is_set_by_the_hardest_negative_group_at_its_own_target() -> None:
    easy = np.linspace(-5, -1, 100)  # 100 easy negatives, all low
    hard = np.arange(10, dtype=float)  # 10 look-alikes: 0..9, target 10% allows one
    scores = np.concatenate([easy, hard])
    groups = ["easy"] * 100 + ["look-alike"] * 10
    cells = per_cell_thresholds(scores, np.full(110, 50), groups, ["plain"] * 110,
                                {"look-alike": 0.10, "easy": 0.02}, default_target=0.05, min_tokens=1)
    b = binding(cells)
    assert b.group == "look-alike" and 8 < b.threshold <= 9
    fp = (hard >= b.threshold).mean()
    assert fp == pytest.approx(0.10)
    # an average over all negatives would have allowed 2 look-alikes through at 2% overall
    assert ((scores >= b.threshold).sum()) == 1


def test_short_records_cannot_be_false_positives_but_count_in_the_cell() -> None:
    scores = np.array([9.0, 8.0, 1.0, 0.0])
    n = np.array([2, 10, 10, 10])  # the 9.0 is a 2-token text: silenced by min_tokens
    [cell] = per_cell_thresholds(scores, n, ["g"] * 4, ["w"] * 4, {"g": 0.25}, default_target=0.0, min_tokens=4)
    assert 1.0 < cell.threshold <= 8.0  # one false positive allowed out of four: the 8.0
    [cell0] = per_cell_thresholds(scores, n, ["g"] * 4, ["w"] * 4, {"g": 0.0}, default_target=0.0, min_tokens=4)
    assert cell0.threshold > 8.0
    assert hysteresis_from(np.array([1.0, 2.0, 3.0, 5.0]), 0.0) == pytest.approx((3.5 - 1.75) / 2)


# --- feature exclusion ------------------------------------------------------------------------

def test_wrapper_features_are_excluded_and_the_content_feature_is_kept() -> None:
    """Feature 0 tracks the reply wrapper (and in the data would correlate with the label), feature 1 the content."""
    rng = np.random.default_rng(0)
    n = 400
    base = [f"b{i}" for i in range(n)]
    y = np.arange(n) % 2
    content = rng.random(n) * 0.3 + y  # feature 1: the content signal
    noise = rng.random(n)  # feature 2: content noise, the same text in both wrappers
    rows_X, fams, bases, labels = [], [], [], []
    for fam, ctx in (("plain", 0.0), ("reply", 1.0)):
        X = np.zeros((n, 3))
        X[:, 0] = ctx + 0.05 * rng.random(n)
        X[:, 1] = content
        X[:, 2] = noise
        rows_X.append(X)
        fams += [fam] * n
        bases += base
        labels.append(y)
    X = np.concatenate(rows_X)
    shift = paired_shift(X, bases, fams)
    assert shift[0] > 1.0 and shift[1] == pytest.approx(0.0) and shift[2] == pytest.approx(0.0)
    neutral = np.array([[0.0, 0, 0.1], [0.0, 0, 0.1], [1.0, 0, 0.1], [1.0, 0, 0.1]])
    gap = wrapper_gap(neutral, ["plain", "plain", "reply", "reply"], scale=np.ones(3))
    assert gap.tolist() == pytest.approx([1.0, 0.0, 0.0])
    # fitted only on replies for positives, feature 0 would separate; fitted on both wrappers it cannot
    yy = np.concatenate(labels)
    ro = fit_readout(X, yy, np.ones(len(yy)), np.array([1, 2]), max_features=2)
    assert 1 in ro.features and 0 not in ro.features
    assert auroc(ro.score(X), yy) > 0.95


def test_formatting_features_are_recognised_from_their_top_contexts() -> None:
    assert is_formatting({"label": "x", "top_contexts": ["end.« ⏎»Next", "a«,» b", "«<|im_start|>»"]})
    assert is_formatting({"label": "period ending a sentence", "top_contexts": []})
    assert not is_formatting({"label": "money and finance words",
                              "top_contexts": ["the« bank» said", "a« loan» of", "«wire» transfer"]})
    assert not is_formatting(None)
    system = "<|im_start|>system⏎You are a helpful AI assistant named Smol«LM», trained by"
    assert is_formatting({"label": None, "top_contexts": [system] * 4 + ["the« bank» said"]})


# --- report and explain -----------------------------------------------------------------------

def _rows() -> PhaseRows:
    n = 6
    feats = np.zeros((n, 4), dtype=np.float32)
    feats[:, 2] = [3, 3, 0, 0, 3, 0]  # positives: 0, 1; look-alikes 2, 3; a short positive-looking text 4
    zero = np.zeros((n, 4), dtype=np.float32)
    return PhaseRows([f"r{i}" for i in range(n)], [f"b{i}" for i in range(n)], ["s"] * n,
                     ["scam", "scam", "look-alike", "look-alike", "short", "short"],
                     ["plain", "reply", "plain", "reply", "plain", "plain"], np.array([1, 1, 0, 0, 0, 0]),
                     {"prompt": np.array([10, 0, 10, 0, 2, 2]), "completion": np.array([0, 10, 0, 10, 0, 0])},
                     {"prompt": feats, "completion": feats.copy()}, {"prompt": zero, "completion": zero})


def test_evaluate_uses_phase_thresholds_the_prior_and_min_tokens() -> None:
    rows = _rows()
    spec = {"name": "d", "kind": "sae", "features": [{"id": 2, "weight": 1.0}], "bias": -1.0, "threshold": 0.5,
            "phase_thresholds": {"completion": 1.5}, "phases": ["prompt", "completion"],
            "pooling": {"min_tokens": 4, "prior_score": -1.0, "prior_tokens": 4}}
    task = Task(np.array([0, 2, 4, 5, 1, 3]), np.array(["prompt"] * 4 + ["completion"] * 2),
                np.array([1, 0, 0, 0, 1, 0]))
    table = {(r["phase"], r["group"], r["wrapper"]): r for r in evaluate(spec, rows, task)}
    # prompt: positive scores (10·2 − 4)/14 ≈ 1.14 ≥ 0.5; the 2-token text scores (2·2 − 4)/6 = 0 and is silent
    assert table[("prompt", "scam", "plain")]["recall"] == 1.0
    assert table[("prompt", "short", "plain")]["fpr"] == 0.0
    assert table[("prompt", "(all)", "(all)")]["auroc"] == 1.0
    # completion: 1.14 < 1.5, so the reply is missed at the completion threshold
    assert table[("completion", "scam", "reply")]["recall"] == 0.0
    assert table[("completion", "look-alike", "reply")]["auroc"] == 1.0  # vs the positives of that wrapper
    out = explain({**spec, "features": [{"id": 2, "weight": 1.0, "label": "scam words"}]},
                  {2: {"label": "x", "top_contexts": ["a«b»c"] * 5}}, X_pos=rows.feats["prompt"][:2])
    assert out["features"][0]["label"] == "scam words" and out["features"][0]["share"] == 1.0
    assert out["features"][0]["top_contexts"] == ["a«b»c"] * 3 and out["largest_share"] == 1.0
    assert math.isclose(out["threshold"], 0.5)


def test_offline_shrinkage_equals_the_runtime_pool() -> None:
    from featurewatch.detector import Pooling
    from featurewatch.pooling import PhasePool

    tokens = [4.0, -1.0, 2.5]
    pool = PhasePool(Pooling(method="mean", min_tokens=4, prior_score=-3.0, prior_tokens=4), threshold=0.0)
    pool.extend(tokens, [1, 2, 3])
    offline = shrunk(np.array([np.mean(tokens)]), np.array([3]), -3.0, 4)[0]
    assert pool.value == pytest.approx(offline)
    assert not pool.check()  # 3 tokens < min_tokens: silent, as fires() says
    assert not fires(np.array([offline]), np.array([3]), 0.0, 4)[0]


def test_evaluate_runs_reads_the_runtime_scores_and_alerts() -> None:
    from types import SimpleNamespace as NS

    from featurewatch.calibration.report import evaluate_runs

    spec = {"name": "d", "threshold": 1.0, "phases": ["prompt", "completion"]}
    rec = lambda label, wrapper, group: NS(extra={"label": label, "wrapper": wrapper, "group": group})  # noqa: E731
    alert = NS(detector="d", phase="completion")
    records = [rec(1, "reply", "scam"), rec(0, "reply+sys", "look-alike"), rec(1, "plain", "scam")]
    runs = [NS(phase_scores={"prompt": {"d": -2.0}, "completion": {"d": 3.0, "other": 9.0}}, alerts=[alert]),
            NS(phase_scores={"prompt": {"d": -2.0}, "completion": {"d": 0.5}}, alerts=[]),
            NS(phase_scores={"prompt": {"d": 2.0}}, alerts=[])]  # over threshold but the runtime did not fire
    table = {(r["phase"], r["group"], r["wrapper"]): r for r in evaluate_runs(spec, records, runs)}
    assert table[("completion", "scam", "reply")]["recall"] == 1.0
    assert table[("completion", "look-alike", "reply")]["fpr"] == 0.0
    assert table[("completion", "(all)", "(all)")]["auroc"] == 1.0
    assert table[("prompt", "scam", "plain")]["recall"] == 0.0  # the runtime's verdict counts, not the score
    assert table[("prompt", "(all)", "(all)")]["n_neg"] == 2  # the neutral requests before the replies
