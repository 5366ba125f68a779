"""Shadow mode says what it would have done: a ``block`` detector in shadow alerts with ``would_block``,
counts ``featurewatch_would_block_total``, and stops nothing — on the Monitor, the vLLM engine monitor
and the plugin's configuration; one switch (pack, ``Monitor(shadow=...)``, ``FEATUREWATCH_SHADOW``).

The tiny in-process Llama runs the generations; the metrics are read from a real registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import HP, TinyTokenizer, make_pack
from featurewatch.alert import Alert
from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.errors import ConfigError, GenerationBlocked
from featurewatch.integrations.vllm.engine import EngineMonitor
from featurewatch.integrations.vllm.plugin import PluginConfig
from featurewatch.metrics import PrometheusMetrics
from featurewatch.pack import load_pack


def blocker(name: str = "blocker", min_tokens: int = 2) -> DetectorSpec:
    """Blocks once ``min_tokens`` completion tokens were read (its threshold is below any score)."""
    return DetectorSpec(name=name, description="blocks", hookpoint=HP, features=[FeatureWeight(id=3, weight=1.0)],
                        threshold=-1e6, action="block", phases=["completion"],
                        pooling={"method": "mean", "min_tokens": min_tokens})


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_enforce_blocks_and_the_alert_says_it_did_not_only_would(tiny_monitor: Any) -> None:
    m = tiny_monitor(detectors=[blocker()])
    with pytest.raises(GenerationBlocked) as info:
        m.generate("abc", max_new_tokens=12, min_new_tokens=12)
    assert info.value.alert.would_block is False and info.value.result.outcome == "blocked"


def test_monitor_shadow_goes_on_marks_would_block_and_counts_it(tiny_monitor: Any) -> None:
    registry = CollectorRegistry()
    m = tiny_monitor(detectors=[blocker()], shadow=True, sinks=[PrometheusMetrics(registry=registry)])
    assert m.shadow == {"blocker"}
    labels = {"detector": "blocker", "model_name": m.model_name}
    assert value(registry, "featurewatch_would_block_total", **labels) == 0.0  # born at 0, for the rules
    result = m.generate("abc", max_new_tokens=12, min_new_tokens=12)
    assert result.outcome == "completed" and len(result.token_ids) == 12  # nothing was stopped
    fired = [a for a in result.alerts if a.detector == "blocker"]
    assert fired and fired[0].would_block is True and fired[0].action == "block"
    assert value(registry, "featurewatch_would_block_total", **labels) == 1.0
    assert value(registry, "featurewatch_alerts_total", phase="completion", action="block", **labels) == 1.0
    assert value(registry, "featurewatch_generations_total", model_name=m.model_name, outcome="completed") == 1.0


def test_shadow_by_name_leaves_the_other_block_detectors_enforcing(tiny_monitor: Any) -> None:
    m = tiny_monitor(detectors=[blocker("late", min_tokens=4), blocker("early", min_tokens=2)], shadow=["early"])
    with pytest.raises(GenerationBlocked) as info:
        m.generate("abc", max_new_tokens=12, min_new_tokens=12)
    early, late = (next(a for a in info.value.result.alerts if a.detector == d) for d in ("early", "late"))
    assert early.would_block is True and late.would_block is False
    assert info.value.alert.detector == "late" and len(info.value.result.token_ids) == 5  # stopped by `late`


def test_a_call_can_shadow_one_detector_of_an_enforcing_monitor(tiny_monitor: Any) -> None:
    m = tiny_monitor(detectors=[blocker()])
    result = m.generate("abc", max_new_tokens=8, min_new_tokens=8, shadow=["blocker"])
    assert result.outcome == "completed" and [a.would_block for a in result.alerts] == [True]
    with pytest.raises(GenerationBlocked):  # the next call enforces again
        m.generate("abc", max_new_tokens=8, min_new_tokens=8)


def test_a_session_that_does_not_block_marks_would_block(tiny_monitor: Any, tiny_llama: Any) -> None:
    m = tiny_monitor(detectors=[blocker(min_tokens=1)])
    with m.session(n_prompt=[1], blocking=False) as s:  # the handler's shadow mode opens its sessions so
        tiny_llama(torch.tensor([[2, 3, 4]]))          # token 1 is the prompt, 2 and 3 the completion
    result = s.results()[0]
    assert result.outcome == "completed" and [a.would_block for a in result.alerts] == [True]


@pytest.mark.parametrize("switch, match", [(["nope"], "not monitored"), ("blocker,nope", "nope")])
def test_an_unknown_detector_in_the_switch_is_a_config_error(tiny_monitor: Any, switch: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_monitor(detectors=[blocker()], shadow=switch)


def test_an_alert_detector_in_shadow_is_never_would_block(tiny_monitor: Any) -> None:
    alerting = blocker().model_copy(update={"action": "alert"})
    result = tiny_monitor(detectors=[alerting], shadow=True).generate("abc", max_new_tokens=4, min_new_tokens=4)
    assert result.alerts and not any(a.would_block for a in result.alerts)


# ---------------------------------------------------------------- the pack's switch, and the engine's
def _pack_dir(root: Path, shadow: Any) -> Path:
    alert = {"name": "demo", "description": "alerts", "kind": "sae", "hookpoint": HP,
             "features": [{"id": 1, "weight": 1.0, "label": "one"}], "threshold": -1e6,
             "phases": ["prompt", "completion"], "pooling": {"method": "mean", "min_tokens": 1}}
    block = {**alert, "name": "demo-block", "action": "block", "phases": ["completion"]}
    path = make_pack(root, d_in=16, d_sae=8, hookpoint=HP, detectors=[alert, block])
    manifest = json.loads((path / "pack.json").read_text())
    (path / "pack.json").write_text(json.dumps({**manifest, "shadow": shadow}))
    return path


def test_the_pack_manifest_switch_puts_its_block_detectors_in_shadow(tmp_path: Path, tiny_monitor: Any) -> None:
    pack = load_pack(_pack_dir(tmp_path / "p", ["demo-block"]))
    assert pack.manifest.shadow == ["demo-block"]
    m = tiny_monitor(pack=pack, saes=None)
    assert m.shadow == {"demo-block"}
    result = m.generate("abc", max_new_tokens=6, min_new_tokens=6)
    assert result.outcome == "completed" and any(a.would_block for a in result.alerts if a.detector == "demo-block")
    m.detach()
    assert tiny_monitor(pack=pack, saes=None, shadow=False).shadow == frozenset()  # the argument wins


def test_a_pack_naming_an_unknown_detector_in_shadow_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no detector 'ghost'"):
        load_pack(_pack_dir(tmp_path / "p", ["ghost"]))


def _engine_step(engine: EngineMonitor, rid: str) -> None:
    """A prefill of 3 prompt tokens, then 2 decode steps (vLLM's flat batch, one request)."""
    prompt = [2, 5, 6]
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=prompt)
    hidden = torch.randn(8, 16)
    engine.begin_step([rid], [0, 3], torch.arange(3), torch.tensor(prompt), {rid: request})
    engine.on_layer(1, hidden[:3], None)
    engine.end_step()
    for pos in (3, 4):
        engine.begin_step([rid], [0, 1], torch.tensor([pos]), torch.tensor([7]), {rid: request})
        engine.on_layer(1, hidden[pos:pos + 1], None)
        engine.end_step()


@pytest.mark.parametrize("switch", [True, ("demo-block",), None])
def test_the_vllm_engine_in_shadow_never_stops_a_request(tmp_path: Path, tiny_llama: Any, switch: Any) -> None:
    registry = CollectorRegistry()
    pack = load_pack(_pack_dir(tmp_path / "p", switch is None))  # None: the pack's own switch
    alerts: list[Alert] = []
    engine = EngineMonitor(tiny_llama, TinyTokenizer(), pack=pack, sinks=[PrometheusMetrics(registry=registry)],
                           shadow=switch, model_name="m", keep_events=True)
    engine.fanout.callbacks.append(alerts.append)
    _engine_step(engine, "r1")
    assert engine.blocked == {}  # the scheduler is told to stop nothing
    assert [a.would_block for a in alerts if a.detector == "demo-block"] == [True]
    engine.finish(["r1"])
    assert engine.results["r1"].outcome == "completed"
    assert value(registry, "featurewatch_would_block_total", detector="demo-block", model_name="m") == 1.0


def test_the_vllm_engine_enforces_without_the_switch(tmp_path: Path, tiny_llama: Any) -> None:
    engine = EngineMonitor(tiny_llama, TinyTokenizer(), pack=load_pack(_pack_dir(tmp_path / "p", False)))
    _engine_step(engine, "r1")
    assert engine.blocked == {"r1": "featurewatch: blocked by demo-block"}


@pytest.mark.parametrize("raw, parsed", [("", None), ("1", True), ("off", False), ("demo-block", ("demo-block",)),
                                         (" demo-block , demo ", ("demo-block", "demo"))])
def test_featurewatch_shadow_env_is_parsed(raw: str, parsed: Any) -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": "smollm2-135m-instruct", "FEATUREWATCH_SHADOW": raw})
    assert config is not None and config.shadow == parsed


def test_featurewatch_shadow_naming_an_unknown_detector_stops_the_server_at_start(tmp_path: Path) -> None:
    config = PluginConfig.from_env({"FEATUREWATCH_PACK": str(_pack_dir(tmp_path / "p", False)),
                                    "FEATUREWATCH_SHADOW": "demo-block,ghost"})
    assert config is not None
    with pytest.raises(ConfigError, match="FEATUREWATCH_SHADOW names detectors that are not monitored \\(ghost\\)"):
        config.validate()


# ---------------------------------------------------------------- `featurewatch run --shadow`, as the README shows
@pytest.fixture
def block_pack(tmp_path: Path) -> Path:
    block = {"name": "demo-block", "description": "blocks", "kind": "sae", "hookpoint": HP, "action": "block",
             "features": [{"id": 1, "weight": 1.0}], "threshold": -1e6, "phases": ["completion"],
             "pooling": {"method": "mean", "min_tokens": 1}}
    return make_pack(tmp_path / "pack", d_in=16, d_sae=8, hookpoint=HP, detectors=[block])


@pytest.mark.parametrize("shadow", [[], ["--shadow"], ["--shadow", "demo-block"]])
def test_cli_run_shadow(tiny_lm_dir: Path, block_pack: Path, shadow: list[str], capsys: Any) -> None:
    from featurewatch.cli import main

    code = main(["run", "--model", str(tiny_lm_dir), "--pack", str(block_pack), "--json", "--max-new-tokens", "4",
                 "--prompt", "Hello there", *shadow])
    out, err = capsys.readouterr()
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    (alert,) = row["alerts"]
    assert row["outcome"] == ("completed" if shadow else "blocked") and alert["would_block"] is bool(shadow)


def test_cli_run_shadow_naming_an_unknown_detector_fails(tiny_lm_dir: Path, block_pack: Path, capsys: Any) -> None:
    from featurewatch.cli import main

    code = main(["run", "--model", str(tiny_lm_dir), "--pack", str(block_pack), "--prompt", "Hi", "--shadow", "nope"])
    assert code == 2 and "shadow= names detectors that are not monitored (nope)" in capsys.readouterr().err
