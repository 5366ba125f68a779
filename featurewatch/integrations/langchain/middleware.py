"""FeatureWatchMiddleware: guard a LangChain 1.x agent (``langchain.agents.create_agent``) in one line.

::

    from langchain.agents import create_agent
    from featurewatch.integrations.langchain import ChatFeatureWatch, FeatureWatchMiddleware

    agent = create_agent(ChatFeatureWatch(monitor=monitor), tools=[...],
                         middleware=[FeatureWatchMiddleware(mode="enforce")])

Why it is built this way:

* **It wraps each model call** (``wrap_model_call``/``awrap_model_call``) of a model featurewatch
  monitors — :class:`~.chat.ChatFeatureWatch`, whose reply carries the run in
  ``response_metadata["featurewatch"]``. A model call without that metadata is recorded as
  ``unmonitored`` (and logged once): the middleware never pretends to have watched it.
* **Modes and per-detector actions.** ``mode="shadow"``: every ``block`` detector only says what
  it would have done (its alert ``would_block=True``, counted in ``featurewatch_would_block_total``)
  and the agent goes on. ``mode="enforce"``: a ``block`` detector stops the model call in the
  forward pass that fired. ``actions={"detector": "block" | "shadow"}`` overrides per detector: a
  ``block`` detector can be rolled out in shadow while the others enforce, and an ``alert``
  detector can be made to block (its call's reply is then withheld when the call ends: the model
  was not asked to stop, so the compute ran on).
* **A typed outcome, not a crash.** A blocked call becomes an ``AIMessage`` with
  ``blocked_message`` as its content (no tool calls, so the agent loop ends there; the partial
  text is withheld) and ``response_metadata["featurewatch"]`` saying ``outcome="blocked"`` and
  ``blocked_by``; every call also appends a :class:`FeatureWatchRecord` to the agent state's
  ``featurewatch`` list (the state schema this middleware adds).
* **Streaming** (LangChain issue #35011: with ``stream_mode="messages"`` a model's tokens reach
  the stream through ``on_llm_new_token`` before any middleware sees the reply). ``stream="hold"``
  (the default when some detector blocks) asks the model to keep its tokens from token callbacks
  until the call ends: a blocked call streams nothing but the blocked outcome, a completed one
  arrives as one message. ``stream="live"`` (the default when nothing blocks, i.e. shadow) lets
  tokens flow as they are written: a block still stops the model within one forward pass, but
  the tokens written before it have been streamed.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ExtendedModelResponse
from langchain_core.messages import AIMessage
from langgraph.types import Command
from typing_extensions import NotRequired, TypedDict

from ...errors import ConfigError, GenerationBlocked
from .chat import _CALL_KWARG, ChatFeatureWatch
from .common import run_metadata

logger = logging.getLogger(__name__)

MODES = ("shadow", "enforce")
ACTIONS = ("block", "shadow")
STREAMS = ("hold", "live")
BLOCKED_MESSAGE = "I can't help with that."


class FeatureWatchRecord(TypedDict):
    """What one model call of the agent came to, as featurewatch saw it (the state's ``featurewatch`` list)."""

    run_id: str | None
    outcome: Literal["completed", "blocked", "unmonitored"]
    blocked_by: str | None
    """The detector that stopped the call (or withheld its reply); None when nothing did."""
    alerts: list[dict[str, Any]]
    """Every alert of the call, as dicts (``Alert.model_dump``), ``would_block`` included."""
    would_block: list[str]
    """Detectors whose ``block`` ran in shadow and fired: what enforcing would have stopped."""


class FeatureWatchState(AgentState):
    """The agent state with the records of featurewatch's model calls (appended, never replaced)."""

    featurewatch: NotRequired[Annotated[list[FeatureWatchRecord], operator.add]]


class FeatureWatchMiddleware(AgentMiddleware):
    """Monitors an agent's model calls with featurewatch: records alerts, and stops (``enforce``) what blocks.

    ``mode``: ``"shadow"`` (default: observe and say what would have been blocked) or
    ``"enforce"``. ``actions``: per-detector ``"block"`` or ``"shadow"``, over the mode.
    ``stream``: ``"hold"`` or ``"live"`` (see the module docstring; default: ``hold`` when a
    detector blocks). ``blocked_message``: the content of a blocked call's reply.
    """

    state_schema = FeatureWatchState

    def __init__(self, mode: str = "shadow", *, actions: Mapping[str, str] | None = None, stream: str | None = None,
                 blocked_message: str = BLOCKED_MESSAGE) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}; valid modes: {', '.join(MODES)}")
        bad = {k: v for k, v in (actions or {}).items() if v not in ACTIONS}
        if bad:
            raise ConfigError(f"actions={bad}: each detector's action is one of {', '.join(ACTIONS)}")
        if stream is not None and stream not in STREAMS:
            raise ConfigError(f"stream={stream!r}; valid: {', '.join(STREAMS)}")
        self.mode = mode
        self.actions = dict(actions or {})
        self.stream = stream
        self.blocked_message = blocked_message
        self._warned = False

    # ------------------------------------------------------------------ the plan for one call
    def plan(self, model: Any) -> tuple[dict[str, Any], set[str]]:
        """The model call's ``featurewatch`` settings (``shadow``, ``hold``), and the non-``block`` detectors
        whose alerts withhold the reply (made ``block`` by ``actions``)."""
        monitor = getattr(model, "monitor", None)
        specs = {d.name: d for d in getattr(monitor, "detectors", [])}
        unknown = sorted(set(self.actions) - set(specs)) if monitor is not None else []
        if unknown:
            raise ConfigError(f"actions names detectors the model's monitor does not run ({', '.join(unknown)}); "
                              f"detectors: {', '.join(sorted(specs)) or 'none'}")
        default = "block" if self.mode == "enforce" else "shadow"
        effective = {name: self.actions.get(name, default if spec.action == "block" else "alert")
                     for name, spec in specs.items()}
        shadow = sorted(n for n, a in effective.items() if a != "block" and specs[n].action == "block")
        withhold = {n for n, a in effective.items() if a == "block" and specs[n].action != "block"}
        blocks = any(a == "block" for a in effective.values())
        hold = self.stream == "hold" if self.stream is not None else blocks
        return {"shadow": shadow, "hold": hold}, withhold

    def _request(self, request: ModelRequest) -> tuple[ModelRequest, set[str]]:
        if not isinstance(request.model, ChatFeatureWatch):  # another model takes no featurewatch settings
            return request, set()
        settings, withhold = self.plan(request.model)
        return request.override(model_settings={**request.model_settings, _CALL_KWARG: settings}), withhold

    # ------------------------------------------------------------------ LangChain's hooks
    def wrap_model_call(self, request: ModelRequest,
                        handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse | ExtendedModelResponse:
        request, withhold = self._request(request)
        try:
            response = handler(request)
        except GenerationBlocked as blocked:
            return self._blocked(blocked.result.run, blocked.alert.detector)
        return self._judge(response, withhold)

    async def awrap_model_call(
            self, request: ModelRequest,
            handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> ModelResponse | ExtendedModelResponse:
        request, withhold = self._request(request)
        try:
            response = await handler(request)
        except GenerationBlocked as blocked:
            return self._blocked(blocked.result.run, blocked.alert.detector)
        return self._judge(response, withhold)

    # ------------------------------------------------------------------ outcomes
    def _judge(self, response: ModelResponse, withhold: set[str]) -> ExtendedModelResponse:
        message = next((m for m in reversed(response.result) if isinstance(m, AIMessage)), None)
        meta = message.response_metadata.get("featurewatch") if message is not None else None
        if not isinstance(meta, dict):
            if not self._warned:
                self._warned = True
                logger.warning("featurewatch: the agent's model reply carries no featurewatch run, so the call was "
                               "not monitored; use ChatFeatureWatch as the agent's model")
            record = FeatureWatchRecord(run_id=None, outcome="unmonitored", blocked_by=None, alerts=[], would_block=[])
            return ExtendedModelResponse(model_response=response, command=Command(update={"featurewatch": [record]}))
        alerts = list(meta.get("alerts") or [])
        culprit = next((a["detector"] for a in alerts if a["detector"] in withhold), None)
        if culprit is not None:
            return self._blocked_meta(meta, culprit)
        record = FeatureWatchRecord(run_id=meta.get("run_id"), outcome="completed", blocked_by=None, alerts=alerts,
                                    would_block=_would_block(alerts))
        return ExtendedModelResponse(model_response=response, command=Command(update={"featurewatch": [record]}))

    def _blocked(self, run: Any, detector: str) -> ExtendedModelResponse:
        return self._blocked_meta(run_metadata(run), detector)

    def _blocked_meta(self, meta: dict[str, Any], detector: str) -> ExtendedModelResponse:
        alerts = list(meta.get("alerts") or [])
        note = {**meta, "outcome": "blocked", "blocked_by": detector}
        message = AIMessage(content=self.blocked_message, response_metadata={"featurewatch": note},
                            id=f"featurewatch-blocked-{meta.get('run_id')}")
        record = FeatureWatchRecord(run_id=meta.get("run_id"), outcome="blocked", blocked_by=detector, alerts=alerts,
                                    would_block=_would_block(alerts))
        return ExtendedModelResponse(model_response=ModelResponse(result=[message]),
                                     command=Command(update={"featurewatch": [record]}))


def _would_block(alerts: list[dict[str, Any]]) -> list[str]:
    return sorted({a["detector"] for a in alerts if a.get("would_block")})
