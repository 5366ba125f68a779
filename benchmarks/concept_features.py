"""Concept features: the best single SAE features per concept, alone, leave-one-source-out (issue 16 §4).

Each feature's pooled activation (mean over a record's content tokens in a phase) is scored as a
detector on its own, in three cells:

  prompt      the concept as a document or a user's message vs that phase's negatives
  reply       the concept as the assistant's reply vs that phase's negatives
  look-alike  the concept vs its hard negatives (text that looks like the concept and is not), both phases

The data is ``dev/multi`` (several public sources per label), prepared as ``featurewatch calibrate
--group-by source`` prepares it (benchmarks/multi_source.py). For each labelled source, the features are
ranked on the *other* sources by their weakest cell and the top ones are scored on the source left out
(within it where it holds both labels, else its one class against the other class of every source, as
``calibrate`` reports). A feature chosen without a source counts as a concept feature there when its
prompt and reply AUROC are >= 0.90 and its look-alike AUROC >= 0.80 (cells the source has).

    .venv/bin/python benchmarks/concept_features.py --json runs/concept_features.json
    .venv/bin/python benchmarks/concept_features.py --pack OLD_PACK        # another pack's SAE and labels
    .venv/bin/python benchmarks/concept_features.py --concepts scam-email --max-per-group 8   # a quick look

Activations are cached under --cache (one forward pass per prepared file, as calibrate caches them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_source import CONCEPTS, ROOT, checked, default_data, prepared  # noqa: E402

from featurewatch.calibration.fit import feature_aurocs  # noqa: E402

CELLS = ("prompt", "reply", "look-alike")
BAR = {"prompt": 0.90, "reply": 0.90, "look-alike": 0.80}


def cell_mask(rows: Any, cell: str) -> np.ndarray:
    if cell == "look-alike":
        return (rows.y == 1) | (rows.kind == "hard_neg")
    return rows.phase == ("prompt" if cell == "prompt" else "completion")


def aurocs(rows: Any, mask: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    y = rows.y[mask]
    if len(y) == 0 or y.min() == y.max():
        return None
    return feature_aurocs(rows.feats[np.ix_(mask, cols)], y)


def scored_mask(rows: Any, in_cell: np.ndarray, left_out: np.ndarray) -> np.ndarray:
    """The left-out source's rows of a cell; where it holds one class only, with the other class of every source."""
    mine = in_cell & left_out
    classes = set(rows.y[mine].tolist())
    if len(classes) != 1:
        return mine
    (c,) = classes
    return mine | (in_cell & (rows.y != c))


def analyse(rows: Any, info: dict[int, Any], top: int) -> dict[str, Any]:
    """Per left-out source: the ``top`` features ranked on the other sources, scored on it."""
    cols = np.flatnonzero((rows.feats > 0).mean(0) >= 0.01)  # features that fire; the rest cannot separate
    labelled = sorted({str(f) for f, k in zip(rows.fold, rows.kind) if k != "pool"})
    cells = {c: cell_mask(rows, c) for c in CELLS}
    out: dict[str, Any] = {}
    for g in labelled:
        left_out = rows.fold == g
        fit = [a for a in (aurocs(rows, m & ~left_out, cols) for m in cells.values()) if a is not None]
        if not fit:
            continue
        worst = np.min(np.stack(fit), axis=0)
        order = np.argsort(-worst)[:top]
        test = {c: aurocs(rows, scored_mask(rows, m, left_out), cols[order]) if (m & left_out).any() else None
                for c, m in cells.items()}
        feats = []
        for j, i in enumerate(order):
            f = int(cols[i])
            row: dict[str, Any] = {"feature": f, "label": (info.get(f) or {}).get("label"),
                                   "fit_min_auroc": round(float(worst[i]), 3)}
            row.update({c: None if (t := test[c]) is None else round(float(t[j]), 3) for c in CELLS})
            scored = [c for c in CELLS if row[c] is not None]
            row["concept_feature"] = bool(scored) and all(row[c] >= BAR[c] for c in scored)
            feats.append(row)
        n = {c: {"pos": int((m & left_out & (rows.y == 1)).sum()), "neg": int((m & left_out & (rows.y == 0)).sum())}
             for c, m in cells.items()}
        out[g] = {"n": n, "features": feats}
    return out


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The best feature chosen without each source, on that source: its weakest cell, and the worst source."""
    per = {}
    for g, res in result.items():
        best = res["features"][0]
        vals = [best[c] for c in CELLS if best[c] is not None]
        per[g] = min(vals) if vals else None
    scored = {g: v for g, v in per.items() if v is not None}
    worst = min(scored, key=lambda g: scored[g]) if scored else None
    return {"sources": len(result), "worst_source": worst, "worst_auroc": scored.get(worst) if worst else None,
            "sources_with_a_concept_feature": sum(any(r["concept_feature"] for r in res["features"])
                                                  for res in result.values())}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| concept | left-out source | best feature chosen without it | label | fit (weakest cell) | prompt | "
             "reply | vs look-alike | bar met |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name, result in results.items():
        for g, res in result.items():
            r = res["features"][0]
            lines.append(f"| {name} | {g} | {r['feature']} | {r['label'] or ''} | {f(r['fit_min_auroc'])} | "
                         f"{f(r['prompt'])} | {f(r['reply'])} | {f(r['look-alike'])} | "
                         f"{'yes' if r['concept_feature'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data(), help="shared data directory (reads dev/multi/*.jsonl; "
                    "default $DATA or ../shared/data)")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--pack", default=str(ROOT / "detectors" / "smollm2-135m-instruct"),
                    help="pack whose SAE and feature labels are read (default: the shipped pack)")
    ap.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated subset of the concepts")
    ap.add_argument("--max-per-group", type=int, default=40,
                    help="records per (source, kind, label, wrapper) cell of each file, by hash of id")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--top", type=int, default=8, help="features per left-out source")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "concept_features"), help="activation cache")
    ap.add_argument("--json", nargs="?", const="-", help="write the result as JSON to this file ('-' or no "
                    "value: the last line of stdout)")
    args = ap.parse_args()
    ok = checked(args.concepts, args.data)
    if ok is None:
        return 2
    concepts, data = ok
    from featurewatch.calibration.sources import load_rows
    from featurewatch.models import load_model
    from featurewatch.pack import load_pack

    pack = load_pack(args.pack)
    hp = next(iter(pack.saes))
    info = {i: f.model_dump() for i, f in pack.features.get(hp, {}).items()}
    loaded = load_model(args.model)
    cache = Path(args.cache)
    results: dict[str, dict[str, Any]] = {}
    for name in concepts:
        phases, _ = CONCEPTS[name]
        rows = load_rows(prepared(data, name, max_per_group=args.max_per_group, cache=cache), model=loaded.model,
                         tokenizer=loaded.tokenizer, model_name=loaded.name, sae=pack.saes[hp], hookpoint=hp,
                         phases=list(phases), max_tokens=args.max_tokens, cache_dir=cache,
                         log=lambda m: print(m, file=sys.stderr))
        results[name] = analyse(rows, info, args.top)
    print(markdown(results))
    out = {name: {"summary": summary(r), "sources": r} for name, r in results.items()}
    for name, res in out.items():
        s = res["summary"]
        print(f"{name}: the best feature chosen without a source, on it: worst {s['worst_source']} "
              f"{s['worst_auroc']}; a concept feature among the top {args.top} on "
              f"{s['sources_with_a_concept_feature']}/{s['sources']} sources")
    if args.json == "-":
        print(json.dumps(out))
    elif args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
