"""Sparse autoencoders: one internal form, several file formats.

Every supported format maps onto the same arithmetic (docs/architecture.md, "SAE files")::

    pre   = (s·x − [sub]·b_dec) @ W_enc + b_enc
    f     = relu(pre) | pre·1[pre > θ] (JumpReLU) | top-k of relu(pre)
    x̂     = (f @ W_dec + b_dec) / s

ReLU and JumpReLU act element-wise, so the activations of a few watched
features need only their encoder columns (:meth:`SparseAutoencoder.encode_subset`);
TopK couples all features and always takes the full encode. Files are read
with safetensors or numpy only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError, FeatureOutOfRange, SAEFormatError
from .sae_formats import SAEFields, read_fields

Architecture = Literal["standard", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")
_ALIASES = {"relu": "standard", "standard": "standard", "jumprelu": "jumprelu", "topk": "topk"}


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over activations of width ``d_in`` with ``d_sae`` features.

    Example::

        sae = SparseAutoencoder.load("detectors/smollm2-135m-instruct/sae/layers.15")
        feats = sae.encode(acts)                  # (batch, seq, d_sae)
        some = sae.encode_subset(acts, [12, 97])  # (batch, seq, 2), exact for ReLU/JumpReLU
    """

    def __init__(
        self,
        W_enc: Tensor,
        W_dec: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        *,
        architecture: str = "standard",
        threshold: Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        input_scale: float = 1.0,
        hook_name: str | None = None,
        model_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        arch = _ALIASES.get(architecture)
        if arch is None:
            raise ConfigError(f"unknown SAE architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        if W_enc.ndim != 2:
            raise SAEFormatError(f"W_enc must be 2-D (d_in, d_sae), got shape {tuple(W_enc.shape)}")
        d_in, d_sae = W_enc.shape
        expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        for name, tensor in (("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            if tuple(tensor.shape) != expected[name]:
                raise SAEFormatError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                                     f"for W_enc of shape {(d_in, d_sae)}")
        if arch == "jumprelu" and (threshold is None or tuple(threshold.shape) != (d_sae,)):
            raise SAEFormatError(f"a jumprelu SAE needs a threshold of shape ({d_sae},)")
        if arch == "topk" and (k is None or not 0 < k <= d_sae):
            raise ConfigError(f"a topk SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ConfigError(f"input_scale must be a positive finite number, got {input_scale}")
        self.W_enc = nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        thr = threshold if threshold is not None else torch.zeros(d_sae, dtype=W_enc.dtype)
        self.threshold = nn.Parameter(thr.detach().clone(), requires_grad=False)
        self.architecture: str = arch
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.input_scale = float(input_scale)
        self.hook_name = hook_name
        self.model_name = model_name
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._check_finite()

    # ------------------------------------------------------------------ shape
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def elementwise(self) -> bool:
        """True when each feature depends only on its own pre-activation (subset encode is exact)."""
        return self.architecture != "topk"

    # ------------------------------------------------------------------ maths
    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``(..., d_sae)``."""
        return self._prepare(x) @ self.W_enc + self.b_enc

    def _activate(self, pre: Tensor, threshold: Tensor) -> Tensor:
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":  # relu(pre)·1[pre > θ], as SAELens and Gemma Scope
            return torch.relu(pre) * (pre > threshold)
        values, indices = torch.topk(pre, self.k, dim=-1)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``(..., d_sae)`` for activations ``(..., d_in)``."""
        return self._activate(self.pre_acts(x), self.threshold)

    def encode_subset(self, x: Tensor, features: Sequence[int] | Tensor) -> Tensor:
        """Activations of ``features`` only, ``(..., len(features))``.

        Exact for element-wise activations (one encoder column per feature);
        TopK needs every pre-activation and so encodes in full, then selects.
        """
        return self.subset(features)(x)

    def subset(self, features: Sequence[int] | Tensor) -> "SubsetEncoder":
        """An encoder for ``features`` only, with their encoder columns sliced once (the hot path's view)."""
        return SubsetEncoder(self, features)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``(..., d_in)`` from feature activations ``(..., d_sae)``."""
        x_hat = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return x_hat / self.input_scale if self.input_scale != 1.0 else x_hat

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_directions(self, features: Sequence[int] | Tensor) -> Tensor:
        """Rows of ``W_dec`` in activation units, ``(len(features), d_in)``: what feature i adds per unit."""
        idx = torch.as_tensor(features, dtype=torch.long, device=self.W_dec.device)
        return self.W_dec.index_select(0, idx) / self.input_scale

    def folded(self) -> "SparseAutoencoder":
        """An equivalent SAE with the input scale folded into the weights (``input_scale == 1``)."""
        s = self.input_scale
        return SparseAutoencoder(
            self.W_enc * s, self.W_dec / s, self.b_enc, self.b_dec / s,
            architecture=self.architecture, threshold=self.threshold, k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input, hook_name=self.hook_name,
            model_name=self.model_name, metadata=self.metadata,
        )

    def _check_finite(self) -> None:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            t = getattr(self, name)
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise SAEFormatError(f"{name} holds {bad} non-finite value(s) (NaN or inf); "
                                     "the SAE file is corrupt: re-export or re-download it")

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``."""
        from safetensors.torch import save_file

        sae = self.folded() if self.input_scale != 1.0 else self
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(sae, n).detach().to(dtype or sae.W_enc.dtype).contiguous().cpu()
                   for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if sae.architecture == "jumprelu":
            tensors["threshold"] = sae.threshold.detach().to(dtype or sae.W_enc.dtype).contiguous().cpu()
        save_file(tensors, str(out / "sae_weights.safetensors"))
        cfg: dict[str, Any] = {
            "architecture": sae.architecture,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "dtype": str(dtype or sae.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": sae.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # sae_lens_version marks the v6 layout, so SAELens reads the nested metadata
            "metadata": {**sae.metadata, "hook_name": sae.hook_name, "model_name": sae.model_name,
                         "sae_lens_version": sae.metadata.get("sae_lens_version", "6.0.0")},
        }
        if sae.architecture == "topk":
            cfg["k"] = sae.k
        (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, *, input_scale: float | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "SparseAutoencoder":
        """Load an SAE directory (SAELens, EleutherAI sparsify) or a Gemma Scope ``params.npz``."""
        return cls.from_fields(read_fields(Path(path), input_scale=input_scale)).to(device=device, dtype=dtype)

    @classmethod
    def from_fields(cls, fields: SAEFields) -> "SparseAutoencoder":
        """Build an SAE from what a format reader returned."""
        return cls(fields.W_enc, fields.W_dec, fields.b_enc, fields.b_dec, architecture=fields.architecture,
                   threshold=fields.threshold, k=fields.k, apply_b_dec_to_input=fields.apply_b_dec_to_input,
                   input_scale=fields.input_scale, hook_name=fields.hook_name, model_name=fields.model_name,
                   metadata=fields.metadata)


def check_feature_ids(sae: SparseAutoencoder, ids: Iterable[int], *, hookpoint: str | None = None,
                      what: str = "feature") -> None:
    """The one range check for feature ids: each in ``0 … d_sae − 1``, else :class:`FeatureOutOfRange` naming
    the ids (as ``what``: ``feature``, ``--feature``, ...) and the valid range."""
    bad = [int(f) for f in ids if not 0 <= int(f) < sae.d_sae]
    if bad:
        at = f" at {hookpoint}" if hookpoint else ""
        ids_text = f"{what} {bad[0]} is" if len(bad) == 1 else f"{what}s {bad} are"
        raise FeatureOutOfRange(f"{ids_text} out of range; the SAE{at} has features 0 … {sae.d_sae - 1}")


class SubsetEncoder:
    """Encodes a fixed set of an SAE's features: ``encoder(x)`` is ``sae.encode(x)[..., features]``.

    For element-wise SAEs (standard, JumpReLU) the encoder columns of the chosen
    features are sliced once, so encoding costs ``d_in × len(features)`` instead of
    ``d_in × d_sae``; TopK needs every pre-activation and encodes in full.
    """

    def __init__(self, sae: SparseAutoencoder, features: Sequence[int] | Tensor) -> None:
        idx = torch.as_tensor(features, dtype=torch.long, device=sae.W_enc.device)
        check_feature_ids(sae, idx.tolist())
        self.sae = sae
        self.features: list[int] = idx.tolist()
        self._idx = idx
        if sae.elementwise:
            self._W_enc = sae.W_enc.index_select(1, idx).contiguous()
            self._b_enc = sae.b_enc.index_select(0, idx)
            self._threshold = sae.threshold.index_select(0, idx)

    def __len__(self) -> int:
        return len(self.features)

    def __call__(self, x: Tensor) -> Tensor:
        sae = self.sae
        if not sae.elementwise:
            return sae.encode(x).index_select(-1, self._idx)
        return sae._activate(sae._prepare(x) @ self._W_enc + self._b_enc, self._threshold)
