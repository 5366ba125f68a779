"""One SAE's quality on each corpus's held-out text, measured the way `train-sae` measures it (issue 16 §3).

The held-out records are those `train-sae` never trains on (sha256(id) in the first 5 %), with
documents put in chat wrappers exactly as the training run did (``--wrap-documents``, seed 0), so
the old and the new SAE are compared on the same tokens:

    .venv/bin/python benchmarks/sae_quality.py --sae detectors/smollm2-135m-instruct/sae/layers.15 \\
        --corpus ../shared/data/corpus/chat_train.jsonl --corpus ../shared/data/corpus/safety_mix.jsonl \\
        --wrap-documents 0.5 --json runs/quality_old.json

``--eval-tokens``/``--ce-tokens`` default to what `train-sae` uses per corpus (30,000 / 8,000).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from featurewatch.models import load_model
from featurewatch.records import load_records
from featurewatch.sae import SparseAutoencoder
from featurewatch.training.evaluate import evaluate_sae
from featurewatch.training.harvest import in_chat_wrappers, is_held_out

KEYS = ("l0", "fvu", "ce_increase", "ce_loss_score", "kl_div", "dead_fraction", "dense_fraction_gt_1e-2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="SAE directory (SAELens layout)")
    ap.add_argument("--corpus", action="append", required=True, help="JSONL corpus; repeat for several")
    ap.add_argument("--hookpoint", default="layers.15")
    ap.add_argument("--wrap-documents", type=float, default=0.0)
    ap.add_argument("--eval-tokens", type=int, default=30_000)
    ap.add_argument("--ce-tokens", type=int, default=8_000)
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args()
    sae = SparseAutoencoder.load(args.sae)
    loaded = load_model(None)
    out = {}
    for path in map(Path, args.corpus):
        t0 = time.time()
        records = in_chat_wrappers(load_records(path), args.wrap_documents, seed=0)
        held = [r for r in records if is_held_out(r.id, 0.05)]
        report = evaluate_sae(loaded.model, loaded.tokenizer, sae, held, args.hookpoint,
                              eval_tokens=args.eval_tokens, ce_tokens=args.ce_tokens)
        out[path.stem] = report
        print(f"{path.stem}: " + ", ".join(f"{k} {report[k]}" for k in KEYS) + f" ({time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
