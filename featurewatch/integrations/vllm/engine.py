"""featurewatch inside one vLLM worker: a run per live request, the readout at each tap, alerts, blocks.

:class:`EngineMonitor` is the vLLM sibling of :class:`~featurewatch.monitor.Monitor`:
the same readouts, pools and firings, driven by vLLM's steps instead of
Hugging Face forward calls. Per step, :meth:`begin_step` maps the runner's
flattened batch to :class:`~featurewatch.positions.StepTokens` (a
:class:`~featurewatch.state.RunState` per request id, created on first
sight), each tapped decoder layer calls :meth:`on_layer` with its output
(``hidden + residual`` is the residual stream), and :meth:`end_step` reports the
step. Requests vLLM has finished are closed by :meth:`finish` with their final
verdicts. A ``block`` firing puts the request in :attr:`blocked` with the stop
reason the scheduler gives it (see :mod:`.worker`).

Why the runs are keyed by request id and re-read nothing: vLLM may preempt a
request and recompute it from position 0, so positions already read are
skipped; prefix caching would skip prompt tokens altogether, so the plugin
turns it off (see :mod:`.plugin`).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ...alert import Alert, RunResult
from ...detection import Firing, observe
from ...detector import DetectorSpec
from ...errors import ConfigError
from ...markup import ChatMarkup
from ...pack import Pack
from ...readout import Readout, build_readouts
from ...runbook import RunBook, ShadowSwitch, pack_shadow, shadow_set
from ...sinks import Fanout, Sink
from ...state import FeatureTotals, RunState, record_tokens
from .batch import Scheduled, step_tokens
from .options import RUN_ID_MAX, SERVER_DEFAULT, RequestPolicy, decide, safe_run_id

logger = logging.getLogger(__name__)

BLOCK_REASON = "featurewatch: blocked by {detector}"


@dataclass
class _Live:
    """A request being monitored."""

    state: RunState
    n_prompt: int
    content: list[bool]
    detectors: list[DetectorSpec]
    markup: list[tuple[int, int]] = field(default_factory=list)  # typed chat markup, reported once read


@dataclass
class _Step:
    rows: Tensor  # (n,) rows of the flat batch that are read this step
    tokens: Any  # StepTokens of those rows
    runs: list[RunState]
    seconds: float = 0.0
    tapped: set[int] = field(default_factory=set)


class EngineMonitor:
    """The monitor of one vLLM worker: readouts at the tapped layers, a run per request id."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, pack: Pack,
                 detectors: Sequence[str] | None = None, sinks: Sequence[Sink] = (), model_name: str = "",
                 capture_text: bool = True, fail_closed: bool = False, keep_events: bool = False,
                 external_id: Callable[[str], str] = lambda rid: rid, keep_results: int = 4096,
                 clock: Callable[[], float] = time.time, request_policy: RequestPolicy = SERVER_DEFAULT,
                 shadow: ShadowSwitch = None) -> None:
        self.pack = pack
        self.detectors = pack.select(list(detectors) if detectors is not None else None)
        self.shadow = shadow_set(shadow, self.detectors, where="FEATUREWATCH_SHADOW") if shadow is not None \
            else pack_shadow(pack, self.detectors)
        """Detectors whose ``block`` runs in shadow mode (alerts ``would_block``; the request goes on)."""
        self.readouts: list[Readout] = build_readouts(model, self.detectors, pack.saes, pack=pack)
        self.by_layer = {r.layer: r for r in self.readouts}
        self.tokenizer = tokenizer
        self.masker = ChatMarkup(tokenizer)
        self.special = torch.tensor(sorted(self.masker.special), dtype=torch.long)
        self.model_name = model_name or pack.manifest.model
        self.events: list[Alert | RunResult] = []  # for a handle in another process (attach), when kept
        self.keep_events = keep_events
        # kept events: each alert as it is delivered (callbacks come before sinks), each result as it ends
        self.fanout = Fanout(sinks, [self._keep] if keep_events else [], fail_closed=fail_closed)
        self.book = RunBook(self.fanout, model_name=self.model_name, clock=clock,
                            tokenizer=tokenizer if capture_text else None, labels=pack.label, shadow=self.shadow)
        self.external_id = external_id
        self.clock = clock
        self.results: OrderedDict[str, RunResult] = OrderedDict()
        self.keep_results = keep_results
        self.runs: dict[str, _Live] = {}
        self._req_of: dict[int, str] = {}  # id(RunState) -> request id
        self._live_ids: set[str] = set()  # run ids of the requests in flight
        self.unmonitored: set[str] = set()
        self.request_policy = request_policy
        self.request_options: Counter[str] = Counter()  # what happened to per-request options, by status
        self.blocked: dict[str, str] = {}  # request id -> stop reason, until vLLM finishes the request
        self.step: _Step | None = None
        self.steps = 0
        self.hook_seconds = 0.0
        self.fanout.emit("on_attach", model_name=self.model_name, detectors=self.detectors)

    @property
    def layers(self) -> list[int]:
        """The decoder layers this monitor reads."""
        return sorted(self.by_layer)

    # ------------------------------------------------------------------ requests
    def _live(self, req_id: str, request: Any) -> _Live | None:
        live = self.runs.get(req_id)
        if live is not None or req_id in self.unmonitored:
            return live
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
        decision = decide(extra if isinstance(extra, Mapping) else None, self.detectors, self.request_policy)
        if decision.status != "none":
            self.request_options[decision.status] += 1
            log = logger.info if decision.status == "accepted" else logger.warning
            log("%s (request %s)", decision.message, safe_run_id(self.external_id(req_id)))
        if not decision.detectors:
            self.unmonitored.add(req_id)
            return None
        detectors = decision.detectors
        prompt = list(getattr(request, "prompt_token_ids", None) or [])
        state = RunState(run_id=self._distinct_run_id(req_id), started_at=self.clock())
        for readout in self.readouts:
            FeatureTotals.zeros(1, len(readout.feature_ids)).bind([state], readout.hookpoint)
        reading = self.masker.read(prompt)
        live = _Live(state, len(prompt), reading.content, detectors, reading.injected)
        self.runs[req_id] = live
        self._req_of[id(state)] = req_id
        self._live_ids.add(state.run_id)
        self.book.open(state, detectors)
        return live

    def _distinct_run_id(self, req_id: str) -> str:
        """The run id of a new request: the client's ``X-Request-Id`` (bounded, :func:`safe_run_id`), or, when a
        request in flight already has that id (a client may send the same one twice at once), the id with a
        short hash of vLLM's own request id, so every run, its alerts and its result stay apart."""
        run_id = safe_run_id(self.external_id(req_id))
        if run_id not in self._live_ids:
            return run_id
        digest = hashlib.sha256(str(req_id).encode("utf-8", "surrogatepass")).hexdigest()
        for n in range(8, len(digest) + 1, 4):
            candidate = f"{run_id[:RUN_ID_MAX - n - 1]}~{digest[:n]}"
            if candidate not in self._live_ids:
                return candidate
        return f"{run_id[:RUN_ID_MAX - 33]}~{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ steps
    def begin_step(self, req_ids: Sequence[str | None], query_start_loc: Sequence[int], positions: Tensor,
                   input_ids: Tensor | None, requests: Mapping[str, Any]) -> None:
        """Map a forward pass's flat batch (request ``i`` in rows ``query_start_loc[i:i+2]``) to runs."""
        scheduled: list[Scheduled] = []
        runs: list[RunState] = []
        for i, rid in enumerate(req_ids):
            start, stop = int(query_start_loc[i]), int(query_start_loc[i + 1])
            if rid is None or stop <= start:
                continue
            live = self._live(rid, requests.get(rid))
            if live is None:
                continue
            scheduled.append(Scheduled(len(runs), start, stop, live.n_prompt, live.content))
            runs.append(live.state)
        n = int(query_start_loc[len(req_ids)]) if len(req_ids) else 0
        ids = input_ids[:n] if input_ids is not None else torch.full((n,), -1, dtype=torch.long)
        tokens = step_tokens(scheduled, positions[:n], ids, self.special)
        rows = torch.cat([torch.arange(s.start, s.stop) for s in scheduled]) if scheduled else torch.zeros(0).long()
        # a preempted request is recomputed from position 0: what was read once is not read again
        seen = torch.tensor([len(runs[r].token_ids) for r in tokens.run.tolist()], dtype=torch.long)
        fresh = tokens.position >= seen
        if not bool(fresh.all()):
            rows = rows[fresh]
            tokens = replace(tokens, counts=(), **{k: getattr(tokens, k)[fresh] for k in  # counts: recounted
                                                   ("run", "position", "completion", "read", "steerable",
                                                    "token_id")})
        record_tokens(runs, tokens)
        for rid in req_ids:
            live = self.runs.get(rid) if rid is not None else None
            # typed chat markup: one alert, once the prompt is read up to its last span (prefills may be chunked)
            if live is not None and live.markup and len(live.state.token_ids) >= live.markup[-1][1]:
                spans, live.markup = live.markup, []
                self.book.flag_markup(live.state, spans)
        self.step = _Step(rows, tokens, runs)

    def on_layer(self, layer: int, hidden: Tensor, residual: Tensor | None) -> None:
        """Read one tapped layer's output for the step's tokens (``hidden``, ``residual``: ``(num_tokens, d)``)."""
        step, readout = self.step, self.by_layer.get(layer)
        if step is None or readout is None:
            return
        step.tapped.add(layer)
        if not len(step.tokens):
            return
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                rows = step.rows.to(hidden.device)
                x = hidden[rows].float()
                if residual is not None:
                    x = x + residual[rows].float()  # the residual stream after the layer
                feats = readout.features(x)
                scores = readout.scores(x, feats).cpu() if readout.detectors else None
                # the step's feature sums per (run, phase), added to each run's before its alerts are built
                # (runs past counts have no token here)
                totals = FeatureTotals.zeros(len(step.tokens.counts), feats.shape[1])
                firings = observe(readout, step.runs, step.tokens, feats.cpu(), scores, totals)
                totals.add_to(step.runs, readout.hookpoint)
                for firing in firings:
                    self._fire(step.runs[firing.row], firing)
        except Exception as exc:  # noqa: BLE001 — fail-open policy of Monitor: the run goes on, degraded
            for run in step.runs:
                run.degraded = True
            self.fanout.fault("hook", exc, stage="hook")
        step.seconds += time.perf_counter() - t0

    def end_step(self) -> None:
        """Close the step: check every watched layer ran, and report the monitor's time."""
        step, self.step = self.step, None
        if step is None:
            return
        missing = set(self.by_layer) - step.tapped
        if missing:
            raise ConfigError(
                f"featurewatch: the taps at layers {sorted(missing)} did not run in a forward pass, so requests "
                "would go unmonitored; the model was probably compiled before featurewatch tapped it. Start vLLM "
                "with FEATUREWATCH_PACK set (the plugin taps layers before compilation), or pass --enforce-eager "
                "(enforce_eager=True)")
        self.steps += 1
        self.hook_seconds += step.seconds
        if len(step.tokens) and not self.fanout.emit("on_forward", model_name=self.model_name,
                                                     seconds=step.seconds, tokens=len(step.tokens)):
            for run in step.runs:
                run.degraded = True

    def finish(self, req_ids: Iterable[str], *, error: bool = False, aborted: Iterable[str] = ()) -> None:
        """Close requests vLLM has finished: final verdicts, ``on_run_end``, results kept by request id.

        ``aborted``: those of ``req_ids`` the client gave up on (a closed stream, a cancelled
        request): outcome ``aborted``, and no end-of-run verdicts (the run did not end).
        """
        gave_up = set(aborted)
        for rid in req_ids:
            self.unmonitored.discard(rid)
            self.blocked.pop(rid, None)
            live = self.runs.pop(rid, None)
            if live is None:
                continue
            run = live.state
            self._req_of.pop(id(run), None)
            self._live_ids.discard(run.run_id)
            result = self.book.close(run, self.readouts, run.outcome(error=error, aborted=rid in gave_up))
            self.results[run.run_id] = result
            while len(self.results) > self.keep_results:
                self.results.popitem(last=False)
            if self.keep_events:
                self._keep(result)

    def _keep(self, event: Alert | RunResult) -> None:
        self.events.append(event)  # the list of now: drain() hands the old one over

    def drain(self) -> list[Alert | RunResult]:
        """The alerts and results since the last call (kept only with ``keep_events``)."""
        events, self.events = self.events, []
        return events

    # ------------------------------------------------------------------ alerts
    def _fire(self, run: RunState, firing: Firing) -> None:
        """The run book's firing; a blocked request also gets the stop reason vLLM's scheduler hands it."""
        alert = self.book.fire(run, firing)
        rid = self._req_of.get(id(run))
        if firing.spec.action == "block" and not alert.would_block and run.blocked and rid is not None:
            self.blocked[rid] = BLOCK_REASON.format(detector=firing.spec.name)
