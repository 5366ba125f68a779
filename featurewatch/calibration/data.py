"""Labelled record sets for discovery, calibration and evaluation.

Splits are by a hash of the record id, so the same record lands in the same
split on every machine and in every command. Token activations are cached per
file (keyed by content, model, hookpoint and truncation) so that discovery,
calibration of several detectors, and probes share one forward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, RecordError
from ..records import Record, load_records
from ..sae import SparseAutoencoder
from ..training.harvest import is_held_out
from .extract import TokenActs, extract

HELD_OUT = 0.2


@dataclass
class Labelled:
    """Records of one file with labels, and where they came from."""

    path: Path
    records: list[Record]
    labels: np.ndarray
    sources: list[str]


def capped(records: list[Record], max_records: int | None) -> list[Record]:
    """A deterministic subset: the first ``max_records`` by hash of id (keeps the held-out split intact)."""
    if max_records is None or len(records) <= max_records:
        return records
    return sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())[:max_records]


def load_labelled(path: str | Path, *, max_records: int | None = None) -> Labelled:
    """Records with a 0/1 ``label``; a record without one is an error naming its line."""
    p = Path(path)
    records = capped(load_records(p), max_records)
    labels = []
    for r in records:
        if r.extra.get("label") not in (0, 1):
            raise RecordError("needs 'label': 0 or 1 for calibration and evaluation", path=str(p), line=r.line)
        labels.append(int(r.extra["label"]))
    return Labelled(p, records, np.array(labels), [str(r.extra.get("source", p.stem)) for r in records])


def split_mask(records: list[Record], split: str, fraction: float = HELD_OUT) -> np.ndarray:
    """Boolean mask of records in ``split`` (``fit``, ``held-out`` or ``all``).

    A wrapped record (``base_id``, see calibration.wrappers) splits with its base text, so every
    wrapper of one text lands in the same split.
    """
    if split == "all":
        return np.ones(len(records), dtype=bool)
    held = np.array([is_held_out(str(r.extra.get("base_id", r.id)), fraction) for r in records], dtype=bool)
    return held if split == "held-out" else ~held


def acts_cache_path(data: Labelled, hookpoint: str, *, max_tokens: int, cache_dir: Path, model_name: str) -> Path:
    """Where :func:`cached_acts` keeps a file's activations (keyed by content, model, hookpoint, truncation)."""
    key = hashlib.sha256()
    key.update(data.path.read_bytes())
    key.update(f"{model_name}|{hookpoint}|{max_tokens}|{len(data.records)}".encode())
    return cache_dir / f"{data.path.stem}-{key.hexdigest()[:16]}.pt"


def cached_acts(model: Any, tokenizer: Any, data: Labelled, hookpoint: str, *, max_tokens: int,
                cache_dir: Path | None, model_name: str, progress: Any = None) -> TokenActs:
    """Token activations of a file's records, from the cache when it has them."""
    path = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = acts_cache_path(data, hookpoint, max_tokens=max_tokens, cache_dir=cache_dir, model_name=model_name)
        if path.exists():
            acts = TokenActs.load(path)
            if acts.ids == [r.id for r in data.records]:
                return acts
    acts = extract(model, tokenizer, data.records, hookpoint, max_tokens=max_tokens, progress=progress)
    if path is not None:
        acts.save(path)
    return acts


@dataclass
class PooledSet:
    """One labelled file with its records' pooled activations: ``(n_records, d_sae)`` and ``(n_records, d_model)``."""

    data: Labelled
    features: np.ndarray | None
    residuals: np.ndarray


def pooled_sets(model: Any, tokenizer: Any, model_name: str, sae: SparseAutoencoder, hookpoint: str,
                paths: list[str | Path], *, phase: str, with_features: bool, max_records: int | None,
                max_tokens: int, cache_dir: Path | None, progress: Any = None) -> list[PooledSet]:
    """Per file, its records pooled over ``phase`` (``prompt``, ``completion`` or ``all``).

    A record with no token in ``phase`` is an error naming its lines: pooling
    over nothing would silently put it at zero.
    """
    out = []
    for path in paths:
        data = load_labelled(path, max_records=max_records)
        acts = cached_acts(model, tokenizer, data, hookpoint, max_tokens=max_tokens, cache_dir=cache_dir,
                           model_name=model_name, progress=progress)
        ph = None if phase == "all" else phase
        feats = acts.pooled(ph, sae)[0] if with_features else None
        resid, has = acts.pooled(ph)
        if not bool(has.all()):
            missing = [data.records[i].line for i in np.flatnonzero(~has.numpy())][:5]
            raise ConfigError(f"{path}: {int((~has).sum())} record(s) have no {phase}-phase tokens "
                              f"(lines {missing}…); pick another --phase or fix the records")
        out.append(PooledSet(data, None if feats is None else feats.numpy(), resid.numpy()))
    return out
