"""Top-activating contexts of chosen SAE features, from activations a calibration already cached.

A build keeps every prepared file's token residuals (``cache/prepared/*.jsonl`` and their ``.pt``);
re-tokenising those records (no model run) and encoding the cached residuals into the chosen
features only gives each feature's strongest contexts, the token in « » — what a person reads to
label a feature, and what a pack shows for the features its detectors read.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

OUTLIER = 3.0  # × the median token norm of a file: such a token lights up every feature at once


def cached_contexts(files: Iterable[tuple[Path, Path]], sae: Any, tokenizer: Any, features: list[int], *,
                    max_tokens: int, top: int = 8, width: int = 12,
                    log: Callable[[str], None] | None = None) -> dict[int, list[str]]:
    """``{feature: its strongest contexts}`` over ``(prepared records, their cached activations)`` pairs.

    A record rendered differently from its cache (another token budget) is skipped, never misaligned;
    tokens with an outlier norm are left out (their context says nothing about any one feature).
    """
    from ..positions import excluded_positions
    from ..records import load_records, render
    from .extract import TokenActs

    features = sorted(set(features))
    heaps: dict[int, list[tuple[float, str]]] = {f: [] for f in features}
    if not features:
        return {}
    enc = sae.subset(features)
    for prepared, pt in files:
        if not pt.is_file():
            continue
        acts = TokenActs.load(pt)
        records = load_records(prepared)
        if acts.ids != [r.id for r in records]:
            continue
        norm_median = float(acts.acts.float().norm(dim=1).median())
        for i, rec in enumerate(records):
            start, end = int(acts.offsets[i]), int(acts.offsets[i + 1])
            if end == start:
                continue
            r = render(rec, tokenizer, max_tokens=max_tokens)
            ids = torch.tensor([r.ids])
            keep = ~excluded_positions(ids, torch.ones_like(ids), tokenizer.all_special_ids)[0]
            keep[: len(r.content)] &= torch.tensor(r.content, dtype=torch.bool)
            positions = keep.nonzero().flatten().tolist()
            if len(positions) != end - start:
                continue
            x = acts.acts[start:end].float()
            with torch.no_grad():
                a = enc(x)
            a[x.norm(dim=1) > OUTLIER * norm_median] = 0
            for j, f in enumerate(features):
                k = int(a[:, j].argmax())
                v = float(a[k, j])
                if v <= 0:
                    continue
                p = positions[k]
                before = tokenizer.decode(r.ids[max(0, p - width):p])
                after = tokenizer.decode(r.ids[p + 1:p + 4])
                ctx = f"{before}«{tokenizer.decode([r.ids[p]])}»{after}".replace("\n", "⏎")
                h = heaps[f]
                if len(h) < top:
                    heapq.heappush(h, (v, ctx))
                elif v > h[0][0]:
                    heapq.heapreplace(h, (v, ctx))
        if log:
            log(f"contexts from {prepared.name}")
    return {f: [c for _, c in sorted(heaps[f], reverse=True)] for f in features}
