"""``calibrate --group-by`` / ``eval --group-by``: leave-one-source-out, end to end on the tiny model.

The commands run as the README shows them, with ``--model``/``--pack`` pointing at the tiny
2-layer Llama and a copy of its pack; the numbers are meaningless there, the mechanics are not:
every group is left out and reported, the spec records its out-of-source figures, ``explain``
shows them, the dense decision is explained in SAE features, and bad input fails before the
model loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from featurewatch.cli import main
from featurewatch.pack import load_pack, load_spec

pytestmark = pytest.mark.slow

SOURCES = ("alpha", "beta", "gamma")


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grouped")
    chats, docs, pool = [], [], []
    for _s, src in enumerate(SOURCES):
        for i in range(8):
            bad = i % 2 == 0
            chats.append({"id": f"{src}-{i}", "label": int(bad), "source": src, "group": "pos" if bad else "neg",
                          "messages": [{"role": "user", "content": f"Please write message {i} for {src}."},
                                       {"role": "assistant", "content": (
                                           "URGENT: your account is locked, send your password now"
                                           if bad else "Hi all, lunch is at noon on Friday, see you there") +
                                        f" ({src} {i})"}]})
            docs.append({"id": f"doc-{src}-{i}", "label": int(bad), "source": f"{src}-mail",
                         "text": ("Dear customer, verify your bank details at this link today or lose access"
                                  if bad else "Minutes of the garden committee: the hedges are trimmed") + f" {i}"})
    for i in range(6):
        pool.append({"id": f"chat-{i}", "source": "chats", "messages": [
            {"role": "user", "content": f"What is a good name for a cat number {i}?"},
            {"role": "assistant", "content": f"How about Biscuit {i}? It is short and friendly."}]})
    return {"chats": _write(root / "chats.jsonl", chats), "docs": _write(root / "docs.jsonl", docs),
            "pool": _write(root / "pool.jsonl", pool)}


@pytest.fixture()
def pack(tiny_lm_pack: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pack"
    shutil.copytree(tiny_lm_pack, dst)
    return dst


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_calibrate_leaves_each_source_out_and_records_it_in_the_spec(
        tiny_lm_dir: Path, pack: Path, files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code, out, err = cli(capsys, "calibrate", "--model", str(tiny_lm_dir), "--pack", str(pack), "--name", "lure",
                         "--input", str(files["chats"]), "--input", str(files["docs"]),
                         "--negatives", str(files["pool"]),
                         "--wrap", "docs.jsonl=plain,reply", "--group-by", "source", "--watch", "prompt,completion",
                         "--max-features", "3", "--target-fpr", "0.1", "--min-tokens", "1", "--max-per-group", "6",
                         "--report", str(tmp_path / "report.json"), "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    assert "leave-one-source-out over 6 groups" in out and "chosen:" in out
    for src in SOURCES:
        assert src in out and f"{src}-mail" in out  # every group left out and reported
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["kinds"]) == {"sae", "probe", "mean-diff"}
    assert len(report["kinds"]["sae"]["loso"]["groups"]) == 7  # six sources and the pool's
    spec = load_spec(pack / "lure.json")
    oos = spec.calibration.out_of_source
    assert oos is not None and oos.group_by == "source" and oos.decision == report["chosen"]
    assert {g["group"] for g in oos.groups} >= {*SOURCES, "chats"} and oos.in_split_auroc is not None
    assert set(spec.phase_thresholds) == {"prompt", "completion"} and spec.pooling.prior_score is not None
    if spec.kind == "probe":  # a dense decision ships with the SAE features that explain it
        assert spec.evidence_features
    probe = load_spec(pack / "lure-probe.json") if (pack / "lure-probe.json").exists() else spec
    assert probe.kind == "probe" and probe.evidence_features and probe.calibration.out_of_source.decision == "probe"
    # the pack loads what calibrate wrote, and explain shows the out-of-source figures
    assert "lure" in load_pack(pack).detectors
    code, out, err = cli(capsys, "explain", "lure", "--pack", str(pack), "--neighbours", "0")
    assert code == 0, err
    assert "out of source (leave-one-source-out)" in out and "decision:" in out and "alpha" in out
    code, out, err = cli(capsys, "explain", "lure", "--pack", str(pack), "--json", "--neighbours", "0")
    assert json.loads(out)["out_of_source"]["group_by"] == "source"


def test_a_forced_sae_decision_lists_provenance_filtered_candidates(
        tiny_lm_dir: Path, pack: Path, files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code, out, err = cli(capsys, "calibrate", "--model", str(tiny_lm_dir), "--pack", str(pack), "--name", "lure",
                         "--input", str(files["chats"]), "--group-by", "source", "--kind", "sae", "--watch",
                         "completion", "--max-features", "2", "--target-fpr", "0.2", "--min-tokens", "1",
                         "--json", "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    report = json.loads(out)
    assert report["chosen"] == "sae" and list(report["kinds"]) == ["sae"]
    written = report["written"]["lure"]
    assert {"fire", "formatting", "provenance", "kept"} <= set(written["excluded"])
    assert 1 <= len(load_spec(pack / "lure.json").features) <= 2


def test_a_baseline_pack_is_scored_on_the_same_records(
        tiny_lm_dir: Path, pack: Path, tiny_lm_pack: Path, files: dict[str, Path], tmp_path: Path,
        capsys: Any) -> None:
    code, out, err = cli(capsys, "calibrate", "--model", str(tiny_lm_dir), "--pack", str(pack), "--name", "demo",
                         "--input", str(files["chats"]), "--group-by", "source", "--kind", "probe", "--watch",
                         "completion", "--min-tokens", "1", "--baseline", str(tiny_lm_pack), "--json",
                         "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    base = json.loads(out)["baseline"]["demo"]  # the tiny pack's hand-set readout, on every left-out group
    assert {g["group"] for g in base["groups"]} == set(SOURCES) and base["auroc"] is not None
    code, _, err = cli(capsys, "calibrate", "--model", str(tiny_lm_dir), "--pack", str(pack), "--name", "other",
                       "--input", str(files["chats"]), "--group-by", "source", "--baseline", str(tiny_lm_pack),
                       "--cache", str(tmp_path / "cache"))
    assert code == 2 and "has no detector 'other'" in err


def test_eval_reports_per_group_and_says_where_it_differs_from_calibration(
        tiny_lm_dir: Path, pack: Path, files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code, out, err = cli(capsys, "eval", "--model", str(tiny_lm_dir), "--pack", str(pack), "--detector", "demo",
                         "--input", str(files["chats"]), "--group-by", "source", "--json", "--cache", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    groups = {r["group"] for r in report["rows"]}
    # positives by source; the multi-source negatives also by kind
    assert {"alpha", "alpha/neg", "beta", "gamma/neg"} <= groups and report["group_by"] == "source"
    assert isinstance(report["warnings"], list)


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("extra, message", [
    (["--negatives", "{pool}"], "needs --group-by"),
    (["--group-by", "source", "--wrap", "nope.jsonl=plain"], "is not one of the --input/--negatives files"),
    (["--group-by", "source", "--wrap", "chats.jsonl=sideways"], "unknown wrapper sideways"),
    (["--group-by", "origin"], "--group-by origin: the field is"),
    (["--group-by", "source", "--kind", "both"], "pick sae, probe, mean-diff, or auto"),
])
def test_bad_grouped_options_fail_before_the_model_loads(files: dict[str, Path], tmp_path: Path, capsys: Any,
                                                          extra: list[str], message: str) -> None:
    extra = [e.format(pool=files["pool"]) for e in extra]
    code, _, err = cli(capsys, "calibrate", "--name", "lure", "--input", str(files["chats"]), *extra,
                       "--cache", str(tmp_path))
    assert code == 2 and message in err


@pytest.mark.usefixtures("no_model")
def test_one_group_cannot_be_left_out(tmp_path: Path, capsys: Any) -> None:
    rows = [{"id": str(i), "label": i % 2, "source": "only", "text": f"text {i}"} for i in range(4)]
    path = _write(tmp_path / "one.jsonl", rows)
    code, _, err = cli(capsys, "calibrate", "--name", "lure", "--input", str(path), "--group-by", "source",
                       "--cache", str(tmp_path / "c"))
    assert code == 2 and "hold one group (only)" in err


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    """The README's ```bash block that contains ``marker``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    return next(b for b in blocks if marker in b)


@pytest.mark.skipif(not (SHARED / "dev" / "multi" / "scam.jsonl").is_file(), reason="needs ../shared/data")
def test_the_readme_leave_one_source_out_block_runs_as_shown(tiny_lm_dir: Path, pack: Path, tmp_path: Path,
                                                             capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's block, command by command as written, with the tests' tiny model and pack (and, for eval,
    the first 40 records: the point is that the options work together, not the tiny model's numbers)."""
    import shlex

    monkeypatch.chdir(ROOT)
    block = readme_block("--group-by source").replace("\\\n", " ")
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["featurewatch", "calibrate"], ["featurewatch", "eval"],
                                         ["featurewatch", "explain"]]
    tiny = ["--model", str(tiny_lm_dir), "--pack", str(pack), "--cache", str(tmp_path / "cache")]
    calibrate, evaluate, explain = (c[1:] for c in commands)
    calibrate = [str(tmp_path / a) if a == "scam.json" else a for a in calibrate]
    code, out, err = cli(capsys, *calibrate, *tiny)
    assert code == 0, err
    assert "leave-one-source-out over" in out and json.loads((tmp_path / "scam.json").read_text())["chosen"]
    code, out, err = cli(capsys, *evaluate, *tiny, "--max-records", "40")
    assert code == 0, err
    assert "scam-email" in out
    code, out, err = cli(capsys, *explain, "--pack", str(pack), "--neighbours", "0")
    assert code == 0, err
    assert "out of source (leave-one-source-out)" in out
