"""``featurewatch train-sae`` end to end: split, harvest, train, export, evaluate.

Each stage leaves its output in the work directory (activation shards, a
training checkpoint, the exported SAE), so a rerun with the same arguments
resumes instead of starting over.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models import load_model, normalize_hookpoint
from ..records import load_records
from .harvest import harvest, in_chat_wrappers, is_held_out
from .train import TrainConfig, train

logger = logging.getLogger(__name__)


def token_shares(n: int, mix: Sequence[float] | None) -> list[float]:
    """Each corpus's share of the harvested tokens: ``mix`` normalised, or equal shares."""
    if mix is None:
        return [1 / n] * n
    if len(mix) != n or any(m < 0 for m in mix) or sum(mix) <= 0:
        raise ValueError(f"mix {list(mix)} needs {n} non-negative shares (one per corpus) with a positive sum")
    return [m / sum(mix) for m in mix]


def train_sae(*, corpus: str | Path | Sequence[str | Path], out: str | Path, model: str | None = None,
              hookpoint: str = "layers.15", tokens: int = 1_200_000, mix: Sequence[float] | None = None,
              wrap_documents: float = 0.0, ctx: int = 256, held_out_fraction: float = 0.05,
              cfg: TrainConfig | None = None, progress: Any = None, eval_tokens: int = 60_000,
              ce_tokens: int = 16_000, harvest_only: bool = False) -> dict[str, Any]:
    """Train an SAE for ``model`` at ``hookpoint`` on one or more corpora; write it and its report under ``out``.

    ``mix`` gives each corpus's share of the ``tokens`` (default: equal); ``wrap_documents`` is
    the fraction of documents put inside a chat (see :func:`harvest.in_chat_wrappers`).
    ``harvest_only`` stops once the activations are cached and returns what was harvested.
    """
    cfg = cfg or TrainConfig()
    t0 = time.time()
    out = Path(out)
    hookpoint = normalize_hookpoint(hookpoint)
    corpora = [Path(corpus)] if isinstance(corpus, (str, Path)) else [Path(c) for c in corpus]
    shares = token_shares(len(corpora), mix)
    loaded = load_model(model)
    torch.manual_seed(cfg.seed)
    parts, held_out, n_records = [], {}, 0
    for i, (path, share) in enumerate(zip(corpora, shares)):
        records = in_chat_wrappers(load_records(path), wrap_documents, seed=cfg.seed)
        n_records += len(records)
        train_records = [r for r in records if not is_held_out(r.id, held_out_fraction)]
        held_out[path.stem] = [r for r in records if is_held_out(r.id, held_out_fraction)]
        logger.info("%s: %d training and %d held-out records, %.0f%% of the tokens", path.name,
                    len(train_records), len(held_out[path.stem]), 100 * share)
        cache = out / "cache" / "train" if len(corpora) == 1 else out / "cache" / "train" / f"{i}-{path.stem}"
        parts.append(harvest(loaded.model, loaded.tokenizer, train_records, hookpoint, cache,
                             max_tokens=round(tokens * share), ctx=ctx, seed=cfg.seed, progress=progress))
    t_harvest = time.time() - t0
    if harvest_only:
        return {"harvested_tokens": {p.stem: int(a.shape[0]) for p, a in zip(corpora, parts)},
                "seconds": {"harvest": round(t_harvest)}}
    acts = parts[0] if len(parts) == 1 else torch.cat(parts)
    del parts
    sae_dir = out / "sae" / hookpoint
    sae_model, scale, history = train(acts, cfg, checkpoint=out / "cache" / "checkpoint.pt", progress=progress)
    del acts
    t_train = time.time() - t0 - t_harvest
    names = ", ".join(f"{p.name} ({s:.0%})" for p, s in zip(corpora, shares))
    sae = sae_model.export(scale, hook_name=hookpoint, model_name=loaded.name,
                           metadata={"corpus": names, "context_size": ctx, "prepend_bos": False,
                                     "trained_tokens": tokens, "documents_in_chat_wrappers": wrap_documents})
    sae.save(sae_dir, dtype=torch.float16)
    (out / "cache" / "history.json").write_text(json.dumps(history))
    from .evaluate import evaluate_sae

    sae = type(sae).load(sae_dir)  # evaluate what was written (fp16 round trip included)
    every = [r for records in held_out.values() for r in records]
    report = evaluate_sae(loaded.model, loaded.tokenizer, sae, every, hookpoint, ctx=ctx,
                          eval_tokens=eval_tokens, ce_tokens=ce_tokens, progress=progress,
                          stats_path=out / "features.json")
    if len(corpora) > 1:  # the same measures on each corpus's held-out text alone
        report["per_corpus"] = {
            name: evaluate_sae(loaded.model, loaded.tokenizer, sae, records, hookpoint, ctx=ctx,
                               eval_tokens=eval_tokens // 2, ce_tokens=ce_tokens // 2, progress=progress)
            for name, records in held_out.items()}
    report.update({
        "model": loaded.name, "hookpoint": hookpoint, "corpus": names,
        "held_out": f"records whose sha256(id) falls in the first {held_out_fraction:.0%} "
                    f"({len(every)} of {n_records})",
        "trained_tokens": tokens, "training": asdict(cfg),
        "seconds": {"harvest": round(t_harvest), "train": round(t_train), "total": round(time.time() - t0)},
        "final_train_fvu": history[-1]["fvu"] if history else None,
    })
    (sae_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
