"""``featurewatch build-pack`` end to end on the tiny 2-layer Llama (seconds, no network).

A pack is built from an SAE in each public layout featurewatch reads (SAELens /
featurewatch, EleutherAI sparsify, Gemma Scope ``params.npz``) and from one trained
here (``--train-sae``), then loaded the way users load the default pack: the
``Monitor``, ``featurewatch score`` and ``featurewatch explain``. The numbers on a random
2-layer model mean nothing; the road does: every stage runs and is timed, the card
and ``build.json`` are written, ``--resume`` reuses what did not change, and each kind
of bad input is one clear error before the long work (most before the model loads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import run_cli
from featurewatch.pack import load_pack
from featurewatch.sae import SparseAutoencoder

pytestmark = pytest.mark.slow

D_IN, D_SAE = 16, 32
SOURCES = ("alpha", "beta", "gamma")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _weights(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_IN, D_SAE, generator=g)
    return W, torch.randn(D_SAE, generator=g) * 0.1


def write_saelens(root: Path) -> Path:
    W, b = _weights()
    return SparseAutoencoder(W, W.T.clone(), b, torch.zeros(D_IN), hook_name="blocks.1.hook_resid_post").save(root)


def write_sparsify(root: Path) -> Path:
    """EleutherAI sparsify's layout: ``<hookpoint>/cfg.json`` + ``sae.safetensors`` (encoder as nn.Linear)."""
    from safetensors.torch import save_file

    W, b = _weights()
    d = root / "layers.1"
    d.mkdir(parents=True)
    save_file({"encoder.weight": W.T.contiguous(), "encoder.bias": b, "W_dec": W.T.contiguous(),
               "b_dec": torch.zeros(D_IN)}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"k": 8, "num_latents": D_SAE, "d_in": D_IN}))
    return d


def write_gemma_scope(root: Path) -> Path:
    """Gemma Scope's ``params.npz`` (JumpReLU; it does not say its layer: ``@layers.1`` does)."""
    W, b = _weights()
    root.mkdir(parents=True)
    np.savez(root / "params.npz", W_enc=W.numpy(), W_dec=W.T.numpy(), b_enc=b.numpy(),
             b_dec=np.zeros(D_IN, dtype=np.float32), threshold=np.full(D_SAE, 0.05, dtype=np.float32))
    return root / "params.npz"


LAYOUTS = {"saelens": (write_saelens, ""), "sparsify": (write_sparsify, ""), "gemma-scope": (write_gemma_scope,
                                                                                               "@layers.1")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: Any) -> Path:
    """Three sources of lures and ordinary notes, a pool of small talk, and a recipe over them."""
    root = tmp_path_factory.mktemp("bp-data")
    rows = []
    for src in SOURCES:
        for i in range(8):
            bad = i % 2 == 0
            rows.append({"id": f"{src}-{i}", "label": int(bad), "source": src, "messages": [
                {"role": "user", "content": f"Please write message {i} for {src}."},
                {"role": "assistant", "content": ("URGENT: your account is locked, send your password now" if bad
                                                  else "Hi all, lunch is at noon on Friday, see you there")
                 + f" ({src} {i})"}]})
    _jsonl(root / "lure.jsonl", rows)
    _jsonl(root / "pool.jsonl", [{"id": f"c{i}", "source": "chats", "messages": [
        {"role": "user", "content": f"A name for cat {i}?"},
        {"role": "assistant", "content": f"How about Biscuit {i}? Short and friendly."}]} for i in range(6)])
    _jsonl(root / "all_neg.jsonl", [dict(r, label=0) for r in rows])
    recipe = {"description": "Phishing lures, a test recipe.", "max_tokens": 48, "max_features": 4,
              "pools": [{"file": "pool.jsonl"}, {"file": "not_here.jsonl", "optional": True}],
              "licences": {"alpha": "CC0-1.0"},
              "detectors": {"lure": {"description": "Phishing lures.", "watch": ["prompt", "completion"],
                                     "min_tokens": 1, "severity": "warning", "inputs": [{"file": "lure.jsonl"}]}}}
    (root / "recipe.json").write_text(json.dumps(recipe))
    (root / "bad_recipe.json").write_text(json.dumps(dict(recipe, detectors={"lure": dict(
        recipe["detectors"]["lure"], inputs=[{"file": "all_neg.jsonl"}])})))
    return root


def build(capsys: Any, tiny_lm_dir: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "build-pack", "--model", str(tiny_lm_dir), "--out", str(out), "--data", str(data),
                   "--recipe", str(data / "recipe.json"), *extra)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_pack_built_on_each_public_sae_layout_loads_like_the_default(
        layout: str, tiny_lm_dir: Path, data: Path, tmp_path: Path, capsys: Any) -> None:
    write, at = LAYOUTS[layout]
    sae_path = write(tmp_path / layout)
    out = tmp_path / "pack"
    code, stdout, err = build(capsys, tiny_lm_dir, data, out, "--sae", f"{sae_path}{at}")
    assert code == 0, err
    for i, stage in enumerate(("check", "sae", "activations", "features", "detectors", "card"), 1):
        assert f"[{i}/6] {stage}:" in err and f"{stage} done in" in err  # every stage announced and timed
    assert "skipped lure: not_here.jsonl (optional" in err  # said, not silently dropped
    assert "leave-one-source-out over 3 groups" in stdout and "stage wall times:" in stdout

    pack = load_pack(out)
    assert set(pack.detectors) == {"lure", "lure-probe"} and list(pack.saes) == ["layers.1"]
    original = SparseAutoencoder.load(sae_path)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(pack.saes["layers.1"].encode(x), original.encode(x))  # the same SAE, converted
    assert pack.manifest.default_detectors == ["lure"]
    spec = pack.detectors["lure"]
    assert spec.calibration is not None and spec.calibration.out_of_source is not None
    assert {g["group"] for g in spec.calibration.out_of_source.groups} >= set(SOURCES)
    assert set(spec.phase_thresholds or {}) == {"prompt", "completion"}

    build_json = json.loads((out / "build.json").read_text())
    assert set(build_json["stages"]) == {"check", "sae", "activations", "features", "detectors", "card", "total"}
    assert build_json["argv"][:2] == ["--model", str(tiny_lm_dir)]
    card = (out / "README.md").read_text()
    for heading in ("## Model and SAE", "## Data", "## Detectors", "### lure", "## Known gaps", "## How it was built"):
        assert heading in card
    assert "| alpha | lure.jsonl | 8 | CC0-1.0 |" in card  # sources with their licences
    assert "not_here.jsonl" in card.split("## Known gaps")[1]  # the optional file it lacked is a known gap
    assert "SAE quality" in card and "explained variance" in card  # measured on the calibration text
    features = json.loads((out / "features.json").read_text())["layers.1"]
    assert len(features) == D_SAE and any(f["top_contexts"] for f in features)
    assert any("«" in c for f in features for c in f["top_contexts"])  # token-level contexts

    # the monitor, score and explain load it as they load the default pack
    from featurewatch.models import load_model
    from featurewatch.monitor import Monitor

    loaded = load_model(str(tiny_lm_dir))
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=out)
    try:
        assert [d.name for d in monitor.detectors] == ["lure"]
        result = monitor.generate("Send your password now, your account is locked.", max_new_tokens=3)
        assert "lure" in result.scores
    finally:
        monitor.detach()
    records = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "URGENT: send your password now"}])
    code, stdout, err = run_cli(capsys, "score", "--model", str(tiny_lm_dir), "--pack", str(out),
                                "--input", str(records))
    assert code == 0, err
    assert "lure" in json.loads(stdout.splitlines()[0])["scores"]
    code, stdout, err = run_cli(capsys, "explain", "lure", "--pack", str(out))
    assert code == 0, err
    assert "out of source (leave-one-source-out)" in stdout
    if layout == "saelens":
        code, stdout, err = run_cli(capsys, "eval", "--model", str(tiny_lm_dir), "--pack", str(out), "--input",
                                    str(data / "lure.jsonl"), "--group-by", "source", "--json", "--cache",
                                    str(tmp_path / "eval-cache"))
        assert code == 0, err
        assert {"alpha", "beta", "gamma"} <= {r["group"] for r in json.loads(stdout)["rows"]}


def test_resume_reuses_what_did_not_change_and_refits_what_did(tiny_lm_dir: Path, data: Path, tmp_path: Path,
                                                                capsys: Any) -> None:
    sae = write_saelens(tmp_path / "sae")
    out = tmp_path / "pack"
    assert build(capsys, tiny_lm_dir, data, out, "--sae", str(sae))[0] == 0
    first = (out / "lure.json").read_text()
    code, _, err = build(capsys, tiny_lm_dir, data, out, "--sae", str(sae), "--resume")
    assert code == 0, err
    assert "lure: unchanged since the last build, reused" in err and (out / "lure.json").read_text() == first
    assert "2 of 2 files were in the cache" in err  # the activation cache is reused, and the card says so
    card = (out / "README.md").read_text()
    assert "came from an earlier build's cache" in card and "The fits of lure were reused" in card
    recipe = json.loads((data / "recipe.json").read_text())
    recipe["target_fpr"] = 0.2
    changed = tmp_path / "recipe.json"
    changed.write_text(json.dumps(recipe))
    code, _, err = run_cli(capsys, "build-pack", "--model", str(tiny_lm_dir), "--out", str(out), "--data", str(data),
                           "--recipe", str(changed), "--sae", str(sae), "--resume")
    assert code == 0, err
    assert "lure: unchanged" not in err
    assert json.loads((out / "lure.json").read_text())["calibration"]["target_fpr"] == 0.2


def test_train_sae_then_build_in_one_command(tiny_lm_dir: Path, data: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "pack"
    args = ["--train-sae", "--corpus", str(data / "pool.jsonl"), "--corpus", str(data / "lure.jsonl"),
            "--hookpoint", "layers.1", "--tokens", "2000", "--d-sae", "32", "--k", "4", "--ctx", "32",
            "--batch-size", "256", "--eval-tokens", "500", "--ce-tokens", "200"]
    code, _, err = build(capsys, tiny_lm_dir, data, out, *args)
    assert code == 0, err
    pack = load_pack(out)
    assert pack.saes["layers.1"].d_sae == 32 and (out / "sae" / "layers.1" / "report.json").is_file()
    assert "featurewatch train-sae on" in (out / "README.md").read_text()
    code, _, err = build(capsys, tiny_lm_dir, data, out, *args, "--resume")
    assert code == 0, err
    assert "the SAE trained by an earlier build with the same options, reused" in err


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("extra, message", [
    ([], "give the SAE with --sae PATH[@HOOKPOINT], or --train-sae"),
    (["--sae", "{sae}", "--train-sae", "--corpus", "x.jsonl"], "--sae and --train-sae: give one of the two"),
    (["--train-sae"], "--train-sae needs --corpus FILE"),
    (["--sae", "{sae}", "--recipe", "{data}/bad_recipe.json"], "are all label 0; calibration needs positives"),
    (["--sae", "{sae}", "--recipe", "{data}/nope.json"], "no such file and not a built-in recipe"),
    (["--sae", "{sae}", "--detectors", "other"], "other not in"),
    (["--sae", "{tmp}/nowhere"], "--sae {tmp}/nowhere: no such file or directory"),
    (["--sae", "{gemma}"], "does not say where it reads the model; give the hookpoint as"),
    (["--sae", "{sae}", "--recipe", "safety"], "is in none of the data directories"),
])
def test_bad_input_is_one_clear_error_before_the_model_loads(
        tiny_lm_dir: Path, data: Path, tmp_path: Path, capsys: Any, extra: list[str], message: str) -> None:
    sae = write_saelens(tmp_path / "sae")
    gemma = write_gemma_scope(tmp_path / "gemma")
    fill = {"sae": sae, "data": data, "tmp": tmp_path, "gemma": gemma}
    extra = [e.format(**fill) for e in extra]
    if "--recipe" in extra:
        args = ["build-pack", "--model", str(tiny_lm_dir), "--out", str(tmp_path / "pack"), "--data", str(data),
                *extra]
        code, _, err = run_cli(capsys, *args)
    else:
        code, _, err = build(capsys, tiny_lm_dir, data, tmp_path / "pack", *extra)
    assert code == 2 and message.format(**fill) in err, err
    assert not (tmp_path / "pack").exists()  # nothing half-written


@pytest.mark.parametrize("what, message", [
    ("width", "reads vectors of width 8, but"),
    ("hookpoint", "the model has layers.0 … layers.1"),
])
def test_an_sae_that_does_not_fit_the_model_fails_at_the_check(
        what: str, message: str, tiny_lm_dir: Path, data: Path, tmp_path: Path, capsys: Any) -> None:
    if what == "width":
        W = torch.randn(8, D_SAE)
        sae = SparseAutoencoder(W, W.T.clone(), torch.zeros(D_SAE), torch.zeros(8), hook_name="layers.1")
        spec = str(sae.save(tmp_path / "narrow"))
    else:
        spec = f"{write_saelens(tmp_path / 'sae')}@layers.9"
    code, _, err = build(capsys, tiny_lm_dir, data, tmp_path / "pack", "--sae", spec)
    assert code == 2 and message in err, err
    assert "[2/6]" not in err and not (tmp_path / "pack").exists()


def test_an_out_directory_it_did_not_write_needs_force(tiny_lm_dir: Path, data: Path, tmp_path: Path,
                                                       capsys: Any) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    sae = write_saelens(tmp_path / "sae")
    code, _, err = build(capsys, tiny_lm_dir, data, out, "--sae", str(sae))
    assert code == 2 and "holds files build-pack did not write" in err and (out / "notes.txt").exists()
    code, _, err = build(capsys, tiny_lm_dir, data, out, "--sae", str(sae), "--force")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "build.json").is_file()


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "dev" / "multi" / "scam.jsonl").is_file(), reason="needs ../shared/data")
def test_the_readme_build_pack_block_runs_as_shown(tiny_lm_dir: Path, tmp_path: Path, capsys: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's worked example, command by command as written, on the built-in ``safety`` recipe and the
    shared data; only the model (the tests' tiny one, ``--model``) and so its SAE (same layout, width 16) and
    the output place differ — the embedded model would take ten minutes here."""
    import shlex

    from test_calibrate_grouped import readme_block

    monkeypatch.chdir(ROOT)
    block = readme_block("featurewatch build-pack").replace("\\\n", " ")
    commands = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["featurewatch", "build-pack"], ["featurewatch", "explain"],
                                         ["featurewatch", "score"]]
    sae = str(write_saelens(tmp_path / "sae"))
    out = str(tmp_path / "scam-only")

    def as_here(argv: list[str]) -> list[str]:
        argv = [out if a == "packs/scam-only" else a for a in argv[1:]]
        i = argv.index("--sae") + 1 if "--sae" in argv else None
        if i is not None:
            assert argv[i] == "detectors/smollm2-135m-instruct/sae/layers.15"
            argv[i] = sae
        return argv

    build_cmd, explain_cmd, score_cmd = (as_here(c) for c in commands)
    code, stdout, err = run_cli(capsys, *build_cmd, "--model", str(tiny_lm_dir), "--work", str(tmp_path / "work"))
    assert code == 0, err
    assert "scam-email: leave-one-source-out over" in stdout
    pack = load_pack(out)
    assert set(pack.detectors) == {"scam-email", "scam-email-probe"}
    card = (Path(out) / "README.md").read_text()
    assert "| nazario |" in card and "CC BY" in card  # licences read from the shared data's README tables
    code, stdout, err = run_cli(capsys, *explain_cmd, "--neighbours", "0")
    assert code == 0, err
    assert "out of source (leave-one-source-out)" in stdout
    code, stdout, err = run_cli(capsys, *score_cmd, "--model", str(tiny_lm_dir))
    assert code == 0, err
    assert len(stdout.splitlines()) == 60 and "scam-email" in json.loads(stdout.splitlines()[0])["scores"]


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "gpt2"])
def test_build_pack_runs_on_other_architectures(family: str, data: Path, tmp_path: Path, capsys: Any) -> None:
    """The architecture matrix's rows, saved with the embedded tokenizer: build-pack hooks, calibrates and
    writes a pack the monitor loads (Gemma's embedding scale and GPT-2's ``transformer.h`` included)."""
    import importlib

    from test_architectures import ARCHS

    from featurewatch.models import load_model, load_tokenizer
    from featurewatch.monitor import Monitor

    tok = load_tokenizer()
    arch = ARCHS[family]
    kwargs = dict(arch.kwargs)
    kwargs.update({"n_positions": 2048} if family == "gpt2" else {"max_position_embeddings": 2048})
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, arch.config)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    model_dir = tmp_path / family
    getattr(transformers, arch.model)(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "pack"
    code, _, err = build(capsys, model_dir, data, out, "--sae", f"{write_saelens(tmp_path / 'sae')}")
    assert code == 0, err
    loaded = load_model(str(model_dir))
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=out)
    try:
        assert "lure" in monitor.generate("Send your password now.", max_new_tokens=2).scores
    finally:
        monitor.detach()


def test_labels_for_this_sae_are_applied_and_json_is_the_build_report(tiny_lm_dir: Path, data: Path,
                                                                       tmp_path: Path, capsys: Any) -> None:
    from featurewatch.calibration.sources import sae_fingerprint

    sae_dir = write_saelens(tmp_path / "sae")
    sae = SparseAutoencoder.load(sae_dir)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"sae": sae_fingerprint(sae), "labels": {str(i): f"label {i}"
                                                                          for i in range(D_SAE)}}))
    out = tmp_path / "pack"
    code, stdout, err = build(capsys, tiny_lm_dir, data, out, "--sae", str(sae_dir), "--labels", str(labels),
                              "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["pack"] == str(out) and report["labels"] == D_SAE and set(report["reports"]) == {"lure"}
    spec = load_pack(out).detectors["lure"]
    assert all(f.label == f"label {f.id}" for f in spec.features)  # the readout's features carry their labels
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"sae": "16x32-000000000000", "labels": {"1": "x"}}))
    code, _, err = build(capsys, tiny_lm_dir, data, tmp_path / "pack2", "--sae", str(sae_dir), "--labels", str(other))
    assert code == 2 and "feature ids mean other features in another SAE" in err
