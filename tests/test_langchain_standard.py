"""LangChain's own standard test suites for chat models, against ChatFeatureWatch.

Capabilities ChatFeatureWatch does not have are declared off through the
suites' properties (the suites then skip those tests themselves); nothing is
skipped by hand. The unit suite runs on a monitor over the tiny in-process
Llama (it never generates); the integration suite on the embedded model with
the default pack, short generations, one monitor for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from conftest import make_monitor
from featurewatch import Monitor
from featurewatch.integrations.langchain import ChatFeatureWatch


class _Capabilities:
    """What ChatFeatureWatch can and cannot do, as the standard suites ask it."""

    monitor: Any = None

    @property
    def chat_model_class(self) -> type[ChatFeatureWatch]:
        return ChatFeatureWatch

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"monitor": self.monitor}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # one monitored model per instance

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatFeatureWatchUnit(_Capabilities, ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _monitor(self, tiny_llama: Any, tiny_tokenizer: Any) -> Iterator[None]:
        monitor = Monitor(tiny_llama, tiny_tokenizer)
        type(self).monitor = monitor
        yield
        monitor.detach()


@pytest.fixture(scope="module")
def default_monitor(smollm: Any) -> Iterator[Monitor]:
    monitor = make_monitor(smollm, model_name=smollm.name)
    yield monitor
    monitor.detach()


@pytest.mark.slow
class TestChatFeatureWatchIntegration(_Capabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "max_tokens": 8}  # short generations: the suite's 100 is minutes on CPU

    @pytest.fixture(autouse=True)
    def _monitor(self, default_monitor: Monitor) -> None:
        type(self).monitor = default_monitor
