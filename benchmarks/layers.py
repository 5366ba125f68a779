"""Where do the concepts live? A dense probe per layer, concept, phase and wrapper (issue 16 §2).

One forward pass per record keeps the residual at several layers; each record is the mean over
its content tokens in the phase that holds the content (a document or quoted mail: prompt; a
reply: completion). For each concept and layer a logistic-regression probe is fitted on the
records whose base text is not held out and scored on the rest (every wrapper of a text lands in
the same split), overall and per wrapper. The sets are the recalibration sets built by
``examples/recalibrate.py --steps build`` (runs/recal/*.jsonl), a deterministic subset of each.

    .venv/bin/python examples/recalibrate.py --steps build
    .venv/bin/python benchmarks/layers.py --layers 3,6,9,12,15,18,21,24,27 --json runs/layers.json

Prints a Markdown table (rows: concept × phase × wrapper; columns: layers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from featurewatch.calibration.fit import feature_aurocs
from featurewatch.calibration.wrappers import phase_of_content, wrapper_family
from featurewatch.hooks import forward_until
from featurewatch.models import load_model
from featurewatch.positions import excluded_positions
from featurewatch.records import load_records, pad_right, render
from featurewatch.training.harvest import is_held_out

ROOT = Path(__file__).resolve().parent.parent
# concept → (recalibration sets, which rows: "prompt"/"completion" content or any)
CONCEPTS = {
    "scam-email": (("mail",), None),
    "dangerous (request)": (("danger_prompt", "danger_alpaca", "danger_hw"), "prompt"),
    "dangerous (reply)": (("danger_reply", "danger_hw"), "completion"),
    "deception": (("deception",), None),
    "sycophancy": (("sycophancy",), None),
}
# hard negatives that must be told apart within the concept: (name, positive groups, negative groups)
HARD = {
    "scam-email": ("handwritten scams vs look-alike notices", {"handwritten-scam"}, {"look-alike"}),
    "dangerous (request)": ("harmful vs XSTest-style look-alikes", {"handwritten-harmful", "harmful-requests"},
                            {"xstest-style"}),
}


def subset(records: list, n: int) -> list:
    """A deterministic subset of ``n`` records per label (by hash of the base text)."""
    out = []
    for label in (0, 1):
        rows = [r for r in records if r.extra.get("label") == label]
        rows.sort(key=lambda r: hashlib.sha256(("layers" + str(r.extra.get("base_id", r.id))).encode()).hexdigest())
        out += rows[:n]
    return out


@torch.inference_mode()
def pooled(model, tokenizer, records, layers: list[int], *, max_tokens: int, batch_size: int) -> np.ndarray:
    """``(n_records, n_layers, d_model)``: each record's content tokens in its content phase, averaged."""
    hps = [f"layers.{i}" for i in layers]
    rendered = [render(r, tokenizer, max_tokens=max_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(rendered[i].ids))
    out = np.zeros((len(records), len(layers), model.config.hidden_size), dtype=np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_right([rendered[i].ids for i in idx], tokenizer.pad_token_id)
        acts = forward_until(model, ids, mask, hps)
        drop = excluded_positions(ids, mask, tokenizer.all_special_ids)
        for row, i in enumerate(idx):
            rd = rendered[i]
            want_completion = phase_of_content(records[i].extra.get("wrapper", "plain")) == "completion"
            keep = ~drop[row]
            n = len(rd.ids)
            keep[:n] &= torch.tensor(rd.content, dtype=torch.bool)
            pos = torch.arange(keep.numel())
            keep &= (pos >= rd.n_prompt) if want_completion else (pos < rd.n_prompt)
            if not keep.any():
                keep = ~drop[row]
            for j, hp in enumerate(hps):
                out[i, j] = acts[hp][row, keep].float().mean(0).numpy()
        print(f"\r  {min(s + batch_size, len(order))}/{len(order)} records", end="", file=sys.stderr)
    print(file=sys.stderr)
    return out


def probe_aurocs(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Held-out probe scores (standardised logistic regression fitted on ``train``)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=2000).fit((X[train] - mu) / sd, y[train])
    return clf.decision_function((X - mu) / sd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=str(ROOT / "runs" / "recal"), help="folder of recalibration sets")
    ap.add_argument("--layers", default="3,6,9,12,15,18,21,24,27")
    ap.add_argument("--per-label", type=int, default=150, help="records per label and concept")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated subset of the concepts")
    ap.add_argument("--json", help="write every cell here")
    args = ap.parse_args()
    sets = Path(args.sets)
    layers = [int(x) for x in args.layers.split(",")]
    unknown = sorted(set(args.concepts.split(",")) - set(CONCEPTS))
    if unknown:
        print(f"error: unknown concept(s) {unknown}; choose among {list(CONCEPTS)}", file=sys.stderr)
        return 2
    concepts = {c: CONCEPTS[c] for c in args.concepts.split(",")}
    missing = [s for names, _ in concepts.values() for s in names if not (sets / f"{s}.jsonl").exists()]
    if missing:
        print(f"error: {sets} lacks {', '.join(sorted(set(missing)))}.jsonl; run "
              "`.venv/bin/python examples/recalibrate.py --steps build` first", file=sys.stderr)
        return 2
    loaded = load_model(None)
    cells: list[dict] = []
    t0 = time.time()
    for concept, (names, phase) in concepts.items():
        records = [r for s in names for r in load_records(sets / f"{s}.jsonl")]
        if phase:
            records = [r for r in records if phase_of_content(r.extra.get("wrapper", "plain")) == phase]
        records = subset(records, args.per_label)
        print(f"{concept}: {len(records)} records", file=sys.stderr)
        X = pooled(loaded.model, loaded.tokenizer, records, layers, max_tokens=args.max_tokens,
                   batch_size=args.batch_size)
        y = np.array([int(r.extra["label"]) for r in records])
        held = np.array([is_held_out(str(r.extra.get("base_id", r.id)), 0.3) for r in records])
        wrappers = np.array([wrapper_family(r.extra.get("wrapper", "plain")) for r in records])
        groups = np.array([str(r.extra.get("group", "")) for r in records])
        rows: dict[str, list] = defaultdict(list)
        for j in range(len(layers)):
            s = probe_aurocs(X[:, j], y, ~held)
            masks = {"all": held}
            masks.update({f"wrapper {w}": held & (wrappers == w) for w in sorted(set(wrappers))})
            if concept in HARD:
                name, pos, neg = HARD[concept]
                masks[name] = held & (np.isin(groups, list(pos)) | np.isin(groups, list(neg)))
                y_hard = np.isin(groups, list(pos)).astype(int)
            for cell, m in masks.items():
                yy = y_hard[m] if concept in HARD and cell == HARD[concept][0] else y[m]
                auc = float(feature_aurocs(s[m, None], yy)[0]) if 0 < yy.sum() < len(yy) else float("nan")
                rows[cell].append(auc)
                cells.append({"concept": concept, "cell": cell, "layer": layers[j], "auroc": auc,
                              "n": int(m.sum()), "pos": int(yy.sum())})
        for cell, aucs in rows.items():
            n = next(c["n"] for c in cells if c["concept"] == concept and c["cell"] == cell)
            print(f"| {concept} | {cell} | {n} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |")
        sys.stdout.flush()
    print(f"layers {layers}; {time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": layers, "cells": cells}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
