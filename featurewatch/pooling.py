"""Pooling per-token scores into run scores, with hysteresis and cooldown.

One :class:`PhasePool` per (run, detector, phase). It is fed token scores in
order and says when the pooled score crosses the threshold. The same code
pools live generation and offline scoring, so ``score`` and ``run`` agree.
"""

from __future__ import annotations

import math

from .detector import Pooling


class PhasePool:
    """Running pooled score of one detector over one phase of one run."""

    __slots__ = ("method", "alpha", "min_tokens", "threshold", "hysteresis", "cooldown",
                 "n", "total", "peak", "peak_pos", "ewma", "first_pos", "last_pos", "armed", "last_fire")

    def __init__(self, pooling: Pooling, threshold: float, hysteresis: float = 0.0, cooldown: int = 0) -> None:
        self.method, self.alpha, self.min_tokens = pooling.method, pooling.alpha, pooling.min_tokens
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
            return self.total / self.n
        return self.peak

    def update(self, score: float, position: int, check: bool = True) -> bool:
        """Add one token's score; return True when this token makes the detector fire.

        With ``check=False`` the score is pooled but no firing decision is made: the monitor
        decides once per forward pass, so a prompt read in one prefill is judged on its whole
        mean (what detectors are calibrated on), not on the noisy mean of its first tokens.
        """
        if self.n == 0:
            self.first_pos = position
            self.ewma = score
        else:
            self.ewma = self.alpha * score + (1 - self.alpha) * self.ewma
        self.n += 1
        self.last_pos = position
        self.total += score
        current = self.ewma if self.method == "ewma" else score
        if current > self.peak:
            self.peak, self.peak_pos = current, position
        if not check:
            return False
        pooled = self.value
        if not self.armed:
            if pooled < self.threshold - self.hysteresis:
                self.armed = True
            return False
        if self.n < self.min_tokens or pooled < self.threshold:
            return False
        if self.last_fire is not None and position - self.last_fire < self.cooldown:
            return False
        self.armed = False
        self.last_fire = position
        return True

    def final(self) -> bool:
        """At the end of a run: fire if the final pooled score is over the threshold and not yet reported.

        ``min_tokens`` guards only the running decision (an early mean is noisy); a run's final
        mean is what detectors are calibrated on, so a short completion still gets its verdict,
        and a scored record alerts exactly when its score reaches the threshold.
        """
        if self.n == 0 or not self.armed or self.value < self.threshold:
            return False
        self.armed = False
        self.last_fire = self.last_pos
        return True

    def span(self, position: int) -> tuple[int, int]:
        """Token positions ``[start, end)`` that drove a firing at ``position``."""
        if self.method == "max":
            return (self.peak_pos, self.peak_pos + 1)
        return (self.first_pos, position + 1)
