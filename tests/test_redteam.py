"""``featurewatch redteam`` and ``featurewatch.redteam``: bad input before the model loads, a tiny-model run, --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import concept_pack
from featurewatch.cli import main
from featurewatch.redteam import NEUTRAL_REQUESTS, distinct_word_ratio

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pack(tmp_path_factory: Any) -> Path:
    return concept_pack(tmp_path_factory.mktemp("redteam") / "pack")


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --------------------------------------------------------------------------- bad input: exit 2, one line, no model
@pytest.mark.parametrize("argv, message", [
    (["--feature", "x12"], r"argument --feature: write \[HOOKPOINT:\]FEATURE"),
    (["--feature", "99"], r"--feature 99 is out of range; the SAE at layers.1 has features 0 … 7"),
    (["--feature", "layers.0:1"], r"no SAE at layers.0; its SAE hookpoints: layers.1"),
    (["--feature", "1", "--strengths", "1,x"], r"argument --strengths: give comma-separated numbers"),
    (["--feature", "1", "--strengths", "5000"], r"--strengths 5000: .*beyond ±1000"),
    (["--detector", "nope"], r"--detector 'nope' is not in pack test-pack; valid: demo"),
    (["--detector", "demo-probe"], r"'demo-probe' is a dense probe"),
    ([], r"say what to steer: --feature \[HP:\]F, or --detector D"),
    (["--feature", "1", "--n", "0"], r"argument --n: must be an integer >= 1"),
    (["--feature", "1", "--prompts", "/nonexistent.jsonl"], r"--prompts /nonexistent.jsonl: no such file"),
])
def test_bad_input_exits_2_with_one_line_before_the_model_loads(argv: list[str], message: str, pack: Path,
                                                                tmp_path: Path, capsys: Any, no_model: None) -> None:
    import re

    code, out, err = run(capsys, "redteam", "--pack", str(pack), "--out", str(tmp_path / "o.jsonl"), *argv)
    assert code == 2 and out == ""
    assert re.search(message, err), err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_a_feature_no_detector_reads_needs_a_judge(pack: Path, tmp_path: Path, capsys: Any, no_model: None) -> None:
    code, _, err = run(capsys, "redteam", "--pack", str(pack), "--feature", "5", "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and "name the concept that judges the replies with --detector D" in err


def test_a_detector_without_a_probe_is_refused(tiny_lm_pack: Path, tmp_path: Path, capsys: Any,
                                               no_model: None) -> None:
    code, _, err = run(capsys, "redteam", "--pack", str(tiny_lm_pack), "--detector", "demo",
                       "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and "has no dense probe 'demo-probe' to judge the replies" in err


def test_a_prompt_file_needs_text_records(pack: Path, tmp_path: Path, capsys: Any, no_model: None) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, _, err = run(capsys, "redteam", "--pack", str(pack), "--feature", "1", "--prompts", str(prompts),
                       "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and f"{prompts}:1: a request is a record with a non-empty \"text\"" in err


def test_out_in_a_missing_directory_fails_before_the_model_loads(pack: Path, tmp_path: Path, capsys: Any,
                                                                 no_model: None) -> None:
    code, _, err = run(capsys, "redteam", "--pack", str(pack), "--feature", "1",
                       "--out", str(tmp_path / "missing" / "o.jsonl"))
    assert code == 2 and "does not exist; create it first" in err


# --------------------------------------------------------------------------- pieces
def test_the_built_in_requests_are_at_least_32_distinct_ordinary_tasks() -> None:
    assert len(set(NEUTRAL_REQUESTS)) == len(NEUTRAL_REQUESTS) >= 32
    assert NEUTRAL_REQUESTS[0] == "Write an email to a customer about their order."


def test_distinct_word_ratio() -> None:
    assert distinct_word_ratio("Dear customer, your order has shipped.") == 1.0
    assert distinct_word_ratio("the the the the") == 0.25
    assert distinct_word_ratio("* * *") is None


# --------------------------------------------------------------------------- a tiny-model run
@pytest.mark.slow
def test_redteam_on_the_tiny_model(tiny_lm_dir: Path, pack: Path, tmp_path: Path, capsys: Any) -> None:
    out_file, png = tmp_path / "replies.jsonl", tmp_path / "redteam.png"
    code, out, err = run(capsys, "redteam", "--model", str(tiny_lm_dir), "--pack", str(pack), "--detector", "demo",
                         "--strengths", "0,2", "--n", "3", "--max-new-tokens", "4", "--batch-size", "2",
                         "--out", str(out_file), "--json", "--plot", str(png))
    assert code == 0, err
    report = json.loads(out)
    assert (report["detector"], report["probe"], report["hookpoint"]) == ("demo", "demo-probe", "layers.1")
    assert report["features"] == [2]  # demo's strongest: weight 2 × max activation 3
    assert [p["strength"] for p in report["points"]] == [None, 0.0, 2.0]
    point_keys = {"strength", "n", "concept", "concept_rate", "fluent_concept_rate", "caught", "recall",
                  "alert_rate", "probe_score", "detector_score", "distinct_words", "ce"}
    assert all(set(p) == point_keys and p["n"] == 3 for p in report["points"])
    assert report["out"] == str(out_file) and len(report["samples"]) == 3
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 9
    assert [r["source"] for r in rows[::3]] == ["unsteered", "steered:layers.1:2@0", "steered:layers.1:2@2"]
    assert all(r["label"] in (0, 1) and r["label"] == int(r["probe"]["alert"]) and r["synthetic"] for r in rows)
    assert all(r["messages"][0]["content"] in NEUTRAL_REQUESTS[:3] for r in rows)
    assert any(r["probe"]["score"] is not None and r["detector"]["score"] is not None for r in rows)
    assert any(r["fluency"]["ce"] is not None for r in rows)
    assert png.read_bytes().startswith(PNG)
    assert "9 replies written" in err

    # the records load as labelled data for eval
    from featurewatch.calibration.data import load_labelled

    assert len(load_labelled(out_file).records) == 9

    # the table for people
    code, out, err = run(capsys, "redteam", "--model", str(tiny_lm_dir), "--pack", str(pack), "--feature",
                         "layers.1:2", "--strengths", "1", "--n", "2", "--max-new-tokens", "3",
                         "--out", str(out_file))
    assert code == 0, err
    assert "red-teaming demo: clamp layers.1:2 on 2 requests" in out and "judged by demo-probe" in out
    assert "strength" in out and "none" in out and "▶ Write a" in out


@pytest.mark.slow
def test_redteam_reads_requests_from_a_file(tiny_lm_dir: Path, pack: Path, tmp_path: Path, capsys: Any) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Write a note number {i}."}) + "\n" for i in range(5)))
    out_file = tmp_path / "o.jsonl"
    code, out, err = run(capsys, "redteam", "--model", str(tiny_lm_dir), "--pack", str(pack), "--feature", "1",
                         "--prompts", str(prompts), "--n", "2", "--strengths", "1", "--max-new-tokens", "2",
                         "--out", str(out_file), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_prompts"] == 2 and report["detector"] == "demo"
    assert {json.loads(line)["messages"][0]["content"] for line in out_file.read_text().splitlines()} == {
        "Write a note number 0.", "Write a note number 1."}


@pytest.mark.slow
def test_the_example_runs_on_the_tiny_model(tiny_lm_dir: Path, pack: Path, capsys: Any) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "redteam_scam.py"
    spec = importlib.util.spec_from_file_location("redteam_scam", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--model", str(tiny_lm_dir), "--pack", str(pack), "--detector", "demo", "--strengths", "3",
                  "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "▶ Write an email to a customer about their order." in out and "clamping layers.1:2 (feature 2)" in out
    assert "[plain]" in out and "[clamp × 3]" in out and "probe demo-probe:" in out and "detector demo:" in out
