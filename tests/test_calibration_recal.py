"""Calibration's building blocks: wrappers, the short-text prior, hysteresis, formatting features, explain, reports."""

import math

import numpy as np
import pytest

from featurewatch.calibration.report import explain
from featurewatch.calibration.select import is_formatting
from featurewatch.calibration.thresholds import fires, hysteresis_from, shrunk
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


def test_formatting_features_are_recognised_from_their_top_contexts() -> None:
    assert is_formatting({"label": "x", "top_contexts": ["end.« ⏎»Next", "a«,» b", "«<|im_start|>»"]})
    assert is_formatting({"label": "period ending a sentence", "top_contexts": []})
    assert not is_formatting({"label": "money and finance words",
                              "top_contexts": ["the« bank» said", "a« loan» of", "«wire» transfer"]})
    assert not is_formatting(None)
    # a word placed by punctuation is a word; markup and preamble words still make a feature formatting
    assert not is_formatting({"label": "'but' after a comma introducing contrast", "top_contexts": []})
    assert not is_formatting({"label": "concessive 'though'/'although' after a comma", "top_contexts": []})
    assert is_formatting({"label": "'ass' of 'assistant' role marker after <|im_start|>", "top_contexts": []})
    assert is_formatting({"label": "'u' inside speaker labels (dialogue markup)", "top_contexts": []})
    assert is_formatting({"label": "'⏎' newline between paragraphs", "top_contexts": []})
    system = "<|im_start|>system⏎You are a helpful AI assistant named Smol«LM», trained by"
    assert is_formatting({"label": None, "top_contexts": [system] * 4 + ["the« bank» said"]})


# --- report and explain -----------------------------------------------------------------------

def test_hysteresis_is_half_the_positives_spread_above_the_threshold() -> None:
    assert hysteresis_from(np.array([1.0, 2.0, 3.0, 5.0]), 0.0) == pytest.approx((3.5 - 1.75) / 2)


def test_explain_lists_labels_top_contexts_and_shares() -> None:
    spec = {"name": "d", "kind": "sae", "features": [{"id": 2, "weight": 1.0, "label": "scam words"}], "bias": -1.0,
            "threshold": 0.5, "phases": ["prompt"]}
    X_pos = np.zeros((2, 4), dtype=np.float32)
    X_pos[:, 2] = 3.0
    out = explain(spec, {2: {"label": "x", "top_contexts": ["a«b»c"] * 5}}, X_pos=X_pos)
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
