"""Seconds per SAE training step: the sparse trainer vs the dense one it replaced (issue 16).

    .venv/bin/python benchmarks/train_step.py --d-sae 16384 --batch-size 4096 --steps 5

Runs ``featurewatch.training.train.train`` for a few steps on synthetic activations (d_in 576, the
embedded model's width) and prints tokens per second; ``--dense`` times the dense reference step
(encoder and decoder as full matmuls with autograd), kept here only as the baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from featurewatch.training.train import TrainConfig, train


def dense_step(x: torch.Tensor, W_enc, b_enc, W_dec, b_dec, k: int) -> torch.Tensor:
    """The previous trainer's step: dense pre-activations with a graph, dense decode."""
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    flat = pre.flatten()
    values, indices = flat.topk(x.shape[0] * k, sorted=False)
    acts = torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)
    loss = (acts @ W_dec + b_dec - x).pow(2).sum(-1).mean()
    loss.backward()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dense", action="store_true", help="also time the dense reference step")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.batch_size * (args.steps + 1)
    acts = (torch.randn(n, 576) * 3).half()
    out = {"d_sae": args.d_sae, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch_size, epochs=1.0, dead_tokens=1)
    train(acts[: 2 * args.batch_size], TrainConfig(**{**cfg.__dict__, "epochs": 1.0}), max_steps=1)  # warm-up
    t = time.perf_counter()
    train(acts, cfg, max_steps=args.steps)
    sparse = (time.perf_counter() - t) / args.steps
    out["sparse_s_per_step"] = round(sparse, 3)
    out["sparse_tok_per_s"] = round(args.batch_size / sparse)
    if args.dense:
        W_enc = torch.randn(576, args.d_sae, requires_grad=True)
        W_dec = torch.randn(args.d_sae, 576, requires_grad=True)
        b_enc = torch.zeros(args.d_sae, requires_grad=True)
        b_dec = torch.zeros(576, requires_grad=True)
        x = acts[: args.batch_size].float()
        dense_step(x, W_enc, b_enc, W_dec, b_dec, args.k)
        t = time.perf_counter()
        for _ in range(args.steps):
            dense_step(x, W_enc, b_enc, W_dec, b_dec, args.k)
        dense = (time.perf_counter() - t) / args.steps
        out["dense_s_per_step"] = round(dense, 3)
        out["dense_tok_per_s"] = round(args.batch_size / dense)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
