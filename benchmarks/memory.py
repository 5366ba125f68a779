"""Memory: a monitor serving many generations does not grow, and what one run keeps.

Serves ``--runs`` short monitored generations on one monitor (the embedded model, or a tiny
``--model DIR`` for large counts), dropping each result, and samples RSS, tracemalloc's
current size and gc's object count every ``--every`` runs: the last samples should equal
the first. Then it keeps ``--keep`` results alive and measures, with tracemalloc, the bytes
a run holds (per run and per token), with and without top-feature readings. Run:

    .venv/bin/python benchmarks/memory.py [--runs 1000 --model DIR] [--new-tokens 8] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import torch

from featurewatch.models import load_model
from featurewatch.monitor import Monitor

PROMPTS = ["Say hello.", "Name a colour.", "What is two plus two?", "Write one word about the sea."]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--pack", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model(args.model)
    monitor = Monitor(lm.model, lm.tokenizer, pack=args.pack)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, raise_on_block=False)
    for p in PROMPTS:  # warm-up: lazy imports, caches, allocator pools
        monitor.generate(p, **kw)
    gc.collect()
    tracemalloc.start()
    samples = []
    for i in range(args.runs + 1):
        if i % args.every == 0:
            gc.collect()
            samples.append({"runs": i, "rss_mb": round(_rss_mb(), 1),
                            "traced_kb": round(tracemalloc.get_traced_memory()[0] / 1024, 1),
                            "gc_objects": len(gc.get_objects()), "live_sessions": len(monitor._live)})
        if i < args.runs:
            result = monitor.generate(PROMPTS[i % len(PROMPTS)], top_features=5 if i % 2 else 0, **kw)
            del result
    kept: dict[str, Any] = {}
    for top in (0, 5):
        gc.collect()
        before = tracemalloc.take_snapshot()
        results = [monitor.generate(PROMPTS[i % len(PROMPTS)], top_features=top, **kw) for i in range(args.keep)]
        gc.collect()
        after = tracemalloc.take_snapshot()
        held = sum(s.size_diff for s in after.compare_to(before, "filename"))  # Python objects only
        tokens = sum(r.run.n_tokens for r in results)
        storages = {}  # tensor storage (not seen by tracemalloc), each shared storage once
        for r in results:
            for row in r.session.rows:
                for chunks in (*row.watched.values(), *row.residuals.values()):
                    for t in chunks:
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            for totals in r.session.totals.values():
                for t in (totals.sums, totals.counts):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        tensor_bytes = sum(storages.values())
        kept[f"top_features={top}"] = {"python_bytes_per_run": round(held / len(results)),
                                       "tensor_bytes_per_run": round(tensor_bytes / len(results)),
                                       "bytes_per_token": round((held + tensor_bytes) / tokens, 1),
                                       "tensor_bytes_per_token": round(tensor_bytes / tokens, 1),
                                       "tokens_per_run": round(tokens / len(results), 1)}
        del results
    tracemalloc.stop()
    readouts = monitor.readouts
    out = {"runs": args.runs, "new_tokens": args.new_tokens, "samples": samples, "kept": kept,
           "tensor_bytes_per_token": {
               "watched_features": sum(4 * len(r.feature_ids) for r in readouts),
               "residual_fp16_if_top_features": sum(2 * r.sae.d_in for r in readouts if r.sae is not None)},
           "growth": {k: samples[-1][k] - samples[1][k] for k in ("rss_mb", "traced_kb", "gc_objects")}}
    if args.json:
        print(json.dumps(out))
    else:
        for s in samples:
            print("  ".join(f"{k}={v}" for k, v in s.items()))
        print(json.dumps({k: out[k] for k in ("kept", "tensor_bytes_per_token", "growth")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
