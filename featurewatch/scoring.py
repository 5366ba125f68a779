"""Offline scoring: records → one forward pass per batch, stopped after the deepest watched layer → run results.

Records are rendered exactly as prompts are for generation (same chat template,
same content mask), right-padded (causal attention makes right pads harmless),
and read by the same hooks as live generation, so a record's scores equal what
the monitor would have seen live. :class:`ScoreRow` is the typed line that
``featurewatch score`` writes (see docs/architecture.md, "Score output").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .alert import COMPLETION, PROMPT, FeatureEvidence, Phase, RunResult
from .errors import ConfigError
from .hooks import _StopForward
from .models import context_length
from .records import Record, pad_right, render
from .session import Session, SessionHost


class ScoreAlert(BaseModel):
    """An alert as written in a score line."""

    model_config = ConfigDict(extra="forbid")

    detector: str
    phase: Phase
    score: float
    threshold: float
    span: tuple[int, int]
    evidence: list[FeatureEvidence] = Field(default_factory=list)
    text: str | None = None


class ScoreToken(BaseModel):
    """One token of a scored record (``featurewatch score --token-scores``), as the page's live stream sends it."""

    model_config = ConfigDict(extra="forbid")

    p: int = Field(description="position in the rendered record")
    t: str = Field(description="the token's text")
    ph: Phase = Field(description="phase")
    x: bool = Field(description="excluded: not read by detectors (markup, system prompt, special tokens)")
    s: dict[str, float] = Field(default_factory=dict, description="per-token score of each detector")


class ScoreRow(BaseModel):
    """One output line of ``featurewatch score``: a record's id, scores and alerts."""

    model_config = ConfigDict(extra="forbid")

    id: str
    scores: dict[str, float | None] = Field(description="every detector; null when no token was scoreable")
    phase_scores: dict[str, dict[str, float]] = Field(default_factory=dict)
    alerts: list[ScoreAlert] = Field(default_factory=list)
    tokens: list[ScoreToken] | None = Field(default=None, description="per-token scores (--token-scores only)")

    @classmethod
    def from_run(cls, record: Record, run: RunResult, detectors: Sequence[str], *,
                 include_text: bool = True, tokens: list[ScoreToken] | None = None) -> ScoreRow:
        """The score line of a record from its run result."""
        return cls(id=record.id, scores={d: run.scores.get(d) for d in detectors}, phase_scores=run.phase_scores,
                   alerts=[ScoreAlert(detector=a.detector, phase=a.phase, score=a.score, threshold=a.threshold,
                                      span=a.span, evidence=list(a.evidence),
                                      text=a.text if include_text else None) for a in run.alerts],
                   tokens=tokens)

    def to_json(self) -> str:
        """One JSON line (``text`` left out of alerts where it was not captured, ``tokens`` unless asked for)."""
        row: dict[str, Any] = self.model_dump(mode="json")
        for alert in row["alerts"]:
            if alert["text"] is None:
                del alert["text"]
        if row["tokens"] is None:
            del row["tokens"]
        return json.dumps(row, ensure_ascii=False)


def score_records(monitor: SessionHost, records: Iterable[Record], *, batch_size: int = 8, max_tokens: int = 512,
                  on_batch: Callable[[int], Any] | None = None) -> Iterator[tuple[Record, RunResult]]:
    """Score records in order, ``batch_size`` at a time; see :meth:`Monitor.score_records`."""
    for record, run, _ in score_with_tokens(monitor, records, batch_size=batch_size, max_tokens=max_tokens,
                                            on_batch=on_batch, tokens=False):
        yield record, run


def score_with_tokens(monitor: SessionHost, records: Iterable[Record], *, batch_size: int = 8, max_tokens: int = 512,
                      on_batch: Callable[[int], Any] | None = None, tokens: bool = True
                      ) -> Iterator[tuple[Record, RunResult, list[ScoreToken] | None]]:
    """:func:`score_records`, with each record's tokens and their per-token detector scores (when ``tokens``)."""
    tok = monitor.tokenizer
    if tok is None:
        raise ConfigError("score_records() needs the tokenizer; pass it to Monitor(model, tokenizer, ...)")
    if batch_size < 1 or max_tokens < 2:
        raise ConfigError(f"batch_size={batch_size}, max_tokens={max_tokens}: both must be positive "
                          "(max_tokens at least 2)")
    context = context_length(monitor.model)
    if context is not None and max_tokens > context:
        raise ConfigError(f"max_tokens={max_tokens} exceeds the model's context of {context} tokens; "
                          f"use at most {context}")
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            yield from _score_batch(monitor, batch, max_tokens, tokens)
            if on_batch:
                on_batch(len(batch))
            batch = []
    if batch:
        yield from _score_batch(monitor, batch, max_tokens, tokens)
        if on_batch:
            on_batch(len(batch))


def _score_batch(monitor: SessionHost, batch: list[Record], max_tokens: int, tokens: bool
                 ) -> Iterator[tuple[Record, RunResult, list[ScoreToken] | None]]:
    rendered = [render(r, monitor.tokenizer, max_tokens=max_tokens) for r in batch]
    ids, mask = pad_right([r.ids for r in rendered], monitor.tokenizer.pad_token_id)
    device = next(monitor.model.parameters()).device
    session = monitor.session(len(batch), n_prompt=[r.n_prompt for r in rendered],
                              content=[r.content for r in rendered], stop_after_deepest=True)
    with session, torch.inference_mode(), contextlib.suppress(_StopForward):
        monitor.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    for r, (record, run) in enumerate(zip(batch, session.results())):
        yield record, run, (token_rows(session, r, stop=len(rendered[r].ids)) if tokens else None)


def token_rows(session: Session, row: int = 0, *, start: int = 0, stop: int | None = None) -> list[ScoreToken]:
    """One batch row's tokens from position ``start`` (to ``stop``) as :class:`ScoreToken`: text, phase, not read,
    each detector's per-token score (:meth:`~featurewatch.session.Session.token_scores`, 5 decimals). What
    ``score --token-scores`` writes and what the page streams after each forward pass."""
    run = session.rows[row]
    end = len(run.token_ids) if stop is None else min(stop, len(run.token_ids))
    scores = session.token_scores(row, start=start)
    tok = session.tokenizer
    out = []
    for i, p in enumerate(range(start, end)):
        tid = run.token_ids[p]
        out.append(ScoreToken(p=p, t=tok.decode([tid]) if tok is not None else str(tid),
                              ph=COMPLETION if run.completion[p] else PROMPT, x=not run.read[p],
                              s={k: round(v[i], 5) for k, v in scores.items() if i < len(v)}))
    return out
