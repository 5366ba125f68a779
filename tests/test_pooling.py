"""Exact pooling, threshold, hysteresis and cooldown maths on hand-set scores."""

import math

import pytest

from featurewatch.detector import Pooling
from featurewatch.pooling import PhasePool


def feed(pool: PhasePool, scores: list[float]) -> list[int]:
    return [i for i, s in enumerate(scores) if pool.update(s, i)]


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


def test_unchecked_tokens_pool_but_never_fire_so_a_prefill_is_judged_on_its_whole_mean() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=1), threshold=2.0)
    # a prompt whose first tokens score high but whose whole mean is low: checked only at its end
    fired = [pool.update(s, i, check=(i == 3)) for i, s in enumerate([9.0, 9.0, -8.0, -8.0])]
    assert fired == [False, False, False, False] and pool.value == pytest.approx(0.5)


def test_final_verdict_fires_once_on_the_final_mean_even_below_min_tokens() -> None:
    pool = PhasePool(Pooling(method="mean", min_tokens=50), threshold=1.0)
    assert [pool.update(s, i) for i, s in enumerate([2.0, 2.0])] == [False, False]
    assert pool.final() and pool.span(pool.last_pos) == (0, 2)
    assert not pool.final()  # already reported
    low = PhasePool(Pooling(method="mean", min_tokens=1), threshold=1.0)
    low.update(0.5, 0)
    assert not low.final()
