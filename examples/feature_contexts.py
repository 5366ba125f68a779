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
import heapq
import json
import sys
from pathlib import Path

import torch

OUTLIER = 3.0  # × the median token norm of the file


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
    from featurewatch.calibration.extract import TokenActs
    from featurewatch.models import load_tokenizer
    from featurewatch.pack import DEFAULT_PACK, load_pack
    from featurewatch.positions import excluded_positions
    from featurewatch.records import load_records, render

    pack = load_pack(args.pack or DEFAULT_PACK)
    hp = next(iter(pack.saes))
    features = sorted({int(f) for f in args.features.split(",") if f.strip()})
    enc = pack.saes[hp].subset(features)
    tok = load_tokenizer()
    cache = Path(args.cache)
    heaps: dict[int, list[tuple[float, str]]] = {f: [] for f in features}
    for prepared in sorted((cache / "prepared").glob("*.jsonl")):
        first = prepared.open(encoding="utf-8").readline()
        if "fw_group" in first:  # an older prepared format (same contents as a newer file): skip the copy
            continue
        pts = sorted(cache.glob(f"{prepared.stem}-*.pt"))
        if not pts:
            continue
        acts = TokenActs.load(pts[0])
        records = load_records(prepared)
        if acts.ids != [r.id for r in records]:
            continue
        norm_median = float(acts.acts.float().norm(dim=1).median())
        for i, rec in enumerate(records):
            start, end = int(acts.offsets[i]), int(acts.offsets[i + 1])
            if end == start:
                continue
            r = render(rec, tok, max_tokens=args.max_tokens)
            ids = torch.tensor([r.ids])
            drop = excluded_positions(ids, torch.ones_like(ids), tok.all_special_ids)[0]
            keep = ~drop
            keep[: len(r.content)] &= torch.tensor(r.content, dtype=torch.bool)
            positions = keep.nonzero().flatten().tolist()
            if len(positions) != end - start:
                continue  # rendered differently from the cache (another budget): skip, never misalign
            x = acts.acts[start:end].float()
            with torch.no_grad():
                a = enc(x)
            # a token with an outlier norm (a few content tokens carry one) lights up every feature at once:
            # its context says nothing about any one feature
            a[x.norm(dim=1) > OUTLIER * norm_median] = 0
            for j, f in enumerate(features):
                col = a[:, j]
                k = int(col.argmax())
                v = float(col[k])
                if v <= 0:
                    continue
                p = positions[k]
                before = tok.decode(r.ids[max(0, p - args.width):p])
                after = tok.decode(r.ids[p + 1:p + 4])
                ctx = f"{before}«{tok.decode([r.ids[p]])}»{after}".replace("\n", "⏎")
                h = heaps[f]
                if len(h) < args.top:
                    heapq.heappush(h, (v, ctx))
                elif v > h[0][0]:
                    heapq.heapreplace(h, (v, ctx))
        print(f"{prepared.name}: done", file=sys.stderr)
    out = {str(f): [c for _, c in sorted(heaps[f], reverse=True)] for f in features}
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote contexts of {len(features)} features to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
