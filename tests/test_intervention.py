"""Interventions: exact maths on hand-set SAEs, the error term kept, per-run isolation, decode steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from conftest import HP, sae16
from featurewatch.errors import ConfigError, FeatureOutOfRange
from featurewatch.hooks import unwrap
from featurewatch.intervention import Intervention, compile_steering
from featurewatch.positions import StepTokens
from featurewatch.state import RunState


def steps(n: int = 4, runs: list[int] | None = None, completion: bool = False) -> StepTokens:
    run = torch.tensor(runs if runs is not None else [0] * n)
    return StepTokens(run=run, position=torch.arange(len(run)), completion=torch.full((len(run),), completion),
                      read=torch.ones(len(run), dtype=torch.bool), steerable=torch.ones(len(run), dtype=torch.bool),
                      token_id=torch.zeros(len(run), dtype=torch.long))


@pytest.mark.parametrize("mode, value, expected", [
    ("clamp", 3.0, lambda a: torch.full_like(a, 3.0)),
    ("add", 2.0, lambda a: a + 2.0),
    ("scale", -1.5, lambda a: a * -1.5),
    ("ablate", None, lambda a: torch.zeros_like(a)),
])
def test_each_mode_changes_only_its_feature_keeping_the_error_term(mode: str, value: float | None,
                                                                   expected: Any) -> None:
    sae = sae16()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    iv = Intervention(feature=4, mode=mode, value=value, absolute=True)  # type: ignore[arg-type]
    steering = compile_steering([iv], {HP: sae})[HP]
    delta = steering.delta(x, steps(), [RunState("r", 0.0)])
    assert delta is not None
    a = sae.encode(x)[:, 4:5]
    want = x + (expected(a) - a) @ sae.W_dec[4:5]
    assert torch.allclose(x + delta, want, atol=1e-5)
    # the reconstruction error x − decode(encode(x)) is kept: x' = decode(edited codes) + the same error
    recon_err_before = x - sae.decode(sae.encode(x))
    edited = sae.encode(x).clone()
    edited[:, 4:5] = expected(a)
    assert torch.allclose(x + delta - sae.decode(edited), recon_err_before, atol=1e-5)


def test_an_intervention_that_changes_nothing_leaves_x_exactly() -> None:
    sae = sae16()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ivs = [Intervention(feature=2, mode="scale", value=1.0), Intervention(feature=7, mode="add", value=0.0,
                                                                          absolute=True)]
    delta = compile_steering(ivs, {HP: sae})[HP].delta(x, steps(5), [RunState("r", 0.0)])
    assert delta is not None and torch.equal(x + delta, x)


def test_several_interventions_add_up() -> None:
    sae = sae16()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)) * 2
    ivs = [Intervention(feature=1, mode="clamp", value=5.0, absolute=True), Intervention(feature=9, mode="ablate")]
    delta = compile_steering(ivs, {HP: sae})[HP].delta(x, steps(3), [RunState("r", 0.0)])
    a = sae.encode(x)
    want = x + (5.0 - a[:, 1:2]) @ sae.W_dec[1:2] + (0 - a[:, 9:10]) @ sae.W_dec[9:10]
    assert delta is not None and torch.allclose(x + delta, want, atol=1e-5)


def test_relative_values_are_in_units_of_max_activation() -> None:
    sae = sae16()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    steering = compile_steering([Intervention(feature=4, mode="clamp", value=2.0)], {HP: sae},
                                max_activation=lambda hp, f: 10.0)[HP]
    delta = steering.delta(x, steps(2), [RunState("r", 0.0)])
    a = sae.encode(x)[:, 4:5]
    assert delta is not None and torch.allclose(delta, (20.0 - a) @ sae.W_dec[4:5], atol=1e-5)  # 2 × max act 10
    with pytest.raises(ConfigError, match="absolute=True"):
        compile_steering([Intervention(feature=4, mode="clamp", value=2.0)], {HP: sae})


def test_when_switches_on_per_run_after_the_detector_fired_there() -> None:
    sae = sae16()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4)) * 3
    steering = compile_steering([Intervention(feature=4, mode="ablate", when="demo")], {HP: sae})[HP]
    fired, quiet = RunState("a", 0.0), RunState("b", 0.0)
    fired.fired["demo"] = 0  # fired at position 0 of run 0
    tokens = steps(runs=[0, 0, 0, 1, 1, 1])
    delta = steering.delta(x, tokens, [fired, quiet])
    assert delta is not None
    assert torch.equal(delta[0], torch.zeros(16))  # the firing position itself is not changed
    assert delta[1:3].abs().sum() > 0  # after it, in that run
    assert torch.equal(delta[3:], torch.zeros(3, 16))  # the other run is never touched


def test_phases_limit_an_intervention() -> None:
    sae = sae16()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5)) * 3
    steering = compile_steering([Intervention(feature=4, mode="ablate", phases=("completion",))], {HP: sae})[HP]
    assert steering.delta(x, steps(2, completion=False), [RunState("r", 0.0)]) is None
    assert steering.delta(x, steps(2, completion=True), [RunState("r", 0.0)]) is not None


def test_generation_applies_interventions_at_prefill_and_every_cached_decode_step(tiny_llama: Any,
                                                                                  tiny_monitor: Any) -> None:
    sae = sae16()
    raw: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    layer = tiny_llama.model.layers[1]
    pre = layer.register_forward_hook(lambda m, a, o: raw.append(unwrap(o).clone()), prepend=True)
    try:
        with tiny_monitor(saes={HP: sae}, fail_closed=True) as m:
            post = layer.register_forward_hook(lambda m, a, o: after.append(unwrap(o).clone()))
            iv = Intervention(feature=4, mode="clamp", value=6.0, absolute=True)
            m.generate("abcd", max_new_tokens=4, min_new_tokens=4, interventions=[iv])
            post.remove()
    finally:
        pre.remove()
    assert [r.shape[1] for r in raw] == [5, 1, 1, 1]  # prefill, then one new position per decode step
    assert after, "the hook after ours saw no forward pass"
    for i, (before, got) in enumerate(zip(raw, after, strict=True)):
        a = sae.encode(before)[..., 4:5]
        want = before + (6.0 - a) @ sae.W_dec[4:5]
        if i == 0:
            want[:, 0] = before[:, 0]  # the attention sink is never steered
        assert torch.allclose(got, want, atol=1e-5), i


def test_parse_the_cli_form() -> None:
    assert Intervention.parse("812:clamp:2") == Intervention(feature=812, mode="clamp", value=2.0)
    assert Intervention.parse("layers.15:7:ablate") == Intervention(feature=7, mode="ablate", hookpoint="layers.15")
    for bad in ("812", "812:boost:2", "x:y", "812:clamp"):
        with pytest.raises(ConfigError, match="FEATURE:MODE"  if bad != "812:clamp" else "finite value"):
            Intervention.parse(bad)


def test_an_intervention_must_name_its_hookpoint_when_there_are_several_saes() -> None:
    two = {"layers.0": sae16(), HP: sae16()}
    with pytest.raises(ConfigError, match="names no hookpoint and the monitor has 2 SAE hookpoints"):
        compile_steering([Intervention(feature=3, mode="ablate")], two)
    with pytest.raises(ConfigError, match="'layers.7': there is no SAE there"):
        compile_steering([Intervention(feature=3, mode="ablate", hookpoint="layers.7")], two)
    assert set(compile_steering([Intervention(feature=3, mode="ablate", hookpoint=HP)], two)) == {HP}


# --------------------------------------------------------------------------- values a user may not give
def test_an_out_of_range_feature_is_reported_before_any_advice_about_units() -> None:
    iv = Intervention(feature=4608, mode="clamp", value=2)
    with pytest.raises(FeatureOutOfRange, match="intervention on feature 4608 is out of range; the SAE at layers.1 has "
                                                  "features 0 … 11"):
        compile_steering([iv], {HP: sae16()}, max_activation=lambda hp, f: None)  # used to advise absolute=True


@pytest.mark.parametrize("kw", [dict(value="2"), dict(value=True), dict(feature=True), dict(feature="3"),
                                dict(absolute=1)])
def test_values_have_strict_types(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Intervention(**{"feature": 3, "mode": "clamp", "value": 2, "absolute": True, **kw})


@pytest.mark.parametrize("mode, value, absolute", [("clamp", 1e300, False), ("add", 1e38, False),
                                                   ("scale", 1e39, False), ("scale", -2e3, True)])
def test_a_value_beyond_the_limit_is_refused(mode: str, value: float, absolute: bool) -> None:
    with pytest.raises(ValidationError, match="beyond ±1000"):
        Intervention(feature=3, mode=mode, value=value, absolute=absolute)  # type: ignore[arg-type]


def test_an_absolute_value_is_checked_in_max_activation_units_and_in_the_residual_dtype() -> None:
    sae = sae16()
    with pytest.raises(ConfigError, match=r"is 1e\+05 × the feature's max activation \(2\); keep it within"):
        compile_steering([Intervention(feature=3, mode="add", value=2e5, absolute=True)], {HP: sae},
                         max_activation=lambda hp, f: 2.0)
    with pytest.raises(ConfigError, match="overflows torch.float32"):  # no unit known: the dtype still bounds it
        compile_steering([Intervention(feature=3, mode="clamp", value=1e38, absolute=True)], {HP: sae})
    with pytest.raises(ConfigError, match="overflows torch.float16"):
        compile_steering([Intervention(feature=3, mode="clamp", value=1e5, absolute=True)], {HP: sae},
                         dtype=torch.float16)
    compile_steering([Intervention(feature=3, mode="clamp", value=1e5, absolute=True)], {HP: sae})  # fine in fp32


def test_the_monitor_refuses_an_overflowing_edit_instead_of_generating_nan(tiny_monitor: Any) -> None:
    m = tiny_monitor()
    try:
        with pytest.raises(ConfigError, match="overflows"):
            m.generate("abc", max_new_tokens=2, chat=False,
                       interventions=[Intervention(feature=3, mode="clamp", value=1e38, absolute=True)])
    finally:
        m.detach()
