"""Exporting a model as a plain Hugging Face folder, for engines that cannot read GGUF (vLLM).

Why a rebuild: transformers dequantises a GGUF file into an ordinary model, but
refuses ``save_pretrained`` on it (the model remembers it came from GGUF). A
fresh model of the same class, built from the same config, with the
dequantised state dict loaded into it, saves normally and generates
bit-identically. The tokenizer (with its chat template) is saved beside it, so
``vllm serve DIR`` and ``Monitor`` load the same weights and the same template.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from .errors import ConfigError
from .models import load_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_model(out: str | Path, *, model: str | Path | None = None, gguf_file: str | None = None,
                 dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``model`` (default: the embedded SmolLM2-135M-Instruct) to ``out`` as a Hugging Face folder.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer files and a
    ``featurewatch_export.json`` note of where the weights came from. ``dtype`` is the
    saved precision (``float32`` keeps the dequantised weights exactly).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; valid: {', '.join(_DTYPES)}")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} exists and is not empty; choose another --out or pass --overwrite")
    loaded = load_model(model, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(loaded.model.config)
    config.dtype = _DTYPES[dtype]
    if hasattr(config, "quantization_config"):  # "gguf": the weights saved are plain tensors
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    missing, unexpected = fresh.load_state_dict(loaded.model.state_dict(), strict=False)
    # Tied embeddings are one tensor under two names; anything else missing is a real mismatch.
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"rebuilding {loaded.name} from its config did not match its weights: missing "
                          f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    fresh.tie_weights()
    fresh.eval()
    target.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(target, safe_serialization=True)
    loaded.tokenizer.save_pretrained(target)
    note = {"source": str(model) if model is not None else "embedded", "name": loaded.name, "dtype": dtype,
            "exported_by": "featurewatch export-model"}
    (target / "featurewatch_export.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    logger.info("exported %s to %s", loaded.name, target)
    return target
