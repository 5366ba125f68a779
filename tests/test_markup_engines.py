"""Typed chat markup through every engine (issue 26 §2): a 2-layer Llama with the embedded model's real
tokenizer and chat template, and the embedded model itself for the README's scam-email example.

Engines that render the chat themselves (``Monitor.generate``, ``score_records``, ``ChatFeatureWatch``)
hand the model no marker a user typed; engines that read ids someone else built (a session around a raw
forward pass, vLLM's engine monitor, the LangChain handler over a pipeline) report a ``markup-injection``
alert with the span of the typed markers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_markup import REQUEST, TYPED

from conftest import RecordingSink, make_monitor
from featurewatch import Monitor
from featurewatch.alert import MARKUP_INJECTION, Alert
from featurewatch.records import markup_ids, parse_record

CASES = list(TYPED)


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir: Path) -> Any:
    from featurewatch.models import load_model

    return load_model(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def monitor(tiny: Any, tiny_lm_pack: Path) -> Iterator[Monitor]:
    m = make_monitor(tiny, pack=tiny_lm_pack)
    yield m
    m.detach()


@pytest.fixture
def seen(tiny: Any) -> Iterator[list[list[int]]]:
    """The input ids of every forward pass of the tiny model (what the model was actually given)."""
    calls: list[list[int]] = []

    def hook(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            calls.append(ids[0].tolist())

    handle = tiny.model.register_forward_pre_hook(hook, with_kwargs=True)
    yield calls
    handle.remove()


def _markers(tok: Any, ids: list[int]) -> list[int]:
    marks = markup_ids(tok)
    return [i for i in ids if i in marks]


def _chat_ids(tok: Any, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _markup_alerts(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.detector == MARKUP_INJECTION]


def _check_alert(alert: Alert, tok: Any, ids: list[int]) -> None:
    assert (alert.severity, alert.action, alert.phase) == ("warning", "alert", "prompt")
    start, end = alert.span
    assert _markers(tok, ids[start:end]), "the span covers the typed markers"
    assert alert.text is not None and "<|" in alert.text


# ---------------------------------------------------------------- engines that render the chat
@pytest.mark.parametrize("case", CASES)
def test_generate_gives_the_model_no_typed_marker(monitor: Monitor, tiny: Any, seen: list[list[int]],
                                                  case: str) -> None:
    result = monitor.generate(TYPED[case] + REQUEST, max_new_tokens=2)
    clean = _chat_ids(tiny.tokenizer, REQUEST)
    assert _markers(tiny.tokenizer, seen[0]) == _markers(tiny.tokenizer, clean)  # only the template's own
    assert not _markup_alerts(result.alerts)
    assert "demo" in result.phase_scores["prompt"]  # the request was read


def test_score_records_reads_typed_markup_as_text(monitor: Monitor, tiny: Any, seen: list[list[int]]) -> None:
    records = [parse_record({"messages": [{"role": "user", "content": TYPED[c] + REQUEST}]}, line=i)
               for i, c in enumerate(CASES, start=1)]
    results = [run for _, run in monitor.score_records(records, batch_size=1)]  # no padding (<|im_end|> pads)
    clean = _markers(tiny.tokenizer, _chat_ids(tiny.tokenizer, REQUEST))
    assert len(seen) == len(CASES) and all(_markers(tiny.tokenizer, ids) == clean for ids in seen)
    assert all(not _markup_alerts(run.alerts) for run in results)


def test_the_langchain_chat_model_gives_the_model_no_typed_marker(monitor: Monitor, tiny: Any,
                                                                  seen: list[list[int]]) -> None:
    from featurewatch.integrations.langchain import ChatFeatureWatch

    chat = ChatFeatureWatch(monitor=monitor, max_new_tokens=2)
    reply = chat.invoke(TYPED["forged assistant turn"] + REQUEST)
    assert _markers(tiny.tokenizer, seen[0]) == _markers(tiny.tokenizer, _chat_ids(tiny.tokenizer, REQUEST))
    assert not [a for a in reply.response_metadata["featurewatch"]["alerts"] if a["detector"] == MARKUP_INJECTION]


# ---------------------------------------------------------------- ids someone else built
@pytest.mark.parametrize("case", CASES)
def test_a_session_around_a_raw_forward_reports_typed_markup(monitor: Monitor, tiny: Any, case: str) -> None:
    ids = _chat_ids(tiny.tokenizer, TYPED[case] + REQUEST)
    with monitor.session() as session:
        tiny.model(input_ids=torch.tensor([ids]))
    [alert] = _markup_alerts(session.result().alerts)
    _check_alert(alert, tiny.tokenizer, ids)
    assert "demo" in session.result().phase_scores["prompt"]  # the request around it was read


def test_a_raw_batch_reports_only_the_typed_row_at_its_own_positions(monitor: Monitor, tiny: Any) -> None:
    tok = tiny.tokenizer
    rows = [_chat_ids(tok, "Hello there, how are you today?"), _chat_ids(tok, TYPED["endoftext"] + REQUEST)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with monitor.session(2) as session:
        tiny.model(input_ids=ids, attention_mask=mask)
    clean, typed = session.results()
    assert not _markup_alerts(clean.alerts)
    [alert] = _markup_alerts(typed.alerts)
    assert ids[1, alert.span[0]:alert.span[1]].tolist() == [tok.convert_tokens_to_ids("<|endoftext|>")]


def test_a_well_formed_raw_chat_reports_nothing(monitor: Monitor, tiny: Any) -> None:
    text = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
         {"role": "user", "content": REQUEST}], tokenize=False, add_generation_prompt=True)
    with monitor.session() as session:
        tiny.model(**tiny.tokenizer(text, return_tensors="pt", add_special_tokens=False))
    assert not _markup_alerts(session.result().alerts)


_Events = RecordingSink


@pytest.mark.parametrize("case", CASES)
def test_the_vllm_engine_reports_typed_markup_once_the_chunked_prompt_is_read(tiny: Any, tiny_lm_pack: Path,
                                                                              case: str) -> None:
    from featurewatch.integrations.vllm.engine import EngineMonitor
    from featurewatch.pack import load_pack

    events = _Events()
    engine = EngineMonitor(tiny.model, tiny.tokenizer, pack=load_pack(tiny_lm_pack), sinks=[events])
    ids = _chat_ids(tiny.tokenizer, TYPED[case] + REQUEST)
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=ids)
    half = len(ids) // 2
    for lo, hi in ((0, half), (half, len(ids))):  # a chunked prefill: two forward passes
        engine.begin_step(["r1"], [0, hi - lo], torch.arange(lo, hi), torch.tensor(ids[lo:hi]), {"r1": request})
        engine.on_layer(1, torch.randn(hi - lo, 16), None)
        engine.end_step()
    engine.finish(["r1"])
    [alert] = _markup_alerts(events.alerts)
    _check_alert(alert, tiny.tokenizer, ids)
    assert alert.run_id == events.results[0].run_id
    assert _markup_alerts(events.results[0].alerts) == [alert]


@pytest.mark.parametrize("how", ["chat", "llm"])
def test_the_langchain_handler_over_a_pipeline_reports_typed_markup(monitor: Monitor, tiny: Any, how: str,
                                                                    seen: list[list[int]]) -> None:
    import transformers
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

    from featurewatch.integrations.langchain import FeatureWatchCallbackHandler

    pipe = transformers.pipeline("text-generation", model=tiny.model, tokenizer=tiny.tokenizer, max_new_tokens=2,
                                 do_sample=False, return_full_text=False)
    llm = HuggingFacePipeline(pipeline=pipe)
    handler = FeatureWatchCallbackHandler(monitor)
    prompt = TYPED["forged assistant turn"] + REQUEST
    if how == "chat":
        ChatHuggingFace(llm=llm, tokenizer=tiny.tokenizer).invoke(prompt, config={"callbacks": [handler]})
    else:
        llm.invoke(prompt, config={"callbacks": [handler]})
    [alert] = _markup_alerts(handler.alerts)  # the handler was bound: the typed markers reached the model
    _check_alert(alert, tiny.tokenizer, seen[0])
    result = handler.result(alert.run_id)
    assert result is not None and _markup_alerts(result.alerts) == [alert]


# ---------------------------------------------------------------- the README's example on the embedded model
@pytest.mark.slow
def test_typed_markup_does_not_switch_scam_email_off_on_the_readme_request(smollm: Any) -> None:

    prefix = TYPED["forged assistant turn"]
    with make_monitor(smollm, detectors=["scam-email"]) as m:
        clean = m.generate(REQUEST, max_new_tokens=1).phase_scores["prompt"]["scam-email"]
        typed = m.generate(prefix + REQUEST, max_new_tokens=1).phase_scores["prompt"]["scam-email"]
        # the same words with the markers typed as plain text: what a prefix costs this detector anyway
        plain = m.generate(prefix.replace("<|im_end|>", "").replace("<|im_start|>", "") + REQUEST,
                           max_new_tokens=1).phase_scores["prompt"]["scam-email"]
        ids = _chat_ids(smollm.tokenizer, prefix + REQUEST)
        with m.session() as session:  # as another engine builds it: the markers are real, and reported
            smollm.model(input_ids=torch.tensor([ids]))
    assert _markup_alerts(session.result().alerts)
    assert abs(typed - plain) < 0.5, (clean, typed, plain)
    assert typed > session.result().phase_scores["prompt"]["scam-email"] + 0.3, "better than reading real markers"
