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
from typing import Any

import torch

from ..models import load_model, normalize_hookpoint
from ..records import load_records
from .harvest import harvest, is_held_out
from .train import TrainConfig, train

logger = logging.getLogger(__name__)


def train_sae(*, corpus: str | Path, out: str | Path, model: str | None = None, hookpoint: str = "layers.15",
              tokens: int = 1_200_000, ctx: int = 256, held_out_fraction: float = 0.05,
              cfg: TrainConfig | None = None, progress: Any = None, eval_tokens: int = 60_000,
              ce_tokens: int = 16_000) -> dict[str, Any]:
    """Train an SAE for ``model`` at ``hookpoint`` on ``corpus``; write it and its report under ``out``."""
    cfg = cfg or TrainConfig()
    t0 = time.time()
    out = Path(out)
    hookpoint = normalize_hookpoint(hookpoint)
    loaded = load_model(model)
    torch.manual_seed(cfg.seed)
    records = load_records(corpus)
    train_records = [r for r in records if not is_held_out(r.id, held_out_fraction)]
    held_out = [r for r in records if is_held_out(r.id, held_out_fraction)]
    logger.info("%d training and %d held-out records", len(train_records), len(held_out))
    acts = harvest(loaded.model, loaded.tokenizer, train_records, hookpoint, out / "cache" / "train",
                   max_tokens=tokens, ctx=ctx, seed=cfg.seed, progress=progress)
    t_harvest = time.time() - t0
    sae_dir = out / "sae" / hookpoint
    sae_model, scale, history = train(acts, cfg, checkpoint=out / "cache" / "checkpoint.pt", progress=progress)
    del acts
    t_train = time.time() - t0 - t_harvest
    sae = sae_model.export(scale, hook_name=hookpoint, model_name=loaded.name,
                           metadata={"corpus": str(Path(corpus).name), "context_size": ctx,
                                     "prepend_bos": False, "trained_tokens": tokens})
    sae.save(sae_dir, dtype=torch.float16)
    (out / "cache" / "history.json").write_text(json.dumps(history))
    from .evaluate import evaluate_sae

    sae = type(sae).load(sae_dir)  # evaluate what was written (fp16 round trip included)
    report = evaluate_sae(loaded.model, loaded.tokenizer, sae, held_out, hookpoint, ctx=ctx,
                          eval_tokens=eval_tokens, ce_tokens=ce_tokens, progress=progress,
                          stats_path=out / "features.json")
    report.update({
        "model": loaded.name, "hookpoint": hookpoint, "corpus": str(Path(corpus).name),
        "held_out": f"records whose sha256(id) falls in the first {held_out_fraction:.0%} "
                    f"({len(held_out)} of {len(records)})",
        "trained_tokens": tokens, "training": asdict(cfg),
        "seconds": {"harvest": round(t_harvest), "train": round(t_train), "total": round(time.time() - t0)},
        "final_train_fvu": history[-1]["fvu"] if history else None,
    })
    (sae_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
