"""What a served model's clients may change: parsed strictly, without vLLM (featurewatch.integrations.vllm.options)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from featurewatch.errors import ConfigError
from featurewatch.integrations.vllm.options import RUN_ID_MAX, RequestPolicy, decide, parse_bool, safe_run_id


@dataclass
class Spec:
    name: str
    action: str = "alert"


DETECTORS = [Spec("scam-email"), Spec("sycophancy"), Spec("scam-block", "block")]


def names(decision: object) -> list[str]:
    return [d.name for d in decision.detectors]  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["false", "0", "no", "off", " False ", False, 0])
def test_false_words_are_false(value: object) -> None:
    assert parse_bool(value, "x") is False  # "false" and "0" used to be true (any non-empty string)


@pytest.mark.parametrize("value", ["maybe", "", 2, 1.0, None, [], "ja"])
def test_anything_else_is_an_error_naming_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match="^featurewatch_off=.* is not a boolean: use 1/0"):
        parse_bool(value, "featurewatch_off")


def test_no_option_runs_every_detector() -> None:
    d = decide({"temperature_hint": 1}, DETECTORS, RequestPolicy())
    assert d.status == "none" and names(d) == ["scam-email", "sycophancy", "scam-block"]


def test_narrowing_within_the_optional_detectors_is_accepted() -> None:
    d = decide({"featurewatch_detectors": "scam-email, scam-block"}, DETECTORS, RequestPolicy(allow=True))
    assert d.status == "accepted" and names(d) == ["scam-email", "scam-block"]
    everything = RequestPolicy(allow=True, optional=("scam-email", "sycophancy", "scam-block"))
    d = decide({"featurewatch_off": "yes"}, DETECTORS, everything)
    assert d.status == "accepted" and names(d) == []


def test_an_unknown_name_is_invalid_and_named() -> None:
    d = decide({"featurewatch_detectors": ["scam-email", "nope"]}, DETECTORS, RequestPolicy(allow=True))
    assert d.status == "invalid" and names(d) == ["scam-email", "sycophancy", "scam-block"]
    assert "does not run (nope); detectors: scam-email, sycophancy, scam-block" in d.message


def test_safe_run_id_keeps_ordinary_ids_and_bounds_others() -> None:
    assert safe_run_id("chatcmpl-1234_ab.c") == "chatcmpl-1234_ab.c"
    long_a, long_b = safe_run_id("a" * 500 + "1"), safe_run_id("a" * 500 + "2")
    assert len(long_a) <= RUN_ID_MAX and long_a != long_b  # distinct ids stay distinct
    assert safe_run_id('x"\n\x1b[31m').startswith("x____")
    assert safe_run_id(safe_run_id("é" * 300)) == safe_run_id("é" * 300)  # idempotent
