"""``featurewatch train-sae``: train an SAE for any model on a JSONL corpus (resumable)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ._common import NON_NEGATIVE, POSITIVE, CLIError, check_input, check_output_dir, float_range, int_range, progress


def register(sub: Any) -> None:
    p = sub.add_parser("train-sae", help="train an SAE on a JSONL corpus (resumable)")
    p.add_argument("--corpus", required=True, action="append",
                   help="JSONL records to train on (5%% by id hash held out); repeat to train on several")
    p.add_argument("--out", required=True, help="work directory (activation cache, checkpoint, SAE, report)")
    p.add_argument("--model", help="hub id, local directory or .gguf file (default: the embedded model)")
    add_train_options(p)
    p.add_argument("--harvest-only", action="store_true",
                   help="stop after caching the activations under --out (a later run without it trains)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_train_sae)


def add_train_options(p: Any) -> None:
    """The training options ``train-sae`` and ``build-pack --train-sae`` share (all but --corpus, --out, --model)."""
    p.add_argument("--mix", type=shares, help="each --corpus's share of --tokens, in order, e.g. 0.6,0.4 "
                   "(default: equal shares)")
    p.add_argument("--wrap-documents", type=float_range(0, 1), default=0.0,
                   help="fraction of documents (text records) put inside a chat: quoted by a user or "
                   "written as the assistant's reply (default 0)")
    p.add_argument("--hookpoint", default="layers.15", help="where to read the residual stream (layers.N)")
    p.add_argument("--tokens", type=POSITIVE, default=1_200_000, help="training tokens to harvest")
    p.add_argument("--ctx", type=int_range(2), default=256, help="tokens per harvested context (>= 2)")
    p.add_argument("--d-sae", type=POSITIVE, default=4608, help="number of features")
    p.add_argument("--k", type=POSITIVE, default=32, help="mean active features per token (<= --d-sae)")
    p.add_argument("--epochs", type=float_range(0, lo_open=True), default=2.0, help="passes over the activations")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=1e-3, help="peak Adam learning rate")
    p.add_argument("--batch-size", type=POSITIVE, default=4096, help="tokens per optimiser step")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--eval-tokens", type=POSITIVE, default=60_000, help="held-out tokens for the report")
    p.add_argument("--ce-tokens", type=POSITIVE, default=16_000, help="held-out tokens for the CE-loss splice")


def shares(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers") from None
    if any(not (math.isfinite(v) and v >= 0) for v in out) or sum(out) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: shares must be finite, >= 0 and not all 0")
    return out


def cmd_train_sae(args: argparse.Namespace) -> int:
    from ..models import normalize_hookpoint

    if args.k > args.d_sae:
        raise CLIError(f"--k {args.k} is larger than --d-sae {args.d_sae}; choose --k <= --d-sae")
    corpus = [check_input(c, "--corpus") for c in args.corpus]
    if args.mix is not None and len(args.mix) != len(corpus):
        raise CLIError(f"--mix has {len(args.mix)} share(s) for {len(corpus)} --corpus file(s); give one per corpus")
    check_output_dir(args.out, "--out")
    normalize_hookpoint(args.hookpoint)  # a malformed name fails now, not after the harvest
    from ..training.pipeline import train_sae  # after the checks: bad input is reported before heavy imports
    from ..training.train import TrainConfig

    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.epochs, lr=args.lr, seed=args.seed,
                      batch_size=args.batch_size)
    report = train_sae(corpus=corpus, out=args.out, model=args.model, hookpoint=args.hookpoint,
                       tokens=args.tokens, mix=args.mix, wrap_documents=args.wrap_documents, ctx=args.ctx,
                       cfg=cfg, progress=progress(), harvest_only=args.harvest_only,
                       eval_tokens=args.eval_tokens, ce_tokens=args.ce_tokens)
    if args.json:
        print(json.dumps(report))
        return 0
    if args.harvest_only:
        print(f"activations cached under {Path(args.out) / 'cache'}: {report['harvested_tokens']}")
        return 0
    keys = ["l0", "fvu", "explained_variance", "ce_increase", "ce_loss_score", "kl_div", "dead_fraction",
            "dense_fraction_gt_1e-2"]
    print(f"SAE written to {Path(args.out) / 'sae' / report['hookpoint']}")
    for k in keys:
        print(f"  {k:<24} {report.get(k)}")
    return 0
