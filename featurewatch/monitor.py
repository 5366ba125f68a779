"""The monitor: attach to a model, and wire each forward pass through positions → readout → detection → actions.

Why it is built this way:

* Hooks are registered once at attach and removed on detach (idempotent, also
  after errors, and when the constructor itself fails). They do nothing unless
  a :class:`~featurewatch.session.Session` of this monitor is active in the
  calling thread/task, so an attached model costs nothing outside monitored
  calls and concurrent runs never see each other's state.
* A forward *pre*-hook on the model tells the session's
  :class:`~featurewatch.positions.PositionTracker` which tokens are new; a
  hook at each watched hookpoint runs the :class:`~featurewatch.readout.Readout`
  on those tokens only (flattened to ``(n_tokens, d)``), hands the scores to
  :mod:`~featurewatch.detection`, turns firings into alerts, and adds the
  :mod:`~featurewatch.intervention` deltas to the residual stream.
* Faults inside the forward pass, sinks and callbacks are fail-open by
  default (logged once, reported to sinks, the run marked ``degraded``);
  ``fail_closed=True`` raises them as :class:`~featurewatch.errors.MonitorError`.

Generation lives in :mod:`~featurewatch.generation`, offline scoring in
:mod:`~featurewatch.scoring`; both only open sessions on this monitor.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .alert import Alert, RunResult
from .detection import observe
from .detector import DetectorSpec
from .errors import ConfigError, MonitorError
from .generation import GenerationResult, Prompt, generate_batch
from .hooks import _StopForward, rewrap, unwrap
from .intervention import Intervention, Steering, compile_steering, suppression
from .markup import ChatMarkup
from .models import LoadedModel, load_model, resolve_hookpoint
from .pack import DEFAULT_PACK, Pack, load_pack
from .readout import Readout, build_readouts
from .records import Record
from .runbook import RunBook, ShadowSwitch, pack_shadow, shadow_set
from .sae import SparseAutoencoder
from .scoring import score_records
from .session import Session, _current
from .sinks import Fanout, Sink

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Monitor] = weakref.WeakKeyDictionary()
AlertCallback = Callable[[Alert], Any]


class Monitor:
    """Watches a causal LM's residual stream through SAEs, scores detectors, and acts on alerts.

    Example::

        monitor = Monitor.default(on_alert=print)      # embedded model + default pack
        result = monitor.generate("Write a phishing email to a bank customer.")
        result.alerts, result.scores

    With your own model::

        monitor = Monitor(model, tokenizer, pack="path/to/pack", sinks=[PrometheusMetrics()])

    ``shadow``: ``block`` detectors that only say what they would have done (``True``: all of them,
    or a list of names; default: the pack's ``shadow``): they alert with ``would_block=True``
    (counted in ``featurewatch_would_block_total``) and the generation goes on.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, pack: Pack | str | Path | None = None,
                 detectors: Sequence[str | DetectorSpec] | None = None,
                 saes: dict[str, SparseAutoencoder] | None = None, watch: dict[str, Sequence[int]] | None = None,
                 interventions: Sequence[Intervention] = (), sinks: Sequence[Sink] = (),
                 on_alert: AlertCallback | Sequence[AlertCallback] = (), fail_closed: bool = False,
                 capture_text: bool = True, model_name: str | None = None,
                 clock: Callable[[], float] = time.time, shadow: ShadowSwitch = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pack = load_pack(pack) if isinstance(pack, (str, Path)) else pack
        self.fail_closed = fail_closed
        self.capture_text = capture_text
        self.clock = clock
        self.model_name = model_name or (self.pack.manifest.model if self.pack else
                                         getattr(getattr(model, "config", None), "_name_or_path", "") or
                                         type(model).__name__)
        self.detectors = self._select_detectors(detectors)
        all_saes = {**(self.pack.saes if self.pack else {}), **(saes or {})}
        self.readouts: list[Readout] = build_readouts(model, self.detectors, all_saes, watch=watch, pack=self.pack)
        self._saes = {r.hookpoint: r.sae for r in self.readouts if r.sae is not None}
        suppress = [iv for spec in self.detectors if spec.action == "suppress" for iv in suppression(spec)]
        self._interventions = list(interventions)  # the monitor's own: a call's stack on top of them
        self._steering = self._compile(interventions, suppress)
        callbacks = [on_alert] if callable(on_alert) else list(on_alert)
        self.shadow = shadow_set(shadow, self.detectors, where="shadow=") if shadow is not None else \
            pack_shadow(self.pack, self.detectors)
        """Detectors whose ``block`` runs in shadow mode: they alert with ``would_block=True`` and stop nothing."""
        self._fanout = Fanout(sinks, callbacks, fail_closed=fail_closed)
        self._book = RunBook(self._fanout, model_name=self.model_name, clock=clock,
                             tokenizer=tokenizer if capture_text else None,
                             labels=self.pack.label if self.pack else None, shadow=self.shadow)
        self._special = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
        self._handles: list[Any] = []
        self._live: weakref.WeakSet[Session] = weakref.WeakSet()
        self._chat: ChatMarkup | None = None  # the template's grammar, probed when a session first needs it
        self.attach()

    @classmethod
    def default(cls, *, model: str | None = None, pack: str | Path = DEFAULT_PACK, **kwargs: Any) -> Monitor:
        """A ready monitor on the embedded SmolLM2-135M-Instruct (or ``model``) with the default pack."""
        loaded: LoadedModel = load_model(model)
        return cls(loaded.model, loaded.tokenizer, pack=pack, model_name=loaded.name, **kwargs)

    @property
    def sinks(self) -> list[Sink]:
        """The sinks events go to (a live list: append or remove sinks at any time)."""
        return self._fanout.sinks

    @property
    def on_alert(self) -> list[AlertCallback]:
        """The alert callbacks (a live list)."""
        return self._fanout.callbacks

    @property
    def hookpoints(self) -> list[str]:
        return [r.hookpoint for r in self.readouts]

    def _select_detectors(self, detectors: Sequence[str | DetectorSpec] | None) -> list[DetectorSpec]:
        if detectors is None:
            return self.pack.select(None) if self.pack else []
        names = [d for d in detectors if isinstance(d, str)]
        if names and not self.pack:
            raise ConfigError(f"detectors named by string ({', '.join(names)}) need a pack")
        by_name = {d.name: d for d in (self.pack.select(names) if names and self.pack else [])}
        specs = [by_name[d] if isinstance(d, str) else d for d in detectors]
        if len({s.name for s in specs}) != len(specs):
            raise ConfigError("detector names must be unique")
        return specs

    def _compile(self, interventions: Sequence[Intervention], extra: Sequence[Intervention] = ()
                 ) -> dict[str, Steering]:
        """Resolve hookpoint names and detector names of interventions, and compile them per hookpoint."""
        names = {d.name for d in self.detectors}
        resolved = []
        for iv in [*extra, *interventions]:
            if not isinstance(iv, Intervention):
                raise ConfigError(f"interventions take featurewatch.Intervention objects, got {iv!r}")
            if iv.when is not None and iv.when not in names:
                raise ConfigError(f"intervention when={iv.when!r} names no detector of this monitor; "
                                  f"detectors: {', '.join(sorted(names)) or 'none'}")
            hp = resolve_hookpoint(self.model, iv.hookpoint)[0] if iv.hookpoint else None
            resolved.append(iv.model_copy(update={"hookpoint": hp}))
        unit = self.pack.max_activation if self.pack else None
        dtype = getattr(self.model, "dtype", None)
        return compile_steering(resolved, self._saes, max_activation=unit,
                                dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)

    def _compile_call(self, interventions: Sequence[Intervention]) -> dict[str, Steering]:
        """A call's interventions, compiled; on a feature the monitor steers too, their sum is bounded as one
        stack's (the two deltas add up in the residual stream)."""
        if self._interventions:
            self._compile([*self._interventions, *interventions])  # checked together, compiled apart
        return self._compile(interventions)

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Monitor:
        """Register the hooks (done by the constructor); attaching twice is a no-op.

        If attaching fails (e.g. a fail-closed sink raises in ``on_attach``), every hook is
        removed again and the model is left as it was.
        """
        if self._handles:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self:
            raise ConfigError("another Monitor is already attached to this model; call its detach() first")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for readout in self.readouts:
                self._handles.append(readout.module.register_forward_hook(self._make_hook(readout)))
            _ATTACHED[self.model] = self
            self._fanout.emit("on_attach", model_name=self.model_name, detectors=self.detectors)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook; safe to call more than once. Runs still in flight are marked degraded."""
        if self._remove_hooks():
            self._fanout.emit("on_detach")

    def _remove_hooks(self) -> bool:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        for session in list(self._live):
            session.detached = True
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
            return True
        return False

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ sessions and calls
    def session(self, batch_size: int = 1, *, top_features: int = 0, run_ids: Sequence[str] | None = None,
                n_prompt: Sequence[int] | None = None, content: Sequence[Sequence[bool]] | None = None,
                interventions: Sequence[Intervention] = (), stop_after_deepest: bool = False,
                blocking: bool = True, markup: Sequence[Sequence[tuple[int, int]]] | None = None,
                shadow: Sequence[str] = ()) -> Session:
        """A session for driving the model yourself: ``with monitor.session() as s: model(...)``.

        ``top_features``: keep each token's residual so readings can list its strongest
        features. ``n_prompt``/``content``: which positions are prompt, and which are
        content a detector reads (default: the whole first call is prompt, all content).
        ``blocking=False`` (shadow mode): ``block`` alerts are reported (``would_block=True``)
        but do not mark the runs blocked, so they go on and are scored to the end; ``shadow``:
        the same for the named detectors only (on top of the monitor's ``shadow``).
        Chat markup typed into a prompt's content that reached the model as markup tokens is reported
        as a ``markup-injection`` alert after the first forward pass: at the token spans ``markup`` gives
        per row (a caller that rendered the prompt knows them), or, without a ``content`` mask (ids
        someone else built), where the ids break the chat template's grammar (:mod:`~featurewatch.markup`).
        """
        if not self._handles:
            raise ConfigError("the monitor is detached; call attach() first")
        if top_features < 0:
            raise ConfigError(f"top_features={top_features}; it must be 0 (off) or more")
        s = Session(batch_size, owner=self, readouts=self.readouts, tokenizer=self.tokenizer,
                    model_name=self.model_name, special_ids=self._special, top_features=top_features,
                    blocking=blocking, steering=self._compile_call(interventions) if interventions else None,
                    stop_after_deepest=stop_after_deepest, n_prompt=n_prompt, content=content, run_ids=run_ids,
                    clock=self.clock, on_end=self._end_session, markup=markup,
                    shadow=shadow_set(list(shadow), self.detectors, where="shadow="))
        self._live.add(s)
        for row in s.rows:
            self._book.open(row, self.detectors)
        return s

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 64, chat: bool = True, top_features: int = 0,
                 raise_on_block: bool = True, interventions: Sequence[Intervention] = (), streamer: Any = None,
                 run_id: str | None = None, shadow: Sequence[str] = (), **generate_kwargs: Any) -> GenerationResult:
        """Generate for one prompt (a string, or chat messages), monitored.

        ``top_features``: strongest SAE features kept per token for ``result.readings()``;
        ``interventions``: feature edits for this call (on top of the monitor's own);
        ``raise_on_block``: raise :class:`~featurewatch.errors.GenerationBlocked` when a
        ``block`` detector stops the generation (else return the partial result);
        ``run_id``: the run's id (e.g. a trace id to join on), random by default.
        ``shadow``: detectors whose ``block`` only marks its alert ``would_block`` in this call.
        ``generate_kwargs`` go to ``model.generate`` (greedy by default).
        """
        return generate_batch(self, [prompt], max_new_tokens=max_new_tokens, chat=chat, top_features=top_features,
                              raise_on_block=raise_on_block, interventions=interventions, streamer=streamer,
                              run_ids=None if run_id is None else [run_id], shadow=shadow, **generate_kwargs)[0]

    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, chat: bool = True,
                       top_features: int = 0, raise_on_block: bool = True,
                       interventions: Sequence[Intervention] = (), shadow: Sequence[str] = (),
                       **generate_kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once (left padding, KV cache), monitored; see :meth:`generate`."""
        return generate_batch(self, prompts, max_new_tokens=max_new_tokens, chat=chat, top_features=top_features,
                              raise_on_block=raise_on_block, interventions=interventions, shadow=shadow,
                              **generate_kwargs)

    def score_records(self, records: Iterable[Record], *, batch_size: int = 8, max_tokens: int = 512,
                      on_batch: Callable[[int], Any] | None = None) -> Iterator[tuple[Record, RunResult]]:
        """Score records in order; the forward pass stops after the deepest watched layer."""
        return score_records(self, records, batch_size=batch_size, max_tokens=max_tokens, on_batch=on_batch)

    # ------------------------------------------------------------------ hot path
    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        session = _current.get()
        if session is None or session.owner is not self:
            return
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            first = session.positions.n_seen == 0
            session.record_step(session.positions.step(ids, kwargs.get("attention_mask"), length))
            if first:
                self._report_markup(session, ids, kwargs.get("attention_mask"))
        except Exception as exc:  # noqa: BLE001 — fail-open policy, see module docstring
            self._fault(session, "pre_hook", exc)

    def _report_markup(self, session: Session, ids: Tensor | None, mask: Tensor | None) -> None:
        """After a session's first forward pass: a ``markup-injection`` alert for each run whose prompt has
        chat markup typed into its content (spans the caller gave, or read from ids someone else built)."""
        spans = session.markup
        if spans is None:
            if session.positions.content is not None or ids is None or self.tokenizer is None:
                return  # featurewatch rendered the prompt: typed markup is text there
            if self._chat is None:
                self._chat = ChatMarkup(self.tokenizer)
            rows = ids.detach().cpu().tolist()
            keep = mask.detach().cpu().bool().tolist() if mask is not None else [[True] * len(r) for r in rows]
            spans = []
            for row, real in zip(rows, keep):
                where = [p for p, ok in enumerate(real) if ok]
                found = self._chat.read([row[p] for p in where]).injected if where else []
                spans.append([(where[a], where[b - 1] + 1) for a, b in found])
        for run, found in zip(session.rows, spans):
            if found:
                self._book.flag_markup(run, found)

    def _make_hook(self, readout: Readout) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            session = _current.get()
            if session is None or session.owner is not self or session.positions.last is None:
                return None
            t0 = time.perf_counter()
            result = None
            try:
                hidden = unwrap(output)
                with torch.no_grad():
                    delta = self._read(readout, session, hidden)
                if delta is not None:  # added outside no_grad: gradients still flow through the residual
                    n = session.positions.n_new
                    pad = torch.zeros_like(hidden)
                    pad[:, -n:, :] = delta.view(hidden.shape[0], n, -1).to(hidden.dtype)
                    result = rewrap(output, hidden + pad)
            except MonitorError:
                raise
            except Exception as exc:  # noqa: BLE001 — fail-open policy
                self._fault(session, "hook", exc)
            session.step_seconds += time.perf_counter() - t0
            if readout.deepest:
                if not self._fanout.emit("on_forward", model_name=self.model_name, seconds=session.step_seconds,
                                         tokens=len(session.positions.last)):
                    session.mark_degraded()
                if session.stop_after_deepest:
                    raise _StopForward
            return result

        return hook

    def _read(self, readout: Readout, session: Session, hidden: Tensor) -> Tensor | None:
        """Read one hookpoint for the step's new tokens; return the residual change of interventions."""
        tokens = session.positions.last
        assert tokens is not None
        n = session.positions.n_new
        x = hidden[:, -n:, :].reshape(-1, hidden.shape[-1]).float()  # (batch · n_new, d), rows as in tokens
        feats = readout.features(x)
        scores = readout.scores(x, feats).cpu() if readout.detectors else None
        feats_cpu = feats.cpu()
        session.keep(readout.hookpoint, tokens, feats_cpu, x if session.top_features else None, scores)
        for firing in observe(readout, session.rows, tokens, feats_cpu, scores, session.totals.get(readout.hookpoint)):
            self._book.fire(session.rows[firing.row], firing, blocking=session.blocking, shadow=session.shadow)
        delta = None
        for steering in (self._steering.get(readout.hookpoint), session.steering.get(readout.hookpoint)):
            d = steering.delta(x, tokens, session.rows) if steering is not None else None
            if d is not None:
                delta = d if delta is None else delta + d
        return delta

    def _end_session(self, session: Session) -> list[RunResult]:
        self._live.discard(session)
        return [self._book.close(row, self.readouts, session.outcome(r)) for r, row in enumerate(session.rows)]

    def _fault(self, session: Session | None, stage: str, exc: BaseException) -> None:
        if session is not None:
            session.mark_degraded()
        self._fanout.fault(stage, exc, stage=stage)
