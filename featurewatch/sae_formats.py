"""Readers for the SAE file layouts featurewatch accepts (docs/architecture.md, "SAE files").

Kept apart from :mod:`featurewatch.sae` so the maths module stays small. Each
reader maps a layout onto the fields of one internal form, :class:`SAEFields`
(plain tensors and config values); ``SparseAutoencoder.load`` builds itself
from them. This module never imports :mod:`featurewatch.sae`, so the two do
not depend on each other in a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, SAEFormatError


@dataclass(frozen=True)
class SAEFields:
    """What an SAE file holds, mapped onto featurewatch's form (the ``SparseAutoencoder`` arguments)."""

    W_enc: Tensor
    """``(d_in, d_sae)`` encoder."""
    W_dec: Tensor
    """``(d_sae, d_in)`` decoder."""
    b_enc: Tensor
    """``(d_sae,)`` encoder bias."""
    b_dec: Tensor
    """``(d_in,)`` decoder bias (subtracted from the input when ``apply_b_dec_to_input``)."""
    architecture: str = "standard"
    """``standard``, ``jumprelu`` or ``topk``."""
    threshold: Tensor | None = None
    """``(d_sae,)`` JumpReLU thresholds."""
    k: int | None = None
    """Active features per token of a TopK SAE."""
    apply_b_dec_to_input: bool = True
    """Whether the encoder sees ``x - b_dec``."""
    input_scale: float = 1.0
    """Factor applied to activations before encoding (dataset-average normalisation)."""
    hook_name: str | None = None
    """Where the SAE was trained, as the file names it."""
    model_name: str | None = None
    """The model the SAE was trained on, as the file names it."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Other metadata the file carries."""


def _regular(path: Path) -> Path:
    if path.exists() and not path.is_file():
        raise SAEFormatError(f"{path} is not a regular file (a directory, FIFO or device); give the SAE file")
    return path


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(_regular(path)))
    except (SafetensorError, OSError, ValueError) as exc:  # truncated, corrupt header, bad dtype
        raise SAEFormatError(f"cannot read {path}: {exc}; the file is truncated or corrupt — "
                             "re-export or re-download it") from exc


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(_regular(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEFormatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path} must hold a JSON object")
    return cfg


def _need(tensors: dict[str, Tensor], path: Path, *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path} lacks tensor(s) {', '.join(missing)}; it has {', '.join(sorted(tensors))}")
    return [tensors[n].float() for n in names]


def read_fields(path: Path, *, input_scale: float | None = None) -> SAEFields:
    """The fields of the SAE at ``path`` (a directory in any supported layout, or a ``.npz`` file)."""
    if path.is_file() and path.suffix == ".npz":
        return _load_gemma_scope(path)
    if not path.is_dir():
        raise SAEFormatError(f"no SAE at {path}: expected a directory with cfg.json + sae_weights.safetensors "
                             "(SAELens), cfg.json + sae.safetensors (sparsify), or a params.npz file (Gemma Scope)")
    if (path / "sae_weights.safetensors").exists():
        return _load_saelens(path, input_scale)
    if (path / "sae.safetensors").exists():
        return _load_sparsify(path)
    if (path / "params.npz").exists():
        return _load_gemma_scope(path / "params.npz")
    raise SAEFormatError(f"{path} holds no SAE weights: expected sae_weights.safetensors (SAELens), "
                         f"sae.safetensors (sparsify) or params.npz (Gemma Scope); found "
                         f"{', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'}")


def _load_saelens(path: Path, input_scale: float | None) -> SAEFields:
    cfg = _read_cfg(path / "cfg.json")
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    # Pre-v6 files are flat and name the activation instead of the architecture.
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if act == "topk" or (arch == "standard" and act == "topk"):
        arch = "topk"
        k = k or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch not in ("standard", "jumprelu", "topk"):
        raise SAEFormatError(f"{path}/cfg.json: architecture {arch!r} is not supported; "
                             "valid: standard, jumprelu, topk")
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):  # pre-v6 files: true meant the dataset-average scaling
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    scale = 1.0
    if norm == "expected_average_only_in":
        if input_scale is None:
            raise ConfigError(f"{path}: normalize_activations='expected_average_only_in' needs the dataset "
                              "scaling factor; pass input_scale=... (or fold it into the weights and save again)")
        scale = input_scale
    elif norm != "none":
        raise SAEFormatError(f"{path}/cfg.json: normalize_activations={norm!r} is not supported; "
                             "valid: none, expected_average_only_in")
    elif input_scale is not None:
        raise ConfigError(f"{path}: input_scale was given but cfg.json says normalize_activations='none'; "
                          "drop input_scale (the weights already work on raw activations)")
    tensors = _read_safetensors(path / "sae_weights.safetensors")
    W_enc, W_dec, b_enc, b_dec = _need(tensors, path / "sae_weights.safetensors", "W_enc", "W_dec", "b_enc", "b_dec")
    threshold = tensors.get("threshold")
    if arch == "jumprelu" and threshold is None:
        raise SAEFormatError(f"{path}: a jumprelu SAE needs a 'threshold' tensor")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks and scales activations by ‖W_dec[i]‖; folding the norms into the
        # weights gives the same encode/decode (and is a no-op for already-folded exports)
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
        if threshold is not None:
            threshold = threshold * norms
    hook_name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if (d_in, d_sae) != tuple(W_enc.shape) and d_in is not None:
        raise SAEFormatError(f"{path}: cfg.json says d_in={d_in}, d_sae={d_sae} but W_enc has shape "
                             f"{tuple(W_enc.shape)}")
    return SAEFields(
        W_enc, W_dec, b_enc, b_dec, architecture=arch,
        threshold=None if threshold is None else threshold.float(), k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), input_scale=scale,
        hook_name=hook_name, model_name=meta.get("model_name") or cfg.get("model_name"),
        metadata={k_: v for k_, v in meta.items() if k_ not in ("hook_name", "model_name")},
    )


def _load_sparsify(path: Path) -> SAEFields:
    cfg = _read_cfg(path / "cfg.json")
    tensors = _read_safetensors(path / "sae.safetensors")
    enc_w, enc_b, W_dec, b_dec = _need(tensors, path / "sae.safetensors",
                                       "encoder.weight", "encoder.bias", "W_dec", "b_dec")
    k = cfg.get("k")
    if not isinstance(k, int):
        raise SAEFormatError(f"{path}/cfg.json: a sparsify SAE needs an integer 'k'")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}/cfg.json: activation={cfg['activation']!r} is not supported; valid: topk")
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise SAEFormatError(f"{path}: sparsify SAEs with a skip connection (W_skip) are not supported")
    # encoder.weight is (d_sae, d_in) like nn.Linear; W_dec is already (d_sae, d_in).
    return SAEFields(enc_w.T.contiguous(), W_dec, enc_b, b_dec, architecture="topk", k=k,
                             apply_b_dec_to_input=not cfg.get("transcode", False),
                             hook_name=path.name, metadata={"format": "sparsify"})


def _load_gemma_scope(path: Path) -> SAEFields:
    import zipfile

    import numpy as np

    try:
        with open(_regular(path), "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SAEFormatError(f"cannot read {path}: {exc}; the file is truncated or corrupt") from exc
    W_enc, W_dec, b_enc, b_dec, thr = _need(arrays, path, "W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    return SAEFields(W_enc, W_dec, b_enc, b_dec, architecture="jumprelu", threshold=thr,
                             apply_b_dec_to_input=False, metadata={"format": "gemma-scope"})
