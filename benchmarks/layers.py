"""Where do the concepts live? A dense probe per layer, concept and phase, leave-one-source-out (issue 16 §2).

One forward pass per record keeps the residual at several layers; each (record, phase) row is the
mean over its content tokens in that phase, as calibration pools them. The data is ``dev/multi``
(several public sources per label), prepared as ``featurewatch calibrate --group-by source`` prepares
it (benchmarks/multi_source.py: same wrappers, same benign pools). For each concept and layer the
product's dense probe (:func:`featurewatch.calibration.loso.fit_decision` ``"probe"``) is fitted
leaving one source out at a time (benign pools left out per file) and scores the source left out;
per phase the table gives the AUROC of those out-of-source scores pooled, the worst source (within it
where it holds both labels, else its one class against the other class of every source), and the
positives against the hard negatives (text that looks like the concept and is not).

    .venv/bin/python benchmarks/layers.py --layers 3,6,9,12,15,18,21,24,27 --json runs/layers.json
    .venv/bin/python benchmarks/layers.py --concepts scam-email --layers 9,15 --max-per-group 8   # a quick look

Prints a Markdown table (rows: concept × phase × cell; columns: layers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_source import CONCEPTS, ROOT, checked, default_data, prepared  # noqa: E402

from featurewatch.calibration.loso import PHASES, group_report, out_of_fold, task_rows  # noqa: E402
from featurewatch.calibration.metrics import auroc  # noqa: E402
from featurewatch.hooks import forward_until  # noqa: E402
from featurewatch.positions import excluded_positions  # noqa: E402
from featurewatch.records import load_records, pad_right, render  # noqa: E402


@torch.inference_mode()
def pooled(model: Any, tokenizer: Any, records: list, layers: list[int], *, max_tokens: int,
           batch_size: int) -> list[dict[str, np.ndarray]]:
    """Per layer, what :func:`featurewatch.calibration.loso.task_rows` reads: per phase the mean residual over
    each record's content tokens in that phase (``resid_<phase>``) and their count (``n_<phase>``)."""
    hps = [f"layers.{i}" for i in layers]
    rendered = [render(r, tokenizer, max_tokens=max_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(rendered[i].ids))
    d = model.config.hidden_size
    out = [{**{f"resid_{p}": np.zeros((len(records), d), dtype=np.float32) for p in PHASES},
            **{f"feats_{p}": np.zeros((len(records), 1), dtype=np.float32) for p in PHASES},
            **{f"n_{p}": np.zeros(len(records), dtype=int) for p in PHASES}} for _ in layers]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_right([rendered[i].ids for i in idx], tokenizer.pad_token_id)
        acts = forward_until(model, ids, mask, hps)
        drop = excluded_positions(ids, mask, tokenizer.all_special_ids)
        for row, i in enumerate(idx):
            rd = rendered[i]
            keep = ~drop[row]
            keep[:len(rd.ids)] &= torch.tensor(rd.content, dtype=torch.bool)
            pos = torch.arange(keep.numel())
            for p in PHASES:
                sel = keep & ((pos >= rd.n_prompt) if p == "completion" else (pos < rd.n_prompt))
                if not sel.any():
                    continue
                for j, hp in enumerate(hps):
                    out[j][f"resid_{p}"][i] = acts[hp][row, sel].float().mean(0).numpy()
                    out[j][f"n_{p}"][i] = int(sel.sum())
        print(f"\r  {min(s + batch_size, len(order))}/{len(order)} records", end="", file=sys.stderr)
    print(file=sys.stderr)
    return out


def cells(rows: Any, scores: np.ndarray, phases: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per phase: AUROC, positives and negatives of the out-of-source scores, pooled, on the worst source (named)
    and against the hard negatives."""
    out: dict[str, dict[str, Any]] = {}
    for ph in phases:
        m = (rows.phase == ph) & np.isfinite(scores)
        y = rows.y[m]
        if y.min(initial=1) == y.max(initial=0):
            continue
        out[f"{ph}: all sources"] = {"auroc": auroc(scores[m], y), "pos": int(y.sum()), "neg": int((y == 0).sum())}
        sub = rows.take(m)
        own = set(sub.group[sub.kind != "pool"].tolist())
        table = [r for r in group_report(sub, scores[m], np.zeros(int(m.sum()), dtype=bool))
                 if r["group"] in own and r.get("auroc") is not None]
        if table:
            w = min(table, key=lambda r: r["auroc"])
            out[f"{ph}: worst source"] = {"auroc": w["auroc"], "pos": w["n_pos"], "neg": w["n_neg"],
                                          "source": w["group"]}
        hard = m & ((rows.y == 1) | (rows.kind == "hard_neg"))
        yh = rows.y[hard]
        if 0 < yh.sum() < len(yh):
            out[f"{ph}: vs hard negatives"] = {"auroc": auroc(scores[hard], yh), "pos": int(yh.sum()),
                                               "neg": int((yh == 0).sum())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data(), help="shared data directory (reads dev/multi/*.jsonl; "
                    "default $DATA or ../shared/data)")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", default="3,6,9,12,15,18,21,24,27")
    ap.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated subset of the concepts")
    ap.add_argument("--max-per-group", type=int, default=40,
                    help="records per (source, kind, label, wrapper) cell of each file, by hash of id")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "layers"), help="where the prepared records are written")
    ap.add_argument("--json", nargs="?", const="-", help="write every cell as JSON to this file ('-' or no value: "
                    "the last line of stdout)")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    ok = checked(args.concepts, args.data)
    if ok is None:
        return 2
    concepts, data = ok
    from featurewatch.calibration.loso import Rows
    from featurewatch.models import load_model

    loaded = load_model(args.model)
    found: list[dict[str, Any]] = []
    t0 = time.time()
    print("| concept | cell | pos | neg | " + " | ".join(f"L{i}" for i in layers) + " |")
    print("|---|---|---|---|" + "---|" * len(layers))
    for concept in concepts:
        phases, _ = CONCEPTS[concept]
        files = prepared(data, concept, max_per_group=args.max_per_group, cache=Path(args.cache))
        per_layer: list[list[Any]] = [[] for _ in layers]
        for path, recs in files:
            print(f"{concept}: {path.name} ({len(recs)} records)", file=sys.stderr)
            pooled_l = pooled(loaded.model, loaded.tokenizer, load_records(path), layers, max_tokens=args.max_tokens,
                              batch_size=args.batch_size)
            for j, p in enumerate(pooled_l):
                r = task_rows(recs, p, phases)
                if len(r):
                    per_layer[j].append(r)
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for j, layer in enumerate(layers):
            rows = Rows.concat(per_layer[j])
            scores = out_of_fold("probe", rows, rows.fold)
            for cell, v in cells(rows, scores, phases).items():
                by_cell.setdefault(cell, []).append(v)
                found.append({"concept": concept, "cell": cell, "layer": layer, **v})
        f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        for cell, vals in by_cell.items():  # the worst source may differ by layer: named per layer
            n = "— | —" if "source" in vals[0] else f"{vals[0]['pos']} | {vals[0]['neg']}"
            print(f"| {concept} | {cell} | {n} | "
                  + " | ".join(f(v["auroc"]) + (f" ({v['source']})" if "source" in v else "") for v in vals) + " |")
        sys.stdout.flush()
    print(f"layers {layers}; {time.time() - t0:.0f} s", file=sys.stderr)
    result = {"layers": layers, "group_by": "source", "max_per_group": args.max_per_group, "cells": found}
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
