"""Putting an :class:`~.engine.EngineMonitor` into a loaded vLLM model runner (plugin and ``attach``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...models import decoder_layers
from ...pack import Pack, load_pack
from ...runbook import ShadowSwitch
from ...sinks import Sink
from .engine import EngineMonitor
from .options import SERVER_DEFAULT, RequestPolicy
from .worker import PROCESS, is_missing, patch_runner, patch_scheduler, runner_classes, tap_layers, tapped_layers

logger = logging.getLogger(__name__)


def external_id(req_id: str) -> str:
    """The request id vLLM's caller sees: the engine appends ``-`` and 8 random characters to it."""
    from vllm import envs

    if not envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION and len(req_id) > 9 and req_id[-9] == "-":
        return req_id[:-9]
    return req_id


def install(runner: Any, *, pack: Pack | str | Path, detectors: Sequence[str] | None = None,
            sinks: Sequence[Sink] = (), capture_text: bool = True, fail_closed: bool = False,
            keep_events: bool = False, model_name: str | None = None, after_start: bool = False,
            request_policy: RequestPolicy = SERVER_DEFAULT, shadow: ShadowSwitch = None) -> EngineMonitor | None:
    """Monitor ``runner``'s requests in this process; None on ranks that do not read (TP rank > 0, other stages).

    ``after_start``: the engine already ran (``attach``): layers not tapped at load time can
    only be tapped now when the model runs eagerly.
    """
    from transformers import AutoTokenizer
    from vllm.config import CompilationMode
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    vllm_config = runner.vllm_config
    if vllm_config.cache_config.enable_prefix_caching:
        raise ConfigError("featurewatch must read every prompt token, and prefix caching skips cached ones: "
                          "create the engine with enable_prefix_caching=False (--no-enable-prefix-caching), "
                          "or set FEATUREWATCH_PACK before it starts (the plugin turns it off)")
    if get_tensor_model_parallel_rank() != 0:
        return None  # the residual stream after a layer is the same on every TP rank: rank 0 reads it
    model_config = runner.model_config
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                              trust_remote_code=model_config.trust_remote_code)
    served = model_config.served_model_name
    name = model_name or (served if isinstance(served, str) else served[0] if served else model_config.model)
    monitor = EngineMonitor(runner.model, tokenizer, pack=load_pack(pack) if not isinstance(pack, Pack) else pack,
                            detectors=detectors, sinks=sinks, model_name=name, capture_text=capture_text,
                            fail_closed=fail_closed, keep_events=keep_events, external_id=external_id,
                            request_policy=request_policy, shadow=shadow)
    layers = decoder_layers(runner.model)
    here = [i for i in monitor.layers if not is_missing(layers[i])]
    if not here:
        logger.info("featurewatch: layers %s are on another pipeline stage", monitor.layers)
        return None
    if len(here) != len(monitor.layers):
        raise ConfigError(f"featurewatch: the watched layers {monitor.layers} are split across pipeline stages "
                          f"(this stage holds {here}); watch layers of one stage")
    if not get_pp_group().is_last_rank and any(d.action == "block" for d in monitor.detectors):
        raise ConfigError("featurewatch: a block detector's layer is on a pipeline stage that is not the last, "
                          "whose output does not reach the scheduler; use alert detectors, or pipeline stages "
                          "that put the watched layer on the last one")
    untapped = sorted(set(monitor.layers) - set(tapped_layers(runner.model)))
    if untapped and after_start and vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ConfigError(f"featurewatch: the engine is compiled and layers {untapped} carry no tap, so they cannot "
                          "be monitored; create the LLM with enforce_eager=True, or set FEATUREWATCH_PACK (a pack "
                          "with these hookpoints) before creating it so the plugin taps them before compilation")
    tap_layers(runner.model, monitor.layers)
    patch_runner(runner_classes()[0])
    patch_scheduler()
    PROCESS.monitor = monitor
    logger.info("featurewatch: monitoring %s at layers %s with %s", name, monitor.layers,
                ", ".join(d.name for d in monitor.detectors))
    return monitor
