"""ChatFeatureWatch: a LangChain chat model that runs the monitored model itself.

Why it is built this way:

* Every call runs :meth:`Monitor.generate` in a worker thread that reports, in
  order, the text as it is decoded, the alerts as they fire, and the end (the
  result, or the exception: :class:`~featurewatch.errors.GenerationBlocked`
  included). ``invoke``/``stream`` read those reports from a queue, and
  ``ainvoke``/``astream`` from an asyncio queue, so the event loop never waits
  on the model and concurrent calls share one model without sharing state.
* The monitor's run id is the LangChain run id. ``invoke`` gets it from the run
  manager; ``stream``/``astream`` (which LangChain calls without one) fix the
  run id in the config before the run starts and look it up again here.
* Alerts are dispatched as custom events named ``featurewatch.alert`` to the
  run's own handlers, so ``astream_events(version="v2")`` shows them between
  the model's start and end, and a tracer files them under the model's run.
* Stop sequences are cut in the decoded text (held back while the text could
  still become one), and stop the compute at the token that completes them.
* Tools (:meth:`ChatFeatureWatch.bind_tools`, which ``create_agent`` calls) are described to the
  model in the system message, Hermes/SmolLM2 style, and a reply's ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` blocks become the message's ``tool_calls``; tool results go
  back as user turns (the chat template knows system, user and assistant only). Whether a model
  writes such calls is the model's: the embedded 135M one does not.
* A call may carry ``featurewatch={"shadow": [...], "hold": bool}`` (what
  :class:`~.middleware.FeatureWatchMiddleware` binds): detectors whose ``block`` only marks
  ``would_block`` in this call, and whether tokens are held back from ``on_llm_new_token`` until
  the call ends (so a blocked call streams nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import queue
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import torch
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage, UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from ...alert import Alert
from ...generation import GenerationResult, render_prompt
from .common import ALERT_EVENT, router_for, run_metadata, to_chat

_RUN_KWARG = "featurewatch_run"  # carries the run id from stream()/astream() down to _stream()/_astream()
_CALL_KWARG = "featurewatch"  # per-call settings: {"shadow": [detector, ...], "hold": bool}
_NOT_FOR_GENERATE = {"stream", "model", _CALL_KWARG, "tools", "tool_choice", "parallel_tool_calls",
                     "ls_structured_output_format"}
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def _tool_prompt(tools: Sequence[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("You may call these tools:\n<tools>\n" + lines + "\n</tools>\nTo call a tool, reply with only "
            '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>.')


def _with_tools(prompt: list[dict[str, str]], tools: Sequence[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The chat with the tools described in its system message (one is added when there is none)."""
    if not tools:
        return prompt
    text = _tool_prompt(tools)
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + text}, *prompt[1:]]
    return [{"role": "system", "content": text}, *prompt]


def _agent_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """An agent's messages in roles the chat template knows: a tool result as a user turn, a tool call as
    the ``<tool_call>`` text the model would have written."""
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, ToolMessage):
            out.append(HumanMessage(f'<tool_response name="{m.name or ""}">\n{m.text}\n</tool_response>'))
        elif isinstance(m, AIMessage) and m.tool_calls:
            calls = "".join(f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['args']})}</tool_call>"
                            for c in m.tool_calls)
            out.append(AIMessage(m.text + calls if calls not in m.text else m.text))
        else:
            out.append(m)
    return out


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The ``<tool_call>{"name", "arguments"}</tool_call>`` blocks of a reply, as tool-call chunks."""
    calls = []
    for i, match in enumerate(_TOOL_CALL.finditer(text)):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"name": call["name"], "args": json.dumps(call.get("arguments") or {}),
                          "id": f"call_{uuid.uuid4().hex[:12]}", "index": i, "type": "tool_call_chunk"})
    return calls
Event = tuple[str, Any]  # ("text", str) | ("alert", Alert) | ("done", (GenerationResult, int)) | ("error", exc)


class _TextStream:
    """A ``model.generate`` streamer: decodes new tokens to text and cuts it at the first stop sequence."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stop, self.emit = tokenizer, [s for s in stop if s], emit
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate() first hands over the prompt
            self._prompt = False
            return
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.text = text
            self._flush(final=False)

    def end(self) -> None:
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, upto = True, cut
        elif final:
            upto = len(self.text)
        else:  # hold back a tail that may still grow into a stop sequence
            held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            upto = len(self.text) - held
        if upto > self.sent:
            self.emit(self.text[self.sent:upto])
            self.sent = upto


class _Until:
    """A stopping criterion: a stop sequence was written, or the caller went away."""

    def __init__(self, stream: _TextStream, cancelled: threading.Event) -> None:
        self.stream, self.cancelled = stream, cancelled

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.stream.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class ChatFeatureWatch(BaseChatModel):
    """A LangChain chat model on a monitored Hugging Face model.

    Example::

        from featurewatch import Monitor, GenerationBlocked
        from featurewatch.integrations.langchain import ChatFeatureWatch

        chat = ChatFeatureWatch(monitor=Monitor.default(), max_new_tokens=128)
        reply = chat.invoke("Draft a short reply to a customer asking about a refund.")
        reply.response_metadata["featurewatch"]    # run_id, scores, alerts, outcome
        safe = chat.with_fallbacks([refusal], exceptions_to_handle=(GenerationBlocked,))

    A ``block`` alert stops the generation and raises
    :class:`~featurewatch.GenerationBlocked` (partial text in ``.result.text``).
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    monitor: Any = Field(repr=False, exclude=True)
    """The :class:`~featurewatch.Monitor` whose model generates."""
    max_new_tokens: int = Field(default=64, ge=1, alias="max_tokens")
    """Most tokens to generate (``max_tokens`` is accepted too)."""
    temperature: float | None = None
    """Sampling temperature; None or 0 decodes greedily."""
    stop: list[str] | None = None
    """Stop sequences for every call (on top of a call's own ``stop``)."""
    model_name: str | None = Field(default=None, alias="model")
    """The name reported to LangChain; the monitor's model name by default."""
    streaming: bool = False
    """Stream tokens to callbacks also on ``invoke``."""
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More arguments for ``model.generate`` (e.g. ``repetition_penalty``)."""

    _calls: dict[str, RunnableConfig] = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "featurewatch"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Describe ``tools`` to the model in each call's system message; ``<tool_call>`` blocks in the reply
        become ``tool_calls`` (see the module docstring). ``tool_choice`` is accepted and not enforced."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, **({"tool_choice": tool_choice} if tool_choice else {}), **kwargs)

    @property
    def name_of_model(self) -> str:
        return self.model_name or getattr(self.monitor, "model_name", "") or "featurewatch"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.name_of_model, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "featurewatch"
        params["ls_model_name"] = kwargs.get("model", self.name_of_model)
        params["ls_max_tokens"] = self.max_new_tokens
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ run ids for stream()/astream()
    def _fix_run_id(self, config: RunnableConfig | None) -> tuple[RunnableConfig, str]:
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid.uuid4()
        config["run_id"] = run_id
        self._calls[str(run_id)] = config
        return config, str(run_id)

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        config, key = self._fix_run_id(config)
        try:
            yield from super().stream(input, config, stop=stop, **{_RUN_KWARG: key}, **kwargs)
        finally:
            self._calls.pop(key, None)

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config, key = self._fix_run_id(config)
        try:
            async for chunk in super().astream(input, config, stop=stop, **{_RUN_KWARG: key}, **kwargs):
                yield chunk
        finally:
            self._calls.pop(key, None)

    def _should_stream(self, *, async_api: bool, run_manager: Any = None, **kwargs: Any) -> bool:
        # invoke() always reaches _generate, which has the run manager (run id, events) and streams
        # tokens to callbacks itself; only stream()/astream() (stream=True) go through _stream.
        return bool(kwargs.get("stream")) and super()._should_stream(async_api=async_api,
                                                                     run_manager=run_manager, **kwargs)

    def _run(self, run_manager: Any, kwargs: dict[str, Any],
             manager_cls: type[CallbackManager | AsyncCallbackManager]) -> tuple[str, Any]:
        """The run id, and a callback manager that reaches the run's handlers (None: no events)."""
        key = kwargs.pop(_RUN_KWARG, None)
        if run_manager is not None:
            manager = manager_cls(handlers=run_manager.handlers, inheritable_handlers=run_manager.inheritable_handlers,
                                  parent_run_id=run_manager.parent_run_id, tags=run_manager.tags,
                                  inheritable_tags=run_manager.inheritable_tags, metadata=run_manager.metadata,
                                  inheritable_metadata=run_manager.inheritable_metadata)
            return str(run_manager.run_id), manager
        config = self._calls.get(key) if key else None
        if config is None:
            return uuid.uuid4().hex, None
        return key, manager_cls.configure(config.get("callbacks"), self.callbacks, self.verbose, config.get("tags"),
                                          self.tags, config.get("metadata"), self.metadata)

    # ------------------------------------------------------------------ the worker
    def _start(self, messages: list[BaseMessage], stop: list[str] | None, run_id: str,
               put: Callable[[Event], None], kwargs: dict[str, Any]) -> threading.Event:
        """Start generating in a worker thread; set the returned event to stop it early."""
        monitor = self.monitor
        prompt = _with_tools(to_chat(_agent_messages(messages)), kwargs.get("tools"))
        shadow = list((kwargs.get(_CALL_KWARG) or {}).get("shadow") or ())
        stream = _TextStream(monitor.tokenizer, [*(self.stop or []), *(stop or [])], lambda t: put(("text", t)))
        cancelled = threading.Event()
        gen = {**self.generate_kwargs, **{k: v for k, v in kwargs.items() if k not in _NOT_FOR_GENERATE}}
        if self.temperature:
            gen.setdefault("do_sample", True)
            gen.setdefault("temperature", self.temperature)
        max_new = int(gen.pop("max_new_tokens", gen.pop("max_tokens", self.max_new_tokens)))

        def work() -> None:
            router = router_for(monitor)
            router.listen(run_id, lambda alert: put(("alert", alert)))
            try:
                n_prompt = len(render_prompt(prompt, monitor.tokenizer).ids)
                result = monitor.generate(prompt, max_new_tokens=max_new, run_id=run_id, streamer=stream,
                                          stopping_criteria=[_Until(stream, cancelled)], shadow=shadow, **gen)
                put(("done", (result, n_prompt, stream.stopped)))
            except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread, raised there
                put(("error", exc))
            finally:
                router.forget(run_id)

        # the caller's context goes along (an open OpenTelemetry span: featurewatch.otel enriches it)
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"featurewatch-{run_id[:8]}",
                         daemon=True).start()
        return cancelled

    def _events(self, messages: list[BaseMessage], stop: list[str] | None, run_id: str,
                kwargs: dict[str, Any]) -> Iterator[Event]:
        reports: queue.Queue[Event] = queue.Queue()
        cancelled = self._start(messages, stop, run_id, reports.put, kwargs)
        try:
            while True:
                event = reports.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            cancelled.set()

    async def _aevents(self, messages: list[BaseMessage], stop: list[str] | None, run_id: str,
                       kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[Event] = asyncio.Queue()

        def put(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(reports.put_nowait, event)

        cancelled = self._start(messages, stop, run_id, put, kwargs)
        try:
            while True:
                event = await reports.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            cancelled.set()

    # ------------------------------------------------------------------ reports → LangChain
    def _metadata(self, done: tuple[GenerationResult, int, bool]) -> tuple[UsageMetadata, dict[str, Any]]:
        result, n_prompt, stopped = done
        n_out = len(result.token_ids)
        eos = getattr(self.monitor.tokenizer, "eos_token_id", None)
        finish = "stop" if stopped or (result.token_ids and result.token_ids[-1] == eos) else "length"
        usage = UsageMetadata(  # type: ignore[typeddict-item]  # the token-detail keys are optional at run time
            input_tokens=n_prompt, output_tokens=n_out, total_tokens=n_prompt + n_out)
        return usage, {"model_name": self.name_of_model, "finish_reason": finish,
                       "featurewatch": run_metadata(result.run)}

    def _translate(self, event: Event) -> ChatGenerationChunk | Alert:
        """One report of the worker as LangChain takes it: a chunk of text, the last chunk (usage and
        ``response_metadata``), or an alert to dispatch; an error is raised."""
        kind, payload = event
        if kind == "error":
            raise payload
        if kind == "alert":
            return payload
        if kind == "text":
            return ChatGenerationChunk(message=AIMessageChunk(content=payload))
        usage, meta = self._metadata(payload)
        calls = parse_tool_calls(payload[0].text)
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta,
                                                          tool_call_chunks=calls,  # type: ignore[arg-type]
                                                          chunk_position="last"))

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None,
                kwargs: dict[str, Any], *, tokens: bool) -> Iterator[ChatGenerationChunk]:
        """The generation as chunks; alerts go to the run's handlers, and text chunks to ``on_llm_new_token``
        when ``tokens``."""
        run_id, events = self._run(run_manager, kwargs, CallbackManager)
        for event in self._events(messages, stop, run_id, kwargs):
            item = self._translate(event)
            if isinstance(item, Alert):
                if events is not None:
                    events.on_custom_event(ALERT_EVENT, item.model_dump(mode="json"), run_id=uuid.UUID(run_id))
                continue
            if tokens and run_manager is not None and event[0] == "text":
                run_manager.on_llm_new_token(item.text, chunk=item)
            yield item

    async def _achunks(self, messages: list[BaseMessage], stop: list[str] | None,
                       run_manager: AsyncCallbackManagerForLLMRun | None, kwargs: dict[str, Any], *,
                       tokens: bool) -> AsyncIterator[ChatGenerationChunk]:
        """:meth:`_chunks` for the event loop."""
        run_id, events = self._run(run_manager, kwargs, AsyncCallbackManager)
        async for event in self._aevents(messages, stop, run_id, kwargs):
            item = self._translate(event)
            if isinstance(item, Alert):
                if events is not None:
                    await events.on_custom_event(ALERT_EVENT, item.model_dump(mode="json"), run_id=uuid.UUID(run_id))
                continue
            if tokens and run_manager is not None and event[0] == "text":
                await run_manager.on_llm_new_token(item.text, chunk=item)
            yield item

    # ------------------------------------------------------------------ LangChain's four entry points
    # invoke() is the stream merged (langchain-core's generate_from_stream); it streams tokens to
    # callbacks only where LangChain would (a streaming handler, or streaming=True)
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        tokens = run_manager is not None and not _hold(kwargs) and BaseChatModel._should_stream(
            self, async_api=False, run_manager=run_manager)
        return generate_from_stream(self._chunks(messages, stop, run_manager, kwargs, tokens=tokens))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        tokens = run_manager is not None and not _hold(kwargs) and BaseChatModel._should_stream(
            self, async_api=True, run_manager=run_manager)
        return await agenerate_from_stream(self._achunks(messages, stop, run_manager, kwargs, tokens=tokens))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, run_manager, kwargs, tokens=True)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self._achunks(messages, stop, run_manager, kwargs, tokens=True):
            yield chunk


def _hold(kwargs: dict[str, Any]) -> bool:
    """The call asked for its tokens to be held back from token callbacks until it ends."""
    return bool((kwargs.get(_CALL_KWARG) or {}).get("hold"))
