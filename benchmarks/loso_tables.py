"""Markdown tables from `featurewatch calibrate --group-by ... --report R.json [--baseline OLD_PACK]` reports.

Per detector: the decisions side by side (in-split vs out-of-source), the baseline pack on the same
records, and per left-out source, worst first, the shipped decision's AUROC, recall and FPR next to
the baseline's.
Sources the baseline pack was itself fitted on are marked † (its figure there is not out of source).

Usage: python benchmarks/loso_tables.py runs/calibrate/scam-email.json [...] [--seen SRC,SRC]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the sources the v0.2.0 pack (fitted by the retired examples/recalibrate.py) saw: the older dev splits, our
# hand-written sets and the chat corpus
SEEN_BY_V020 = ("phishing_pot", "csdmc2010_ham", "refusal_direction/harmful_train", "alpaca_harmless_train",
                "jailbreakbench_ablated_reply", "alpaca_reply", "truthfulqa", "geometry_of_truth/",
                "caa_sycophancy", "nrimsky_agree_disagree", "handwritten-", "alpaca_eval/", "synthetic_persona_chat")


def f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def seen(group: str, marks: tuple[str, ...]) -> bool:
    return any(group == m or (m.endswith(("/", "-")) and group.startswith(m)) for m in marks)


def tables(report: dict, marks: tuple[str, ...]) -> str:
    d = report["detector"]
    out = [f"#### {d} (watches {', '.join(report['phases'])}; shipped: **{report['chosen']}**)", "",
           f"Chosen because: {report['reason']}.", "",
           "| decision | in-split AUROC | out-of-source AUROC | worst source | recall | FPR |",
           "|---|---|---|---|---|---|"]
    for kind, res in report["kinds"].items():
        loso = res["loso"]
        worst = min((g for g in loso["groups"] if g["group"] in report["groups"] and g.get("auroc") is not None),
                    key=lambda g: g["auroc"], default=None)
        name = f"**{kind}**" if kind == report["chosen"] else kind
        out.append(f"| {name} (new) | {f(res.get('in_split', {}).get('auroc'))} | {f(loso['auroc'])} | "
                   f"{f(loso['worst_auroc'])} ({worst['group'] if worst else '—'}) | {f(loso['recall'])} | "
                   f"{f(loso['fpr'])} |")
    base = report.get("baseline") or {}
    for name, res in base.items():
        if isinstance(res, dict) and "auroc" in res:
            out.append(f"| v0.2.0 `{name}` | {f(res['in_split_auroc'])} (its split) | {f(res['auroc'])} (these "
                       f"records†) | {f(res['worst_auroc'])} | {f(res['recall'])} | {f(res['fpr'])} |")
    chosen = {g["group"]: g for g in report["kinds"][report["chosen"]]["loso"]["groups"]}
    old_name = report["detector"] if report["detector"] in base else None
    old = {g["group"]: g for g in base.get(old_name, {}).get("groups", [])} if old_name else {}
    out += ["", "| left-out source | pos | neg | AUROC | recall | FPR neg / hard / pool | v0.2.0 AUROC | v0.2.0 recall "
            "| v0.2.0 FPR neg / hard / pool |", "|---|---|---|---|---|---|---|---|---|"]
    pools = [g for g in chosen.values() if g["group"] not in report["groups"]]
    for g in sorted((chosen[k] for k in report["groups"]), key=lambda g: (g.get("auroc") is None, g.get("auroc"))):
        o = old.get(g["group"], {})
        mark = " †" if seen(g["group"], marks) else ""
        fprs = " / ".join(f(g.get(k)) for k in ("fpr_neg", "fpr_hard_neg", "fpr_pool"))
        ofprs = " / ".join(f(o.get(k)) for k in ("fpr_neg", "fpr_hard_neg", "fpr_pool"))
        out.append(f"| {g['group']}{mark} | {g['n_pos']} | {g['n_neg']} | {f(g.get('auroc'))} | {f(g.get('recall'))} "
                   f"| {fprs} | {f(o.get('auroc'))} | {f(o.get('recall'))} | {ofprs} |")
    if pools:
        n = sum(g["n_neg"] for g in pools)
        fired = sum((g.get("fpr_pool") or 0) * g["n_neg"] for g in pools)
        ofired = sum((old.get(g["group"], {}).get("fpr_pool") or 0) * g["n_neg"] for g in pools)
        out.append(f"| benign pools ({len(pools)} groups) | 0 | {n} | — | — | pool {f(fired / n)} | — | — | pool "
                   f"{f(ofired / n) if old else '—'} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--seen", default=",".join(SEEN_BY_V020), help="sources the baseline was fitted on (marked †)")
    args = ap.parse_args()
    marks = tuple(s for s in args.seen.split(",") if s)
    for path in args.reports:
        print(tables(json.loads(Path(path).read_text()), marks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
