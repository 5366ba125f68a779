"""Interventions on the real embedded model: a clamped concept feature bends the text; a silent one changes nothing."""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import EMBEDDED_HP, make_monitor
from featurewatch.intervention import Intervention
from featurewatch.monitor import Monitor
from featurewatch.pack import load_pack

pytestmark = pytest.mark.slow

WEATHER = 3731  # top contexts: « weather», « Hurricane», « storm» (see README, Interventions)
WEATHER_WORDS = r"weather|rain|sunny|sunshine|forecast|storm|cloud|snow|temperature|humid|umbrella|wind|hurricane"
SILENT = 3977  # among the rarest in features.json (density 1.6e-5: « place» in "Web addresses in one place")
PROMPT = "Describe your ideal weekend."


@pytest.fixture(scope="module")
def monitor(smollm: Any) -> Any:
    m = make_monitor(smollm, pack=load_pack(), detectors=[], watch={EMBEDDED_HP: [SILENT]}, fail_closed=True)
    yield m
    m.detach()


@pytest.fixture(scope="module")
def plain(monitor: Monitor) -> Any:
    return monitor.generate(PROMPT, max_new_tokens=30)


def test_clamping_the_weather_feature_bends_an_unrelated_reply_toward_weather(monitor: Monitor, plain: Any) -> None:
    steered = monitor.generate(PROMPT, max_new_tokens=30,
                               interventions=[Intervention(feature=WEATHER, mode="clamp", value=5)])
    assert steered.token_ids != plain.token_ids
    assert not re.search(WEATHER_WORDS, plain.text, re.I)
    assert re.search(WEATHER_WORDS, steered.text, re.I), steered.text


def test_ablating_a_feature_that_never_fires_leaves_the_greedy_text_token_identical(monitor: Monitor,
                                                                                   plain: Any) -> None:
    assert all(r.features.get(SILENT, 0.0) == 0.0 for r in plain.readings())  # silent on prompt and reply
    ablated = monitor.generate(PROMPT, max_new_tokens=30, interventions=[Intervention(feature=SILENT, mode="ablate")])
    assert ablated.token_ids == plain.token_ids
