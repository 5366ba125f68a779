"""The vLLM plugin's settings come from the environment, and a bad one fails before vLLM serves anything."""

from __future__ import annotations

import pytest

from featurewatch.errors import ConfigError
from featurewatch.integrations.vllm.plugin import PluginConfig


def test_unset_pack_means_the_plugin_is_off() -> None:
    assert PluginConfig.from_env({}) is None
    assert PluginConfig.from_env({"FEATUREWATCH_PACK": "  "}) is None


def test_settings_are_read_from_the_environment() -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct",
                                    "FEATUREWATCH_DETECTORS": "scam-email, deception,",
                                    "FEATUREWATCH_ALERT_LOG": "/tmp/a.jsonl", "FEATUREWATCH_ALERT_TEXT": "1",
                                    "FEATUREWATCH_METRICS": "0", "FEATUREWATCH_FAIL_CLOSED": "true"})
    assert config == PluginConfig(pack="smollm2-135m-instruct", detectors=("scam-email", "deception"),
                                  alert_log="/tmp/a.jsonl", alert_text=True, metrics=False, fail_closed=True)
    config.validate()


@pytest.mark.parametrize("env, valid", [
    ({"FEATUREWATCH_PACK": "no-such-pack"}, "shipped packs: smollm2-135m-instruct"),
    ({"FEATUREWATCH_PACK": "smollm2-135m-instruct", "FEATUREWATCH_DETECTORS": "scam"}, "valid: dangerous-content"),
])
def test_a_bad_setting_names_the_valid_choices(env: dict[str, str], valid: str) -> None:
    config = PluginConfig.from_env(env)
    assert config is not None
    with pytest.raises(ConfigError, match=valid):
        config.validate()
