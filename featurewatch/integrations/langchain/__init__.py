"""LangChain integration: a callback handler for apps that already run a local model, and a chat model.

Two surfaces, one monitor:

* :class:`FeatureWatchCallbackHandler` — put it in ``callbacks=[...]`` of a
  ``ChatHuggingFace``/``HuggingFacePipeline`` call that runs the monitored
  model; it reads that call's features, in ``"shadow"`` mode (observe) or
  ``"enforce"`` mode (a ``block`` alert stops the compute and raises
  :class:`~featurewatch.GenerationBlocked`).
* :class:`ChatFeatureWatch` — a ``BaseChatModel`` that runs the monitored model
  itself: invoke, batch, stream and their async forms, with alerts as
  ``featurewatch.alert`` custom events and in ``response_metadata["featurewatch"]``.
* :class:`FeatureWatchMiddleware` — middleware for a LangChain 1.x agent
  (``langchain.agents.create_agent``) around a ``ChatFeatureWatch``: records each model
  call's alerts in the agent state, and in ``enforce`` mode stops a call that blocks with
  a typed outcome. Needs ``langchain`` 1.x (``featurewatch[langchain-agents]``); imported
  on first use, so the other two never need it.

In both, the monitor's run id is the LangChain run id, so one id joins a
LangChain trace, the JSON alert log and Prometheus exemplars.

Needs ``pip install 'featurewatch[langchain]'`` (and ``langchain-huggingface``
for the handler's usual partner); importing :mod:`featurewatch` alone never
imports LangChain.
"""

from __future__ import annotations

from importlib.util import find_spec

if find_spec("langchain_core") is None:  # pragma: no cover — exercised where LangChain is absent
    raise ImportError("featurewatch.integrations.langchain needs LangChain: pip install 'featurewatch[langchain]'")

from typing import TYPE_CHECKING, Any

from .chat import ChatFeatureWatch
from .common import ALERT_EVENT
from .handler import FeatureWatchCallbackHandler

if TYPE_CHECKING:
    from .middleware import FeatureWatchMiddleware

__all__ = ["ALERT_EVENT", "ChatFeatureWatch", "FeatureWatchCallbackHandler", "FeatureWatchMiddleware"]


def __getattr__(name: str) -> Any:
    if name == "FeatureWatchMiddleware":  # needs the langchain package (1.x), not only langchain-core
        if find_spec("langchain") is None or find_spec("langchain.agents") is None:
            raise ImportError("FeatureWatchMiddleware needs LangChain 1.x agents: "
                              "pip install 'featurewatch[langchain-agents]'")
        from .middleware import FeatureWatchMiddleware

        return FeatureWatchMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
