"""Issue 26 §5, the small ones: each failure as it was reported, now a test.

inspect --corpus checks its lines before the model loads; SAELens hookpoint names reach ``inspect`` and the
page's feature API; ``inspect --map`` bounds ``--neighbours``; two concurrent vLLM requests with one
``X-Request-Id`` get distinct run ids; interventions stacked on one feature are bounded as a sum.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import RecordingSink, build_sae, concept_pack, make_monitor, run_cli
from featurewatch.errors import ConfigError
from featurewatch.intervention import STEER_LIMIT, Intervention, compile_steering


@pytest.fixture(scope="module")
def pack(tmp_path_factory: Any) -> Path:
    return concept_pack(tmp_path_factory.mktemp("small") / "pack")  # an SAE at layers.1


run = run_cli


# ---------------------------------------------------------------- (b) inspect --corpus
def test_inspect_corpus_names_a_malformed_line_before_the_model_loads(pack: Path, tmp_path: Path, capsys: Any,
                                                                     no_model: None) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n' + json.dumps({"text": "x"}) + "\n")
    code, out, err = run(capsys, "inspect", "1", "--pack", str(pack), "--corpus", str(corpus))
    assert code == 2 and re.search(r"corpus\.jsonl:2: invalid JSON", err), err
    assert "loading model" not in err


# ---------------------------------------------------------------- (c) SAELens hookpoint names
def test_inspect_accepts_a_saelens_hookpoint_name(pack: Path, capsys: Any, no_model: None) -> None:
    code, out, err = run(capsys, "inspect", "1", "--pack", str(pack), "--hookpoint", "blocks.1.hook_resid_post",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["hookpoint"] == "layers.1"
    code, out, err = run(capsys, "inspect", "1", "--pack", str(pack), "--hookpoint", "blocks.7.hook_resid_post")
    assert code == 2 and "no SAE there; valid: layers.1" in err


def test_the_pages_feature_api_accepts_a_saelens_hookpoint_name(tiny_lm_dir: Path, pack: Path) -> None:
    from featurewatch.models import load_model
    from featurewatch.ui import serve_ui

    loaded = load_model(str(tiny_lm_dir))
    monitor = make_monitor(loaded, pack=pack, model_name="tiny")
    server = serve_ui(monitor, port=0, max_new_tokens=8)
    try:
        base = server.url.rstrip("/")
        with urllib.request.urlopen(f"{base}/api/features/blocks.1.hook_resid_post/1", timeout=60) as response:
            card = json.loads(response.read())
        with urllib.request.urlopen(f"{base}/api/features/layers.1/1", timeout=60) as response:
            assert json.loads(response.read()) == card
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/api/features/blocks.9.hook_resid_post/1", timeout=60)
        assert missing.value.code == 404
        missing.value.close()
    finally:
        server.close()
        monitor.detach()
    assert card["hookpoint"] == "layers.1" and card["feature"] == 1


# ---------------------------------------------------------------- (d) inspect --map --neighbours
def test_inspect_map_bounds_neighbours_before_any_work(pack: Path, tmp_path: Path, capsys: Any,
                                                       no_model: None) -> None:
    png = tmp_path / "map.png"
    code, out, err = run(capsys, "inspect", "1", "--pack", str(pack), "--map", str(png), "--neighbours", "100000")
    assert code == 2 and "--neighbours 100000: --map labels every point, so it draws at most 32" in err, err
    assert not png.exists()
    code, out, err = run(capsys, "inspect", "1", "--pack", str(pack), "--neighbours", "100000", "--json")
    assert code == 0  # the list alone is bounded by the SAE's width


# ---------------------------------------------------------------- (e) one X-Request-Id, two requests
def test_two_concurrent_vllm_requests_with_one_request_id_get_distinct_run_ids(tiny_llama: Any, tmp_path: Path
                                                                               ) -> None:
    from conftest import TinyTokenizer, make_pack
    from featurewatch.integrations.vllm.engine import EngineMonitor
    from featurewatch.pack import load_pack
    Events = RecordingSink

    detector = {"name": "demo", "description": "alerts", "kind": "sae", "hookpoint": "layers.1",
                "features": [{"id": 1, "weight": 1.0}], "threshold": -1e6, "phases": ["prompt"],
                "pooling": {"method": "mean", "min_tokens": 1}}
    events = Events()
    engine = EngineMonitor(tiny_llama, TinyTokenizer(), sinks=[events],
                           pack=load_pack(make_pack(tmp_path / "pack", d_in=16, d_sae=8, hookpoint="layers.1",
                                                    detectors=[detector])),
                           external_id=lambda rid: rid[:-9])  # vLLM appends "-" and 8 characters to the client's id
    prompt = [5, 6, 7, 8]
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=prompt)
    ids = ["trace-42-aaaaaaaa", "trace-42-bbbbbbbb"]  # the same X-Request-Id, sent twice at once
    engine.begin_step(ids, [0, 4, 8], torch.arange(4).repeat(2), torch.tensor(prompt * 2),
                      {rid: request for rid in ids})
    engine.on_layer(1, torch.randn(8, 16), None)
    engine.end_step()
    engine.finish(ids)
    first, second = (r.run_id for r in events.results)
    assert first == "trace-42" and second != first and second.startswith("trace-42~")
    assert sorted(a.run_id for a in events.alerts) == sorted([first, second])  # each alert in its own run
    assert set(engine.results) == {first, second}
    engine.begin_step(["trace-42-cccccccc"], [0, 4], torch.arange(4), torch.tensor(prompt),
                      {"trace-42-cccccccc": request})  # the first is over: the id is free again
    engine.on_layer(1, torch.randn(4, 16), None)
    engine.end_step()
    assert engine.runs["trace-42-cccccccc"].state.run_id == "trace-42"


# ---------------------------------------------------------------- (f) stacked interventions
def test_interventions_stacked_on_one_feature_are_bounded_as_a_sum() -> None:
    sae = build_sae(4, 6)
    unit = 2.0
    half = Intervention(feature=3, mode="add", value=STEER_LIMIT * 0.6)
    compile_steering([half], {"layers.1": sae}, max_activation=lambda hp, f: unit)  # one alone is fine
    compile_steering([half, half.model_copy(update={"feature": 2})], {"layers.1": sae},
                     max_activation=lambda hp, f: unit)  # two features, one each: fine
    with pytest.raises(ConfigError, match=r"2 interventions on feature 3 at layers\.1 \(add 600, add 600\) add up to "
                                          r"1\.2e\+03 × the feature's max activation"):
        compile_steering([half, half], {"layers.1": sae}, max_activation=lambda hp, f: unit)
    many = [Intervention(feature=3, mode="scale", value=STEER_LIMIT)] * 3
    with pytest.raises(ConfigError, match="add up to 3e\\+03"):
        compile_steering(many, {"layers.1": sae}, max_activation=lambda hp, f: unit)
    # absolute values (no unit): held to what the dtype can carry, summed
    big = Intervention(feature=3, mode="add", value=4000, absolute=True)
    compile_steering([big], {"layers.1": sae}, dtype=torch.float16)
    with pytest.raises(ConfigError, match="together, which overflows torch.float16"):
        compile_steering([big] * 2, {"layers.1": sae}, dtype=torch.float16)


def test_a_calls_interventions_stack_on_the_monitors_own(tiny_monitor: Any) -> None:
    big = Intervention(feature=1, mode="add", value=3e37, absolute=True, hookpoint="layers.1")
    monitor = tiny_monitor(interventions=[big])
    with monitor.session(interventions=[big.model_copy(update={"feature": 2})]):
        pass  # another feature: no stack
    with pytest.raises(ConfigError, match="2 interventions on feature 1 at layers.1 .* overflows torch.float32"):
        monitor.session(interventions=[big])


# ---------------------------------------------------------------- §4, one range check for feature ids
def test_every_entry_point_checks_feature_ids_with_the_one_check(pack: Path, tmp_path: Path, capsys: Any,
                                                                 no_model: None) -> None:
    import ast

    from featurewatch.errors import FeatureOutOfRange
    from featurewatch.neighbours import decoder_neighbours
    from featurewatch.pack import load_pack

    loaded = load_pack(pack)
    sae = loaded.saes["layers.1"]
    wanted = "is out of range; the SAE at layers.1 has features 0 … 7"
    for call in (lambda: loaded.feature_summary("layers.1", 8),
                 lambda: compile_steering([Intervention(feature=8, mode="ablate")], {"layers.1": sae}),
                 lambda: decoder_neighbours(sae, 8, 3),
                 lambda: sae.subset([8])):
        with pytest.raises(FeatureOutOfRange, match="8 is out of range; the SAE.* has features 0 … 7"):
            call()
    out_file = str(tmp_path / "o.jsonl")
    for argv in (["inspect", "8", "--pack", str(pack)],
                 ["redteam", "--feature", "8", "--pack", str(pack), "--out", out_file],
                 ["run", "--steer", "8:ablate", "--pack", str(pack), "--prompt", "x"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and wanted in err, (argv, err)
    # no module but sae.py compares a feature id with d_sae (the page server is left to its rewrite)
    root = Path(__file__).resolve().parents[1] / "featurewatch"
    for path in root.rglob("*.py"):
        if path.name == "sae.py" or path.parts[-2:] == ("ui", "server.py") or "training" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            sides = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
            counts = any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "len"
                         for c in sides)  # a count of rows against d_sae is not a feature id
            if not counts and any(isinstance(c, ast.Attribute) and c.attr == "d_sae"
                                  and not (isinstance(c.value, ast.Name) and c.value.id == "args")
                                  for c in sides):  # not --k vs --d-sae
                pytest.fail(f"{path.relative_to(root)}:{node.lineno} checks a feature id itself")


# ---------------------------------------------------------------- §4, one offline reader of record files
def test_the_shipped_corpus_and_record_files_are_read_by_one_reader(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from featurewatch import records, steering_sweep
    from featurewatch.errors import RecordError

    read: list[str] = []
    original = records.records_from_lines

    def spy(lines: Any, *, path: str, **kw: Any) -> Any:
        read.append(path)
        return original(lines, path=path, **kw)

    monkeypatch.setattr(records, "records_from_lines", spy)
    monkeypatch.setattr(steering_sweep, "records_from_lines", spy)
    corpus = steering_sweep.default_corpus()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: not UTF-8"):
        records.load_records(bad)
    assert corpus and read == ["featurewatch/data/neutral.jsonl", str(bad)]
