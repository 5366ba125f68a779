"""Top-activating contexts of chosen SAE features, from the activations calibration already cached.

`featurewatch calibrate --group-by` keeps every prepared file's token residuals under its cache
(``<cache>/prepared/*.jsonl`` and ``<cache>/*.pt``). This script re-tokenises those records (no
model run), encodes the cached residuals into the given features only, and writes each feature's
strongest contexts (the token in « ») — what a person reads to label a feature without being told
which detector reads it. The pack's features.json keeps only two contexts for features no detector
read before, too few to label from.

Usage: python examples/feature_contexts.py --cache runs/calibrate/acts --features 12,873 --out contexts.json
       [--pack detectors/smollm2-135m-instruct] [--top 8] [--width 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--features", required=True, help="comma-separated feature ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", default=None)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--width", type=int, default=12, help="tokens of context before the token")
    ap.add_argument("--max-tokens", type=int, default=160,
                    help="the --max-tokens the activations were extracted with (records are re-rendered alike)")
    args = ap.parse_args()
    from featurewatch.calibration.contexts import cached_contexts
    from featurewatch.models import load_tokenizer
    from featurewatch.pack import DEFAULT_PACK, load_pack

    pack = load_pack(args.pack or DEFAULT_PACK)
    hp = next(iter(pack.saes))
    features = sorted({int(f) for f in args.features.split(",") if f.strip()})
    cache = Path(args.cache)
    files = []
    for prepared in sorted((cache / "prepared").glob("*.jsonl")):
        if "fw_group" in prepared.open(encoding="utf-8").readline():
            continue  # an older prepared format (same contents as a newer file): skip the copy
        pts = sorted(cache.glob(f"{prepared.stem}-*.pt"))
        if pts:
            files.append((prepared, pts[0]))
    found = cached_contexts(files, pack.saes[hp], load_tokenizer(), features, max_tokens=args.max_tokens,
                            top=args.top, width=args.width, log=lambda m: print(m, file=sys.stderr))
    out = {str(f): found[f] for f in features}
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote contexts of {len(features)} features to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
