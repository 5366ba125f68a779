"""Issue-7 hardening of the monitor itself, each case reproduced on the tiny in-process Llama."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from conftest import HP, tiny_spec
from featurewatch.alert import RunResult
from featurewatch.errors import ConfigError, MonitorError
from featurewatch.sinks import BaseSink


def hook_count(model: Any) -> int:
    return len(model._forward_pre_hooks) + sum(len(layer._forward_hooks) for layer in model.model.layers)


def test_a_failed_constructor_leaves_the_model_as_it_found_it(tiny_llama: Any, tiny_monitor: Any) -> None:
    class BrokenAttach(BaseSink):
        def on_attach(self, **kw: Any) -> None:
            raise RuntimeError("registry is down")

    before = hook_count(tiny_llama)
    with pytest.raises(MonitorError, match="registry is down"):
        tiny_monitor(sinks=[BrokenAttach()], fail_closed=True)
    assert hook_count(tiny_llama) == before
    with tiny_monitor() as again:  # the model is free again
        assert again.attached


def test_generation_pads_per_call_and_never_touches_the_tokenizer(tiny_tokenizer: Any, tiny_monitor: Any) -> None:
    tiny_tokenizer.padding_side = "right"
    with tiny_monitor(fail_closed=True) as m:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(3):
                    res = m.generate_batch(["ab", "abcdefgh"], max_new_tokens=3, min_new_tokens=3)
                    assert len(res) == 2 and all(len(r.token_ids) == 3 for r in res)
            except BaseException as exc:  # noqa: BLE001 — surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert tiny_tokenizer.padding_side == "right"


def test_a_session_without_no_grad_keeps_no_autograd_graph(tiny_llama: Any, tiny_monitor: Any) -> None:
    with tiny_monitor(detectors=[tiny_spec()], fail_closed=True) as m:
        ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
        with m.session(top_features=3) as s:
            out = tiny_llama(input_ids=ids)  # grad mode on, as in a user's own code
        assert out.logits.requires_grad  # the user's graph is intact ...
        run = s.rows[0]
        kept = [*run.watched[HP], *run.residuals[HP], *run.feature_sums.values()]
        assert kept and not any(t.requires_grad for t in kept)  # ... but nothing the monitor keeps holds it


def test_generate_runs_the_model_in_inference_mode_and_readings_still_work(tiny_monitor: Any) -> None:
    # inference mode, not generate()'s own no_grad: ~4 % per decode step (docs/architecture.md)
    with tiny_monitor(detectors=[tiny_spec()], fail_closed=True) as m:
        result = m.generate("abcdef", max_new_tokens=3, min_new_tokens=3, top_features=3)
        run = result.session.rows[0]
        kept = [*run.watched[HP], *run.residuals[HP]]
        assert kept and all(t.is_inference() for t in kept)
        readings = result.readings()  # read back outside inference mode, grad mode on
        assert len(readings) == len(run.token_ids) and any(r.top for r in readings)


def test_detaching_mid_generation_marks_the_run_degraded(tiny_monitor: Any) -> None:
    m = tiny_monitor(detectors=[tiny_spec()])

    class DetachAfterTwoSteps(BaseSink):
        steps = 0

        def on_forward(self, **kw: Any) -> None:
            self.steps += 1
            if self.steps == 2:
                m.detach()

    m.sinks.append(DetachAfterTwoSteps())
    result = m.generate("abc", max_new_tokens=6, min_new_tokens=6)
    assert len(result.token_ids) == 6
    assert result.degraded and result.outcome == "completed"


def test_a_session_is_single_use_and_ends_once(tiny_llama: Any, tiny_monitor: Any) -> None:
    ended: list[RunResult] = []

    class Ends(BaseSink):
        def on_run_end(self, result: RunResult) -> None:
            ended.append(result)

    with tiny_monitor(sinks=[Ends()], fail_closed=True) as m:
        session = m.session()
        with session:
            tiny_llama(input_ids=torch.tensor([[2, 3, 4]]))
        with pytest.raises(ConfigError, match="single-use"), session:
            pass
    assert len(ended) == 1


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("", {"chat": False}, "empty prompt"),
    ("   ", {}, "empty prompt"),
    ([], {}, "non-empty list"),
    ([{"role": "bogus", "content": "hi"}], {}, "role"),
    ([{"role": "user"}], {}, "content"),
    ("abc", {"max_new_tokens": 0}, "max_new_tokens=0"),
    ("abc", {"max_new_tokens": -5}, "max_new_tokens=-5"),
])
def test_bad_prompts_are_config_errors_naming_the_problem(prompt: Any, kwargs: dict[str, Any], message: str,
                                                          tiny_monitor: Any) -> None:
    with tiny_monitor(fail_closed=True) as m:
        with pytest.raises(ConfigError, match=message):
            m.generate(prompt, **kwargs)
        with pytest.raises(ConfigError, match="non-empty list"):
            m.generate_batch([])


def test_a_prompt_longer_than_the_context_is_a_clear_error(tiny_llama: Any, tiny_monitor: Any) -> None:
    context = tiny_llama.config.max_position_embeddings  # 128
    with tiny_monitor(fail_closed=True) as m:
        with pytest.raises(ConfigError, match=f"context of {context} tokens"):
            m.generate("a" * (context - 4), max_new_tokens=8)
        assert len(m.generate("a" * (context - 20), max_new_tokens=8).token_ids) <= 8  # within: fine


def test_per_phase_thresholds_fire_each_phase_at_its_own(tiny_monitor: Any) -> None:
    both = tiny_spec(threshold=1e6, phase_thresholds={"prompt": 1e6, "completion": -1e6},
                     phases=["prompt", "completion"])
    with tiny_monitor(detectors=[both], fail_closed=True) as m:
        result = m.generate("abcdef", max_new_tokens=4, min_new_tokens=4)
    assert [(a.phase, a.threshold) for a in result.alerts] == [("completion", -1e6)]


def test_min_tokens_keeps_a_short_phase_silent_at_the_end_too(tiny_monitor: Any) -> None:
    low = tiny_spec(threshold=-1e6, phases=["completion"], pooling={"method": "mean", "min_tokens": 5})
    with tiny_monitor(detectors=[low], fail_closed=True) as m:
        short = m.generate("abc", max_new_tokens=3, min_new_tokens=3)  # 2 completion tokens are read
        long = m.generate("abc", max_new_tokens=8, min_new_tokens=8)
    assert not short.alerts and "completion" in short.phase_scores
    assert len(long.alerts) == 1


def test_scoring_refuses_a_max_tokens_past_the_context(tiny_monitor: Any) -> None:
    from featurewatch.records import parse_record

    record = parse_record({"text": "abc"}, line=1)
    with tiny_monitor(fail_closed=True) as m:
        with pytest.raises(ConfigError, match="context of 128 tokens"):
            list(m.score_records([record], max_tokens=4096))
        with pytest.raises(ConfigError, match="max_tokens=0"):
            list(m.score_records([record], max_tokens=0))
        assert len(list(m.score_records([record], max_tokens=128))) == 1
