"""How much of an alert's evidence sits on features whose label names the concept.

Scores labelled positives through the real runtime (``Monitor.score_records``: the pools, thresholds
and evidence an application gets) and, over the alerts they raise, sums each evidence feature's
contribution: the share on features whose label names the detector's concept (a keyword pass over the
labels, written blind from top contexts), the share on the rest, and — for a dense detector explained
in SAE features — the unexplained part. Also: how many positives alert, per source.

Usage: python benchmarks/evidence_share.py --input DETECTOR=F.jsonl [...] [--pack DIR] [--per-source 20]
       [--max-tokens 160] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# words in a feature's label that name each concept (lower-case substrings)
CONCEPT_WORDS = {
    "scam-email": ("scam", "phish", "fraud", "password", "login", "log in", "account", "verif", "bank", "payment",
                   "wire", "transfer", "invoice", "prize", "lottery", "urgent", "credential", "click", "link",
                   "suspend", "refund", "gift card", "bitcoin", "security", "claim", "winner", "money"),
    "dangerous-content": ("weapon", "bomb", "explos", "kill", "murder", "drug", "hack", "malware", "virus", "poison",
                          "violen", "attack", "steal", "harm", "gun", "illegal", "crime", "criminal", "danger",
                          "meth", "abuse", "suicide", "self-harm", "terror", "exploit", "fraud"),
    "deception": ("lie", "lying", "false", "deceiv", "decept", "mislead", "untrue", "fake", "incorrect", "wrong",
                  "dishonest", "truth"),
    "sycophancy": ("agree", "flatter", "prais", "complim", "opinion", "you're right", "correct", "great question",
                   "admir", "sycophan"),
}


def names_concept(detector: str, label: str | None) -> bool:
    text = (label or "").lower()
    return any(w in text for w in CONCEPT_WORDS.get(detector.removesuffix("-probe"), ()))


def sample(path: Path, per_source: int) -> list[Any]:
    from featurewatch.records import load_records

    by_source: dict[str, list[Any]] = defaultdict(list)
    for r in load_records(path):
        if r.extra.get("label") == 1:
            by_source[str(r.extra.get("source"))].append(r)
    out = []
    for recs in by_source.values():
        out += sorted(recs, key=lambda r: hashlib.sha256(("ev" + r.id).encode()).hexdigest())[:per_source]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, metavar="DETECTOR=F.jsonl")
    ap.add_argument("--pack", default=None)
    ap.add_argument("--per-source", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from featurewatch.models import load_model
    from featurewatch.monitor import Monitor
    from featurewatch.pack import DEFAULT_PACK, load_pack

    pack = load_pack(args.pack or DEFAULT_PACK)
    loaded = load_model(None)
    results: dict[str, Any] = {}
    for item in args.input:
        detector, _, path = item.partition("=")
        records = sample(Path(path), args.per_source)
        monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=[detector], model_name=loaded.name,
                          capture_text=False)
        try:
            runs = [run for _, run in monitor.score_records(records, batch_size=8, max_tokens=args.max_tokens)]
        finally:
            monitor.detach()
        concept = other = unexplained = 0.0
        alerted: dict[str, list[int]] = defaultdict(list)
        cited: dict[str, int] = defaultdict(int)
        for rec, run in zip(records, runs):
            alerts = [a for a in run.alerts if a.detector == detector]
            alerted[str(rec.extra.get("source"))].append(int(bool(alerts)))
            for a in alerts:
                for e in a.evidence:
                    if names_concept(detector, e.label):
                        concept += abs(e.contribution)
                        cited[f"#{e.feature} {e.label}"] += 1
                    else:
                        other += abs(e.contribution)
                unexplained += abs(a.unexplained or 0.0)
        listed = concept + other
        results[detector] = {
            "file": path, "records": len(records), "alerts": sum(sum(v) for v in alerted.values()),
            "alert_rate_by_source": {s: round(sum(v) / len(v), 3) for s, v in sorted(alerted.items())},
            "concept_share_of_listed_evidence": round(concept / listed, 3) if listed else None,
            "concept_share_with_unexplained": round(concept / (listed + unexplained), 3) if listed else None,
            "concept_features_cited": dict(sorted(cited.items(), key=lambda kv: -kv[1])[:8]),
        }
        print(f"{detector}: {results[detector]['alerts']}/{len(records)} positives alert; concept share of the "
              f"listed evidence {results[detector]['concept_share_of_listed_evidence']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        for d, r in results.items():
            print(f"{d}: {r['alerts']}/{r['records']} alert; concept share {r['concept_share_of_listed_evidence']} of "
                  f"the listed evidence, {r['concept_share_with_unexplained']} with the unexplained part")
            print(f"   by source: {r['alert_rate_by_source']}")
            print(f"   concept features cited: {r['concept_features_cited']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
