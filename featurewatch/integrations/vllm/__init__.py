"""featurewatch inside vLLM: the plugin for ``vllm serve``, and :func:`attach` for ``vllm.LLM``.

Server: ``FEATUREWATCH_PACK=smollm2-135m-instruct vllm serve DIR`` (see
:mod:`.plugin`). Python::

    from vllm import LLM, SamplingParams
    from featurewatch.integrations.vllm import attach

    llm = LLM("smollm2-hf", enforce_eager=True, enable_prefix_caching=False)
    monitor = attach(llm, pack="smollm2-135m-instruct", on_alert=print)
    outputs = llm.chat([[{"role": "user", "content": "Write a phishing email."}]], SamplingParams(max_tokens=32))
    monitor.result(outputs[0].request_id).scores

The monitor runs in vLLM's worker (another process, by default); alerts and
results reach this process's callbacks and sinks when :meth:`VLLMMonitor.collect`
runs (``result`` and ``results`` call it). Per request,
``SamplingParams(extra_args={"featurewatch_off": True})`` leaves a request
unmonitored and ``{"featurewatch_detectors": ["scam-email"]}`` picks detectors (``attach``
honours them; a server does only where its operator allows it, see :mod:`.options`).

vLLM is imported only when these functions run; install it with
``bash .ci/setup-vllm.sh`` (a venv of its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ...alert import Alert, RunResult
from ...errors import ConfigError
from ...pack import DEFAULT_PACK, load_pack, resolve_pack_path
from ...runbook import shadow_set
from ...sinks import Fanout, Sink
from .options import DETECTORS_KEY, OFF_KEY, RequestPolicy, safe_run_id

__all__ = ["DETECTORS_KEY", "OFF_KEY", "VLLMMonitor", "attach"]

_INSTALL_HINT = "featurewatch's vLLM integration needs vLLM: bash .ci/setup-vllm.sh (creates .venv-vllm)"


def _rpc_attach(worker: Any, pack: str, detectors: list[str] | None, capture_text: bool, fail_closed: bool,
                shadow: bool | list[str] | None = None) -> Any:
    from .install import install

    monitor = install(worker.model_runner, pack=pack, detectors=detectors, capture_text=capture_text,
                      fail_closed=fail_closed, keep_events=True, after_start=True, shadow=shadow)
    if monitor is not None:
        # the caller of attach() owns the LLM (operator and client at once): every request option is honoured
        monitor.request_policy = RequestPolicy(allow=True, optional=tuple(d.name for d in monitor.detectors))
    return None if monitor is None else {"layers": monitor.layers, "detectors": [d.name for d in monitor.detectors],
                                         "model_name": monitor.model_name}


def _rpc_drain(worker: Any) -> list[Alert | RunResult]:
    from .worker import PROCESS

    return PROCESS.monitor.drain() if PROCESS.monitor is not None else []


def _rpc_detach(worker: Any) -> None:
    from .worker import PROCESS

    if PROCESS.monitor is not None:
        PROCESS.monitor.finish(list(PROCESS.monitor.runs), error=True)
        PROCESS.monitor = None


class VLLMMonitor:
    """A handle on featurewatch inside a ``vllm.LLM``: results by request id, alerts to your callbacks."""

    def __init__(self, llm: Any, *, model_name: str, detectors: list[str], layers: list[int],
                 fanout: Fanout, in_process: bool) -> None:
        self.llm = llm
        self._in_process = in_process
        self.model_name = model_name
        self.detectors = detectors
        self.layers = layers
        self._fanout = fanout
        self._results: dict[str, RunResult] = {}
        self._attached = True

    def collect(self) -> list[RunResult]:
        """Fetch the alerts and finished runs from the workers; deliver them to callbacks and sinks."""
        finished = []
        for events in self.llm.collective_rpc(_rpc_drain):
            for event in events or []:
                if isinstance(event, Alert):
                    self._fanout.alert(event)
                else:
                    self._results[event.run_id] = event
                    self._fanout.emit("on_run_end", event)
                    finished.append(event)
        return finished

    def _flush(self) -> None:
        # vLLM tells its workers which requests finished with the next step; an idle
        # in-process engine takes no next step, so take one (it schedules nothing new).
        engine = getattr(self.llm, "llm_engine", None)
        if self._in_process and engine is not None and not engine.has_unfinished_requests():
            engine.step()

    def result(self, request_id: str, *, timeout: float = 5.0) -> RunResult:
        """The :class:`RunResult` of a finished request (``RequestOutput.request_id``)."""
        deadline = time.monotonic() + timeout
        request_id = safe_run_id(request_id)  # as the worker keys it
        while request_id not in self._results:
            self._flush()
            self.collect()
            if request_id in self._results or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # an engine in another process flushes on its own, a moment later
        try:
            return self._results[request_id]
        except KeyError:
            raise ConfigError(f"no featurewatch result for request {request_id!r}: it is unfinished, was "
                              f"unmonitored ({OFF_KEY}), or ran before attach()") from None

    def results(self, request_ids: Iterable[str]) -> list[RunResult]:
        """The results of several finished requests, in order."""
        return [self.result(r) for r in request_ids]

    def detach(self) -> None:
        """Stop monitoring (the layer taps stay, as no-ops); safe to call more than once."""
        if self._attached:
            self._attached = False
            self._flush()
            self.collect()
            self.llm.collective_rpc(_rpc_detach)
            self._fanout.emit("on_detach")

    def __enter__(self) -> VLLMMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach(llm: Any, *, pack: str | Path = DEFAULT_PACK, detectors: Sequence[str] | None = None,
           sinks: Sequence[Sink] = (), on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] = (),
           capture_text: bool = True, fail_closed: bool = False,
           shadow: bool | Sequence[str] | None = None) -> VLLMMonitor:
    """Monitor every request of ``llm`` (a ``vllm.LLM``) with a pack's detectors; see the module docstring.

    The LLM needs ``enable_prefix_caching=False``, and either ``enforce_eager=True`` or
    ``FEATUREWATCH_PACK`` set before it was created (so its layers were tapped before
    compilation). With vLLM's engine in another process (the default), the attach call
    crosses it as a function: set ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, or run the engine
    in-process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``. ``shadow``: ``block`` detectors that only
    alert ``would_block`` (True: all; default: the pack's ``shadow``).
    """
    try:
        from vllm import envs
    except ImportError as exc:
        raise ConfigError(_INSTALL_HINT) from exc
    in_process = not envs.VLLM_ENABLE_V1_MULTIPROCESSING
    if not in_process and not envs.VLLM_ALLOW_INSECURE_SERIALIZATION:
        raise ConfigError("attach() sends featurewatch's set-up to vLLM's engine process as a function, which vLLM "
                          "refuses by default: set VLLM_ALLOW_INSECURE_SERIALIZATION=1 (or "
                          "VLLM_ENABLE_V1_MULTIPROCESSING=0 to run the engine in this process) before creating "
                          "the LLM")
    path = str(resolve_pack_path(pack))
    selected = load_pack(path).select(list(detectors) if detectors is not None else None)  # fail here, not in
    if shadow is not None:                                                                  # the worker
        shadow_set(shadow, selected)
    switch = shadow if isinstance(shadow, (bool, type(None))) else list(shadow)
    infos = [i for i in llm.collective_rpc(_rpc_attach, args=(path, list(detectors) if detectors else None,
                                                               capture_text, fail_closed, switch)) if i]
    if not infos:
        raise ConfigError("no vLLM worker took the monitor (no rank holds the watched layers)")
    callbacks = [on_alert] if callable(on_alert) else list(on_alert)
    fanout = Fanout(sinks, callbacks, fail_closed=fail_closed)
    info = infos[0]
    fanout.emit("on_attach", model_name=info["model_name"],
                detectors=load_pack(path).select(info["detectors"]))
    return VLLMMonitor(llm, model_name=info["model_name"], detectors=info["detectors"], layers=info["layers"],
                       fanout=fanout, in_process=in_process)
