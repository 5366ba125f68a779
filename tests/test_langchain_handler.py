"""FeatureWatchCallbackHandler on the real LangChain runtime: ChatHuggingFace/HuggingFacePipeline, embedded model.

One monitor for the module, with two deterministic detectors copied from the
shipped pack: ``always`` alerts on every prompt, ``stop-now`` blocks at the
third completion token. Shadow mode must let every call finish; enforce mode
must stop the compute right after the forward pass that fired.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _langchain_helpers import Passes, lc_detectors
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

from conftest import make_monitor
from featurewatch import GenerationBlocked, Monitor
from featurewatch.alertlog import JsonAlertLog
from featurewatch.errors import ConfigError
from featurewatch.integrations.langchain import FeatureWatchCallbackHandler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def monitor(smollm: Any) -> Iterator[Monitor]:
    m = make_monitor(smollm, detectors=lc_detectors())
    yield m
    m.detach()


@pytest.fixture(scope="module")
def passes(smollm: Any, monitor: Monitor) -> Iterator[Passes]:
    p = Passes()
    handle = smollm.model.register_forward_pre_hook(p.hook)
    monitor.on_alert.append(p.on_alert)
    yield p
    handle.remove()
    monitor.on_alert.remove(p.on_alert)


@pytest.fixture(scope="module")
def llm(smollm: Any, monitor: Monitor) -> HuggingFacePipeline:
    import transformers

    pipe = transformers.pipeline("text-generation", model=smollm.model, tokenizer=smollm.tokenizer,
                                 max_new_tokens=10, do_sample=False, return_full_text=False)
    return HuggingFacePipeline(pipeline=pipe)


@pytest.fixture(scope="module")
def chat(llm: HuggingFacePipeline, smollm: Any) -> ChatHuggingFace:
    return ChatHuggingFace(llm=llm, tokenizer=smollm.tokenizer)  # the tokenizer given: no hub look-up


def test_mode_is_validated(monitor: Monitor) -> None:
    with pytest.raises(ConfigError, match="valid modes: shadow, enforce"):
        FeatureWatchCallbackHandler(monitor, mode="block")


def test_shadow_observes_and_joins_the_langchain_run(chat: ChatHuggingFace, monitor: Monitor, smollm: Any) -> None:
    handler = FeatureWatchCallbackHandler(monitor)
    buffer = io.StringIO()
    logger = logging.getLogger("test.featurewatch.langchain")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(logging.StreamHandler(buffer))
    log = JsonAlertLog(logger=logger, context=handler.context)
    monitor.sinks.append(log)
    run_id = uuid.uuid4()
    try:
        reply = chat.invoke("Hello", config={"callbacks": [handler], "run_id": run_id, "tags": ["support"],
                                             "metadata": {"tenant": "acme"}})
    finally:
        monitor.sinks.remove(log)
    assert reply.content  # shadow: the block alert stopped nothing
    assert [(a.detector, a.run_id) for a in handler.alerts] == [("always", str(run_id)), ("stop-now", str(run_id))]
    result = handler.result(run_id)
    assert result is not None and result.outcome == "completed" and result.run_id == str(run_id)
    assert result.n_tokens > 10  # prompt + the whole completion were read
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["run_id"] for line in lines] == [str(run_id)] * 2
    assert lines[0]["context"]["langchain"]["tags"] == ["support"]
    assert lines[0]["context"]["langchain"]["metadata"]["tenant"] == "acme"
    assert "generate" not in vars(smollm.model)  # the wrapper is gone once no run is pending


def _call(how: str, chat: ChatHuggingFace, llm: HuggingFacePipeline, config: dict[str, Any]) -> Any:
    if how == "invoke":
        return chat.invoke("Hello", config=config)
    if how == "stream":
        return "".join(str(c.content) for c in chat.stream("Hello", config=config))
    # ChatHuggingFace has no async path over a pipeline (it raises NotImplementedError upstream), so the
    # async calls go through HuggingFacePipeline, the LLM it wraps.
    if how == "ainvoke":
        return asyncio.run(llm.ainvoke("Hello there", config=config))

    async def collect() -> str:
        return "".join([c async for c in llm.astream("Hello there", config=config)])

    return asyncio.run(collect())


@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke", "astream"])
def test_enforce_stops_the_compute_right_after_the_block(how: str, chat: ChatHuggingFace, llm: HuggingFacePipeline,
                                                         monitor: Monitor, passes: Passes, smollm: Any) -> None:
    handler = FeatureWatchCallbackHandler(monitor, mode="enforce")
    run_id = uuid.uuid4()
    before = passes.n
    with pytest.raises(GenerationBlocked) as info:
        _call(how, chat, llm, {"callbacks": [handler], "run_id": run_id})
    blocked = info.value
    assert blocked.alert.detector == "stop-now" and blocked.alert.run_id == str(run_id)
    assert blocked.result.outcome == "blocked" and blocked.result.text  # the partial text comes along
    total = passes.n - before
    at_block = passes.fired[(str(run_id), "stop-now")] - before
    assert at_block == 4  # prefill + 3 decode steps read 3 completion tokens
    assert total - at_block <= 1, f"{total - at_block} forward passes ran after the block"
    assert handler.result(run_id) is not None and handler.result(run_id).outcome == "blocked"
    assert "generate" not in vars(smollm.model)


def test_shadow_streams_to_the_end(chat: ChatHuggingFace, monitor: Monitor) -> None:
    handler = FeatureWatchCallbackHandler(monitor)
    chunks = list(chat.stream("Hello", config={"callbacks": [handler]}))
    assert len(chunks) > 3
    assert {a.detector for a in handler.alerts} == {"always", "stop-now"}
    [run_id] = {a.run_id for a in handler.alerts}
    assert handler.result(run_id).outcome == "completed"


def test_lcel_chain_alerts_carry_the_model_run(chat: ChatHuggingFace, monitor: Monitor) -> None:
    handler = FeatureWatchCallbackHandler(monitor)
    chain = ChatPromptTemplate.from_messages([("human", "Reply to: {email}")]) | chat | StrOutputParser()
    chain_id = uuid.uuid4()
    text = chain.invoke({"email": "Where is my parcel?"}, config={"callbacks": [handler], "run_id": chain_id})
    assert isinstance(text, str) and text
    [run_id] = {a.run_id for a in handler.alerts}
    assert run_id != str(chain_id)  # the chat model's own run, a child of the chain's
    assert handler.context(run_id)["langchain"]["parent_run_id"] == str(chain_id)
    assert "parcel" in (handler.alerts[0].text or "")


def test_four_concurrent_calls_each_get_only_their_own_alerts(llm: HuggingFacePipeline, monitor: Monitor) -> None:
    handler = FeatureWatchCallbackHandler(monitor)
    words = ["apples", "bicycles", "castles", "dolphins"]
    ids = [uuid.uuid4() for _ in words]

    async def go() -> list[str]:
        calls = [llm.ainvoke(f"Tell me about {w}.", config={"callbacks": [handler], "run_id": i},
                             pipeline_kwargs={"max_new_tokens": 4}) for w, i in zip(words, ids)]
        return await asyncio.gather(*calls)

    asyncio.run(go())
    for word, run_id in zip(words, ids):
        mine = [a for a in handler.alerts if a.run_id == str(run_id)]
        assert [a.detector for a in mine] == ["always", "stop-now"]
        assert word in (mine[0].text or "")  # the prompt alert's span is this call's own prompt
        assert not any(w in (mine[0].text or "") for w in words if w != word)
        assert handler.result(run_id).outcome == "completed"
