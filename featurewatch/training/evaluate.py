"""Measuring an SAE on held-out text, and the per-feature statistics a pack ships.

Definitions follow SAELens: L0 = mean non-zero features per token; explained
variance ``1 − E‖x−x̂‖² / (E‖x‖² − ‖E x‖²)`` in float64 (FVU = 1 − EV); the
reconstruction spliced into the forward pass gives ΔCE (nats/token), the CE
loss score ``(CE_zero − CE_sae)/(CE_zero − CE_clean)`` and KL to the clean
model. Attention sinks and special tokens are excluded everywhere, and the
splice leaves them untouched (their norms are far outside what an SAE models).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooks import hooked, rewrap, unwrap
from ..models import resolve_hookpoint
from ..positions import excluded_positions
from ..records import Record, pad_right
from ..sae import SparseAutoencoder
from .harvest import batches, kept_activations

logger = logging.getLogger(__name__)


@torch.inference_mode()
def evaluate_sae(model: Any, tokenizer: Any, sae: SparseAutoencoder, records: list[Record], hookpoint: str, *,
                 ctx: int = 256, eval_tokens: int = 100_000, ce_tokens: int = 16_000, batch_size: int = 32,
                 n_contexts: int = 5, progress: Any = None, stats_path: Path | None = None) -> dict[str, Any]:
    """Report L0, FVU, ΔCE, dead/dense fractions on held-out ``records``; optionally write feature stats."""
    d_sae = sae.d_sae
    n = 0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sum_err = torch.zeros((), dtype=torch.float64)
    l0s: list[Tensor] = []
    fired = torch.zeros(d_sae, dtype=torch.long)
    max_act = torch.zeros(d_sae)
    top_vals = torch.zeros(n_contexts, d_sae)
    top_idx = torch.full((n_contexts, d_sae), -1, dtype=torch.long)
    rows_seen: list[list[int]] = []
    where: list[Tensor] = []  # per kept token: (row in rows_seen, position)
    bar = progress(total=eval_tokens, desc="evaluate", unit="tok") if progress else None
    for rows in batches(records, tokenizer, ctx=ctx, batch_size=batch_size, seed=1):
        if n >= eval_tokens:
            break
        x, r, p = kept_activations(model, tokenizer, rows, hookpoint)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        xd = x.double()
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum()
        sum_err += (xd - x_hat.double()).pow(2).sum()
        active = f > 0
        l0s.append(active.sum(-1).float())
        fired += active.sum(0)
        max_act = torch.maximum(max_act, f.max(0).values)
        base = len(where) and int(sum(w.shape[0] for w in where))
        cand_vals = torch.cat([top_vals, f])
        cand_idx = torch.cat([top_idx, torch.arange(base, base + f.shape[0]).unsqueeze(1).expand(-1, d_sae)])
        top_vals, pick = cand_vals.topk(n_contexts, dim=0)
        top_idx = cand_idx.gather(0, pick)
        where.append(torch.stack([r + len(rows_seen), p], dim=1))
        rows_seen.extend(rows)
        n += x.shape[0]
        if bar:
            bar.update(x.shape[0])
    if bar:
        bar.close()
    mean = sum_x / n
    total_var = sum_x2 / n - mean.pow(2).sum()
    fvu = float((sum_err / n) / total_var)
    l0 = torch.cat(l0s)
    density = fired.double() / n
    report: dict[str, Any] = {
        "eval_tokens": n,
        "l0": round(float(l0.mean()), 2),
        "l0_p10_p50_p90": [round(float(q), 1) for q in l0.quantile(torch.tensor([0.1, 0.5, 0.9]))],
        "fvu": round(fvu, 4),
        "explained_variance": round(1 - fvu, 4),
        "dead_fraction": round(float((fired == 0).double().mean()), 4),
        "dense_fraction_gt_1e-2": round(float((density > 1e-2).double().mean()), 4),
        "dense_fraction_gt_1e-1": round(float((density > 1e-1).double().mean()), 4),
    }
    if ce_tokens > 0:  # 0: statistics only (the CE splice runs the whole model three times)
        report.update(splice_ce(model, tokenizer, sae, records, hookpoint, ctx=ctx, max_tokens=ce_tokens))
    if stats_path is not None:
        positions = torch.cat(where)
        feats = []
        for i in range(d_sae):
            contexts = []
            for v, t in zip(top_vals[:, i].tolist(), top_idx[:, i].tolist()):
                if v <= 0 or t < 0:
                    continue
                row, pos = positions[t].tolist()
                contexts.append(context_snippet(tokenizer, rows_seen[row], pos))
            feats.append({"id": i, "max_activation": round(float(max_act[i]), 4),
                          "density": float(f"{float(density[i]):.3g}"), "top_contexts": contexts})
        stats_path.write_text(json.dumps({hookpoint: feats}, ensure_ascii=False) + "\n")
    return report


def context_snippet(tokenizer: Any, ids: list[int], pos: int, before: int = 12, after: int = 3) -> str:
    """Text around ``ids[pos]`` with the token itself in «guillemets»."""
    left = tokenizer.decode(ids[max(0, pos - before):pos])
    mid = tokenizer.decode(ids[pos:pos + 1])
    right = tokenizer.decode(ids[pos + 1:pos + 1 + after])
    return (left + "«" + mid + "»" + right).replace("\n", "⏎")


@torch.inference_mode()
def splice_ce(model: Any, tokenizer: Any, sae: SparseAutoencoder, records: list[Record], hookpoint: str, *,
              ctx: int = 256, max_tokens: int = 16_000, batch_size: int = 8) -> dict[str, float]:
    """CE loss with the SAE reconstruction (and with zeros) spliced in at ``hookpoint``."""
    _, _, module = resolve_hookpoint(model, hookpoint)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    mode = {"value": "clean"}
    keep_mask: dict[str, Tensor] = {}

    def splice(_m: Any, _a: Any, output: Any) -> Any:
        if mode["value"] == "clean":
            return None
        h = unwrap(output)
        replaced = sae(h.float()).to(h.dtype) if mode["value"] == "sae" else torch.zeros_like(h)
        keep = keep_mask["m"].unsqueeze(-1)
        return rewrap(output, torch.where(keep, replaced, h))

    with hooked([(module, splice)]):
        for rows in batches(records, tokenizer, ctx=ctx, batch_size=batch_size, seed=2):
            if count >= max_tokens:
                break
            ids, mask = pad_right(rows, tokenizer.pad_token_id)
            keep_mask["m"] = ~excluded_positions(ids, mask, tokenizer.all_special_ids)
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            logp = {}
            for m in ("clean", "sae", "zero"):
                mode["value"] = m
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                logp[m] = F.log_softmax(logits, dim=-1)
                nll = -logp[m].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                totals[m] += float(nll[valid].sum())
            kl = (logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum(-1)
            totals["kl"] += float(kl[valid].sum())
            count += int(valid.sum())
    ce = {k: v / count for k, v in totals.items()}
    return {
        "ce_tokens": count,
        "ce_clean": round(ce["clean"], 4),
        "ce_sae": round(ce["sae"], 4),
        "ce_zero_ablation": round(ce["zero"], 4),
        "ce_increase": round(ce["sae"] - ce["clean"], 4),
        "ce_loss_score": round((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), 4),
        "kl_div": round(ce["kl"], 4),
    }
