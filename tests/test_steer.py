"""The steering sweep on the tiny model; --steer parsing; block stops within one decode step."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import HP
from featurewatch.errors import ConfigError
from featurewatch.intervention import Intervention
from featurewatch.monitor import Monitor
from featurewatch.records import parse_record
from featurewatch.steering_sweep import SweepResult, default_corpus, plot, sweep, with_strength

CORPUS = [parse_record({"id": f"c{i}", "text": t}, line=i) for i, t in enumerate(["hello world", "abc def ghi"])]


@pytest.fixture()
def monitor(tiny_monitor: Any) -> Any:
    m = tiny_monitor(fail_closed=True)
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


def test_sweep_refuses_a_monitor_that_steers_by_itself(tiny_monitor: Any) -> None:
    with tiny_monitor(interventions=[Intervention(feature=1, mode="ablate")]) as m, \
            pytest.raises(ConfigError, match="unsteered"):
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


# --------------------------------------------------------------------------- the command line on a tiny model
@pytest.fixture(scope="module")
def tiny_cli(tiny_lm_dir: Any, tiny_lm_pack: Any) -> list[str]:
    """``--model DIR --pack DIR``: the 2-layer Llama with the embedded tokenizer (no big model load)."""
    return ["--model", str(tiny_lm_dir), "--pack", str(tiny_lm_pack)]


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    from featurewatch.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_steer_command_writes_json_per_strength_and_a_plot(tiny_cli: list[str], tmp_path: Any, capsys: Any) -> None:
    png = tmp_path / "sweep.png"
    code, out, err = cli(capsys, "steer", *tiny_cli, "--feature", "3", "--absolute", "--strengths=-4,0,4",
                         "--prompt", "Hello there", "--max-new-tokens", "3", "--keywords", "the", "--json",
                         "--plot", str(png))
    assert code == 0, err
    report = json.loads(out)
    assert [p["strength"] for p in report["points"]] == [None, -4.0, 0.0, 4.0]
    for p in report["points"]:
        assert set(p) >= {"activation", "kl_generated", "kl_corpus", "ce_corpus", "delta_ce", "concept_rate",
                          "samples"}
        assert p["samples"][0]["prompt"] == "Hello there"
    assert png.read_bytes()[:4] == b"\x89PNG" and "steer" in err  # progress on stderr


def test_steer_command_prints_a_table(tiny_cli: list[str], capsys: Any) -> None:
    code, out, err = cli(capsys, "steer", *tiny_cli, "--steer", "layers.1:2:add", "--absolute", "--strengths", "1",
                         "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["strength", "act"] and lines[2].split()[0] == "none" and lines[3].split()[0] == "1"


@pytest.mark.parametrize("argv, message", [
    (["run", "--steer", "812:boost:2"], "[HOOKPOINT:]FEATURE:MODE[:VALUE]"),
    (["run", "--steer", "812:clamp"], "finite value"),
    (["run", "--steer", "99:clamp:2", "--steer-absolute"], "out of range"),
    (["run", "--steer", "3:clamp:2"], "max activation"),  # the test pack has no feature statistics
    (["steer"], "say what to steer"),
    (["steer", "--steer", "3:boost"], "FEATURE:MODE"),
    # one `featurewatch: error:` line each, before the load (these printed pydantic's three-line dump with a URL,
    # and a bad hookpoint was found only after the model loaded)
    (["run", "--steer", "1:clamp:1e999", "--steer-absolute"], "mode 'clamp' needs a finite value"),
    (["run", "--steer", "1:ablate:5"], "mode 'ablate' takes no value"),
    (["run", "--steer", "1:clamp:1e300"], "clamp value 1e+300 is beyond ±1000"),
    (["run", "--steer", "1:scale:1e39"], "scale value 1e+39 is beyond ±1000 (a factor)"),
    (["run", "--steer", "layers.7:1:clamp:2", "--steer-absolute"],
     "has no SAE at layers.7; its SAE hookpoints: layers.1"),
    (["run", "--steer", "attn.x:1:clamp:2", "--steer-absolute"], "hookpoint 'attn.x' is not understood"),
    (["steer", "--feature", "1", "--mode", "scale", "--strengths", "2,1e39"], "--strengths 1e+39: scale value"),
])
def test_bad_steering_exits_2_naming_the_valid_form(tiny_cli: list[str], argv: list[str], message: str,
                                                    capsys: Any) -> None:
    code, out, err = cli(capsys, *argv[:1], *tiny_cli, *argv[1:])
    assert code == 2 and message in err and "loading model" not in err  # checked before the model loads
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurewatch: error:") and "http" not in err, err


def test_json_output_is_standard_json_without_nan() -> None:
    from featurewatch.cli._common import json_line

    line = json_line({"kl": float("nan"), "points": [{"ce": float("inf")}, {"ce": 1.5}], "s": "é"})
    assert line == '{"kl": null, "points": [{"ce": null}, {"ce": 1.5}], "s": "é"}'
    assert json.loads(line)["kl"] is None


def test_run_steer_applies_to_each_generation(tiny_cli: list[str], capsys: Any) -> None:
    common = ["run", *tiny_cli, "--prompt", "Hello there", "--max-new-tokens", "6", "--json", "--top-features", "0"]
    code, out, err = cli(capsys, *common)
    assert code == 0, err
    plain = json.loads(out)["completion"]
    code, out, err = cli(capsys, *common, "--steer", "1:clamp:500", "--steer", "layers.1:2:add:-500",
                         "--steer-absolute")
    assert code == 0, err
    assert json.loads(out)["completion"] != plain
