"""FeatureWatchCallbackHandler: monitor the local model an app already runs through LangChain.

Why it is built this way:

* A callback cannot reach the model's forward pass: ``HuggingFacePipeline``
  streams by running ``model.generate`` in a thread of its own (so a context
  variable set in a callback never reaches the hooks), and async calls run it
  in an executor thread. So while LangChain runs are pending, the monitored
  model's ``generate`` is wrapped (on the instance, removed when the last run
  ends): the wrapper opens the monitor session in whichever thread generates,
  and adds a stopping criterion that ends the compute right after the forward
  pass where a ``block`` alert fired.
* Each ``generate`` call is bound to its LangChain run by its prompt: at
  ``on_chat_model_start``/``on_llm_start`` the handler renders the prompt with
  the monitor's tokenizer, as the pipeline will (chat markup typed into a message
  becomes marker tokens there, so it is reported as a ``markup-injection`` alert,
  and the message's other text read as content); the wrapper claims, per batch
  row, the oldest pending run whose tokens it is given. Concurrent calls thus
  stay isolated whatever thread they generate in; two identical prompts in
  flight at once may swap run ids (their tokens, and so their alerts, are the
  same). A ``generate`` that matches no run passes through unmonitored.
* Enforce mode raises :class:`~featurewatch.GenerationBlocked` where the
  caller will see it: from the wrapper when ``generate`` runs in the caller's
  call chain (invoke, ainvoke), else (streaming) from the next token callback
  in the consumer's thread, after the generating thread has stopped.
* A batch (``batch``/``abatch`` of a ``BaseLLM``, ``generate`` with several
  prompts) is one LangChain call whose prompts run in one ``_generate``: an
  exception there would fail every input, the finished ones too, and stop the
  rest. So each input gets its own outcome: a blocked prompt's row stops within
  one decode step and its text comes back empty (nothing of a blocked
  generation is handed over; ``generation_info["featurewatch"]`` and
  :meth:`FeatureWatchCallbackHandler.result` say ``blocked`` and why), the other
  prompts run to their end. Nothing is raised for a batch input.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage

from ...alert import Alert, RunResult
from ...errors import ConfigError, GenerationBlocked
from ...generation import GenerationResult, StopBlocked, blocked_error, count_generated, generation_results
from ...records import Rendered, render_chat, render_text
from ...session import Session, current_session
from .common import PerMonitor, router_for, to_chat

if TYPE_CHECKING:
    from ...monitor import Monitor

logger = logging.getLogger(__name__)
MODES = ("shadow", "enforce")
_CLAIMED: Any = object()  # a run's session while its generate() call is opening one


@dataclass(eq=False)
class _Run:
    """A LangChain run waiting for (or in) its ``generate`` call."""

    run_id: str
    rendered: Rendered | None
    enforce: bool
    session: Session | None = None
    row: int = 0
    results: list[GenerationResult] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    raised: bool = False
    batch: bool = False  # one of several prompts of one LangChain call: blocked without raising

    @property
    def blocked(self) -> bool:
        return isinstance(self.session, Session) and self.session.rows[self.row].blocked


def _claim(row: list[int], rendered: Rendered, special: set[int]) -> int | None:
    """How many special tokens the pipeline put before the rendered prompt, or None if it is another prompt."""
    n = len(rendered.ids)
    if n == 0 or len(row) < n or row[len(row) - n:] != list(rendered.ids):
        return None
    prefix = row[:len(row) - n]
    return len(prefix) if all(t in special for t in prefix) else None


class _Binder:
    """Wraps one model's ``generate`` while LangChain runs are pending, and binds each call to its runs."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.model: Any = monitor.model  # nn.Module's stub does not know generate()
        self.pending: list[_Run] = []
        self.lock = threading.Lock()
        self.original: Any = self.model.generate
        self._saved: Any = None
        self._installed = False

    def add(self, run: _Run) -> None:
        with self.lock:
            self.pending.append(run)
            if not self._installed:
                model = self.model
                self._saved = model.__dict__.get("generate")
                self.original = model.generate
                model.generate = self.generate  # on the instance; the class is untouched
                self._installed = True

    def remove(self, run: _Run) -> None:
        with self.lock:
            if run in self.pending:
                self.pending.remove(run)
            if self._installed and not self.pending:
                model = self.model
                if self._saved is None:
                    model.__dict__.pop("generate", None)
                else:
                    model.__dict__["generate"] = self._saved
                self._installed = False

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        from transformers import StoppingCriteriaList

        original = self.original
        ids = kwargs.get("input_ids", args[0] if args else None)
        if current_session() is not None or not torch.is_tensor(ids) or ids.dim() != 2:
            return original(*args, **kwargs)  # already monitored (Monitor.generate), or not a token batch
        mask = kwargs.get("attention_mask")
        keep = mask.bool().cpu() if torch.is_tensor(mask) else torch.ones_like(ids, dtype=torch.bool).cpu()
        rows = [ids[r].cpu()[keep[r]].tolist() for r in range(ids.shape[0])]
        special = set(getattr(self.monitor.tokenizer, "all_special_ids", []) or [])
        claims: list[tuple[_Run, int] | None] = []
        with self.lock:
            free = [(run, run.rendered) for run in self.pending if run.session is None and run.rendered is not None]
            for row in rows:
                hit = next(((run, p) for run, rendered in free if (p := _claim(row, rendered, special)) is not None),
                           None)
                if hit is not None:
                    free = [f for f in free if f[0] is not hit[0]]
                    hit[0].session = _CLAIMED  # taken: no other generate() may bind it
                claims.append(hit)
        if not any(claims):
            return original(*args, **kwargs)
        width = ids.shape[1]
        content, markup = [], []
        for r, hit in enumerate(claims):
            where = keep[r].nonzero().flatten().tolist()
            flags = [False] * width
            rendered = hit[0].rendered if hit else None
            marks = [False] * hit[1] + list(rendered.content) if hit and rendered else [True] * len(where)
            for pos, flag in zip(where, marks):
                flags[pos] = flag
            content.append(flags)
            # chat markup typed into the messages, which the pipeline tokenized as markup: reported
            spans = rendered.markup if hit and rendered else ()
            markup.append([(where[hit[1] + a], where[hit[1] + b - 1] + 1) for a, b in spans] if hit else [])
        run_ids = [hit[0].run_id if hit else uuid.uuid4().hex for hit in claims]
        enforce = any(hit[0].enforce for hit in claims if hit)
        session = self.monitor.session(len(rows), run_ids=run_ids, n_prompt=[width] * len(rows),
                                       content=content, blocking=enforce, markup=markup)
        for r, hit in enumerate(claims):
            if hit:
                hit[0].session, hit[0].row = session, r
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                            StopBlocked(session)])
        try:
            with session:
                out = original(*args, **kwargs)
                count_generated(session, out, width, self.monitor.tokenizer)
            sequences = out.sequences if hasattr(out, "sequences") else out
            results = generation_results(session, rows, sequences, width, self.monitor.tokenizer)
            for hit in claims:
                if hit:
                    hit[0].results = results
        finally:
            for hit in claims:
                if hit:
                    hit[0].done.set()
        blocked = [hit[0] for hit in claims if hit and hit[0].enforce and hit[0].blocked and not hit[0].batch]
        if blocked and kwargs.get("streamer") is None:
            blocked[0].raised = True
            raise _blocked_error(blocked[0])
        return out


def _withhold(response: Any, run: _Run) -> None:
    """Empty a blocked batch input's generation (the same objects the batch returns), saying why."""
    assert isinstance(run.session, Session)
    alert = next(a for a in run.session.rows[run.row].alerts if a.action == "block" and not a.would_block)
    note = {"run_id": run.run_id, "outcome": "blocked", "detector": alert.detector, "phase": alert.phase}
    for generations in getattr(response, "generations", []):
        for gen in generations:
            message = getattr(gen, "message", None)
            if message is not None:
                message.content = ""
            gen.text = ""
            gen.generation_info = {**(gen.generation_info or {}), "featurewatch": note}


def _blocked_error(run: _Run) -> GenerationBlocked:
    """The error of a blocked run (its ``generate`` call's results, or the run alone if it has none yet)."""
    assert isinstance(run.session, Session)
    if run.results:
        return blocked_error(run.results[run.row], run.results)
    alone = GenerationResult(run=run.session.result(run.row), prompt="", text="", token_ids=[], session=run.session,
                             row=run.row)
    return blocked_error(alone, [alone])


class FeatureWatchCallbackHandler(BaseCallbackHandler):
    """Monitors the LangChain calls it is a callback of, when they run the monitor's model.

    Example::

        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        from featurewatch.integrations.langchain import FeatureWatchCallbackHandler

        monitor = Monitor(model, tokenizer, pack="smollm2-135m-instruct")
        chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=tokenizer)
        handler = FeatureWatchCallbackHandler(monitor, mode="enforce")
        chat.invoke("...", config={"callbacks": [handler]})   # may raise GenerationBlocked
        handler.alerts, handler.result(run_id)

    ``mode="shadow"`` (default) observes only: a ``block`` alert is reported and the
    generation goes on. ``mode="enforce"``: a ``block`` alert stops the compute within
    one decode step and the call raises :class:`~featurewatch.GenerationBlocked`.
    ``handler.context`` gives a run's LangChain tags and metadata (for
    ``JsonAlertLog(context=handler.context)``).
    """

    run_inline = True  # bind the run before the model starts, in the caller's thread or task

    def __init__(self, monitor: Monitor, *, mode: str = "shadow", keep_runs: int = 1000) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}; valid modes: {', '.join(MODES)}")
        if monitor.tokenizer is None:
            raise ConfigError("the handler renders prompts with the monitor's tokenizer; pass it to Monitor(...)")
        self.monitor = monitor
        self.mode = mode
        self.raise_error = mode == "enforce"  # LangChain re-raises our GenerationBlocked only then
        self.keep_runs = keep_runs
        self.alerts: list[Alert] = []
        """Every alert of this handler's runs, in the order they fired."""
        self._runs: dict[str, _Run] = {}
        self._results: OrderedDict[str, RunResult] = OrderedDict()
        self._contexts: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._binder = _binder_for(monitor)
        self._router = router_for(monitor)

    # ------------------------------------------------------------------ lookups
    def result(self, run_id: str | UUID) -> RunResult | None:
        """The monitored run of a LangChain run (None if it is unknown or did not run the model)."""
        key = str(run_id)
        with self._lock:
            if key in self._results:
                return self._results[key]
            run = self._runs.get(key)
        return run.session.result(run.row) if run is not None and isinstance(run.session, Session) else None

    def context(self, run_id: str) -> dict[str, Any] | None:
        """The LangChain tags, metadata and parent run of a run, for the alert log."""
        with self._lock:
            return self._contexts.get(str(run_id))

    # ------------------------------------------------------------------ LangChain callbacks
    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            rendered = render_chat(to_chat(messages[0]), self.monitor.tokenizer, typed_markup="markup")
        except Exception as exc:  # noqa: BLE001 — an unrenderable prompt is not monitored, the call goes on
            logger.warning("featurewatch cannot render run %s's messages, so it is not monitored: %s", run_id, exc)
            rendered = None
        self._start(run_id, rendered, parent_run_id, tags, metadata, batch=int(kwargs.get("batch_size") or 1) > 1)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        rendered = (render_text(prompts[0], self.monitor.tokenizer, typed_markup="markup")
                    if prompts and prompts[0].strip() else None)
        self._start(run_id, rendered, parent_run_id, tags, metadata, batch=int(kwargs.get("batch_size") or 1) > 1)

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.mode == "enforce":
            self._raise_if_blocked(str(run_id))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            if self.mode == "enforce":
                run = self._runs.get(str(run_id))
                if run is not None and run.batch:
                    if run.blocked:
                        _withhold(response, run)  # its own outcome; the batch's other inputs go on
                else:
                    self._raise_if_blocked(str(run_id))
        finally:
            self._end(str(run_id))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(str(run_id))

    # ------------------------------------------------------------------ internals
    def _start(self, run_id: UUID, rendered: Rendered | None, parent_run_id: UUID | None,
               tags: Sequence[str] | None, metadata: dict[str, Any] | None, *, batch: bool = False) -> None:
        key = str(run_id)
        run = _Run(run_id=key, rendered=rendered, enforce=self.mode == "enforce", batch=batch)
        with self._lock:
            self._runs[key] = run
            self._remember(self._contexts, key, {"langchain": {
                "tags": list(tags or []), "metadata": dict(metadata or {}),
                "parent_run_id": str(parent_run_id) if parent_run_id else None}})
        self._router.listen(key, self._on_alert)
        self._binder.add(run)

    def _on_alert(self, alert: Alert) -> None:
        with self._lock:
            self.alerts.append(alert)

    def _raise_if_blocked(self, key: str) -> None:
        run = self._runs.get(key)
        if run is None or run.raised or not run.blocked:
            return
        run.done.wait(timeout=60)  # the stopping criterion ends generate() within one decode step
        run.raised = True
        raise _blocked_error(run)

    def _end(self, key: str) -> None:
        with self._lock:
            run = self._runs.pop(key, None)
        self._router.forget(key)
        if run is None:
            return
        self._binder.remove(run)
        if isinstance(run.session, Session):
            with self._lock:
                self._remember(self._results, key, run.session.result(run.row))

    def _remember(self, store: OrderedDict[str, Any], key: str, value: Any) -> None:
        store[key] = value
        while len(store) > self.keep_runs:
            store.popitem(last=False)


_binder_for = PerMonitor(_Binder)
"""One binder per monitor (so one wrapper per model), shared by all its handlers."""
