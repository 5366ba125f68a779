"""The vLLM plugin's settings come from the environment, and a bad one fails before vLLM serves anything."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("name", ["FEATUREWATCH_METRICS", "FEATUREWATCH_ALERT_TEXT", "FEATUREWATCH_FAIL_CLOSED",
                                  "FEATUREWATCH_ALLOW_REQUEST_OPTIONS"])
def test_an_unknown_boolean_is_a_start_up_error_naming_the_variable(name: str) -> None:
    # FEATUREWATCH_METRICS=maybe used to mean "off", silently
    with pytest.raises(ConfigError, match=f"^{name}='maybe' is not a boolean: use 1/0, true/false"):
        PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct", name: "maybe"})


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), (" on ", True), ("yes", True),
                                             ("0", False), ("false", False), ("Off", False), ("no", False)])
def test_booleans_are_read_strictly(value: str, expected: bool) -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "p", "FEATUREWATCH_METRICS": value,
                                    "FEATUREWATCH_ALLOW_REQUEST_OPTIONS": value})
    assert config is not None and config.metrics is expected and config.allow_request_options is expected


def test_request_options_are_off_unless_the_operator_allows_them() -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct"})
    assert config is not None and config.request_policy.allow is False
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct",
                                    "FEATUREWATCH_ALLOW_REQUEST_OPTIONS": "1",
                                    "FEATUREWATCH_OPTIONAL_DETECTORS": "scam-email, "})
    assert config is not None and config.request_policy.allow and config.request_policy.optional == ("scam-email",)
    config.validate()


def test_an_optional_detector_the_server_does_not_run_is_a_start_up_error() -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct",
                                    "FEATUREWATCH_OPTIONAL_DETECTORS": "scam"})
    assert config is not None
    with pytest.raises(ConfigError, match="FEATUREWATCH_OPTIONAL_DETECTORS names detectors this server does not "
                                          "run \\(scam\\)"):
        config.validate()


def test_an_unwritable_alert_log_fails_at_plugin_load_in_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "no-such-dir" / "alerts.jsonl"
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct",
                                    "FEATUREWATCH_ALERT_LOG": str(blocked)})
    assert config is not None
    with pytest.raises(ConfigError) as info:
        config.validate()  # used to be found only after the model load, inside a worker traceback
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"FEATUREWATCH_ALERT_LOG={blocked}: cannot append to it (No such file or directory)")
    assert "unset it to log alerts to stderr" in message
