"""The ``featurewatch score`` contract (docs/architecture.md, "Score output") on the real embedded model."""

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import make_pack
from featurewatch import cli, models

pytestmark = pytest.mark.slow


@pytest.fixture()
def pack(tmp_path: Path) -> Path:
    return make_pack(tmp_path / "pack")


@pytest.fixture(autouse=True)
def reuse_model(monkeypatch: Any, smollm: Any) -> None:
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm)


def run(capsys: Any, *argv: str) -> tuple[int, list[dict], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_one_row_per_record_in_order_with_ids_and_phase_scores(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "text": "Dear customer, your account is locked. " * (i + 1)} for i in range(5)]
    rows.insert(2, {"id": "chat", "messages": [{"role": "user", "content": "Hi there!"},
                                                {"role": "assistant", "content": "Hello, how can I help?"}]})
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = run(capsys, "score", "--input", str(inp), "--pack", str(pack), "--batch-size", "4")
    assert code == 0
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert set(out[0]) == {"id", "scores", "phase_scores", "alerts"}
    assert set(out[0]["phase_scores"]) == {"prompt"}
    assert set(out[2]["phase_scores"]) == {"prompt", "completion"}
    for row in out:
        assert set(row["scores"]) == {"demo"}
    alerts = [alert for row in out for alert in row["alerts"]]
    assert alerts, "the demo detector (threshold 0) fires on these records; no alert means no alert was checked"
    for alert in alerts:
        assert alert["score"] >= alert["threshold"] and alert["detector"] == "demo"
        assert 0 <= alert["span"][0] < alert["span"][1]
        assert alert["phase"] in ("prompt", "completion") and isinstance(alert["evidence"], list)


def test_output_file_and_the_same_scores_batched_or_not(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in
                             enumerate(["a short line of text", "a somewhat longer piece of text here",
                                        "mid length"])) + "\n")
    out1, out8 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for batch_size, out in (("1", out1), ("8", out8)):
        assert cli.main(["score", "--input", str(inp), "--pack", str(pack), "--batch-size", batch_size,
                         "--output", str(out)]) == 0
    a = [json.loads(x) for x in out1.read_text().splitlines()]
    b = [json.loads(x) for x in out8.read_text().splitlines()]
    assert [r["id"] for r in a] == [r["id"] for r in b] == ["0", "1", "2"]
    for ra, rb in zip(a, b, strict=True):
        assert ra["scores"]["demo"] is not None
        assert ra["scores"]["demo"] == pytest.approx(rb["scores"]["demo"], rel=1e-3, abs=1e-3)


def test_malformed_line_exits_2_naming_the_line(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "ok", "text": "fine"}\n{"id": "bad", "txt": "typo"}\n')
    code, out, err = run(capsys, "score", "--input", str(inp), "--pack", str(pack))
    assert code == 2 and out == []
    assert f"{inp}:2:" in err


def test_skip_invalid_reports_each_skipped_line(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "fine"}\nnot json\n{"id": "b", "text": "also fine"}\n')
    code, out, err = run(capsys, "score", "--input", str(inp), "--pack", str(pack), "--skip-invalid")
    assert code == 0 and [r["id"] for r in out] == ["a", "b"]
    assert f"{inp}:2:" in err and "1 invalid line(s) skipped" in err


def test_a_record_without_scoreable_tokens_gets_null_scores(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "tiny", "text": "Hi"}\n')  # its only token is the attention sink
    code, out, err = run(capsys, "score", "--input", str(inp), "--pack", str(pack))
    assert code == 0 and out[0]["scores"] == {"demo": None} and out[0]["alerts"] == []


def test_empty_file_gives_no_rows(tmp_path: Path, pack: Path, capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    code, out, err = run(capsys, "score", "--input", str(inp), "--pack", str(pack))
    assert code == 0 and out == []
