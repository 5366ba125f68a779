"""Tapping vLLM: decoder layers call an opaque custom op; the runner and scheduler are wrapped.

Why this shape:

* **A custom op, not a forward hook.** vLLM compiles the model with
  ``torch.compile`` by default, and a hook added after that never fires,
  silently. A decoder layer whose ``forward`` is wrapped *before* compilation to
  call ``torch.ops.featurewatch.tap(hidden, residual, layer)`` keeps that call
  in the compiled graph: the op is opaque to the compiler (its fake returns an
  empty tensor like ``hidden``) and runs eagerly, in Python, every step. It
  returns a copy of ``hidden`` so the graph depends on it and it is never
  dropped. The engine monitor also checks after each step that every watched
  layer's tap ran, and stops the engine with the fix when one did not.
* **The runner tells the monitor the batch layout.** ``_model_forward`` (the one
  place a real step calls the model) is wrapped to hand the monitor the
  request ids, ``query_start_loc``, positions and input ids first;
  ``execute_model`` to close the requests the scheduler finished.
* **Blocking goes through the scheduler's own stop check.** The runner's output
  carries the blocked request ids (an attribute, so it also crosses the
  process boundary of a multiprocess executor), and the scheduler's
  ``check_stop`` finishes those requests as *stopped* with the stop reason
  ``featurewatch: blocked by <detector>``: the request ends after the step that
  fired, and no other request is touched.
* **Aborts are told apart.** The scheduler's ``finish_requests`` notes the
  requests finished as aborted (a client closed its stream), and the next
  scheduler output carries them (``featurewatch_aborted``) to the runner, so the
  monitor records them ``aborted``, without end-of-run verdicts.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...models import decoder_layers
from .engine import EngineMonitor

logger = logging.getLogger(__name__)


@dataclass
class _ProcessState:
    """This process's monitor (one vLLM worker per process), read by the tap op."""

    monitor: EngineMonitor | None = None


PROCESS = _ProcessState()
_OP: Any = None


def tap_op() -> Any:
    """The ``featurewatch::tap`` custom op (registered on first use)."""
    global _OP
    if _OP is None:
        @torch.library.custom_op("featurewatch::tap", mutates_args=())
        def tap(hidden: Tensor, residual: Optional[Tensor], layer: int) -> Tensor:  # noqa: UP045 (the op schema is read from it)
            monitor = PROCESS.monitor
            if monitor is not None:
                monitor.on_layer(layer, hidden, residual)
            return hidden.clone()

        @tap.register_fake
        def _(hidden: Tensor, residual: Optional[Tensor], layer: int) -> Tensor:  # noqa: UP045
            return torch.empty_like(hidden)

        _OP = tap
    return _OP


def is_missing(layer: nn.Module) -> bool:
    """A layer another pipeline stage holds (vLLM's ``PPMissingLayer``)."""
    return type(layer).__name__ == "PPMissingLayer"


def tap_layers(model: nn.Module, layers: list[int]) -> None:
    """Wrap the ``forward`` of decoder layers ``layers`` to call the tap op (idempotent)."""
    op = tap_op()
    mods = decoder_layers(model)
    for index in layers:
        layer = mods[index]
        if getattr(layer, "_featurewatch_tapped", False) or is_missing(layer):
            continue
        inner = layer.forward

        def forward(*args: Any, _inner: Any = inner, _index: int = index, **kwargs: Any) -> Any:
            out = _inner(*args, **kwargs)
            if isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]):
                return op(out[0], out[1], _index), out[1]  # vLLM layers return (hidden, residual)
            return op(out, None, _index)

        layer.forward = forward
        setattr(layer, "_featurewatch_tapped", True)  # noqa: B010 (nn.Module's typed __setattr__)


def tapped_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers that carry a tap."""
    return [i for i, layer in enumerate(decoder_layers(model)) if getattr(layer, "_featurewatch_tapped", False)]


# ---------------------------------------------------------------------- the model runner
def patch_runner(cls: Any) -> None:
    """Wrap a model runner class's step methods so the process's monitor sees each step (idempotent)."""
    if cls.__dict__.get("_featurewatch_patched"):
        return
    execute_model, model_forward, sample_tokens = cls.execute_model, cls._model_forward, cls.sample_tokens

    def _execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        monitor = PROCESS.monitor
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if monitor is not None and finished:
            monitor.finish(finished, aborted=getattr(scheduler_output, "featurewatch_aborted", ()))
        return execute_model(self, scheduler_output, *args, **kwargs)

    def _model_forward(self: Any, input_ids: Tensor | None = None, positions: Tensor | None = None,
                       *args: Any, **kwargs: Any) -> Any:
        monitor = PROCESS.monitor
        if monitor is None or positions is None:
            return model_forward(self, input_ids, positions, *args, **kwargs)
        batch = self.input_batch
        n = batch.num_reqs
        flat = positions if positions.ndim == 1 else positions[0]  # M-RoPE passes (3, n)
        monitor.begin_step(list(batch.req_ids[:n]), self.query_start_loc.cpu[:n + 1].tolist(), flat.cpu(),
                           None if input_ids is None else input_ids.cpu(), self.requests)
        try:
            out = model_forward(self, input_ids, positions, *args, **kwargs)
        except BaseException:
            monitor.step = None
            raise
        monitor.end_step()
        return out

    def _sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = sample_tokens(self, *args, **kwargs)
        monitor = PROCESS.monitor
        if monitor is not None and monitor.blocked and hasattr(out, "req_ids"):
            out = copy.copy(out)  # never mark a shared constant output (e.g. the empty one)
            out.featurewatch_blocked = dict(monitor.blocked)
        return out

    cls.execute_model = _execute_model
    cls._model_forward = _model_forward
    cls.sample_tokens = _sample_tokens
    cls._featurewatch_patched = True


def patch_scheduler() -> None:
    """Make vLLM's scheduler stop the requests the runner reports blocked (idempotent)."""
    from vllm.v1.core.sched import scheduler as sched
    from vllm.v1.request import RequestStatus

    if getattr(sched, "_featurewatch_patched", False):
        return
    reasons: dict[str, str] = {}
    aborted: set[str] = set()  # requests the client gave up on, until the next step's output names them
    check_stop, update = sched.check_stop, sched.Scheduler.update_from_output
    finish_requests, schedule = sched.Scheduler.finish_requests, sched.Scheduler.schedule

    def _check_stop(request: Any, max_model_len: int) -> bool:
        reason = reasons.pop(request.request_id, None)
        if reason is not None:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = reason
            return True
        return check_stop(request, max_model_len)

    def _update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        blocked = getattr(model_runner_output, "featurewatch_blocked", None)
        if blocked:
            live = {r.request_id for r in self.running}
            reasons.update({rid: why for rid, why in blocked.items() if rid in live})
        return update(self, scheduler_output, model_runner_output)

    def _finish_requests(self: Any, request_ids: Any, finished_status: Any, *args: Any, **kwargs: Any) -> Any:
        if finished_status == RequestStatus.FINISHED_ABORTED:
            ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
            live = getattr(self, "requests", None)
            aborted.update(r for r in ids if live is None or r in live)  # unknown ids are never finished
        return finish_requests(self, request_ids, finished_status, *args, **kwargs)

    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = schedule(self, *args, **kwargs)
        finished = set(getattr(out, "finished_req_ids", None) or ())
        if aborted & finished:
            # an attribute, so it crosses to a worker in another process with the scheduler output
            out.featurewatch_aborted = aborted & finished
            aborted.difference_update(finished)
        return out

    sched.check_stop = _check_stop
    sched.Scheduler.finish_requests = _finish_requests
    sched.Scheduler.schedule = _schedule
    sched.Scheduler.update_from_output = _update_from_output
    sched._featurewatch_patched = True


def runner_classes() -> list[Any]:
    """The model runner classes this vLLM build may use."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[Any] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        pass
    else:
        classes.append(CPUModelRunner)
    return classes
