"""ChatFeatureWatch on the real LangChain runtime and the embedded model: metadata, events, stops, blocks, concurrency.

The module's monitor has one deterministic detector, ``always`` (alerts on
every prompt); the blocking tests swap in a monitor whose ``stop-now`` blocks
at the third completion token (only one monitor may be attached at a time).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _langchain_helpers import Passes, lc_detectors
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from conftest import make_monitor
from featurewatch import GenerationBlocked, Monitor
from featurewatch.integrations.langchain import ALERT_EVENT, ChatFeatureWatch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def monitor(smollm: Any) -> Iterator[Monitor]:
    m = make_monitor(smollm, detectors=lc_detectors()[:1])
    yield m
    m.detach()


@pytest.fixture
def blocking_monitor(smollm: Any, monitor: Monitor) -> Iterator[Monitor]:
    monitor.detach()
    m = make_monitor(smollm, detectors=lc_detectors())
    try:
        yield m
    finally:
        m.detach()
        monitor.attach()


@pytest.fixture(scope="module")
def chat(monitor: Monitor) -> ChatFeatureWatch:
    return ChatFeatureWatch(monitor=monitor, max_new_tokens=8)


def test_invoke_reports_the_run_under_the_langchain_run_id(chat: ChatFeatureWatch) -> None:
    run_id = uuid.uuid4()
    reply = chat.invoke("Hello", config={"run_id": run_id})
    meta = reply.response_metadata["featurewatch"]
    assert meta["run_id"] == str(run_id) and str(run_id) in str(reply.id)
    assert set(meta) == {"run_id", "scores", "phase_scores", "alerts", "outcome", "degraded"}
    assert [a["detector"] for a in meta["alerts"]] == ["always"] and meta["alerts"][0]["run_id"] == str(run_id)
    assert meta["outcome"] == "completed" and meta["degraded"] is False and "always" in meta["scores"]
    usage = reply.usage_metadata
    assert usage is not None and usage["output_tokens"] == 8 and usage["input_tokens"] > 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert reply.response_metadata["finish_reason"] == "length"


def test_stream_is_token_by_token_and_ends_with_the_run(chat: ChatFeatureWatch) -> None:
    run_id = uuid.uuid4()
    chunks = list(chat.stream("Hello", config={"run_id": run_id}))
    assert len(chunks) >= 6 and chunks[-1].chunk_position == "last"
    assert all(str(run_id) in str(c.id) for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.response_metadata["featurewatch"]["run_id"] == str(run_id)
    assert full.usage_metadata is not None and full.usage_metadata["output_tokens"] == 8
    assert full.content == chat.invoke("Hello").content  # greedy: the same text both ways


def test_stop_sequences_cut_the_text_and_the_compute(chat: ChatFeatureWatch) -> None:
    text = str(chat.invoke("Hello").content)
    word = text.split()[2]  # a word in the middle of the reply
    cut = text[: text.index(word)]
    stopped = chat.invoke("Hello", stop=[word])
    assert stopped.content == cut and stopped.response_metadata["finish_reason"] == "stop"
    assert stopped.usage_metadata is not None and stopped.usage_metadata["output_tokens"] < 8
    assert "".join(str(c.content) for c in chat.stream("Hello", stop=[word])) == cut


async def test_astream_events_show_the_alert_inside_the_model_run(chat: ChatFeatureWatch) -> None:
    chain = ChatPromptTemplate.from_messages([("human", "Reply to: {email}")]) | chat | StrOutputParser()
    events = [e async for e in chain.astream_events({"email": "Where is my parcel?"}, version="v2")]
    kinds = [e["event"] for e in events]
    start, end = kinds.index("on_chat_model_start"), kinds.index("on_chat_model_end")
    [alert] = [(i, e) for i, e in enumerate(events) if e["event"] == "on_custom_event"]
    assert alert[1]["name"] == ALERT_EVENT and start < alert[0] < end
    model_run = events[start]["run_id"]
    assert alert[1]["run_id"] == model_run and alert[1]["data"]["run_id"] == model_run
    assert alert[1]["data"]["detector"] == "always" and "parcel" in alert[1]["data"]["text"]
    assert "on_chat_model_stream" in kinds and isinstance(events[-1]["data"]["output"], str)


def test_invoke_dispatches_alert_events_to_handlers(chat: ChatFeatureWatch) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    seen: list[tuple[str, Any, str]] = []

    class Events(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, *, run_id: uuid.UUID, **kw: Any) -> None:
            seen.append((name, data["detector"], str(run_id)))

    run_id = uuid.uuid4()
    chat.invoke("Hello", config={"callbacks": [Events()], "run_id": run_id})
    assert seen == [(ALERT_EVENT, "always", str(run_id))]


async def test_four_concurrent_calls_each_get_only_their_own_alerts(chat: ChatFeatureWatch) -> None:
    words = ["apples", "bicycles", "castles", "dolphins"]
    small = chat.bind(max_new_tokens=4)
    replies = await asyncio.gather(small.ainvoke(f"Tell me about {words[0]}."),
                                   small.ainvoke(f"Tell me about {words[1]}."),
                                   small.abatch([f"Tell me about {w}." for w in words[2:]]))
    flat = [replies[0], replies[1], *replies[2]]
    assert len({r.response_metadata["featurewatch"]["run_id"] for r in flat}) == 4
    for word, reply in zip(words, flat):
        meta = reply.response_metadata["featurewatch"]
        [alert] = meta["alerts"]
        assert alert["run_id"] == meta["run_id"] and word in alert["text"]
        assert not any(w in alert["text"] for w in words if w != word)


def test_a_block_raises_with_the_partial_text_and_a_fallback_refuses(blocking_monitor: Monitor,
                                                                      smollm: Any) -> None:
    chat = ChatFeatureWatch(monitor=blocking_monitor, max_new_tokens=12)
    passes = Passes()
    handle = smollm.model.register_forward_pre_hook(passes.hook)
    blocking_monitor.on_alert.append(passes.on_alert)
    try:
        run_id = uuid.uuid4()
        with pytest.raises(GenerationBlocked) as info:
            chat.invoke("Hello", config={"run_id": run_id})
        assert info.value.alert.detector == "stop-now" and info.value.result.run_id == str(run_id)
        assert info.value.result.text and passes.n - passes.fired[(str(run_id), "stop-now")] <= 1
        streamed: list[str] = []
        with pytest.raises(GenerationBlocked):
            for chunk in chat.stream("Hello"):
                streamed.append(str(chunk.content))
        assert "".join(streamed)  # the tokens before the block were streamed
    finally:
        handle.remove()
    refusal = RunnableLambda(lambda _: AIMessage("Sorry, I can't help with that."))
    safe = chat.with_fallbacks([refusal], exceptions_to_handle=(GenerationBlocked,))
    assert safe.invoke("Hello").content == "Sorry, I can't help with that."


async def test_astream_raises_the_block_too(blocking_monitor: Monitor) -> None:
    chat = ChatFeatureWatch(monitor=blocking_monitor, max_new_tokens=12)
    with pytest.raises(GenerationBlocked):
        async for _ in chat.astream("Hello"):
            pass
