"""The steering sweep on the tiny model; --steer parsing; block stops within one decode step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.errors import ConfigError, GenerationBlocked
from featurewatch.intervention import Intervention
from featurewatch.monitor import Monitor
from featurewatch.records import parse_record
from featurewatch.steering_sweep import SweepResult, default_corpus, plot, sweep, with_strength

from conftest import build_sae

HP = "layers.1"
CORPUS = [parse_record({"id": f"c{i}", "text": t}, line=i) for i, t in enumerate(["hello world", "abc def ghi"])]


def sae16() -> Any:
    return build_sae(16, 12, architecture="standard", seed=1, b_enc=torch.full((12,), 0.5))


@pytest.fixture()
def monitor(tiny_llama: Any, tiny_tokenizer: Any) -> Any:
    m = Monitor(tiny_llama, tiny_tokenizer, saes={HP: sae16()}, fail_closed=True)
    yield m
    m.detach()


def test_sweep_measures_every_strength_against_the_unsteered_model(monitor: Monitor) -> None:
    iv = Intervention(feature=4, mode="clamp", value=1.0, absolute=True)
    result = sweep(monitor, [iv], [-5.0, 0.0, 5.0], prompts=["abc", "hello"], corpus=CORPUS, keywords="[aeiou]{2}",
                   max_new_tokens=6, chat=False)
    assert [p.strength for p in result.points] == [None, -5.0, 0.0, 5.0]
    base = result.points[0]
    assert base.kl_generated == pytest.approx(0.0, abs=1e-5) and base.kl_corpus == pytest.approx(0.0, abs=1e-6)
    assert base.delta_ce == 0.0
    for p in result.points:
        assert len(p.samples) == 2 and p.concept_rate is not None and 0 <= p.concept_rate <= 1
        assert set(p.activation) == {f"{HP}:4"} and p.activation_rel == {f"{HP}:4": None}  # no pack, no unit
    assert result.points[3].kl_corpus > 0 and result.points[3].kl_generated > 0
    assert result.points[3].delta_ce == pytest.approx(result.points[3].ce_corpus - base.ce_corpus)
    again = SweepResult.model_validate_json(result.model_dump_json())
    assert again == result


def test_a_sweep_that_changes_nothing_costs_nothing(monitor: Monitor) -> None:
    iv = Intervention(feature=4, mode="scale", value=1.0)
    result = sweep(monitor, [iv], [1.0], prompts=["abc"], corpus=CORPUS, max_new_tokens=4, chat=False)
    steered = result.points[1]
    assert steered.kl_corpus == pytest.approx(0.0, abs=1e-6) and steered.delta_ce == pytest.approx(0.0, abs=1e-6)
    assert steered.samples == result.points[0].samples and steered.concept_rate is None


def test_sweep_refuses_a_monitor_that_steers_by_itself(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    with Monitor(tiny_llama, tiny_tokenizer, saes={HP: sae16()},
                 interventions=[Intervention(feature=1, mode="ablate")]) as m:
        with pytest.raises(ConfigError, match="unsteered"):
            sweep(m, [Intervention(feature=4, mode="ablate")], prompts=["abc"], corpus=CORPUS, chat=False)


def test_strength_replaces_the_value_but_not_an_ablation() -> None:
    assert with_strength(Intervention(feature=1, mode="clamp", value=2), -5).value == -5
    ablate = Intervention(feature=1, mode="ablate")
    assert with_strength(ablate, 3) is ablate


def test_the_built_in_corpus_ships_with_the_package() -> None:
    rows = default_corpus()
    assert len(rows) >= 10 and any(r.messages for r in rows) and any(r.text for r in rows)


def test_plot_writes_a_png(monitor: Monitor, tmp_path: Any) -> None:
    iv = Intervention(feature=4, mode="add", value=1.0, absolute=True)
    result = sweep(monitor, [iv], [-2.0, 2.0], prompts=["abc"], corpus=CORPUS, keywords="a", max_new_tokens=3,
                   chat=False)
    out = plot(result, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
