"""Concept features: the best single SAE features per concept, alone (issue 16 §4).

For each concept, every feature's pooled activation (mean over a record's content tokens in the
phase that holds the content) is scored as a detector on its own. Features are ranked on the fit
split and reported on the held-out split (texts whose sha256(base id) falls in the first 20 %,
every wrapper of a text together — the split `examples/recalibrate.py` reports on), per cell:

  prompt     the concept as a document or a user's message vs the same phase's negatives
  reply      the concept written as the assistant's reply vs the same phase's negatives
  look-alike the hand-written concept vs legitimate look-alikes in the same style (both phases)

A feature counts as a concept feature when prompt and reply AUROC are both >= 0.90 and the
look-alike AUROC >= 0.80. Needs the recalibration cache (examples/recalibrate.py --steps
build,extract); runs in a minute on cached activations:

    .venv/bin/python benchmarks/concept_features.py --json runs/concept_features.json
    .venv/bin/python benchmarks/concept_features.py --sae OLD/sae/layers.15 --features OLD/features.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from recalibrate import MAX_TOKENS, OUT, SETS  # noqa: E402
from recalibrate_fit import HOOK, load_rows  # noqa: E402

from featurewatch.calibration.fit import feature_aurocs  # noqa: E402
from featurewatch.calibration.rows import PhaseRows  # noqa: E402
from featurewatch.sae import SparseAutoencoder  # noqa: E402
from featurewatch.training.harvest import is_held_out  # noqa: E402

PACK = ROOT / "detectors" / "smollm2-135m-instruct"
# concept → its sets (label 1 = the concept), the sets that give negatives, the look-alike pair
CONCEPTS: dict[str, dict[str, Any]] = {
    "scam-email": dict(sets={"mail"}, neg={"neutral", "chats", "danger_alpaca", "danger_reply"},
                       pos_groups={"handwritten-scam"}, look_alike={"look-alike"}),
    "dangerous-content": dict(sets={"danger_prompt", "danger_alpaca", "danger_hw", "danger_reply"},
                              neg={"neutral", "chats", "mail"},
                              pos_groups={"handwritten-harmful", "harmful-requests"}, look_alike={"xstest-style"}),
    "deception": dict(sets={"deception"}, neg={"neutral", "chats"}, pos_groups=set(), look_alike=set()),
    "sycophancy": dict(sets={"sycophancy"}, neg={"neutral", "chats"}, pos_groups=set(), look_alike=set()),
}
CELLS = ("prompt", "reply", "look-alike")


def cell_xy(rows: PhaseRows, concept: dict[str, Any], cell: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels of one cell: rows in ``mask`` whose content sits in the cell's phase."""
    content = np.array(rows.content_phase)
    own = np.array([s in concept["sets"] for s in rows.sets])
    neg = np.array([s in concept["neg"] for s in rows.sets]) & (rows.labels == 0)
    if cell == "look-alike":
        groups = np.array(rows.groups)
        pick = mask & own & (np.isin(groups, list(concept["pos_groups"])) & (rows.labels == 1)
                             | np.isin(groups, list(concept["look_alike"])))
        phases = content
    else:
        phase = "prompt" if cell == "prompt" else "completion"
        pick = mask & (own | neg) & (content == phase)
        phases = np.full(len(content), phase)
    idx = np.flatnonzero(pick)
    X = np.stack([rows.feats[phases[i]][i] for i in idx]) if len(idx) else np.zeros((0, rows.feats["prompt"].shape[1]))
    y = np.where(own[idx], rows.labels[idx], 0)
    return X, y


def aurocs(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    if len(y) == 0 or y.min() == y.max():
        return None
    return feature_aurocs(X, y)


def analyse(rows: PhaseRows, info: dict[int, dict], top: int) -> dict[str, Any]:
    held = np.array([is_held_out(b, 0.2) for b in rows.base_ids])
    density = np.array([(info.get(f) or {}).get("density", np.nan) for f in range(rows.feats["prompt"].shape[1])])
    out: dict[str, Any] = {}
    for name, concept in CONCEPTS.items():
        fit = {c: aurocs(*cell_xy(rows, concept, c, ~held)) for c in CELLS}
        test = {c: aurocs(*cell_xy(rows, concept, c, held)) for c in CELLS}
        n = {c: dict(zip(("neg", "pos"), np.bincount(cell_xy(rows, concept, c, held)[1], minlength=2).tolist()))
             for c in CELLS}
        # rank on the fit split by the weakest of the cells the concept has
        have = [c for c in CELLS if fit[c] is not None]
        worst = np.min(np.stack([fit[c] for c in have]), axis=0)
        order = np.argsort(-worst)[:top]
        feats = []
        for f in order:
            row = {"feature": int(f), "label": (info.get(int(f)) or {}).get("label"),
                   "density": None if np.isnan(density[f]) else float(density[f]),
                   "fit_min_auroc": round(float(worst[f]), 3)}
            row.update({c: None if test[c] is None else round(float(test[c][f]), 3) for c in CELLS})
            row["concept_feature"] = bool(
                all(row[c] is not None and row[c] >= 0.90 for c in ("prompt", "reply"))
                and (row["look-alike"] is None or row["look-alike"] >= 0.80))
            feats.append(row)
        out[name] = {"n_held_out": n, "features": feats,
                     "concept_features": sum(r["concept_feature"] for r in feats)}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| concept | feature | label | density | prompt | reply | vs look-alike | counts |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name, res in result.items():
        for r in res["features"]:
            d = "—" if r["density"] is None else f"{r['density']:.4f}"
            lines.append(f"| {name} | {r['feature']} | {r['label'] or ''} | {d} | {f(r['prompt'])} | {f(r['reply'])} "
                         f"| {f(r['look-alike'])} | {'yes' if r['concept_feature'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=str(PACK / "sae" / HOOK), help="SAE directory (default: the pack's)")
    ap.add_argument("--features", default=str(PACK / "features.json"), help="features.json with labels, density")
    ap.add_argument("--top", type=int, default=8, help="features per concept")
    ap.add_argument("--json", help="write the result as JSON here")
    args = ap.parse_args()
    sae = SparseAutoencoder.load(args.sae)
    info = {f["id"]: f for f in json.loads(Path(args.features).read_text())[HOOK]}
    rows = load_rows(OUT, sae, {s: MAX_TOKENS.get(s, 128) for s in SETS})
    result = analyse(rows, info, args.top)
    print(markdown(result))
    for name, res in result.items():
        print(f"{name}: {res['concept_features']} concept feature(s) among the top {args.top}; "
              f"held-out cells {res['n_held_out']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
