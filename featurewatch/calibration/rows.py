"""Per-record, per-phase pooled activations of wrapped record sets: what fitting and evaluation read.

The runtime scores each phase of a run separately (a mean over the phase's
content tokens), so every record here has a prompt row and a completion row:
the pooled SAE features, the pooled residual (for dense probes) and the number
of content tokens (for ``min_tokens`` and the short-text prior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..records import Record
from ..sae import SparseAutoencoder
from .extract import TokenActs
from .wrappers import phase_of_content, wrapper_family

PHASES = ("prompt", "completion")


@dataclass
class PhaseRows:
    """Records of one or more wrapped sets with pooled activations per phase."""

    ids: list[str]
    base_ids: list[str]
    sets: list[str]
    groups: list[str]
    wrappers: list[str]  # full tag, e.g. "reply+sys"
    labels: np.ndarray  # (n,) the record's label for its own task
    n: dict[str, np.ndarray]  # phase → (n,) content tokens in that phase
    feats: dict[str, np.ndarray]  # phase → (n, d_sae) mean SAE activations (0 where no tokens)
    resid: dict[str, np.ndarray]  # phase → (n, d_model) mean residuals

    @property
    def families(self) -> list[str]:
        return [wrapper_family(w) for w in self.wrappers]

    @property
    def content_phase(self) -> list[str]:
        return [phase_of_content(w) for w in self.wrappers]

    def select(self, mask: np.ndarray) -> "PhaseRows":
        idx = np.flatnonzero(mask)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PhaseRows(pick(self.ids), pick(self.base_ids), pick(self.sets), pick(self.groups),
                         pick(self.wrappers), self.labels[idx], {p: v[idx] for p, v in self.n.items()},
                         {p: v[idx] for p, v in self.feats.items()}, {p: v[idx] for p, v in self.resid.items()})

    @staticmethod
    def concat(parts: list["PhaseRows"]) -> "PhaseRows":
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return PhaseRows(cat("ids"), cat("base_ids"), cat("sets"), cat("groups"), cat("wrappers"),
                         np.concatenate([p.labels for p in parts]),
                         {ph: np.concatenate([p.n[ph] for p in parts]) for ph in PHASES},
                         {ph: np.concatenate([p.feats[ph] for p in parts]) for ph in PHASES},
                         {ph: np.concatenate([p.resid[ph] for p in parts]) for ph in PHASES})


def phase_rows(acts: TokenActs, records: list[Record], sae: SparseAutoencoder, set_name: str) -> PhaseRows:
    """Pool a set's cached token activations per phase; record metadata from the wrapped records."""
    if acts.ids != [r.id for r in records]:
        raise ValueError(f"{set_name}: cached activations do not match the records (rebuild the cache)")
    record_of = torch.repeat_interleave(torch.arange(len(records)), acts.offsets.diff())
    n, feats, resid = {}, {}, {}
    for ph in PHASES:
        sel = acts.completion if ph == "completion" else ~acts.completion
        n[ph] = torch.bincount(record_of[sel], minlength=len(records)).numpy()
        f, _ = acts.pooled(ph, sae)
        r, _ = acts.pooled(ph)
        feats[ph], resid[ph] = f.numpy().astype(np.float32), r.numpy().astype(np.float32)
    meta: list[dict[str, Any]] = [r.extra for r in records]
    return PhaseRows([r.id for r in records], [str(m.get("base_id", r.id)) for m, r in zip(meta, records)],
                     [set_name] * len(records), [str(m.get("group", m.get("source", set_name))) for m in meta],
                     [str(m.get("wrapper", "native")) for m in meta], np.array([int(m["label"]) for m in meta]),
                     n, feats, resid)
