"""Hook mechanics on a tiny in-process Llama: readings, positions, isolation, actions, faults."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from conftest import HP, build_sae, sae16, tiny_spec
from featurewatch.alert import Alert
from featurewatch.detector import DetectorSpec
from featurewatch.errors import (
    ConfigError,
    FeatureOutOfRange,
    FeatureWatchError,
    GenerationBlocked,
    HookpointNotFound,
    MonitorError,
    WidthMismatch,
)
from featurewatch.hooks import unwrap
from featurewatch.monitor import Monitor
from featurewatch.session import current_session
from featurewatch.sinks import BaseSink

WATCH = [0, 3, 5, 9]


def spec(**kw: Any) -> DetectorSpec:
    return tiny_spec(**{"name": "probe-like", **kw})


@pytest.fixture()
def monitor(tiny_monitor: Any) -> Any:
    m = tiny_monitor(detectors=[spec()], watch={HP: WATCH},
                     fail_closed=True)
    yield m
    m.detach()


def reference_features(model: Any, ids: torch.Tensor, mask: torch.Tensor, sae: Any) -> torch.Tensor:
    """Full forward with output_hidden_states: the reference for what the hook must read."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return sae.encode(out.hidden_states[2])[..., sorted(set(WATCH) | {3, 5})]


def test_generate_reads_every_new_position_once_with_the_kv_cache(monitor: Monitor, tiny_llama: Any) -> None:
    class Count(BaseSink):
        def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
            seen.append(tokens)

    seen: list[int] = []
    monitor.sinks.append(Count())
    result = monitor.generate("hello there", max_new_tokens=5, min_new_tokens=5)
    prompt_len = len("hellothere") + 1
    assert seen == [prompt_len, 1, 1, 1, 1]  # prefill, then one position per decode step
    readings = result.readings()
    # the last sampled token is never run through the model, so it has no reading
    assert [r.position for r in readings] == list(range(prompt_len + 4))
    assert [r.phase for r in readings] == ["prompt"] * prompt_len + ["completion"] * 4
    # the first position (attention sink) and special tokens are excluded, nothing else
    assert [r.excluded for r in readings] == [r.position == 0 or r.token_id in (0, 1) for r in readings]
    # values equal a reference forward over the full sequence
    full = torch.tensor([[r.token_id for r in readings]])
    ref = reference_features(tiny_llama, full, torch.ones_like(full), monitor.readouts[0].sae)[0]
    for r in readings:
        expected = {f: float(ref[r.position, i]) for i, f in enumerate(sorted(WATCH))}
        assert r.features.keys() <= set(WATCH)
        for f, v in expected.items():
            assert r.features.get(f, 0.0) == pytest.approx(v, abs=1e-4)


def test_cache_off_reads_only_the_new_tail(monitor: Monitor) -> None:
    cached = monitor.generate("abcabc", max_new_tokens=4, min_new_tokens=4)
    uncached = monitor.generate("abcabc", max_new_tokens=4, min_new_tokens=4, use_cache=False)
    a, b = cached.readings(), uncached.readings()
    assert [r.position for r in a] == [r.position for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.token_id == rb.token_id
        for f in WATCH:
            assert ra.features.get(f, 0.0) == pytest.approx(rb.features.get(f, 0.0), abs=1e-4)


def test_left_padded_batch_matches_single_rows_and_excludes_pads(monitor: Monitor) -> None:
    single = monitor.generate("hi", max_new_tokens=3, min_new_tokens=3)
    batch = monitor.generate_batch(["hi", "a much longer prompt"], max_new_tokens=3, min_new_tokens=3)
    short = batch[0].readings()
    pads = len("amuchlongerprompt") - len("hi")
    assert all(r.excluded for r in short[:pads])
    assert short[pads].excluded  # the first real token is an attention sink
    real = short[pads:]
    assert [r.token_id for r in real] == [r.token_id for r in single.readings()]
    for ra, rb in zip(real, single.readings(), strict=True):
        for f in WATCH:
            assert ra.features.get(f, 0.0) == pytest.approx(rb.features.get(f, 0.0), abs=1e-3)
    assert batch[0].run_id != batch[1].run_id


def test_concurrent_threads_never_see_each_others_readings(monitor: Monitor) -> None:
    prompts = ["alpha beta", "zzzz yyyy xxxx"]
    reference = {p: [r.token_id for r in monitor.generate(p, max_new_tokens=6).readings()] for p in prompts}
    results: dict[str, list[list[int]]] = {p: [] for p in prompts}
    barrier = threading.Barrier(2)

    def work(p: str) -> None:
        barrier.wait()
        for _ in range(3):
            results[p].append([r.token_id for r in monitor.generate(p, max_new_tokens=6).readings()])

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        assert results[p] == [reference[p]] * 3


def test_hooks_are_removed_on_exit_even_after_an_exception(tiny_llama: Any, tiny_monitor: Any) -> None:
    layer = tiny_llama.model.layers[1]
    before = (len(layer._forward_hooks), len(tiny_llama._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"), \
            tiny_monitor(watch={HP: [1]}):
        assert len(layer._forward_hooks) == before[0] + 1
        raise RuntimeError("boom")
    assert (len(layer._forward_hooks), len(tiny_llama._forward_pre_hooks)) == before


def test_session_is_cleared_after_an_error_inside_generate(monitor: Monitor) -> None:
    with pytest.raises(ValueError, match="not used by the model"):
        monitor.generate("abc", max_new_tokens=2, no_such_generate_argument=1)
    assert current_session() is None


def test_attaching_twice_never_double_hooks(monitor: Monitor, tiny_llama: Any, tiny_monitor: Any) -> None:
    layer = tiny_llama.model.layers[1]
    n = len(layer._forward_hooks)
    monitor.attach()
    assert len(layer._forward_hooks) == n
    with pytest.raises(ConfigError, match="already attached"):
        tiny_monitor(watch={HP: [1]})
    monitor.detach()
    monitor.detach()  # idempotent
    assert len(layer._forward_hooks) == n - 1


def test_bad_configuration_fails_at_attach_with_the_valid_choices(tiny_llama: Any, tiny_monitor: Any) -> None:
    hooks_before = len(tiny_llama.model.layers[1]._forward_hooks)
    with pytest.raises(HookpointNotFound, match=r"layers\.0 … layers\.2"):
        tiny_monitor(saes={"layers.7": sae16()})
    with pytest.raises(WidthMismatch, match="16"):
        tiny_monitor(saes={HP: build_sae(8, 12)})
    with pytest.raises(FeatureOutOfRange, match="0 … 11"):
        tiny_monitor(watch={HP: [12]})
    assert len(tiny_llama.model.layers[1]._forward_hooks) == hooks_before


def test_alerts_arrive_during_generation_not_after(tiny_monitor: Any) -> None:
    seen_at: list[int] = []

    def on_alert(alert: Alert) -> None:
        session = current_session()
        assert session is not None
        seen_at.append(session.positions.n_seen)

    with tiny_monitor(on_alert=on_alert, fail_closed=True,
                      detectors=[spec(threshold=-1000.0, phases=["completion"])]) as m:
        result = m.generate("abc", max_new_tokens=6, min_new_tokens=6)
    assert len(result.alerts) == 1 and seen_at
    assert seen_at[0] < len("abc") + 1 + 5  # fired before the last position was read
    alert = result.alerts[0]
    assert alert.phase == "completion" and alert.run_id == result.run_id
    assert alert.span[0] == len("abc") + 1  # the first completion position
    assert {e.feature for e in alert.evidence} <= {3, 5}


def test_block_stops_generation_and_is_not_a_featurewatch_error(tiny_monitor: Any) -> None:
    assert not issubclass(GenerationBlocked, FeatureWatchError)
    with tiny_monitor(fail_closed=True,
                      detectors=[spec(threshold=-1000.0, action="block", phases=["completion"])]) as m, \
            pytest.raises(GenerationBlocked) as info:
        m.generate("abc", max_new_tokens=20, min_new_tokens=0)
    result = info.value.result
    assert result.outcome == "blocked"
    assert len(result.token_ids) < 20
    assert info.value.alert.action == "block"


def test_generate_takes_the_run_id_and_keeps_the_callers_stopping_criteria(tiny_monitor: Any) -> None:
    calls: list[int] = []

    def stop_after_two(input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return torch.full((input_ids.shape[0],), len(calls) >= 2, dtype=torch.bool)

    with tiny_monitor(fail_closed=True,
                      detectors=[spec(threshold=-1000.0, phases=["prompt"])]) as m:
        result = m.generate("abc", max_new_tokens=10, min_new_tokens=0, run_id="trace-7",
                            stopping_criteria=[stop_after_two])
    assert result.run_id == "trace-7" and result.alerts[0].run_id == "trace-7"
    assert len(result.token_ids) == 2


def test_a_shadow_session_reports_a_block_without_blocking(tiny_llama: Any, tiny_tokenizer: Any,
                                                           tiny_monitor: Any) -> None:
    with tiny_monitor(fail_closed=True,
                      detectors=[spec(threshold=-1000.0, action="block", phases=["prompt", "completion"])]) as m:
        ids = torch.tensor([tiny_tokenizer.encode("abcd")])
        with m.session(blocking=False) as shadow:
            tiny_llama(ids)
        with m.session() as enforced:
            tiny_llama(ids)
    assert [a.action for a in shadow.result().alerts] == ["block"] and shadow.result().outcome == "completed"
    assert enforced.result().outcome == "blocked"


def test_suppress_ablates_the_features_from_the_next_position_keeping_the_error_term(tiny_llama: Any,
                                                                                     tiny_monitor: Any) -> None:
    sae = sae16()
    captured: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    layer = tiny_llama.model.layers[1]
    pre = layer.register_forward_hook(lambda m, a, o: raw.append(unwrap(o).clone()), prepend=True)
    try:
        with tiny_monitor(saes={HP: sae}, fail_closed=True,
                          detectors=[spec(threshold=-1000.0, action="suppress", phases=["prompt"])]) as m:
            post = layer.register_forward_hook(lambda m, a, o: captured.append(unwrap(o).clone()))  # after ours
            m.generate("abcd", max_new_tokens=3, min_new_tokens=3)
            post.remove()
    finally:
        pre.remove()
    # prefill is unchanged (the alert fires during it); every decode step after is ablated
    assert torch.equal(captured[0], raw[0])
    assert len(raw) == len(captured) == 3  # prefill and two decode steps (the last token is never read)
    for before, after in zip(raw[1:], captured[1:], strict=True):
        f = sae.encode(before)[..., [3, 5]]
        expected = before - f @ sae.W_dec[[3, 5]]
        assert torch.allclose(after, expected, atol=1e-5)
        assert not torch.allclose(after, before)


class Exploding(BaseSink):
    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_alert(self, alert: Alert) -> None:
        raise RuntimeError("sink down")

    def on_error(self, *, stage: str, error: BaseException) -> None:
        self.errors.append(stage)


def test_fail_open_a_broken_sink_or_hook_never_breaks_generation(monkeypatch: Any, tiny_monitor: Any) -> None:
    recorder = Exploding()

    class Recorder(BaseSink):
        stages: list[str] = []

        def on_error(self, *, stage: str, error: BaseException) -> None:
            self.stages.append(stage)

    rec = Recorder()
    with tiny_monitor(sinks=[recorder, rec],
                      detectors=[spec(threshold=-1000.0)]) as m:
        result = m.generate("abc", max_new_tokens=3)
        assert result.alerts and "sink" in rec.stages
        assert result.degraded  # a sink fault marks the run degraded, as documented
        monkeypatch.setattr(m, "_read", lambda *a: 1 / 0)
        result = m.generate("abc", max_new_tokens=3)
        assert result.degraded and "hook" in rec.stages
        assert len(result.token_ids) == 3


def test_a_sink_fault_at_run_end_marks_the_result_degraded(tiny_monitor: Any) -> None:
    class FailsAtEnd(BaseSink):
        def on_run_end(self, result: Any) -> None:
            raise OSError("disk full")

    with tiny_monitor(sinks=[FailsAtEnd()], detectors=[spec()]) as m:
        result = m.generate("abc", max_new_tokens=2)
    assert result.degraded  # the fault is logged as "marked degraded"; it used to stay False


def test_fail_closed_turns_a_fault_into_an_error(monitor: Monitor, monkeypatch: Any) -> None:
    monkeypatch.setattr(monitor, "_read", lambda *a: 1 / 0)
    with pytest.raises(MonitorError, match="ZeroDivisionError"):
        monitor.generate("abc", max_new_tokens=2)
    assert current_session() is None


def test_a_run_its_caller_gave_up_on_ends_aborted_without_end_of_run_verdicts(
        tiny_monitor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Session.abort`` (the page's cancel): outcome ``aborted``, and no end-of-run verdicts are asked for."""
    import featurewatch.runbook as runbook

    judged: list[str] = []
    final_firings = runbook.final_firings

    def spy(readouts: Any, runs: Any) -> Any:
        judged.extend(run.run_id for run in runs)
        return final_firings(readouts, runs)

    monkeypatch.setattr(runbook, "final_firings", spy)
    m = tiny_monitor(detectors=[spec()], watch={HP: WATCH})
    with m.session(2, run_ids=["kept", "given-up"]) as s:
        m.model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]] * 2))
        s.abort(1)
    assert [r.outcome for r in s.results()] == ["completed", "aborted"]
    assert judged == ["kept"]
