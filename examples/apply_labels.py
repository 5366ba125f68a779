"""Put the hand-written feature labels into a pack: features.json and every spec that reads the feature.

Labels are written from each feature's top contexts by readers who are not told which detector reads
it (``examples/feature_contexts.py`` gathers the contexts); they live in examples/feature_labels.json
under the SAE's fingerprint (``featurewatch.calibration.sources.sae_fingerprint``, the key calibration's
caches use) and are applied only to that SAE (feature ids mean nothing across
dictionaries). ``--merge F.json`` adds a batch of new labels ({id: label}) to that file first.

Usage: python examples/apply_labels.py PACK [--merge labels.json ...] [--contexts contexts.json ...] [--trim]
  --contexts  top contexts the labels were written from (examples/feature_contexts.py): they become the
              feature's top_contexts where features.json holds fewer than three
  --trim      keep every top context for the features a detector reads or cites, two for the rest
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABELS = Path(__file__).resolve().parent / "feature_labels.json"
FEW_CONTEXTS = 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--merge", action="append", default=[])
    ap.add_argument("--contexts", action="append", default=[])
    ap.add_argument("--trim", action="store_true")
    args = ap.parse_args()
    from featurewatch.calibration.sources import sae_fingerprint
    from featurewatch.sae import SparseAutoencoder

    pack = Path(args.pack)
    manifest = json.loads((pack / "pack.json").read_text())
    (hp, rel), = manifest["hookpoints"].items()
    key = sae_fingerprint(SparseAutoencoder.load(pack / rel))
    stored = json.loads(LABELS.read_text())
    if stored["sae"] != key:
        print(f"error: {LABELS.name} holds labels for SAE {stored['sae']}, this pack's is {key}", file=sys.stderr)
        return 2
    for path in args.merge:
        new = json.loads(Path(path).read_text())
        stored["labels"].update({str(int(k)): str(v) for k, v in new.items()})
        print(f"merged {len(new)} labels from {path}", file=sys.stderr)
    if args.merge:
        stored["labels"] = dict(sorted(stored["labels"].items(), key=lambda kv: int(kv[0])))
        LABELS.write_text(json.dumps(stored, ensure_ascii=False, indent=1) + "\n")
    labels = {int(k): v for k, v in stored["labels"].items()}
    features = json.loads((pack / "features.json").read_text())
    for f in features[hp]:
        if f["id"] in labels:
            f["label"] = labels[f["id"]]
    gathered: dict[int, list[str]] = {}
    for path in args.contexts:
        gathered.update({int(k): v for k, v in json.loads(Path(path).read_text()).items() if v})
    for f in features[hp]:
        if len(f.get("top_contexts", [])) < 3 and f["id"] in gathered:
            f["top_contexts"] = gathered[f["id"]][:5]
    specs = [p for p in pack.glob("*.json") if p.name not in ("pack.json", "features.json")]
    used: set[int] = set()
    for path in specs:
        spec = json.loads(path.read_text())
        for field in ("features", "evidence_features"):
            for f in spec.get(field, []):
                used.add(f["id"])
                if f["id"] in labels:
                    f["label"] = labels[f["id"]]
        path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    if args.trim:
        for f in features[hp]:
            if f["id"] not in used:
                f["top_contexts"] = f["top_contexts"][:FEW_CONTEXTS]
    (pack / "features.json").write_text(json.dumps(features, ensure_ascii=False) + "\n")
    missing = sorted(used - set(labels))
    print(f"{len(used)} features read by the pack's specs; {len(used) - len(missing)} labelled"
          + (f"; unlabelled: {missing[:20]}" if missing else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
