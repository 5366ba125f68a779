"""The run book every engine shares: open a run, fire its alerts, close it with its verdicts and result."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from conftest import tiny_spec
from featurewatch.alert import Alert, RunResult
from featurewatch.detection import Firing
from featurewatch.runbook import RunBook
from featurewatch.sinks import BaseSink, Fanout
from featurewatch.state import RunState


class Book(BaseSink):
    def __init__(self, fail_at: str = "") -> None:
        self.events: list[tuple[str, Any]] = []
        self.fail_at = fail_at

    def _note(self, name: str, value: Any) -> None:
        self.events.append((name, value))
        if name == self.fail_at:
            raise OSError("disk full")

    def on_run_start(self, *, run_id: str, model_name: str) -> None:
        self._note("start", run_id)

    def on_alert(self, alert: Alert) -> None:
        self._note("alert", alert.detector)

    def on_run_end(self, result: RunResult) -> None:
        self._note("end", result.outcome)


SPECS = [tiny_spec(name="watch", threshold=1.0), tiny_spec(name="stop", threshold=1.0, action="block")]
READOUT = SimpleNamespace(hookpoint="layers.1", feature_ids=[3, 5], detectors=SPECS)


def _book(sink: Book) -> tuple[RunBook, RunState]:
    book = RunBook(Fanout([sink], [], fail_closed=False), model_name="tiny", clock=lambda: 7.0)
    run = RunState("r1", 1.0)
    book.open(run, SPECS)
    return book, run


def _firing(run: RunState, name: str, *, final: bool = False) -> Firing:
    spec = next(s for s in SPECS if s.name == name)
    pool = run.pools[(name, "prompt")]
    pool.extend([2.0], [3])
    return Firing(0, READOUT, spec, "prompt", pool, 3, final=final)  # type: ignore[arg-type]


@pytest.mark.parametrize(("blocking", "final", "blocked"), [(True, False, True), (False, False, False),
                                                            (True, True, False)])
def test_a_block_firing_blocks_the_run_unless_shadowed_or_at_the_end(blocking: bool, final: bool,
                                                                      blocked: bool) -> None:
    sink = Book()
    book, run = _book(sink)
    alert = book.fire(run, _firing(run, "stop", final=final), blocking=blocking)
    assert run.blocked is blocked and run.alerts == [alert]
    assert sink.events == [("start", "r1"), ("alert", "stop")]


def test_closing_a_completed_run_gives_its_end_of_run_verdicts_before_its_result() -> None:
    sink = Book()
    book, run = _book(sink)
    for pool in (run.pools[("watch", "prompt")], run.combined["watch"]):  # as detection.observe pools
        pool.extend([2.0, 2.0], [1, 2])  # over the threshold, never judged
    result = book.close(run, [READOUT], run.outcome())  # type: ignore[list-item]
    assert sink.events == [("start", "r1"), ("alert", "watch"), ("end", "completed")]
    assert (result.outcome, result.scores, result.ended_at, [a.detector for a in result.alerts]) == (
        "completed", {"watch": 2.0}, 7.0, ["watch"])
    assert result.phase_scores == {"prompt": {"watch": 2.0}}


@pytest.mark.parametrize(("kw", "outcome"), [({"aborted": True}, "aborted"), ({"error": True}, "error")])
def test_a_run_that_did_not_complete_gets_no_verdicts(kw: dict[str, bool], outcome: str) -> None:
    sink = Book()
    book, run = _book(sink)
    run.pools[("watch", "prompt")].extend([2.0], [1])
    assert book.close(run, [READOUT], run.outcome(**kw)).outcome == outcome  # type: ignore[list-item]
    assert sink.events == [("start", "r1"), ("end", outcome)]


@pytest.mark.parametrize("fail_at", ["start", "alert", "end"])
def test_a_sink_fault_anywhere_marks_the_result_degraded(fail_at: str) -> None:
    book, run = _book(Book(fail_at=fail_at))
    book.fire(run, _firing(run, "watch"))
    assert book.close(run, [READOUT], run.outcome()).degraded  # type: ignore[list-item]
