"""FeatureWatchMiddleware in a real LangChain 1.x agent (``langchain.agents.create_agent``): a loop with a
real tool call and the embedded model behind ``ChatFeatureWatch``.

The monitor's detectors are deterministic (``always`` alerts on every prompt; ``stop-now`` blocks at the
third completion token). The embedded 135M model does not write tool calls, so the agent's *first* turn
is a stand-in — ``ScriptedToolCall``, a middleware that answers that turn with a tool call as a
tool-calling model would. The tool then runs for real (LangGraph's tool node) and its result goes into
the real model's prompt, which featurewatch reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _langchain_helpers import lc_detectors
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from prometheus_client import CollectorRegistry

from conftest import make_monitor
from featurewatch import Monitor
from featurewatch.errors import ConfigError
from featurewatch.integrations.langchain import ChatFeatureWatch, FeatureWatchMiddleware
from featurewatch.integrations.langchain.chat import parse_tool_calls
from featurewatch.integrations.langchain.middleware import BLOCKED_MESSAGE
from featurewatch.metrics import PrometheusMetrics

pytestmark = pytest.mark.slow

ASK = "Where is my order A17?"


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order's delivery status."""
    return f"Order {order_id} left the warehouse on Monday and arrives on Thursday."


class ScriptedToolCall(AgentMiddleware):
    """Stand-in for a tool-calling model on the agent's first turn (the embedded 135M model writes none)."""

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        if not any(isinstance(m, ToolMessage) for m in request.messages):
            return AIMessage("", tool_calls=[{"name": "lookup_order", "args": {"order_id": "A17"}, "id": "call_1"}])
        return handler(request)

    async def awrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        if not any(isinstance(m, ToolMessage) for m in request.messages):
            return AIMessage("", tool_calls=[{"name": "lookup_order", "args": {"order_id": "A17"}, "id": "call_1"}])
        return await handler(request)


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def monitor(smollm: Any, registry: CollectorRegistry) -> Iterator[Monitor]:
    m = make_monitor(smollm, detectors=lc_detectors(), sinks=[PrometheusMetrics(registry=registry)])
    yield m
    m.detach()


@pytest.fixture(scope="module")
def chat(monitor: Monitor) -> ChatFeatureWatch:
    return ChatFeatureWatch(monitor=monitor, max_new_tokens=8)


def agent(chat: ChatFeatureWatch, guard: FeatureWatchMiddleware) -> Any:
    return create_agent(chat, tools=[lookup_order], middleware=[ScriptedToolCall(), guard])


def would_block(registry: CollectorRegistry, monitor: Monitor) -> float:
    return registry.get_sample_value("featurewatch_would_block_total",
                                     {"detector": "stop-now", "model_name": monitor.model_name}) or 0.0


def test_shadow_records_alerts_in_state_and_metadata_and_the_loop_runs_on(chat: ChatFeatureWatch, monitor: Monitor,
                                                                          registry: CollectorRegistry) -> None:
    before = would_block(registry, monitor)
    state = agent(chat, FeatureWatchMiddleware()).invoke({"messages": [HumanMessage(ASK)]})
    human, call, result, reply = state["messages"]
    assert call.tool_calls[0]["name"] == "lookup_order" and isinstance(result, ToolMessage)
    assert "arrives on Thursday" in result.text  # the tool ran, and its result is in the model's prompt
    assert isinstance(reply, AIMessage) and reply.text and reply.text != BLOCKED_MESSAGE  # shadow stopped nothing
    meta = reply.response_metadata["featurewatch"]
    assert meta["outcome"] == "completed"
    assert {a["detector"]: a["would_block"] for a in meta["alerts"]} == {"always": False, "stop-now": True}
    (record,) = state["featurewatch"]  # one monitored model call; the scripted turn is not the model's
    assert record["run_id"] == meta["run_id"] and record["outcome"] == "completed" and record["blocked_by"] is None
    assert record["would_block"] == ["stop-now"] and [a["detector"] for a in record["alerts"]] == ["always", "stop-now"]
    assert would_block(registry, monitor) == before + 1


def test_enforce_stops_the_call_that_blocks_with_a_typed_outcome(chat: ChatFeatureWatch, monitor: Monitor) -> None:
    state = agent(chat, FeatureWatchMiddleware("enforce")).invoke({"messages": [HumanMessage(ASK)]})
    reply = state["messages"][-1]
    assert isinstance(state["messages"][-2], ToolMessage)  # the loop reached the model again, which was stopped
    assert reply.text == BLOCKED_MESSAGE and not reply.tool_calls  # no crash; the agent ends on the outcome
    meta = reply.response_metadata["featurewatch"]
    assert meta["outcome"] == "blocked" and meta["blocked_by"] == "stop-now"
    (record,) = state["featurewatch"]
    assert record["outcome"] == "blocked" and record["blocked_by"] == "stop-now" and record["would_block"] == []
    stop = next(a for a in record["alerts"] if a["detector"] == "stop-now")
    assert stop["would_block"] is False and stop["action"] == "block"


def test_per_detector_actions_shadow_one_block_and_make_an_alert_block(chat: ChatFeatureWatch) -> None:
    state = agent(chat, FeatureWatchMiddleware("enforce", actions={"stop-now": "shadow"})).invoke(
        {"messages": [HumanMessage(ASK)]})
    (record,) = state["featurewatch"]
    assert record["outcome"] == "completed" and record["would_block"] == ["stop-now"]
    state = agent(chat, FeatureWatchMiddleware("shadow", actions={"always": "block"})).invoke(
        {"messages": [HumanMessage(ASK)]})
    (record,) = state["featurewatch"]
    assert record["outcome"] == "blocked" and record["blocked_by"] == "always"  # withheld when the call ended
    assert state["messages"][-1].text == BLOCKED_MESSAGE


def test_actions_are_checked(chat: ChatFeatureWatch) -> None:
    with pytest.raises(ConfigError, match="one of block, shadow"):
        FeatureWatchMiddleware(actions={"stop-now": "maybe"})
    with pytest.raises(ConfigError, match="valid modes"):
        FeatureWatchMiddleware("block")
    with pytest.raises(ConfigError, match="does not run \\(nope\\)"):
        agent(chat, FeatureWatchMiddleware(actions={"nope": "block"})).invoke({"messages": [HumanMessage(ASK)]})


def _streamed(graph: Any, **kw: Any) -> list[Any]:
    return [chunk for chunk, _meta in graph.stream({"messages": [HumanMessage(ASK)]}, stream_mode="messages", **kw)]


def test_enforce_holds_tokens_so_a_blocked_call_streams_nothing_but_its_outcome(chat: ChatFeatureWatch) -> None:
    streamed = _streamed(agent(chat, FeatureWatchMiddleware("enforce")))
    from_model = [m for m in streamed if isinstance(m, (AIMessage, AIMessageChunk)) and not m.tool_calls]
    assert [m.text for m in from_model] == [BLOCKED_MESSAGE]  # not one token of the blocked reply
    # the trade-off stream="live" makes (LangChain #35011): the tokens written before the block were streamed
    live = _streamed(agent(chat, FeatureWatchMiddleware("enforce", stream="live")))
    leaked = [m for m in live if isinstance(m, AIMessageChunk) and m.text]
    assert leaked and live[-1].text == BLOCKED_MESSAGE


def test_shadow_streams_tokens_live(chat: ChatFeatureWatch) -> None:
    streamed = _streamed(agent(chat, FeatureWatchMiddleware("shadow")))
    tokens = [m for m in streamed if isinstance(m, AIMessageChunk) and m.text]
    assert len(tokens) >= 2  # token by token, as written


def test_async_agent_enforces_too(chat: ChatFeatureWatch) -> None:
    state = asyncio.run(agent(chat, FeatureWatchMiddleware("enforce")).ainvoke({"messages": [HumanMessage(ASK)]}))
    assert state["featurewatch"][0]["blocked_by"] == "stop-now" and state["messages"][-1].text == BLOCKED_MESSAGE


def test_tool_calls_in_a_reply_are_parsed() -> None:
    (call,) = parse_tool_calls('Sure. <tool_call>{"name": "lookup_order", "arguments": {"order_id": "A17"}}'
                               '</tool_call>')
    assert call["name"] == "lookup_order" and call["args"] == '{"order_id": "A17"}'
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") == []


def test_the_readme_agent_example_runs_shadow_then_enforce() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "agent_guard.py"
    out = subprocess.run([sys.executable, str(example), "--max-new-tokens", "8"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    shadow, enforce = (json.loads(line) for line in out.stdout.splitlines())
    assert shadow["mode"] == "shadow" and shadow["outcome"] == "completed" and shadow["would_block"] == ["scam-email"]
    assert shadow["reply"] and shadow["featurewatch_would_block_total"] == 1.0
    assert enforce["outcome"] == "blocked" and enforce["blocked_by"] == "scam-email"
    assert enforce["reply"] == BLOCKED_MESSAGE and enforce["featurewatch_would_block_total"] == 1.0


def test_a_model_featurewatch_does_not_monitor_is_recorded_unmonitored(caplog: Any) -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    other = GenericFakeChatModel(messages=iter([AIMessage("hello")]))  # LangChain's own fake: not monitored
    state = create_agent(other, tools=[], middleware=[FeatureWatchMiddleware("enforce")]).invoke(
        {"messages": [HumanMessage("hi")]})
    assert state["messages"][-1].text == "hello"  # passed through, untouched
    assert state["featurewatch"] == [{"run_id": None, "outcome": "unmonitored", "blocked_by": None, "alerts": [],
                                      "would_block": []}]
    assert "not monitored" in caplog.text
