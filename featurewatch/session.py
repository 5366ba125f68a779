"""Sessions: the state of one monitored call, its results and its token-by-token readings.

The hooks own only the hot path; everything a run accumulates lives here, one
:class:`Session` per monitored call (one :class:`~featurewatch.state.RunState` per batch row), so
concurrent runs never mix. The monitor finds the active session through a
context variable: each thread (and each asyncio task) has its own.

A session is single-use: entered once, ended once (``on_run_end`` reaches the
sinks exactly once per run). Everything it stores is detached from autograd.
Readings keep the watched features of every token (a few hundred floats); the
strongest features of each token are computed only when asked for, from the
residuals a session keeps when it was opened with ``top_features > 0``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .alert import COMPLETION, PROMPT, Outcome, RunResult
from .errors import ConfigError
from .positions import PositionTracker, StepTokens
from .state import FeatureTotals, RunState, record_tokens

if TYPE_CHECKING:
    from .intervention import Intervention, Steering
    from .readout import Readout


class TokenReading(NamedTuple):
    """What the SAE saw at one position of one run."""

    position: int
    token_id: int
    text: str
    phase: str
    excluded: bool
    """Not read by detectors: attention sink, special token, padding, chat markup or system prompt."""
    features: dict[int, float]
    """Watched features' activations (non-zero only)."""
    top: list[tuple[int, float]]
    """Strongest features at this position (only when the session asked for ``top_features``)."""


class SessionHost(Protocol):
    """What drivers (:mod:`~featurewatch.generation`, :mod:`~featurewatch.scoring`, a session's ``owner``) need
    of the monitor: its model and tokenizer, and sessions served by its hooks. :class:`~featurewatch.monitor.Monitor`
    is one; nothing below ``monitor`` imports it."""

    model: nn.Module
    tokenizer: Any

    def session(self, batch_size: int = 1, *, top_features: int = 0, run_ids: Sequence[str] | None = None,
                n_prompt: Sequence[int] | None = None, content: Sequence[Sequence[bool]] | None = None,
                interventions: Sequence[Intervention] = (), stop_after_deepest: bool = False,
                blocking: bool = True, markup: Sequence[Sequence[tuple[int, int]]] | None = None,
                shadow: Sequence[str] = ()) -> Session:
        """A session of this host's hooks (see :meth:`Monitor.session <featurewatch.monitor.Monitor.session>`)."""
        ...


class Session:
    """State of one monitored call: a generation (batch rows) or a batch of scored records.

    Use it through :meth:`Monitor.session` when driving the model yourself::

        with monitor.session(top_features=5) as session:
            model(**inputs)
        results = session.results()
    """

    def __init__(self, batch_size: int, *, owner: SessionHost, readouts: Sequence[Readout], tokenizer: Any,
                 model_name: str, special_ids: Sequence[int], top_features: int = 0, blocking: bool = True,
                 steering: Mapping[str, Steering] | None = None, stop_after_deepest: bool = False,
                 n_prompt: Sequence[int] | None = None, content: Sequence[Sequence[bool]] | None = None,
                 run_ids: Sequence[str] | None = None, clock: Callable[[], float] = time.time,
                 on_end: Callable[[Session], list[RunResult]] | None = None,
                 markup: Sequence[Sequence[tuple[int, int]]] | None = None, shadow: Collection[str] = ()) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; a session needs at least one run")
        if run_ids is not None and len(run_ids) != batch_size:
            raise ConfigError(f"{len(run_ids)} run_ids for a batch of {batch_size}")
        now = clock()
        ids = list(run_ids) if run_ids is not None else [uuid.uuid4().hex for _ in range(batch_size)]
        self.rows = [RunState(run_id=r, started_at=now) for r in ids]
        self.positions = PositionTracker(batch_size, special_ids, n_prompt=n_prompt, content=content)
        self.readouts = list(readouts)
        self.totals = {r.hookpoint: FeatureTotals.zeros(batch_size, len(r.feature_ids)).bind(self.rows, r.hookpoint)
                       for r in self.readouts}
        self.owner = owner
        """The monitor whose hooks serve this session (its hooks compare identity, nothing more)."""
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.top_features = top_features
        self.blocking = blocking
        """False in shadow mode: ``block`` alerts are reported (``would_block``) but do not stop the runs."""
        self.shadow = frozenset(shadow)
        """Detectors whose ``block`` runs in shadow mode in this call (on top of the monitor's)."""
        self.steering: Mapping[str, Steering] = dict(steering or {})
        """This call's own compiled interventions, by hookpoint (the monitor's are the monitor's)."""
        self.stop_after_deepest = stop_after_deepest
        self.markup = [list(spans) for spans in markup] if markup is not None else None
        """Per batch row, the token spans of chat markup typed into the prompt's content (the caller rendered
        the prompt and knows); None: read from the ids after the first forward pass when no content mask was
        given (see :mod:`~featurewatch.markup`)."""
        self.clock = clock
        self.step_seconds = 0.0
        self.error = False
        self.detached = False
        self.aborted: set[int] = set()
        """Batch rows the caller gave up on (:meth:`abort`)."""
        self._on_end = on_end
        self._ended: list[RunResult] | None = None  # the results the runs ended with
        self._state = "new"
        self._token: Token[Session | None] | None = None

    # -- context management ------------------------------------------------------------
    def __enter__(self) -> Session:
        if self._state != "new":
            raise ConfigError("a session is single-use: open a new one with monitor.session()")
        self._state = "open"
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._token is not None
        _current.reset(self._token)
        self._state = "ended"
        self.error = exc_type is not None
        if self.detached:
            for row in self.rows:
                row.degraded = True
        if self._on_end is not None:
            self._ended = self._on_end(self)

    @property
    def ended(self) -> bool:
        return self._state == "ended"

    def abort(self, row: int | None = None) -> None:
        """The caller gave up on a run (``row``; None: every run), e.g. a cancelled generation: it ends
        ``aborted``, without end-of-run verdicts (it did not run to its end)."""
        self.aborted.update(range(len(self.rows)) if row is None else (row,))

    def mark_degraded(self) -> None:
        """A monitoring fault touched this call: every run's result says so."""
        for row in self.rows:
            row.degraded = True

    # -- what the hooks record -----------------------------------------------------------
    def record_step(self, tokens: StepTokens) -> None:
        """Append a forward pass's new tokens to their runs."""
        self.step_seconds = 0.0
        record_tokens(self.rows, tokens)

    def keep(self, hookpoint: str, tokens: StepTokens, feats: Tensor, residuals: Tensor | None,
             scores: Tensor | None = None) -> None:
        """Keep a step's watched features and per-token detector scores (CPU) and, when readings want
        top features, its residuals.

        Each run gets a view of the step's tensors (its rows are consecutive, see
        :class:`~featurewatch.positions.StepTokens`); residuals are halved where they are and
        copied to the CPU once.
        """
        counts = list(tokens.counts)
        chunks = feats.split(counts) if len(counts) > 1 else (feats,)
        score_chunks = (scores.split(counts) if len(counts) > 1 else (scores,)) if scores is not None else ()
        kept: Sequence[Tensor] = ()
        if residuals is not None:
            half = residuals.detach().half().cpu()
            kept = half.split(counts) if len(counts) > 1 else (half,)
        for r, row in enumerate(self.rows):
            row.watched.setdefault(hookpoint, []).append(chunks[r])
            if scores is not None:
                row.scores.setdefault(hookpoint, []).append(score_chunks[r])
            if residuals is not None:
                row.residuals.setdefault(hookpoint, []).append(kept[r])

    # -- results -----------------------------------------------------------------------
    def result(self, row: int = 0) -> RunResult:
        """The :class:`RunResult` of one batch row: the one its run ended with (what the sinks got),
        or, while the session is open, the run so far."""
        if self._ended is not None:
            return self._ended[row]
        return self.rows[row].result(model_name=self.model_name, outcome=self.outcome(row), ended_at=self.clock())

    def outcome(self, row: int = 0) -> Outcome:
        """How one batch row's run ends (or would end now)."""
        return self.rows[row].outcome(error=self.error, aborted=row in self.aborted)

    def results(self) -> list[RunResult]:
        """One :class:`RunResult` per batch row."""
        return [self.result(r) for r in range(len(self.rows))]

    def readings(self, row: int = 0, hookpoint: str | None = None) -> list[TokenReading]:
        """Token-by-token readings of one batch row at one hookpoint (the first by default)."""
        readout = self._readout(hookpoint)
        run = self.rows[row]
        chunks = run.watched.get(readout.hookpoint, [])
        watched = torch.cat(chunks) if chunks else torch.zeros(0, len(readout.feature_ids))
        top_vals = top_ids = None
        residuals = run.residuals.get(readout.hookpoint)
        if residuals and readout.sae is not None:
            with torch.inference_mode():
                acts = readout.sae.encode(torch.cat(residuals).float())
            top_vals, top_ids = acts.topk(min(self.top_features, readout.sae.d_sae), dim=-1)
        out = []
        for pos, tid in enumerate(run.token_ids[: watched.shape[0]]):
            acts_at = watched[pos]
            top = []
            if top_vals is not None and top_ids is not None:
                top = [(int(i), float(v)) for v, i in zip(top_vals[pos], top_ids[pos]) if v > 0]
            text = self.tokenizer.decode([tid]) if self.tokenizer is not None and tid >= 0 else ""
            out.append(TokenReading(pos, tid, text, COMPLETION if run.completion[pos] else PROMPT,
                                    not run.read[pos],
                                    {readout.feature_ids[i]: float(acts_at[i]) for i in acts_at.nonzero().flatten()},
                                    top))
        return out

    def token_scores(self, row: int = 0, start: int = 0) -> dict[str, list[float]]:
        """Per-token scores of every detector (``bias + Σ wᵢ·aᵢ``, the values the pools took in) for
        one batch row, from position ``start`` on; a position its hookpoint did not read yet is missing
        (each list is as long as that hookpoint's readings)."""
        run = self.rows[row]
        out: dict[str, list[float]] = {}
        for readout in self.readouts:
            chunks = run.scores.get(readout.hookpoint)
            if not readout.detectors:
                continue
            table = torch.cat(chunks)[start:] if chunks else torch.zeros(0, len(readout.detectors))
            for j, spec in enumerate(readout.detectors):
                out[spec.name] = table[:, j].tolist()
        return out

    def _readout(self, hookpoint: str | None) -> Readout:
        if not self.readouts:
            raise ConfigError("this monitor reads no hookpoint: give it a pack, detectors or saes")
        if hookpoint is None:
            return self.readouts[0]
        for r in self.readouts:
            if r.hookpoint == hookpoint:
                return r
        raise ConfigError(f"no readings at {hookpoint!r}; watched hookpoints: "
                          f"{', '.join(r.hookpoint for r in self.readouts)}")


_current: ContextVar[Session | None] = ContextVar("featurewatch_session", default=None)


def current_session() -> Session | None:
    """The session active in this thread / task, if any."""
    return _current.get()
