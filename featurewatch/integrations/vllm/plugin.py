"""The ``vllm.general_plugins`` entry point: ``FEATUREWATCH_PACK=... vllm serve MODEL`` monitors every request.

vLLM calls :func:`register` in each of its processes (API server, engine core,
workers). With ``FEATUREWATCH_PACK`` unset it does nothing. With it set:

* every process: the runner's ``load_model`` taps the pack's layers right after
  the model loads, before vLLM compiles it (so compiled mode works), and
  creates the worker's :class:`~.engine.EngineMonitor` (on tensor-parallel rank
  0 only: the residual stream is replicated across ranks, read it once);
* the process that builds the engine config: prefix caching is turned off
  (featurewatch must read every prompt token; cached prefixes skip the model);
* the API server: vLLM's ``/metrics`` is switched to prometheus_client's
  multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, the mode vLLM itself uses
  for several API servers; vLLM then serves the merged directory), so the worker's featurewatch series are served
  next to vLLM's, whatever the process layout. Alerts go to the JSON alert log.

A bad setting raises here, so ``vllm serve`` fails at start-up with the message
rather than serving unmonitored.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import RequestPolicy, env_flag, shadow_switch

if TYPE_CHECKING:
    from ...sinks import Sink

logger = logging.getLogger(__name__)

ENV_PACK = "FEATUREWATCH_PACK"


@dataclass(frozen=True)
class PluginConfig:
    """What the plugin does, from the environment (read when vLLM loads the plugin, never at import)."""

    pack: str
    """``FEATUREWATCH_PACK``: a shipped pack name or a pack directory."""
    detectors: tuple[str, ...] | None = None
    """``FEATUREWATCH_DETECTORS``: comma-separated detector names (default: the pack's defaults)."""
    alert_log: str | None = None
    """``FEATUREWATCH_ALERT_LOG``: file the JSON alert lines are appended to (default: stderr)."""
    alert_text: bool = False
    """``FEATUREWATCH_ALERT_TEXT=1``: put the alert span's text in the log lines (personal data, off by default)."""
    metrics: bool = True
    """``FEATUREWATCH_METRICS=0``: no Prometheus series."""
    fail_closed: bool = False
    """``FEATUREWATCH_FAIL_CLOSED=1``: a monitoring fault fails the step instead of marking the run degraded."""
    model_name: str | None = None
    """``FEATUREWATCH_MODEL_NAME``: the ``model_name`` label (default: vLLM's served model name)."""
    allow_request_options: bool = False
    """``FEATUREWATCH_ALLOW_REQUEST_OPTIONS=1``: honour ``featurewatch_off``/``featurewatch_detectors`` in requests."""
    optional_detectors: tuple[str, ...] | None = None
    """``FEATUREWATCH_OPTIONAL_DETECTORS``: the detectors a request may leave out (default: the non-``block`` ones)."""
    shadow: bool | tuple[str, ...] | None = None
    """``FEATUREWATCH_SHADOW``: ``block`` detectors in shadow mode (``1``: all, or comma-separated names; ``0``:
    none): they alert with ``would_block`` and the request goes on. Unset: the pack's ``shadow``."""

    @property
    def request_policy(self) -> RequestPolicy:
        return RequestPolicy(allow=self.allow_request_options, optional=self.optional_detectors)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PluginConfig | None:
        """The configuration in ``env``, or None when ``FEATUREWATCH_PACK`` is not set."""
        pack = env.get(ENV_PACK, "").strip()
        if not pack:
            return None
        names = [n.strip() for n in env.get("FEATUREWATCH_DETECTORS", "").split(",") if n.strip()]
        optional = env.get("FEATUREWATCH_OPTIONAL_DETECTORS")
        return cls(pack=pack, detectors=tuple(names) or None, alert_log=env.get("FEATUREWATCH_ALERT_LOG") or None,
                   alert_text=env_flag(env, "FEATUREWATCH_ALERT_TEXT", False),
                   metrics=env_flag(env, "FEATUREWATCH_METRICS", True),
                   fail_closed=env_flag(env, "FEATUREWATCH_FAIL_CLOSED", False),
                   model_name=env.get("FEATUREWATCH_MODEL_NAME") or None,
                   allow_request_options=env_flag(env, "FEATUREWATCH_ALLOW_REQUEST_OPTIONS", False),
                   optional_detectors=None if optional is None else
                   tuple(n.strip() for n in optional.split(",") if n.strip()),
                   shadow=shadow_switch(env.get("FEATUREWATCH_SHADOW", "")))

    def validate(self) -> None:
        """Load the pack, select the detectors, open the alert log: raise :class:`ConfigError` naming the fix."""
        from ...errors import ConfigError
        from ...pack import load_pack
        from ...runbook import shadow_set

        selected = load_pack(self.pack).select(list(self.detectors) if self.detectors else None)
        if self.shadow is not None:
            shadow_set(self.shadow, selected, where="FEATUREWATCH_SHADOW")
        unknown = sorted(set(self.optional_detectors or ()) - {d.name for d in selected})
        if unknown:
            raise ConfigError(f"FEATUREWATCH_OPTIONAL_DETECTORS names detectors this server does not run "
                              f"({', '.join(unknown)}); detectors: {', '.join(d.name for d in selected)}")
        if self.alert_log:
            try:
                with open(self.alert_log, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                raise ConfigError(f"FEATUREWATCH_ALERT_LOG={self.alert_log}: cannot append to it "
                                  f"({exc.strerror or exc}); give a writable file, or unset it to log alerts to "
                                  "stderr") from None


def register() -> None:
    """vLLM's general-plugin hook (called in every vLLM process, possibly more than once)."""
    config = PluginConfig.from_env(os.environ)  # a bad boolean raises here, naming the variable
    if config is None:
        return
    config.validate()
    from . import worker

    for cls in worker.runner_classes():
        _patch_load_model(cls, config)
    worker.patch_runner(worker.runner_classes()[0])
    worker.patch_scheduler()
    _patch_engine_args()
    if config.metrics and _is_api_server():
        _multiprocess_metrics()


def _patch_load_model(cls: type, config: PluginConfig) -> None:
    if "load_model" not in cls.__dict__ or cls.__dict__.get("_featurewatch_load"):
        return
    load_model = cls.__dict__["load_model"]

    def _load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = load_model(self, *args, **kwargs)
        from .install import install

        install(self, pack=config.pack, detectors=config.detectors, sinks=_sinks(config),
                capture_text=config.alert_text, fail_closed=config.fail_closed, model_name=config.model_name,
                request_policy=config.request_policy, shadow=config.shadow)
        return out

    cls.load_model = _load_model  # type: ignore[attr-defined]
    cls._featurewatch_load = True  # type: ignore[attr-defined]


def _sinks(config: PluginConfig) -> list[Sink]:
    from ...alertlog import ALERT_LOGGER, JsonAlertLog

    alerts = logging.getLogger(ALERT_LOGGER)
    if not any(getattr(h, "_featurewatch", False) for h in alerts.handlers):
        handler: logging.Handler = (logging.FileHandler(config.alert_log, encoding="utf-8") if config.alert_log
                                    else logging.StreamHandler(sys.stderr))
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._featurewatch = True  # type: ignore[attr-defined]
        alerts.addHandler(handler)
        alerts.setLevel(logging.INFO)
        alerts.propagate = False
    sinks: list[Sink] = [JsonAlertLog(include_text=config.alert_text)]
    # Series reach /metrics when they land in the multiprocess directory the API server serves.
    if config.metrics and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from ...metrics import PrometheusMetrics

        sinks.append(PrometheusMetrics())
    return sinks


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if EngineArgs.__dict__.get("_featurewatch_patched"):
        return
    create = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.enable_prefix_caching is not False:  # None: vLLM's default, on
            logger.warning("featurewatch: prefix caching turned off (every prompt token must pass the monitored "
                           "layers; a cached prefix would skip them)")
        self.enable_prefix_caching = False
        return create(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._featurewatch_patched = True


_API_SERVER_MODULES = ("vllm.entrypoints.cli.serve", "vllm.entrypoints.openai.api_server",
                       "vllm.entrypoints.launchers.api_server.entry")


def _is_api_server() -> bool:
    return any(m in sys.modules for m in _API_SERVER_MODULES)


def _multiprocess_metrics() -> None:
    """Serve every process's series on the API server's /metrics (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # already multiprocess (several API servers, or set by the operator)
    import atexit
    import shutil
    import tempfile

    from prometheus_client import values

    # a directory of our own, as vLLM makes one for several API servers (its clean-up of that one
    # is reserved for its own: this process removes ours at exit)
    directory = tempfile.mkdtemp(prefix="featurewatch-prometheus-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus_client chose in-memory values when it was imported; metrics made from now on
    # (vLLM's are made when the engine client starts) write to the directory instead.
    values.ValueClass = values.get_value_class()
    logger.info("featurewatch: Prometheus multiprocess mode in %s", os.environ["PROMETHEUS_MULTIPROC_DIR"])
