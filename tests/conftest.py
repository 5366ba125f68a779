"""Shared fixtures and the tests' helpers: a tiny in-process Llama, hand-set SAEs, and the real embedded model.

The one place a test finds its model and monitor: ``tiny_monitor`` (the in-process Llama),
:func:`make_monitor` (a monitor on a loaded model: the embedded SmolLM2 ``smollm``, or
``load_model(tiny_lm_dir)``), and the hookpoints they watch (:data:`HP`, :data:`EMBEDDED_HP`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from prometheus_client import CollectorRegistry

from featurewatch.alert import Alert, RunResult
from featurewatch.detector import DetectorSpec, FeatureWeight
from featurewatch.monitor import Monitor
from featurewatch.sae import SparseAutoencoder
from featurewatch.sinks import BaseSink


def pytest_configure(config: pytest.Config) -> None:
    """Run the suite as if from a terminal's foreground, however it was launched.

    A shell starts a background job (``cmd &`` in a script, ``nohup … &``) with SIGINT ignored, and an ignored
    signal stays ignored across exec: every ``featurewatch`` a test starts would then ignore the Ctrl-C the
    test sends (``run --serve`` never exits; the page exits 0, not 130). A user's Ctrl-C reaches a foreground
    process, so the suite puts SIGINT back to Python's default here; the processes it starts inherit
    the default (a handler resets to it on exec) and install their own KeyboardInterrupt as usual.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HP = "layers.1"
"""The hookpoint the tiny models watch (``tiny_llama``, ``tiny_lm_dir`` and their packs)."""
EMBEDDED_HP = "layers.15"
"""The default pack's hookpoint on the embedded SmolLM2-135M-Instruct."""


def make_monitor(loaded: Any, **kw: Any) -> Monitor:
    """A :class:`Monitor` on a loaded model (``smollm``, the embedded SmolLM2, or ``load_model(tiny_lm_dir)``):
    ``Monitor(loaded.model, loaded.tokenizer, pack=<the default pack>, **kw)``. The caller detaches it (or uses
    it as a context manager): one monitor per model at a time."""
    from featurewatch.pack import DEFAULT_PACK

    kw.setdefault("pack", DEFAULT_PACK)
    return Monitor(loaded.model, loaded.tokenizer, **kw)


def build_sae(d_in: int = 4, d_sae: int = 6, *, architecture: str = "standard", seed: int = 0,
              **kwargs: Any) -> SparseAutoencoder:
    """A small random SAE with overridable pieces (weights given in kwargs win)."""
    g = torch.Generator().manual_seed(seed)
    parts = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    for key in list(parts):
        if key in kwargs:
            parts[key] = kwargs.pop(key)
    if architecture == "jumprelu":
        kwargs.setdefault("threshold", torch.full((d_sae,), 0.3))
    if architecture == "topk":
        kwargs.setdefault("k", 2)
    return SparseAutoencoder(parts["W_enc"], parts["W_dec"], parts["b_enc"], parts["b_dec"],
                             architecture=architecture, **kwargs)


def sae16() -> SparseAutoencoder:
    """The tiny Llama's SAE in the monitor tests: 16 → 12, standard, every feature biased on."""
    return build_sae(16, 12, architecture="standard", seed=1, b_enc=torch.full((12,), 0.5))


def tiny_spec(**kw: Any) -> DetectorSpec:
    """A never-firing SAE detector at layers.1 of the tiny Llama (features 3 and 5); override any field."""
    base: dict[str, Any] = dict(name="demo", description="test", hookpoint="layers.1",
                                features=[FeatureWeight(id=3, weight=1.0), FeatureWeight(id=5, weight=0.5)],
                                threshold=1e6, pooling={"method": "mean", "min_tokens": 1})
    base.update(kw)
    return DetectorSpec(**base)


class TinyTokenizer:
    """Just enough tokenizer for the monitor's hot path on the tiny model (ids are characters)."""

    all_special_ids = [0, 1]
    pad_token_id = 0
    eos_token_id = 1
    chat_template = None
    padding_side = "right"

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if not (skip_special_tokens and i in (0, 1)))

    def encode(self, text: str) -> list[int]:
        return [2] + [3 + (ord(c) - ord("a")) % 26 for c in text.lower() if c.isalpha()]

    def __call__(self, texts: str | list[str], return_tensors: str | None = None, padding: bool = False,
                 add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> Any:
        """One string → ``{"input_ids": [...]}``; a list → a padded batch (like a slow HF tokenizer)."""
        from transformers import BatchEncoding

        if return_offsets_mapping:
            raise NotImplementedError("slow tokenizers have no offset mapping")
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = [r + [0] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    """A 3-layer, width-16 Llama built in-process: hook mechanics without downloads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture()
def tiny_tokenizer() -> TinyTokenizer:
    return TinyTokenizer()


@pytest.fixture()
def tiny_monitor(tiny_llama: Any, tiny_tokenizer: TinyTokenizer) -> Iterator[Callable[..., Monitor]]:
    """Build monitors on the tiny Llama: ``tiny_monitor(**kw)`` is ``Monitor(tiny_llama, tiny_tokenizer,
    saes={"layers.1": sae16()}, **kw)`` (``model``, ``tokenizer`` and ``saes`` overridable). Every
    monitor it built is detached after the test, so a failing test cannot leave the shared model hooked."""
    built: list[Monitor] = []

    def build(**kw: Any) -> Monitor:
        kw.setdefault("saes", {"layers.1": sae16()})
        model, tokenizer = kw.pop("model", tiny_llama), kw.pop("tokenizer", tiny_tokenizer)
        monitor = Monitor(model, tokenizer, **kw)
        built.append(monitor)
        return monitor

    yield build
    for monitor in built:
        monitor.detach()


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads a model (its input checks came too late)."""
    from featurewatch import models

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="session")
def smollm() -> Any:
    """The real embedded SmolLM2-135M-Instruct (loaded once per test session)."""
    from featurewatch.models import load_model

    return load_model()


# --- observability: fresh registries, free ports, sink-event builders, the Prometheus tools ---


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry, so no test sees another's series."""
    return CollectorRegistry()


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """Return a function giving a tool's path; skip when it is absent, but fail under CI=true.

    CI installs the tools (.ci/install-servers.sh), so a missing one there is a
    broken setup, not a reason to skip.
    """

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            reason = f"{name} is not installed (run .ci/install-servers.sh)"
            if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
                pytest.fail(f"{reason}; CI must run this test")
            pytest.skip(reason)
        return path

    return find


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function giving a TCP port on 127.0.0.1 that was free a moment ago."""

    def pick() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    return pick


@dataclass(frozen=True)
class FakeDetector:
    """What a sink sees of a detector at attach time (sinks.DetectorInfo)."""

    name: str
    threshold: float = 1.5
    action: str = "alert"
    severity: str = "warning"
    phases: tuple[str, ...] = ("prompt", "completion")


@pytest.fixture
def make_detector() -> Callable[..., FakeDetector]:
    """Build a detector as sinks see it; every field overridable."""
    return FakeDetector


@pytest.fixture
def make_alert() -> Callable[..., Alert]:
    """Build an :class:`Alert` with overridable defaults."""

    def build(**kw: Any) -> Alert:
        fields: dict[str, Any] = dict(detector="scam-email", phase="prompt", score=3.1, threshold=1.5,
                                      run_id="run-1", model_name="tiny", span=(2, 9), started_at=1000.0,
                                      fired_at=1000.5)
        fields.update(kw)
        return Alert(**fields)

    return build


@pytest.fixture
def make_result() -> Callable[..., RunResult]:
    """Build a :class:`RunResult` with overridable defaults."""

    def build(**kw: Any) -> RunResult:
        fields: dict[str, Any] = dict(run_id="run-1", model_name="tiny", scores={"scam-email": 0.2},
                                      n_tokens=12, started_at=1000.0, ended_at=1001.0)
        fields.update(kw)
        return RunResult(**fields)

    return build


def make_pack(root: Any, *, d_in: int = 576, d_sae: int = 64, hookpoint: str = "layers.3",
              detectors: list[dict] | None = None, seed: int = 0) -> Any:
    """Write a small valid pack (random SAE + one detector) and return its path."""
    import json
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sae = build_sae(d_in, d_sae, architecture="jumprelu", seed=seed, threshold=torch.full((d_sae,), 0.1),
                    hook_name=hookpoint)
    sae.save(root / "sae" / hookpoint)
    (root / "pack.json").write_text(json.dumps({
        "name": "test-pack", "version": "0.0.1", "model": "SmolLM2-135M-Instruct",
        "hookpoints": {hookpoint: f"sae/{hookpoint}"}}))
    for spec in detectors if detectors is not None else [{
            "name": "demo", "description": "test detector", "kind": "sae", "hookpoint": hookpoint,
            "features": [{"id": 1, "weight": 1.0, "label": "one"}, {"id": 2, "weight": -0.5}],
            "threshold": 0.0, "phases": ["prompt", "completion"]}]:
        (root / f"{spec['name']}.json").write_text(json.dumps(spec))
    return root


def concept_pack(root: Any, *, probe_threshold: float = 0.0) -> Any:
    """The tiny model's pack with a ``demo`` SAE detector, its ``demo-probe`` and feature statistics.

    Thresholds at 0 and a probe of constant sign make both fire on some replies, so every
    column of the report has something in it.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    pack = make_pack(Path(root), d_in=16, d_sae=8, hookpoint="layers.1", detectors=[
        {"name": "demo", "description": "test concept", "kind": "sae", "hookpoint": "layers.1",
         "features": [{"id": 1, "weight": 1.0, "label": "one"}, {"id": 2, "weight": 2.0, "label": "two"}],
         "threshold": 0.0, "pooling": {"method": "mean", "min_tokens": 1}, "phases": ["prompt", "completion"]},
        {"name": "demo-probe", "description": "test concept (probe)", "kind": "probe", "hookpoint": "layers.1",
         "probe_weights": "probes/demo-probe.safetensors", "threshold": probe_threshold,
         "pooling": {"method": "mean", "min_tokens": 1}, "phases": ["prompt", "completion"]}])
    (pack / "probes").mkdir(exist_ok=True)
    save_file({"weight": torch.linspace(-1, 1, 16)}, str(pack / "probes" / "demo-probe.safetensors"))
    (pack / "features.json").write_text(json.dumps({"layers.1": [
        {"id": i, "max_activation": 1.0 + i, "density": 0.01 * (i + 1), "label": f"feature {i}",
         "top_contexts": [f"a context of« {i}»"]} for i in range(8)]}))
    return pack


# --- the command line on a tiny model: a real `--model DIR` that loads in about a second ---


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: Any) -> Any:
    """A 2-layer, width-16 Llama saved with the embedded model's real tokenizer (chat template included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from featurewatch.models import load_tokenizer

    tok = load_tokenizer()  # only the tokenizer: no need to load the embedded model's weights
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(cfg).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_lm_pack(tmp_path_factory: Any) -> Any:
    """A pack for :func:`tiny_lm_dir`: a hand-seeded SAE at layers.1 and the ``demo`` detector."""
    return make_pack(tmp_path_factory.mktemp("tiny-pack") / "pack", d_in=16, d_sae=8, hookpoint="layers.1")


class RecordingSink(BaseSink):
    """A sink that keeps every alert and every run result it is given (tests read them back)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.results: list[RunResult] = []

    def on_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def on_run_end(self, result: RunResult) -> None:
        self.results.append(result)


def serving_port(proc: Any) -> int:
    """The port a ``featurewatch run --serve`` child serves metrics on, read from its stderr once it says it
    serves (the test fails with what it printed if it exits first)."""
    import re

    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    else:
        pytest.fail(f"run exited ({proc.wait()}) before serving: {''.join(lines)}")
    return int(re.search(r"\(port (\d+)\)", lines[-1]).group(1))  # type: ignore[union-attr]


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``featurewatch ARGV`` in-process: (exit code, stdout, stderr); a traceback is a failure."""
    from featurewatch.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err
