"""The vLLM engine monitor without vLLM: a tiny Llama's layer output fed as vLLM's runner would feed it.

What a client sends (``extra_args``, request ids) must never stop the engine or switch monitoring
off against the operator; aborted requests, sink faults and evidence are recorded as the
transformers monitor records them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import TinyTokenizer, make_pack
from featurewatch.alert import Alert, RunResult
from featurewatch.integrations.vllm.engine import EngineMonitor
from featurewatch.integrations.vllm.options import RUN_ID_MAX, RequestPolicy
from featurewatch.pack import load_pack
from featurewatch.sinks import BaseSink

PROMPT = [2, 5, 6, 7, 8, 9]


def _pack(root: Path) -> Any:
    alert = {"name": "demo", "description": "alerts", "kind": "sae", "hookpoint": "layers.1",
             "features": [{"id": 1, "weight": 1.0, "label": "one"}, {"id": 2, "weight": -0.5}],
             "threshold": 0.0, "phases": ["prompt", "completion"], "pooling": {"method": "mean", "min_tokens": 1}}
    block = {**alert, "name": "demo-block", "action": "block", "severity": "critical"}
    return load_pack(make_pack(root, d_in=16, d_sae=8, hookpoint="layers.1", detectors=[alert, block]))


class Events(BaseSink):
    def __init__(self, fail_on_run_end: bool = False) -> None:
        self.alerts: list[Alert] = []
        self.results: list[RunResult] = []
        self.fail_on_run_end = fail_on_run_end

    def on_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def on_run_end(self, result: RunResult) -> None:
        self.results.append(result)
        if self.fail_on_run_end:
            raise OSError("disk full")


@pytest.fixture
def make_engine(tmp_path: Path, tiny_llama: Any) -> Any:
    pack = _pack(tmp_path / "pack")

    def build(**kw: Any) -> tuple[EngineMonitor, Events]:
        events = kw.pop("events", None) or Events()
        return EngineMonitor(tiny_llama, TinyTokenizer(), pack=pack, sinks=[events], **kw), events

    return build


def _firing_rows(engine: EngineMonitor, n: int) -> torch.Tensor:
    """Residuals on which feature 1 is strongly on (so ``demo`` fires with feature 1 as evidence)."""
    sae = engine.readouts[0].sae
    assert sae is not None
    direction = sae.W_enc[:, 1] / sae.W_enc[:, 1].norm()
    return (sae.b_dec + 20 * direction).expand(n, -1).clone()


def _prefill(engine: EngineMonitor, rid: str, extra: Any = None, hidden: torch.Tensor | None = None) -> None:
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), prompt_token_ids=PROMPT)
    n = len(PROMPT)
    engine.begin_step([rid], [0, n], torch.arange(n), torch.tensor(PROMPT), {rid: request})
    engine.on_layer(1, _firing_rows(engine, n) if hidden is None else hidden, None)
    engine.end_step()


# ---------------------------------------------------------------- per-request options (§1: server safety)
@pytest.mark.parametrize("extra", [
    {"featurewatch_detectors": 5}, {"featurewatch_detectors": 1.5}, {"featurewatch_detectors": [1, 2]},
    {"featurewatch_off": "maybe"}, {"featurewatch_off": 2}, {"featurewatch_detectors": "no-such-detector"},
])
def test_a_malformed_request_option_never_reaches_the_step_and_the_request_runs_monitored(
        make_engine: Any, extra: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    engine, events = make_engine(request_policy=RequestPolicy(allow=True))
    _prefill(engine, "r1", extra)  # used to raise TypeError inside begin_step and kill vLLM's engine core
    assert engine.blocked == {"r1": "featurewatch: blocked by demo-block"}
    assert {a.detector for a in events.alerts} == {"demo", "demo-block"}
    assert engine.request_options == {"invalid": 1}
    assert "invalid request option" in caplog.text and "runs with every detector" in caplog.text


@pytest.mark.parametrize("extra", [
    {"featurewatch_off": True}, {"featurewatch_off": "false"}, {"featurewatch_detectors": "demo"},
    {"featurewatch_detectors": "none"}, {"featurewatch_detectors": ""}, {"featurewatch_detectors": []},
])
def test_request_options_are_refused_unless_the_operator_allows_them(
        make_engine: Any, extra: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    engine, events = make_engine()  # the server's default
    _prefill(engine, "r1", extra)
    assert "r1" in engine.blocked  # the block detector still stops the request
    assert engine.request_options == {"refused": 1}
    assert "refused" in caplog.text and "FEATUREWATCH_ALLOW_REQUEST_OPTIONS" in caplog.text


@pytest.mark.parametrize("extra", [{"featurewatch_off": True}, {"featurewatch_detectors": "demo"},
                                   {"featurewatch_detectors": ""}])
def test_an_allowed_request_still_cannot_drop_a_block_detector(make_engine: Any, extra: dict[str, Any],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    engine, events = make_engine(request_policy=RequestPolicy(allow=True))  # optional: the non-block ones
    _prefill(engine, "r1", extra)
    assert "r1" in engine.blocked
    assert "demo-block" in {a.detector for a in events.alerts}
    assert engine.request_options == {"narrowed": 1}
    assert "may not leave out demo-block" in caplog.text


def test_strings_that_mean_false_keep_monitoring_on(make_engine: Any) -> None:
    engine, events = make_engine(request_policy=RequestPolicy(allow=True, optional=("demo", "demo-block")))
    for i, value in enumerate(["false", "0", "no", False, 0]):
        _prefill(engine, f"r{i}", {"featurewatch_off": value})
        assert f"r{i}" in engine.runs, value
    _prefill(engine, "off", {"featurewatch_off": "true"})
    assert "off" not in engine.runs and "off" in engine.unmonitored
    assert engine.request_options == {"accepted": 6}


def test_an_operator_listed_detector_may_be_dropped(make_engine: Any) -> None:
    engine, events = make_engine(request_policy=RequestPolicy(allow=True, optional=("demo", "demo-block")))
    _prefill(engine, "r1", {"featurewatch_detectors": ["demo"]})
    assert {a.detector for a in events.alerts} == {"demo"} and not engine.blocked


# ---------------------------------------------------------------- request ids
def test_a_client_request_id_is_bounded_and_safe_in_run_id(make_engine: Any) -> None:
    engine, events = make_engine(external_id=lambda rid: rid)
    hostile = "x" * 10_000 + '"\n{"detector": "forged"}'
    _prefill(engine, hostile)
    engine.finish([hostile])
    run_id = events.results[0].run_id
    assert len(run_id) <= RUN_ID_MAX
    assert all(c.isalnum() or c in "._:@~-" for c in run_id)
    assert {a.run_id for a in events.alerts} == {run_id}
    _prefill(engine, "chatcmpl-abc_1")
    engine.finish(["chatcmpl-abc_1"])
    assert events.results[1].run_id == "chatcmpl-abc_1"  # an ordinary id is kept as it is


# ---------------------------------------------------------------- run ends
def _quiet_rows(engine: EngineMonitor, n: int) -> torch.Tensor:
    """Residuals on which feature 2 (weight −0.5) is on and feature 1 off: ``demo`` scores below 0."""
    sae = engine.readouts[0].sae
    assert sae is not None
    up, down = sae.W_enc[:, 2] / sae.W_enc[:, 2].norm(), sae.W_enc[:, 1] / sae.W_enc[:, 1].norm()
    return (sae.b_dec + 20 * up - 20 * down).expand(n, -1).clone()


def test_an_aborted_request_is_recorded_aborted_without_final_verdicts(make_engine: Any) -> None:
    engine, events = make_engine(detectors=["demo"])
    for rid in ("done", "gone"):
        _prefill(engine, rid, hidden=_quiet_rows(engine, len(PROMPT)))
        # a pool over its threshold that has not been judged yet (as after a cooldown): the end-of-run
        # verdict would fire on it
        engine.runs[rid].state.pools[("demo", "prompt")].extend([1e3], [len(PROMPT)])
    assert not events.alerts
    engine.finish(["done", "gone"], aborted={"gone"})
    outcomes = {r.run_id: r.outcome for r in events.results}
    assert outcomes == {"done": "completed", "gone": "aborted"}  # was "completed" for both
    assert [(a.run_id, a.detector) for a in events.alerts] == [("done", "demo")]  # none for the aborted run


def test_a_sink_fault_at_run_end_marks_the_result_degraded(make_engine: Any) -> None:
    engine, events = make_engine(events=Events(fail_on_run_end=True))
    _prefill(engine, "r1")
    engine.finish(["r1"])
    assert engine.results["r1"].degraded  # the log line says "marked degraded": the result says so too


def test_kept_events_reach_each_drain_in_order(make_engine: Any) -> None:
    engine, events = make_engine(detectors=["demo"], keep_events=True)
    for rid in ("r1", "r2"):  # a second request after a drain: its events reach the next drain
        _prefill(engine, rid)
        engine.finish([rid])
        kept = engine.drain()
        assert [(type(e).__name__, e.run_id) for e in kept] == [("Alert", rid), ("RunResult", rid)]
        assert kept == [*(a for a in events.alerts if a.run_id == rid), engine.results[rid]]
    assert engine.drain() == []


# ---------------------------------------------------------------- evidence
def test_sae_alerts_carry_evidence_as_the_transformers_monitor_computes_it(make_engine: Any) -> None:
    engine, events = make_engine()
    _prefill(engine, "r1")
    alert = next(a for a in events.alerts if a.detector == "demo")
    assert [e.feature for e in alert.evidence] == [1]  # feature 1 carried the score (was always [])
    ev = alert.evidence[0]
    assert ev.label == "one" and ev.activation > 0 and ev.contribution == pytest.approx(ev.activation)


def test_a_recomputed_request_beside_a_decoding_one_keeps_both_runs_sound(make_engine: Any) -> None:
    engine, events = make_engine(detectors=["demo"])
    n = len(PROMPT)
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=PROMPT)
                for rid in ("a", "b")}
    engine.begin_step(["a", "b"], [0, n, 2 * n], torch.cat([torch.arange(n)] * 2), torch.tensor(PROMPT * 2),
                      requests)
    engine.on_layer(1, _firing_rows(engine, 2 * n), None)
    engine.end_step()
    # a decodes its first token; b was preempted and is recomputed from position 0 (nothing new to read)
    engine.begin_step(["a", "b"], [0, 1, 1 + n], torch.cat([torch.tensor([n]), torch.arange(n)]),
                      torch.tensor([40, *PROMPT]), requests)
    engine.on_layer(1, _firing_rows(engine, 1 + n), None)
    engine.end_step()
    a, b = engine.runs["a"].state, engine.runs["b"].state
    assert not a.degraded and not b.degraded  # the step's sums were sized for the runs it read
    assert int(a.feature_counts[("layers.1", "completion")]) == 1 and len(a.token_ids) == n + 1
    assert int(b.feature_counts[("layers.1", "completion")]) == 0 and len(b.token_ids) == n
