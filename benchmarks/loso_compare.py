"""Two packs' detectors side by side, one whole public source left out at a time.

Reads each spec's ``calibration.out_of_source`` (figures from fits that never saw the source, at the
thresholds the pack ships) for the sources found in ``DATA/dev/multi``, worst first by the new pack.

    python benchmarks/loso_compare.py --old f3c1b15 [--new DIR] [--data ../shared/data]

``--old`` is a git revision whose ``detectors/smollm2-135m-instruct`` is the old pack (or a directory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = "detectors/smollm2-135m-instruct"
DETECTORS = ("scam-email", "dangerous-content", "deception", "sycophancy")


def spec(where: str, name: str) -> dict:
    if Path(where).is_dir():
        return json.loads((Path(where) / f"{name}.json").read_text())
    return json.loads(subprocess.check_output(["git", "show", f"{where}:{PACK}/{name}.json"], cwd=ROOT))


def f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def table(old: str, new: str, data: Path) -> str:
    sources = set()
    for p in (data / "dev" / "multi").glob("*.jsonl"):
        with open(p, encoding="utf-8") as fh:
            sources |= {json.loads(line)["source"] for line in fh}
    out = []
    for d in DETECTORS:
        o, n = spec(old, d)["calibration"]["out_of_source"], spec(new, d)["calibration"]["out_of_source"]
        go, gn = ({g["group"]: g for g in x["groups"]} for x in (o, n))
        same = go == gn
        out.append(f"\n**{d}** — {o['decision']} → {n['decision']}; pooled out-of-source AUROC {f(o['auroc'])} → "
                   f"{f(n['auroc'])}, recall {f(o['recall'])} → {f(n['recall'])}, FPR {f(o['fpr'])} → {f(n['fpr'])}"
                   + (" (every per-source figure identical)" if same else "") + "\n")
        out += ["| left-out source (dev/multi) | pos | neg | AUROC old → new | recall | FPR (its negatives) |",
                "|---|---|---|---|---|---|"]
        rows = sorted((g for g in gn if g in sources),
                      key=lambda g: (gn[g].get("auroc") is None, gn[g].get("auroc") or 0))
        for g in rows:
            a, b = go.get(g, {}), gn[g]

            def fp(x: dict) -> float | None:
                return x.get("fpr_neg") if x.get("fpr_neg") is not None else x.get("fpr_pool")

            out.append(f"| {g} | {b['n_pos']} | {b['n_neg']} | {f(a.get('auroc'))} → {f(b.get('auroc'))} | "
                       f"{f(a.get('recall'))} → {f(b.get('recall'))} | {f(fp(a))} → {f(fp(b))} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision (its shipped pack) or a pack directory")
    ap.add_argument("--new", default=str(ROOT / PACK),
                    help="git revision or pack directory (default: the working tree's)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    if not (Path(args.data) / "dev" / "multi").is_dir():
        print(f"error: {args.data} has no dev/multi (pass --data DIR)", file=sys.stderr)
        return 2
    print(table(args.old, args.new, Path(args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
