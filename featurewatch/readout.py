"""Readout: residual activations → watched feature activations → per-token detector scores.

One :class:`Readout` per hookpoint, compiled once when a monitor is built. It
reads a flat ``(n_tokens, d_model)`` batch (see :mod:`featurewatch.positions`),
encodes only the features its detectors (and ``watch``) need through the SAE's
own :class:`~featurewatch.sae.SubsetEncoder`, and scores every detector at that
hookpoint with one matmul: ``scores = feats @ W_feat + x @ W_probe + bias``.
Nothing here knows about runs, phases or alerts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .detector import DetectorSpec
from .errors import ConfigError, FeatureOutOfRange, WidthMismatch
from .models import model_width, resolve_hookpoint
from .pack import Pack
from .sae import SparseAutoencoder, SubsetEncoder


@dataclass
class Readout:
    """Everything one hookpoint's hook computes, decided at attach time."""

    hookpoint: str
    layer: int
    module: nn.Module
    sae: SparseAutoencoder | None
    encoder: SubsetEncoder | None  # the watched features (sorted ids)
    detectors: list[DetectorSpec]
    W_feat: Tensor  # (m, n_det): readout weights of the watched features
    W_probe: Tensor | None  # (d_model, n_det): dense probe weights, if any detector is a probe
    bias: Tensor  # (n_det,)
    deepest: bool = False

    @property
    def feature_ids(self) -> list[int]:
        return self.encoder.features if self.encoder is not None else []

    def features(self, x: Tensor) -> Tensor:
        """Watched feature activations ``(n, m)`` of residuals ``(n, d_model)``."""
        if self.encoder is None or not len(self.encoder):
            return x.new_zeros(x.shape[0], 0)
        return self.encoder(x)

    def scores(self, x: Tensor, feats: Tensor) -> Tensor:
        """Per-token scores ``(n, n_det)`` of every detector at this hookpoint."""
        out = feats @ self.W_feat + self.bias
        if self.W_probe is not None:
            out = out + x @ self.W_probe
        return out


def build_readouts(model: nn.Module, detectors: Sequence[DetectorSpec], saes: Mapping[str, SparseAutoencoder], *,
                   watch: Mapping[str, Sequence[int]] | None = None, pack: Pack | None = None) -> list[Readout]:
    """Compile one :class:`Readout` per hookpoint that a detector, a watch list or an SAE names."""
    watch = dict(watch or {})
    width = model_width(model)
    device = next(model.parameters()).device
    by_hp: dict[str, list[DetectorSpec]] = {}
    for spec in detectors:
        by_hp.setdefault(resolve_hookpoint(model, spec.hookpoint)[0], []).append(spec)
    for hp in [*watch, *saes]:
        by_hp.setdefault(resolve_hookpoint(model, hp)[0], [])
    watch = {resolve_hookpoint(model, hp)[0]: ids for hp, ids in watch.items()}
    sae_at = {resolve_hookpoint(model, hp)[0]: sae for hp, sae in saes.items()}
    readouts = []
    for hp, specs in by_hp.items():
        name, layer, module = resolve_hookpoint(model, hp)
        sae = sae_at.get(name)
        if sae is not None:
            if sae.d_in != width:
                raise WidthMismatch(f"the SAE at {name} reads width {sae.d_in}, but the model's residual "
                                    f"stream is {width} wide: use an SAE trained for this model")
            sae = sae.to(device=device, dtype=torch.float32)
        needed = ({f.id for s in specs for f in (s.features if s.kind == "sae" else s.evidence_features)}
                  | {int(i) for i in watch.get(name, [])})
        if needed and sae is None:
            raise ConfigError(f"detectors or watched features at {name} need an SAE there; "
                              f"SAEs given for: {', '.join(saes) or 'none'}")
        if sae is not None and needed and max(needed) >= sae.d_sae:
            raise FeatureOutOfRange(f"feature {max(needed)} is out of range for the SAE at {name} "
                                    f"(features 0 … {sae.d_sae - 1})")
        ids = sorted(needed)
        col = {f: i for i, f in enumerate(ids)}
        W_feat = torch.zeros(len(ids), len(specs))
        W_probe = torch.zeros(width, len(specs)) if any(s.kind == "probe" for s in specs) else None
        for j, spec in enumerate(specs):
            if spec.kind == "sae":
                for f in spec.features:
                    W_feat[col[f.id], j] = f.weight
            else:
                if pack is None or W_probe is None:
                    raise ConfigError(f"probe detector {spec.name!r} needs its pack (its weights live there)")
                W_probe[:, j] = pack.probe_weight(spec)
        readouts.append(Readout(
            hookpoint=name, layer=layer, module=module, sae=sae,
            encoder=sae.subset(ids) if sae is not None else None, detectors=list(specs),
            W_feat=W_feat.to(device), W_probe=None if W_probe is None else W_probe.to(device),
            bias=torch.tensor([s.bias for s in specs], dtype=torch.float32, device=device)))
    readouts.sort(key=lambda r: r.layer)
    if readouts:
        readouts[-1].deepest = True
    return readouts
