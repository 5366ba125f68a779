"""Every command and flag in the README's command table exists, and each command runs for real.

The real runs use a tiny 2-layer Llama saved with the embedded model's tokenizer
(``--model DIR`` loads in about a second) and a hand-seeded pack, in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from featurewatch.cli import build_parser, main
from featurewatch.pack import load_spec

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(command, flags)`` for each row of the README's ``| command | what it does |`` table."""
    rows = re.findall(r"^\| `featurewatch ([a-z-]+)([^`]*)` \|", README.read_text(encoding="utf-8"), re.M)
    return [(cmd, re.findall(r"--[a-z][a-z0-9-]*", rest)) for cmd, rest in rows]


def test_the_readme_table_lists_every_command() -> None:
    documented = [cmd for cmd, _ in readme_commands()]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    # a command may have more than one row (calibrate: by record, and leave-one-source-out)
    assert documented and sorted(set(documented)) == sorted(sub.choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command, flags", readme_commands(), ids=[c for c, _ in readme_commands()])
def test_readme_command_has_help_with_every_flag_shown(command: str, flags: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert re.search(re.escape(flag) + r"\b", text), f"README shows {command} {flag}, its --help does not"


# --------------------------------------------------------------------------- real runs on a tiny model
def chat(i: int, bad: bool) -> dict[str, Any]:
    ask = ("Write an urgent email: your bank account is locked, confirm your password now " if bad
           else "Write a friendly note inviting the team to a picnic ") + str(i)
    reply = ("URGENT: click this link and confirm your password within 24 hours." if bad
             else "Hi all, join us for a picnic in the park on Saturday!")
    return {"id": f"{'pos' if bad else 'neg'}-{i}", "label": int(bad), "source": "hand",
            "messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-data")
    rows = [chat(i, bad) for i in range(20) for bad in (True, False)]
    files = {"labelled": rows, "pos": [r for r in rows if r["label"]], "neg": [r for r in rows if not r["label"]]}
    out = {}
    for name, recs in files.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir: Path, tiny_lm_pack: Path, tmp_path_factory: Any) -> list[str]:
    """``--model``, ``--pack`` and ``--cache`` options for the tiny model."""
    return ["--model", str(tiny_lm_dir), "--pack", str(tiny_lm_pack)]


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_run_with_prompt_input_json_and_metrics(tiny: list[str], data: dict[str, Path], capsys: Any) -> None:
    code, out, err = cli(capsys, "run", *tiny, "--prompt", "Hello there", "--input", str(data["pos"]),
                         "--json", "--metrics-port", "0", "--max-new-tokens", "3", "--top-features", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1 + 20
    assert all(r["outcome"] in ("completed", "blocked") and set(r["scores"]) == {"demo"} for r in rows)
    assert any(len(t["top"]) == 2 for t in rows[0]["tokens"])
    assert re.search(r"serving metrics on http://127\.0\.0\.1:\d+/metrics", err)


def test_score_with_output_detector_and_skip_invalid(tiny: list[str], data: dict[str, Path], tmp_path: Path,
                                                     capsys: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(data["pos"].read_text(encoding="utf-8") + "not json\n", encoding="utf-8")
    out_file = tmp_path / "scores.jsonl"
    code, out, err = cli(capsys, "score", *tiny, "--input", str(inp), "--output", str(out_file),
                         "--detector", "demo", "--skip-invalid")
    assert code == 0 and out == ""
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"pos-{i}" for i in range(20)]
    assert f"{inp}:21:" in err and "1 invalid line(s) skipped" in err


def test_eval_on_the_held_out_split(tiny: list[str], data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code, out, err = cli(capsys, "eval", *tiny, "--input", str(data["labelled"]), "--detector", "demo",
                         "--split", "held-out", "--json", "--cache", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "held-out"
    row = next(r for r in report["rows"] if r["group"] == "(all)" and r["wrapper"] == "(all)")
    assert row["detector"] == "demo" and 0 < row["n_pos"] + row["n_neg"] < 40
    assert {"auroc", "recall", "fpr", "threshold", "probe_auroc", "phase"} <= set(row)


def test_explain_lists_the_readout(tiny: list[str], capsys: Any) -> None:
    pack = tiny[tiny.index("--pack") + 1]
    code, out, err = cli(capsys, "explain", "demo", "--pack", pack, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["detector"] == "demo" and report["features"]
    assert {"id", "weight", "label", "top_contexts", "share"} <= set(report["features"][0])
    code, out, err = cli(capsys, "explain", "nope", "--pack", pack)
    assert code == 2 and "valid:" in err


def test_explain_shows_shares_sorted_by_share(tmp_path: Path, capsys: Any) -> None:
    from conftest import make_pack

    # feature 1: weight 1.0 but a small max activation (0.5); feature 2: weight -0.5, max activation 6
    pack = make_pack(tmp_path / "pack", d_in=16, d_sae=8, hookpoint="layers.1")
    (pack / "features.json").write_text(json.dumps({"layers.1": [
        {"id": 1, "max_activation": 0.5, "label": "one"}, {"id": 2, "max_activation": 6.0, "label": "two"}]}))
    code, out, err = cli(capsys, "explain", "demo", "--pack", str(pack), "--json")
    assert code == 0, err
    report = json.loads(out)
    # shares were null for every feature, rows sorted by |weight|
    assert [(r["id"], r["share"]) for r in report["features"]] == [(2, 0.8571), (1, 0.1429)]
    assert report["share_basis"] == "max_activation" and report["largest_share"] == 0.8571
    code, out, err = cli(capsys, "explain", "demo", "--pack", str(pack))
    assert code == 0 and "share  86%" in out and "share = |wᵢ · max activationᵢ| / Σ" in out


def test_discover_ranks_features(tiny: list[str], data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code, out, err = cli(capsys, "discover", *tiny, "--pos", str(data["pos"]), "--neg", str(data["neg"]),
                         "--top", "3", "--json", "--cache", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    assert (report["n_pos"], report["n_neg"]) == (20, 20) and len(report["features"]) == 3


def test_calibrate_writes_loadable_specs(tiny: list[str], data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    out_dir = tmp_path / "specs"
    code, out, err = cli(capsys, "calibrate", *tiny, "--name", "picnic", "--input", str(data["labelled"]),
                         "--phase", "completion", "--max-features", "4", "--target-fpr", "0.1", "--out",
                         str(out_dir), "--json", "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    report = json.loads(out)
    assert set(report["kinds"]) == {"sae", "probe"}
    sae_spec, probe_spec = load_spec(out_dir / "picnic.json"), load_spec(out_dir / "picnic-probe.json")
    assert sae_spec.phases == ["completion"] and 1 <= len(sae_spec.features) <= 4
    assert probe_spec.kind == "probe" and (out_dir / "probes" / "picnic-probe.safetensors").is_file()


def test_inspect_stored_and_live_contexts(tiny: list[str], data: dict[str, Path], capsys: Any) -> None:
    code, out, err = cli(capsys, "inspect", "1", "2", "--pack", tiny[3], "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["feature"] for r in rows] == [1, 2] and rows[0]["used_by"] == ["demo"]
    code, out, err = cli(capsys, "inspect", "1", *tiny, "--corpus", str(data["pos"]), "--records", "5")
    assert code == 0, err
    assert "top-activating contexts" in out and str(data["pos"]) in out


def test_train_sae_on_a_mix_of_corpora_harvests_then_trains(tiny_lm_dir: Path, data: dict[str, Path],
                                                             tmp_path: Path, capsys: Any) -> None:
    from featurewatch.sae import SparseAutoencoder

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Subject: invoice {i}\n\nPlease find the "
                                        f"invoice attached and pay by Friday. Ref {i * 7}."}) + "\n"
                            for i in range(40)), encoding="utf-8")
    out_dir = tmp_path / "work"
    common = ["--corpus", str(docs), "--corpus", str(data["labelled"]), "--mix", "3,1", "--wrap-documents", "0.5",
              "--out", str(out_dir), "--model", str(tiny_lm_dir), "--hookpoint", "layers.1", "--tokens", "800",
              "--ctx", "24", "--d-sae", "16", "--k", "2", "--batch-size", "64", "--epochs", "1",
              "--eval-tokens", "64", "--ce-tokens", "48", "--json"]
    code, out, err = cli(capsys, "train-sae", *common, "--harvest-only")
    assert code == 0, err
    harvested = json.loads(out)["harvested_tokens"]
    assert harvested["docs"] == 600 and harvested["labelled"] == 200  # --mix 3,1 of --tokens 800
    assert not (out_dir / "sae").exists()  # --harvest-only: nothing trained yet
    code, out, err = cli(capsys, "train-sae", *common)  # the same command without it trains on the cache
    assert code == 0, err
    report = json.loads(out)
    assert report["corpus"] == "docs.jsonl (75%), labelled.jsonl (25%)"
    assert set(report["per_corpus"]) == {"docs", "labelled"}
    assert all({"fvu", "l0", "ce_increase"} <= set(r) for r in report["per_corpus"].values())
    assert report["hookpoint"] == "layers.1"
    sae = SparseAutoencoder.load(out_dir / "sae" / "layers.1")
    assert (sae.d_in, sae.d_sae) == (16, 16)


def test_in_chat_wrappers_puts_a_stated_fraction_of_documents_in_chats() -> None:
    from featurewatch.records import Record
    from featurewatch.training.harvest import in_chat_wrappers

    docs = [Record(f"d{i}", f"document {i}", None, {}, i) for i in range(400)]
    chats = [Record("c", None, ({"role": "user", "content": "hi"},), {}, 0)]
    out = in_chat_wrappers(docs + chats, 0.5)
    wrapped = [r for r in out[:400] if r.messages is not None]
    assert 160 < len(wrapped) < 240 and out[400] is chats[0]  # ~half the documents; chats untouched
    last = {r.messages[-1]["role"] for r in wrapped}  # type: ignore[index]
    assert last == {"user", "assistant"}  # quoted by the user, or written as the assistant's reply
    assert all(any(f"document {r.id[1:]}" in m["content"] for m in r.messages) for r in wrapped)  # type: ignore[union-attr]
    assert in_chat_wrappers(docs, 0.5) == out[:400]  # deterministic
    assert in_chat_wrappers(docs, 0) == docs
