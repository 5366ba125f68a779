"""One meaning for a threshold (issue 26 §3): the threshold a phase's alerts fire at, published the same
everywhere — the metrics gauge (per phase), ``featurewatch explain``, the page's API — never the spec's bare
``threshold`` where a phase has its own."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import make_monitor, make_pack
from featurewatch.cli import main
from featurewatch.metrics import PrometheusMetrics

BARE = 1.898  # the scam-email: published 1.898 while alerts fired at 2.60 / 2.65
PER_PHASE = {"prompt": 2.6, "completion": 2.65}


@pytest.fixture(scope="module")
def split_pack(tmp_path_factory: Any) -> Path:
    return make_pack(tmp_path_factory.mktemp("split-pack") / "pack", d_in=16, d_sae=8, hookpoint="layers.1",
                     detectors=[
                         {"name": "split", "description": "a threshold per phase", "kind": "sae",
                          "hookpoint": "layers.1", "features": [{"id": 1, "weight": 1.0}], "threshold": BARE,
                          "phase_thresholds": PER_PHASE},
                         {"name": "one", "description": "one threshold for every phase", "kind": "sae",
                          "hookpoint": "layers.1", "features": [{"id": 2, "weight": 1.0}], "threshold": 0.5,
                          "phase_thresholds": {"completion": 0.75}, "phases": ["prompt", "completion"]}])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_metrics_explain_and_the_page_show_the_thresholds_alerts_fire_at(tiny_lm_dir: Path, split_pack: Path,
                                                                          capsys: Any) -> None:
    from featurewatch.models import load_model
    from featurewatch.ui import serve_ui

    expected = {"split": PER_PHASE, "one": {"prompt": 0.5, "completion": 0.75}}
    registry = CollectorRegistry()
    loaded = load_model(str(tiny_lm_dir))
    monitor = make_monitor(loaded, pack=split_pack, model_name="tiny", sinks=[PrometheusMetrics(registry=registry)])
    server = serve_ui(monitor, port=0, max_new_tokens=8)
    try:
        base = server.url.rstrip("/")
        info = {d["name"]: d["thresholds"] for d in _get(base + "/api/info")["detectors"]}
        cards = {name: _get(f"{base}/api/detectors/{name}")["thresholds"] for name in expected}
    finally:
        server.close()
        monitor.detach()
    gauge = {name: {phase: registry.get_sample_value("featurewatch_detector_threshold",
                                                     {"detector": name, "phase": phase, "model_name": "tiny"})
                    for phase in ("prompt", "completion")} for name in expected}
    explained = {}
    for name in expected:
        assert main(["explain", name, "--pack", str(split_pack), "--json"]) == 0
        explained[name] = json.loads(capsys.readouterr().out)["thresholds"]
    assert info == cards == gauge == explained == expected
    assert main(["explain", "split", "--pack", str(split_pack)]) == 0
    assert "fires at: prompt 2.600, completion 2.650" in capsys.readouterr().out
    # what alerts carry: the pools a run opens fire at the same numbers
    from featurewatch.detection import new_pools
    from featurewatch.state import RunState

    run = RunState(run_id="r", started_at=0.0)
    new_pools(run, monitor.detectors)
    assert {name: {p: run.pools[(name, p)].threshold for p in ("prompt", "completion")} for name in expected} == \
        expected
