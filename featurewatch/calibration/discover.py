"""Ranking SAE features that separate two sets of records (cf. Goodfire's ``features.contrast``).

For each feature: AUROC of its pooled activation (positives vs negatives),
a standardised effect size (Cohen's d), and how often it fires in each set.
Top contexts from the pack's feature statistics help put a label on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..hooks import forward_until
from ..positions import excluded_positions
from ..records import load_records, pad_right, render
from ..sae import SparseAutoencoder
from ..training.evaluate import context_snippet
from .fit import feature_aurocs


def contrast(pos: np.ndarray, neg: np.ndarray, top: int = 20) -> list[dict[str, Any]]:
    """Rank features (columns of pooled activations) that are more active in ``pos`` than ``neg``."""
    X = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    au = feature_aurocs(X, y)
    pooled_sd = np.sqrt((pos.var(0) + neg.var(0)) / 2) + 1e-6
    d = (pos.mean(0) - neg.mean(0)) / pooled_sd
    order = np.argsort(-(au - 0.5))[:top]
    return [{"feature": int(i), "auroc": round(float(au[i]), 4), "effect_size": round(float(d[i]), 3),
             "fires_pos": round(float((pos[:, i] > 0).mean()), 3),
             "fires_neg": round(float((neg[:, i] > 0).mean()), 3),
             "mean_pos": round(float(pos[:, i].mean()), 4), "mean_neg": round(float(neg[:, i].mean()), 4)}
            for i in order]


@torch.inference_mode()
def top_contexts(model: Any, tokenizer: Any, sae: SparseAutoencoder, hookpoint: str, corpus: str,
                 features: list[int], *, n_records: int = 400, n: int = 8,
                 progress: Any = None) -> dict[int, list[dict[str, Any]]]:
    """The ``n`` strongest activations of each feature in the first ``n_records`` records of ``corpus``."""
    records = load_records(corpus)[:n_records]
    best: dict[int, list[tuple[float, str]]] = {f: [] for f in features}
    bar = progress(total=len(records), desc="inspect", unit="rec") if progress else None
    for s in range(0, len(records), 16):
        rows = [render(r, tokenizer, max_tokens=256).ids for r in records[s:s + 16]]
        ids, mask = pad_right(rows, tokenizer.pad_token_id)
        acts = forward_until(model, ids, mask, [hookpoint])[hookpoint]
        f_all = sae.encode_subset(acts, features)
        f_all[excluded_positions(ids, mask, tokenizer.all_special_ids)] = 0
        for j, feature in enumerate(features):
            f = f_all[..., j]
            top = torch.topk(f.flatten(), min(n, f.numel()))
            for v, flat in zip(top.values.tolist(), top.indices.tolist()):
                if v > 0:
                    r, p = divmod(flat, f.shape[1])
                    best[feature].append((v, context_snippet(tokenizer, rows[r], p)))
            best[feature] = sorted(best[feature], key=lambda t: -t[0])[:n]
        if bar:
            bar.update(len(rows))
    if bar:
        bar.close()
    return {f: [{"activation": round(v, 3), "context": c} for v, c in items] for f, items in best.items()}
