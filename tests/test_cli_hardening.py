"""Bad input never crashes the command line: one ``featurewatch: error:`` line, exit 2, before the model loads.

Each test reproduces a failure seen on the old CLI (issue 7). Checks that must
happen before the model loads run with ``load_model`` replaced by a function
that fails the test, so a check that comes too late is caught.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import serving_port
from featurewatch import models
from featurewatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.jsonl"
    p.write_text('{"id": "a", "text": "fine", "label": 1}\n', encoding="utf-8")
    return p


def fails(capsys: Any, argv: list[str], *patterns: str, code: int = 2) -> str:
    """Run ``featurewatch argv``: it must exit ``code`` with one error line matching every pattern."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse usage errors
        status = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status == code, err
    assert "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    return err


# --------------------------------------------------------------------------- input files
@pytest.mark.parametrize("command", [["score"], ["eval"], ["run", "--max-new-tokens", "1"]])
def test_non_utf8_input_is_an_error_naming_the_line(command: list[str], tmp_path: Path, capsys: Any,
                                                    no_model: None) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "text": "ok", "label": 0}\n{"id": "b", "text": "caf\xe9", "label": 1}\n')
    fails(capsys, [*command, "--input", str(p)], rf"featurewatch: error: {re.escape(str(p))}:2: not UTF-8")


def test_a_binary_input_file_is_an_error_not_a_decode_traceback(tmp_path: Path, capsys: Any, no_model: None) -> None:
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2048))
    fails(capsys, ["score", "--input", str(p)], r"weights\.bin:1: not UTF-8")


def test_skip_invalid_skips_undecodable_and_deeply_nested_lines(tmp_path: Path, capsys: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "text": "ok"}\n\xff\xfe junk\n{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n")
    seen: list[list[str]] = []

    class FakeMonitor:  # stands in for the model: only the records that reach it matter here
        detectors: list[Any] = []

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def score_records(self, records: list[Any], **kw: Any) -> Any:
            seen.append([r.id for r in records])
            return iter(())

        def detach(self) -> None:
            pass

    monkeypatch.setattr("featurewatch.monitor.Monitor", FakeMonitor)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: type("L", (), {"model": None, "tokenizer": None,
                                                                             "name": "fake"})())
    assert main(["score", "--input", str(p), "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert seen == [["a"]]
    assert f"{p}:2: not UTF-8" in err and f"{p}:3: JSON nested too deeply" in err
    assert "2 invalid line(s) skipped" in err


def test_deeply_nested_json_is_an_error_naming_the_line(tmp_path: Path, capsys: Any, no_model: None) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    fails(capsys, ["score", "--input", str(p)], r"in\.jsonl:1: JSON nested too deeply")


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "assistant", "content": "Hello!"}], "needs a system or user message before the assistant"),
    ([{"role": "bogus", "content": "hi"}], "role 'bogus'; valid roles: system, user, assistant"),
    ([], "non-empty list"),
])
@pytest.mark.parametrize("command", ["score", "run"])
def test_bad_chats_fail_before_the_model_loads(command: str, messages: list, pattern: str, tmp_path: Path,
                                               capsys: Any, no_model: None) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"id": "x", "messages": messages}) + "\n", encoding="utf-8")
    fails(capsys, [command, "--input", str(p)], rf"in\.jsonl:1: .*{pattern}")


@pytest.mark.parametrize("command", [["score", "--input"], ["eval", "--input"], ["run", "--input"],
                                     ["discover", "--neg", "x", "--pos"], ["calibrate", "--name", "x", "--input"],
                                     ["train-sae", "--out", "o", "--corpus"], ["inspect", "1", "--corpus"]])
def test_a_missing_input_file_fails_before_the_model_loads(command: list[str], tmp_path: Path, capsys: Any,
                                                           no_model: None) -> None:
    missing = tmp_path / "nope.jsonl"
    fails(capsys, [*command, str(missing)], rf"featurewatch: error: .*{re.escape(str(missing))}")


# --------------------------------------------------------------------------- output, pack, detectors
def test_output_in_a_missing_directory_fails_before_the_model_loads(good: Path, tmp_path: Path, capsys: Any,
                                                                     no_model: None) -> None:
    target = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    fails(capsys, ["score", "--input", str(good), "--output", str(target)], r"--output .*does not exist")


def test_output_that_is_a_directory_fails_before_the_model_loads(good: Path, tmp_path: Path, capsys: Any,
                                                                 no_model: None) -> None:
    fails(capsys, ["score", "--input", str(good), "--output", str(tmp_path)], r"--output .* is a directory")


def test_output_in_a_read_only_place_fails_before_the_model_loads(good: Path, tmp_path: Path, capsys: Any,
                                                                  no_model: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        # root writes anywhere a mode allows; sysfs refuses new files even to root
        place = Path("/sys") if os.access(locked, os.W_OK) else locked
        fails(capsys, ["score", "--input", str(good), "--output", str(place / "out.jsonl")], r"cannot write")
    finally:
        locked.chmod(0o700)


def test_an_unknown_detector_fails_before_the_model_loads_listing_the_valid_ones(good: Path, capsys: Any,
                                                                                  no_model: None) -> None:
    for command in (["score", "--input", str(good)], ["run"], ["eval", "--input", str(good)]):
        fails(capsys, [*command, "--detector", "scam-mail"], r"no detector 'scam-mail'; valid: .*scam-email")


def test_an_unknown_pack_fails_before_the_model_loads(good: Path, capsys: Any, no_model: None) -> None:
    fails(capsys, ["score", "--input", str(good), "--pack", "no-such-pack"], r"no pack 'no-such-pack'.*shipped packs")


def test_serve_without_a_port_is_an_error(capsys: Any, no_model: None) -> None:
    fails(capsys, ["run", "--serve"], r"--serve .* --metrics-port")


def test_calibrate_checks_name_weights_and_watch_before_the_model_loads(good: Path, capsys: Any,
                                                                        no_model: None) -> None:
    base = ["calibrate", "--input", str(good)]
    fails(capsys, [*base, "--name", "Bad Name"], r"--name 'Bad Name'")
    fails(capsys, [*base, "--name", "x", "--weight", "good.jsonl=abc"], r"--weight .*W > 0")
    fails(capsys, [*base, "--name", "x", "--weight", "other.jsonl=2"], r"not one of the --input files")
    fails(capsys, [*base, "--name", "x", "--watch", "prompt,reply"], r"--watch .*valid phases")


# --------------------------------------------------------------------------- numeric options
@pytest.mark.parametrize("argv, option", [
    (["score", "--input", "x", "--max-tokens", "0"], "--max-tokens"),
    (["score", "--input", "x", "--max-tokens", "-5"], "--max-tokens"),
    (["score", "--input", "x", "--batch-size", "0"], "--batch-size"),
    (["eval", "--input", "x", "--batch-size", "0"], "--batch-size"),
    (["eval", "--input", "x", "--max-records", "0"], "--max-records"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "--top-features", "-1"], "--top-features"),
    (["run", "--metrics-port", "70000"], "--metrics-port"),
    (["discover", "--pos", "x", "--neg", "y", "--top", "0"], "--top"),
    (["calibrate", "--name", "x", "--input", "x", "--target-fpr", "1.5"], "--target-fpr"),
    (["calibrate", "--name", "x", "--input", "x", "--target-fpr", "nan"], "--target-fpr"),
    (["calibrate", "--name", "x", "--input", "x", "--max-features", "0"], "--max-features"),
    (["calibrate", "--name", "x", "--input", "x", "--max-features", "129"], "--max-features"),
    (["calibrate", "--name", "x", "--input", "x", "--min-tokens", "0"], "--min-tokens"),
    (["inspect", "1", "--records", "0"], "--records"),
    (["train-sae", "--corpus", "x", "--out", "o", "--lr", "0"], "--lr"),
    (["train-sae", "--corpus", "x", "--out", "o", "--epochs", "inf"], "--epochs"),
    (["train-sae", "--corpus", "x", "--out", "o", "--ctx", "1"], "--ctx"),
    (["train-sae", "--corpus", "x", "--out", "o", "--d-sae", "0"], "--d-sae"),
])
def test_numeric_options_are_checked_by_the_parser(argv: list[str], option: str, capsys: Any,
                                                   no_model: None) -> None:
    fails(capsys, argv, rf"featurewatch [a-z-]+: error: argument {option}(/\S+)?: must be (an integer|a number)")


@pytest.mark.parametrize("argv, message", [
    (["--mix", "0.6,x"], r"argument --mix: '0.6,x' is not a comma-separated list of numbers"),
    (["--mix", "0,0"], r"argument --mix: '0,0': shares must be finite, >= 0 and not all 0"),
    (["--wrap-documents", "1.5"], r"argument --wrap-documents"),
])
def test_train_sae_mix_options_are_checked_by_the_parser(argv: list[str], message: str, capsys: Any,
                                                         no_model: None) -> None:
    fails(capsys, ["train-sae", "--corpus", "x", "--out", "o", *argv], message)


def test_train_sae_needs_one_share_per_corpus(good: Path, tmp_path: Path, capsys: Any, no_model: None) -> None:
    fails(capsys, ["train-sae", "--corpus", str(good), "--corpus", str(good), "--out", str(tmp_path / "o"),
                   "--mix", "1,2,3"], r"--mix has 3 share\(s\) for 2 --corpus file\(s\); give one per corpus")


def test_train_sae_k_above_d_sae_is_an_error(good: Path, tmp_path: Path, capsys: Any, no_model: None) -> None:
    fails(capsys, ["train-sae", "--corpus", str(good), "--out", str(tmp_path), "--d-sae", "8", "--k", "9"],
          r"--k 9 is larger than --d-sae 8")


# --------------------------------------------------------------------------- interrupts and flushing
def test_ctrl_c_exits_130_with_one_line(good: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    assert main(["score", "--input", str(good)]) == 130
    assert capsys.readouterr().err.splitlines()[-1:] == ["featurewatch: interrupted"]


def test_score_writes_each_row_as_soon_as_it_is_scored(tmp_path: Path, capsys: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from featurewatch.alert import RunResult

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "text": "x"}) + "\n" for i in range(3)), encoding="utf-8")
    on_disk: list[int] = []

    class FakeMonitor:
        detectors: list[Any] = []

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def score_records(self, records: list[Any], **kw: Any) -> Any:
            for r in records:
                on_disk.append(len(out.read_text().splitlines()))  # what a kill now would leave
                yield r, RunResult(run_id=r.id, model_name="fake", scores={}, n_tokens=1, started_at=0.0,
                                   ended_at=1.0)
            raise KeyboardInterrupt  # the user stops the run: the rows so far stay written

        def detach(self) -> None:
            pass

    monkeypatch.setattr("featurewatch.monitor.Monitor", FakeMonitor)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: type("L", (), {"model": None, "tokenizer": None,
                                                                             "name": "fake"})())
    assert main(["score", "--input", str(inp), "--output", str(out), "--detector", "scam-email"]) == 130
    assert on_disk == [0, 1, 2]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1", "r2"]


# --------------------------------------------------------------------------- metrics, for real
@pytest.mark.slow
def test_run_serves_metrics_that_can_be_scraped_and_stops_on_ctrl_c(tiny_lm_dir: Path, tiny_lm_pack: Path) -> None:
    """`run --metrics-port 0 --json --serve` crashed: AttributeError: ... has no attribute 'registry'."""
    argv = [sys.executable, "-m", "featurewatch.cli", "run", "--model", str(tiny_lm_dir), "--pack",
            str(tiny_lm_pack), "--prompt", "Hello there", "--max-new-tokens", "4", "--json", "--metrics-port", "0",
            "--serve"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stderr is not None and proc.stdout is not None
            port = serving_port(proc)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                body = response.read().decode()
            model = tiny_lm_dir.name
            assert f'featurewatch_generations_total{{model_name="{model}",outcome="completed"}} 1.0' in body
            assert re.search(r'featurewatch_tokens_scanned_total\{model_name="[^"]+"\} [1-9]', body)
            assert 'featurewatch_alerts_total{action="alert",detector="demo"' in body
            row = json.loads(proc.stdout.readline())
            assert row["outcome"] == "completed" and "demo" in row["scores"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
            rest = proc.stderr.read()
            assert rest.strip().splitlines()[-1:] == ["featurewatch: interrupted"] and "Traceback" not in rest
        finally:
            if proc.poll() is None:
                proc.kill()


# --------------------------------------------------------------------------- set-up script
def test_setup_installs_the_pinned_torch_by_name_from_the_configured_index() -> None:
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    assert 'torch==2.13.0' in setup
    assert "--index-url" not in setup and "download.pytorch.org" not in setup
