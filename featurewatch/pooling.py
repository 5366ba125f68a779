"""Pooling per-token scores into run scores, with hysteresis and cooldown.

One :class:`PhasePool` per (run, detector, phase). It is fed the scores of the
tokens a forward pass adds and says whether the pooled score crosses the
threshold. The same code pools live generation and offline scoring, so
``score`` and ``run`` agree.

Short texts: a mean over two tokens is noise, so a pool (1) never fires before
``min_tokens`` scoreable tokens, at the end of a run too, and (2) can shrink
its mean toward a prior score with ``prior_tokens`` pseudo-tokens, so a 1–3
token text reports a score near the prior instead of an extreme one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .detector import Pooling


class PhasePool:
    """Running pooled score of one detector over one phase (or all phases) of one run."""

    __slots__ = ("method", "alpha", "min_tokens", "prior_score", "prior_tokens", "threshold", "hysteresis",
                 "cooldown", "n", "total", "peak", "peak_pos", "ewma", "first_pos", "last_pos", "armed",
                 "last_fire")

    def __init__(self, pooling: Pooling, threshold: float, hysteresis: float = 0.0, cooldown: int = 0) -> None:
        self.method, self.alpha, self.min_tokens = pooling.method, pooling.alpha, pooling.min_tokens
        self.prior_score = pooling.prior_score if pooling.prior_score is not None else 0.0
        self.prior_tokens = pooling.prior_tokens if pooling.prior_score is not None else 0.0
        self.threshold, self.hysteresis, self.cooldown = threshold, hysteresis, cooldown
        self.n = 0
        self.total = 0.0
        self.peak = -math.inf
        self.peak_pos = -1
        self.ewma = 0.0
        self.first_pos = -1
        self.last_pos = -1
        self.armed = True
        self.last_fire: int | None = None

    @property
    def value(self) -> float:
        """The pooled score so far (``nan`` before any token)."""
        if self.n == 0:
            return math.nan
        if self.method == "mean":
            return (self.total + self.prior_tokens * self.prior_score) / (self.n + self.prior_tokens)
        return self.peak

    def extend(self, scores: Sequence[float], positions: Sequence[int]) -> None:
        """Pool the scores of new tokens (in position order) without deciding anything."""
        for score, position in zip(scores, positions):
            if self.n == 0:
                self.first_pos = position
                self.ewma = score
            else:
                self.ewma = self.alpha * score + (1 - self.alpha) * self.ewma
            self.n += 1
            self.total += score
            current = self.ewma if self.method == "ewma" else score
            if current > self.peak:
                self.peak, self.peak_pos = current, position
        if positions:
            self.last_pos = positions[-1]

    def check(self) -> bool:
        """Decide once after a forward pass: True when the pooled score makes the detector fire now.

        The monitor decides once per pass, so a prompt read in one prefill is judged on its
        whole mean (what detectors are calibrated on), not on the noisy mean of its first
        tokens. After firing, the pool re-arms only when its score falls below
        ``threshold − hysteresis``: one alert per episode, not one per overlapping span.
        """
        if self.n == 0:
            return False
        pooled = self.value
        if not self.armed:
            if pooled < self.threshold - self.hysteresis:
                self.armed = True
            return False
        if self.n < self.min_tokens or pooled < self.threshold:
            return False
        if self.last_fire is not None and self.last_pos - self.last_fire < self.cooldown:
            return False
        self.armed = False
        self.last_fire = self.last_pos
        return True

    def final(self) -> bool:
        """At the end of a run: fire if the final pooled score is over the threshold and not yet reported."""
        if self.n < self.min_tokens or not self.armed or self.value < self.threshold:
            return False
        self.armed = False
        self.last_fire = self.last_pos
        return True

    def span(self, position: int) -> tuple[int, int]:
        """Token positions ``[start, end)`` that drove a firing at ``position``."""
        if self.method == "max":
            return (self.peak_pos, self.peak_pos + 1)
        return (self.first_pos, position + 1)
