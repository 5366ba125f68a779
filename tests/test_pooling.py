"""Exact pooling, threshold, hysteresis and cooldown maths on hand-set scores."""

import math

import pytest

from featurewatch.detector import Pooling
from featurewatch.pooling import PhasePool


def feed(pool: PhasePool, scores: list[float]) -> list[int]:
    """One token per forward pass (a decode step each): the positions where the pool fires."""
    fired = []
    for i, s in enumerate(scores):
        pool.extend([s], [i])
        if pool.check():
            fired.append(i)
    return fired


def test_mean_pooling_is_the_running_mean_and_fires_once_when_crossing() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=2.0)
    fired = feed(pool, [1.0, 3.0, 5.0, 5.0])  # means 1, 2, 3, 3.5
    assert fired == [1]
    assert pool.value == pytest.approx(3.5)
    assert pool.span(1) == (0, 2)


def test_min_tokens_holds_back_an_early_crossing() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=3), threshold=2.0)
    assert feed(pool, [9.0, 9.0, 9.0]) == [2]


def test_max_pooling_and_its_span_is_the_peak_token() -> None:
    pool = PhasePool(Pooling(method="max", min_tokens=1), threshold=4.0)
    assert feed(pool, [1.0, 2.0, 7.0, 3.0]) == [2]
    assert pool.value == 7.0
    assert pool.span(3) == (2, 3)


def test_ewma_pooling_is_the_peak_of_the_moving_average() -> None:
    pool = PhasePool(Pooling(method="ewma", alpha=0.5, min_tokens=1), threshold=100.0)
    feed(pool, [0.0, 4.0, 0.0])  # ewma 0, 2, 1
    assert pool.value == pytest.approx(2.0)


def test_hysteresis_one_sustained_event_is_one_alert() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0, hysteresis=0.5)
    # means: 2, 1.5, 1, .75, .6, .5, 1.14, 1.625 — never strictly below 0.5, so it never re-arms
    assert feed(pool, [2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]) == [0]


def test_rearm_below_threshold_minus_hysteresis_then_fire_again() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0, hysteresis=0.2)
    scores = [3.0, -3.0, -3.0, 9.0]  # means 3 (fire), 0 (re-arm: < 0.8), -1, 1.5 (fire again)
    assert feed(pool, scores) == [0, 3]


def test_cooldown_blocks_refiring_within_n_tokens() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0, cooldown=5)
    scores = [3.0, -3.0, 9.0, -9.0, 0.0, 20.0, 20.0]
    # means: 3 fire@0, 0 rearm, 3 (pos 2 < cooldown 5) no, ... 5 at pos 5: mean 20/6≈3.3 fires (5-0 ≥ 5)
    assert feed(pool, scores) == [0, 5]


def test_value_is_nan_before_any_token() -> None:
    assert math.isnan(PhasePool(Pooling(), threshold=0.0).value)


def test_a_prefill_is_judged_once_on_its_whole_mean() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=2.0)
    # a prompt whose first tokens score high but whose whole mean is low: judged at its end only
    pool.extend([9.0, 9.0, -8.0, -8.0], [0, 1, 2, 3])
    assert not pool.check() and pool.value == pytest.approx(0.5)
    assert (pool.first_pos, pool.last_pos) == (0, 3)


def test_min_tokens_also_gates_the_final_verdict() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=4), threshold=1.0)
    pool.extend([5.0, 5.0, 5.0], [0, 1, 2])
    assert not pool.check() and not pool.final()  # three tokens: too few to judge, even at the end
    pool.extend([5.0], [3])
    assert pool.final() and pool.span(pool.last_pos) == (0, 4)
    assert not pool.final()  # reported once


def test_final_verdict_is_the_final_mean() -> None:
    low = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0)
    low.extend([0.5], [0])
    assert not low.final()
    high = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0)
    high.extend([3.0, -0.5], [0, 1])
    assert high.final()


def test_prior_shrinks_short_texts_toward_the_prior_score() -> None:
    pooling = Pooling(method="mean", min_tokens=1, prior_score=-4.0, prior_tokens=6.0)
    short = PhasePool(pooling, threshold=1.0)
    short.extend([20.0], [0])  # one extreme token
    assert short.value == pytest.approx((20.0 + 6 * -4.0) / 7)  # -0.57: not an alert
    assert not short.check()
    long = PhasePool(pooling, threshold=1.0)
    long.extend([3.0] * 200, list(range(200)))
    assert long.value == pytest.approx((600.0 - 24.0) / 206) and long.check()


def test_no_prior_means_the_plain_mean() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1, prior_tokens=5.0), threshold=0.0)  # no prior_score
    pool.extend([2.0, 4.0], [0, 1])
    assert pool.value == pytest.approx(3.0)
