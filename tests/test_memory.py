"""Memory: a finished run leaves nothing behind in the monitor, and per-token state is opt-in."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch

from conftest import HP, tiny_spec
from featurewatch.detector import DetectorSpec, FeatureWeight


def one_feature() -> DetectorSpec:
    """A never-firing detector on feature 3 alone: one watched float per token."""
    return tiny_spec(features=[FeatureWeight(id=3, weight=1.0)])


def test_sessions_are_freed_once_their_results_are_dropped(tiny_monitor: Any) -> None:
    with tiny_monitor(detectors=[one_feature()], fail_closed=True) as m:
        refs = []
        for i in range(20):
            result = m.generate("abcdef"[: 2 + i % 4], max_new_tokens=3, min_new_tokens=3, top_features=i % 2)
            refs.append(weakref.ref(result.session))
            del result
        gc.collect()
        assert not any(r() is not None for r in refs)
        assert len(m._live) == 0


def test_residuals_are_kept_only_when_readings_ask_for_top_features(tiny_monitor: Any) -> None:
    with tiny_monitor(detectors=[one_feature()], fail_closed=True) as m:
        plain = m.generate("abcd", max_new_tokens=3, min_new_tokens=3)
        top = m.generate("abcd", max_new_tokens=3, min_new_tokens=3, top_features=2)
    assert not plain.session.rows[0].residuals
    kept = torch.cat(top.session.rows[0].residuals[HP])
    assert kept.dtype == torch.float16 and kept.shape == (top.run.n_tokens, 16)
    watched = torch.cat(plain.session.rows[0].watched[HP])
    assert watched.shape == (plain.run.n_tokens, 1)  # one float per watched feature per token
