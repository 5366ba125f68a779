"""Feature neighbourhoods: ``inspect --neighbours/--map``, ``explain``'s neighbours, and ``featurewatch.neighbours``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_sae, concept_pack, run_cli
from featurewatch.neighbours import decoder_neighbours, projection

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pack(tmp_path_factory: Any) -> Path:
    return concept_pack(tmp_path_factory.mktemp("neighbours") / "pack")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    rows = [{"id": f"{lab}-{i}", "label": lab, "messages": [
        {"role": "user", "content": "Write the email." if lab else "Describe a park."},
        {"role": "assistant", "content": ("URGENT: confirm your password at this link now " if lab
                                          else "A quiet green park with old trees ") + str(i)}]}
            for i in range(10) for lab in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


run = run_cli


# --------------------------------------------------------------------------- the library
def test_decoder_neighbours_are_the_nearest_directions() -> None:
    w_dec = torch.eye(4, 3).repeat(2, 1)  # rows 0..3 then again 4..7: row i and i+4 point the same way
    w_dec[5] = torch.tensor([0.9, 0.1, 0.0])  # near feature 0 too, less than feature 4
    sae = build_sae(3, 8, W_enc=torch.randn(3, 8), W_dec=w_dec)
    near = decoder_neighbours(sae, 0, 2)
    assert [n.feature for n in near] == [4, 5] and near[0].similarity == pytest.approx(1.0)
    assert 0 not in [n.feature for n in decoder_neighbours(sae, 0, 7)]  # never itself
    xy = projection(sae, [0, 4, 5, 1])
    assert xy.shape == (4, 2) and torch.allclose(xy[0], xy[1], atol=1e-5)  # same direction, same point


# --------------------------------------------------------------------------- inspect
def test_inspect_neighbours_json_shape(pack: Path, capsys: Any, no_model: None) -> None:
    code, out, err = run(capsys, "inspect", "2", "--pack", str(pack), "--neighbours", "3", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["feature"] == 2 and set(row["neighbours"]) == {"decoder"}  # no corpus: no co-activation
    near = row["neighbours"]["decoder"]
    assert len(near) == 3 and 2 not in [n["feature"] for n in near]
    assert set(near[0]) == {"feature", "cosine", "name", "label", "density", "top_context"}
    assert near[0]["label"] == f"feature {near[0]['feature']}" and near[0]["top_context"].startswith("a context")
    assert [n["cosine"] for n in near] == sorted((n["cosine"] for n in near), reverse=True)


def test_inspect_neighbours_and_map_for_people(pack: Path, tmp_path: Path, capsys: Any, no_model: None) -> None:
    png = tmp_path / "map.png"
    code, out, err = run(capsys, "inspect", "2", "--pack", str(pack), "--neighbours", "4", "--map", str(png))
    assert code == 0, err
    assert "nearest features by decoder cosine:" in out
    assert len(re.findall(r"^    #\d+ +cosine [+-]\d\.\d{3}  density 0\.\d{4}  feature \d", out, re.M)) == 4
    assert png.read_bytes().startswith(PNG) and f"map written to {png}" in err


@pytest.mark.parametrize("argv, message", [
    (["1", "2", "--map", "m.png"], r"--map draws one feature's neighbourhood; give one FEATURE, not 2"),
    (["1", "--neighbours", "0"], r"argument --neighbours: must be an integer >= 1"),
    (["99", "--neighbours", "3"], r"feature 99 is out of range; the SAE at layers.1 has features 0 … 7"),
    (["1", "--map", "/nonexistent/dir/m.png"], r"--map /nonexistent/dir/m.png: directory /nonexistent/dir does not"),
])
def test_inspect_bad_input_exits_2_before_the_model_loads(argv: list[str], message: str, pack: Path,
                                                          capsys: Any, no_model: None) -> None:
    code, out, err = run(capsys, "inspect", "--pack", str(pack), *argv)
    assert code == 2 and re.search(message, err), err


@pytest.mark.slow
def test_inspect_coactivation_neighbours_on_a_corpus(tiny_lm_dir: Path, pack: Path, labelled: Path,
                                                     capsys: Any) -> None:
    code, out, err = run(capsys, "inspect", "2", "--pack", str(pack), "--model", str(tiny_lm_dir), "--corpus",
                         str(labelled), "--records", "8", "--neighbours", "3", "--json")
    assert code == 0, err
    near = json.loads(out)["neighbours"]
    assert set(near) == {"decoder", "coactivation"} and len(near["decoder"]) == 3
    assert all(0 < n["jaccard"] <= 1 and n["tokens_both"] > 0 and n["feature"] != 2 for n in near["coactivation"])
    code, out, err = run(capsys, "inspect", "2", "--pack", str(pack), "--model", str(tiny_lm_dir), "--corpus",
                         str(labelled), "--records", "8", "--neighbours", "3")
    assert code == 0 and f"by co-activation in {labelled}" in out


# --------------------------------------------------------------------------- explain
def test_explain_lists_three_neighbours_per_readout_feature(pack: Path, capsys: Any, no_model: None) -> None:
    code, out, err = run(capsys, "explain", "demo", "--pack", str(pack), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert all(len(r["neighbours"]) == 3 for r in report["features"]) and "data" not in report
    code, out, err = run(capsys, "explain", "demo", "--pack", str(pack), "--neighbours", "0", "--json")
    assert code == 0 and all("neighbours" not in r for r in json.loads(out)["features"])
    code, out, err = run(capsys, "explain", "demo", "--pack", str(pack))
    assert code == 0 and len(re.findall(r"^        near #\d+ feature \d \(cos [+-]\d\.\d\d\)", out, re.M)) == 6


def test_explain_input_is_checked_before_the_model_loads(pack: Path, tmp_path: Path, capsys: Any,
                                                         no_model: None) -> None:
    code, _, err = run(capsys, "explain", "demo", "--pack", str(pack), "--input", str(tmp_path / "none.jsonl"))
    assert code == 2 and "--input" in err and "no such file" in err
    code, _, err = run(capsys, "explain", "demo-probe", "--pack", str(pack), "--input", str(tmp_path))
    assert code == 2 and "is a directory" in err


@pytest.mark.slow
def test_explain_flags_neighbours_that_separate_the_data_better(tiny_lm_dir: Path, pack: Path, labelled: Path,
                                                                tmp_path: Path, capsys: Any) -> None:
    common = ["explain", "demo", "--pack", str(pack), "--model", str(tiny_lm_dir), "--input", str(labelled),
              "--cache", str(tmp_path)]
    code, out, err = run(capsys, *common, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"] == {"inputs": ["labelled.jsonl"], "phase": "all", "n_pos": 10, "n_neg": 10, "margin": 0.02}
    for row in report["features"]:
        assert 0 <= row["auroc"] <= 1
        for n in row["neighbours"]:
            assert 0 <= n["auroc"] <= 1 and n["better"] == (n["auroc"] > row["auroc"] + 0.02)
    code, out, err = run(capsys, *common)
    assert code == 0, err
    assert "AUROC: of each feature's mean all activation on 10 positives vs 10 negatives" in out
    assert ("hint:" in out) or ("no neighbour separates the data better" in out)
