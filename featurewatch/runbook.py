"""The run book: how every engine opens a run, turns a firing into an alert, and closes the run.

The transformers :class:`~featurewatch.monitor.Monitor` (and the LangChain surfaces, which run
through it) and vLLM's :class:`~featurewatch.integrations.vllm.engine.EngineMonitor` drive
different loops, but each of their runs goes through these steps, written here once:

* :meth:`RunBook.open` — a pool per (detector, phase), ``on_run_start``;
* :meth:`RunBook.flag_markup` — a ``markup-injection`` alert for chat markup typed into a prompt's
  content that reached the model as markup (:mod:`~featurewatch.markup`);
* :meth:`RunBook.fire` — the alert with its evidence (:func:`~featurewatch.detection.record_alert`),
  a ``block`` stopping the run — or, in shadow mode, going on with the alert marked
  ``would_block`` — delivery to callbacks and sinks;
* :meth:`RunBook.close` — the end-of-run verdicts (:func:`~featurewatch.detection.final_firings`,
  only for a run that completed), its :class:`~featurewatch.alert.RunResult`
  (:meth:`~featurewatch.state.RunState.result`), ``on_run_end``.

A sink or callback fault marks the run degraded (fail-open), so the result its caller gets says so.
What differs by engine stays with the engine: how a blocked run is stopped (a stopping criterion,
vLLM's scheduler), and where results are kept.

**Shadow mode** (rolling blocking out): a ``block`` detector in shadow fires as before, but its run
goes on and its alert says ``would_block=True`` (what enforcing would have done). A detector is in
shadow when the engine's switch names it (:func:`shadow_set`: a pack's ``shadow``, ``Monitor(shadow=...)``,
``FEATUREWATCH_SHADOW``), when the call names it, or when the whole call does not block (a
LangChain handler in ``shadow`` mode).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from .alert import MARKUP_INJECTION, PROMPT, Alert, Outcome, RunResult
from .detection import Firing, LabelLookup, final_firings, new_pools, record_alert
from .detector import DetectorSpec
from .errors import ConfigError
from .readout import Readout
from .sinks import Fanout
from .state import RunState

ShadowSwitch = bool | Sequence[str] | None
"""Which ``block`` detectors run in shadow mode: True (all), a list of names, False/None/empty (none)."""


def shadow_set(switch: ShadowSwitch, detectors: Sequence[DetectorSpec], *, where: str = "shadow") -> frozenset[str]:
    """The names of the detectors whose ``block`` runs in shadow mode (``where`` names the switch in errors)."""
    if switch is None or switch is False:
        return frozenset()
    names = {d.name for d in detectors}
    if switch is True:
        return frozenset(d.name for d in detectors if d.action == "block")
    if isinstance(switch, str):
        switch = [n.strip() for n in switch.split(",") if n.strip()]
    unknown = sorted(set(switch) - names)
    if unknown:
        raise ConfigError(f"{where} names detectors that are not monitored ({', '.join(unknown)}); "
                          f"detectors: {', '.join(sorted(names)) or 'none'}")
    return frozenset(switch)


def pack_shadow(pack: Any, detectors: Sequence[DetectorSpec]) -> frozenset[str]:
    """The pack's own ``shadow`` (its manifest's), for the detectors a monitor runs (None: no pack)."""
    switch = pack.manifest.shadow if pack is not None else False
    if isinstance(switch, list):
        switch = [n for n in switch if n in {d.name for d in detectors}]  # the pack checked the names
    return shadow_set(switch, detectors)


class RunBook:
    """One engine's runs: opened, fired on and closed the same way as every other engine's."""

    def __init__(self, fanout: Fanout, *, model_name: str, clock: Callable[[], float], tokenizer: Any = None,
                 labels: LabelLookup | None = None, shadow: Collection[str] = frozenset()) -> None:
        self.fanout = fanout
        self.shadow = frozenset(shadow)
        """Detectors whose ``block`` runs in shadow mode on every call (:func:`shadow_set`)."""
        self.model_name = model_name
        self.clock = clock
        self.tokenizer = tokenizer
        """Decodes an alert's span to text; None when the operator does not capture text."""
        self.labels = labels

    def open(self, run: RunState, detectors: Sequence[DetectorSpec]) -> None:
        """Give a new run its pools and announce it to the sinks."""
        new_pools(run, detectors)
        if not self.fanout.emit("on_run_start", run_id=run.run_id, model_name=self.model_name):
            run.degraded = True

    def fire(self, run: RunState, firing: Firing, *, blocking: bool = True,
             shadow: Collection[str] = frozenset()) -> Alert:
        """Record a firing's alert in its run, block the run (``block``, not at the end, when
        ``blocking`` and the detector is not in shadow: the engine's or the call's ``shadow``), or
        mark the alert ``would_block``; and deliver the alert."""
        name = firing.spec.name
        blocks = firing.spec.action == "block" and not firing.final  # an end-of-run verdict stops nothing
        shadowed = blocks and (not blocking or name in self.shadow or name in shadow)
        alert = record_alert(firing, run, model_name=self.model_name, fired_at=self.clock(),
                             tokenizer=self.tokenizer, labels=self.labels, would_block=shadowed)
        if blocks and not shadowed:
            run.blocked = True
        if not self.fanout.alert(alert):
            run.degraded = True
        return alert

    def flag_markup(self, run: RunState, spans: Sequence[tuple[int, int]]) -> Alert:
        """Report chat markup typed into a run's prompt content that reached the model as markup: one
        ``markup-injection`` alert (severity ``warning``, action ``alert``) whose span covers every
        typed marker found (``score``: how many spans), delivered as any alert is."""
        start, end = min(a for a, _ in spans), max(b for _, b in spans)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in run.token_ids[start:end] if t >= 0])
        alert = Alert(detector=MARKUP_INJECTION, phase=PROMPT, score=float(len(spans)), threshold=1.0,
                      action="alert", severity="warning", run_id=run.run_id, model_name=self.model_name,
                      span=(start, end), text=text, started_at=run.started_at, fired_at=self.clock())
        run.alerts.append(alert)
        if not self.fanout.alert(alert):
            run.degraded = True
        return alert

    def close(self, run: RunState, readouts: Sequence[Readout], outcome: Outcome) -> RunResult:
        """End a run: its end-of-run verdicts if it completed, its result, ``on_run_end``."""
        if outcome == "completed":
            for firing in final_firings(readouts, [run]):
                self.fire(run, firing)  # final: never blocks, never would have
        result = run.result(model_name=self.model_name, outcome=outcome, ended_at=self.clock())
        if not self.fanout.emit("on_run_end", result):
            result.degraded = run.degraded = True  # the result the caller gets says so, as the fault's log line does
        return result
