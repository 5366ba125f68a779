"""``featurewatch inspect``: a feature's statistics and top-activating contexts, for labelling."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import FeatureOutOfRange
from ._common import NON_NEGATIVE, POSITIVE, CLIError, check_input, load_model, progress


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="a feature's statistics and top-activating contexts")
    p.add_argument("features", type=NON_NEGATIVE, nargs="+", metavar="FEATURE", help="feature id(s) in the SAE")
    p.add_argument("--pack", default=None, help="pack name or directory (default: smollm2-135m-instruct)")
    p.add_argument("--hookpoint", help="the SAE's hookpoint (default: the pack's first)")
    p.add_argument("--corpus", help="JSONL records to find top contexts in (default: the pack's stored ones)")
    p.add_argument("--records", type=POSITIVE, default=400, help="records of --corpus to scan (>= 1)")
    p.add_argument("--model", help="model for --corpus (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="one JSON object per feature")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..display import feature_name
    from ..pack import DEFAULT_PACK, load_pack

    corpus = check_input(args.corpus, "--corpus") if args.corpus else None
    pack = load_pack(args.pack or DEFAULT_PACK)
    hp = args.hookpoint or next(iter(pack.saes))
    sae = pack.saes.get(hp)
    if sae is None:
        raise CLIError(f"--hookpoint {hp}: pack {pack.name} has no SAE there; valid: {', '.join(pack.saes)}")
    bad = [f for f in args.features if not 0 <= f < sae.d_sae]
    if bad:
        raise FeatureOutOfRange(f"feature(s) {bad} out of range; the SAE at {hp} has 0 … {sae.d_sae - 1}")
    live: dict[int, list[Any]] = {}
    if corpus is not None:
        from ..calibration.discover import top_contexts

        loaded = load_model(args)
        live = top_contexts(loaded.model, loaded.tokenizer, sae, hp, str(corpus), list(args.features),
                            n_records=args.records, progress=progress())
    out = []
    for feature in args.features:
        summary = pack.feature_summary(hp, feature)
        out.append({"feature": feature, "hookpoint": hp, "name": feature_name(pack, hp, feature, 200),
                    "label": summary["label"], "max_activation": summary["max_activation"],
                    "density": summary["density"], "used_by": [u["detector"] for u in summary["used_by"]],
                    "top_contexts": live.get(feature, []) if corpus else summary["top_contexts"]})
    if args.json:
        for row in out:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    for row in out:
        print(f"{row['name']}  (pack {pack.name}, {hp})")
        print(f"  max activation {row['max_activation']}, firing density {row['density']}")
        if row["used_by"]:
            print(f"  used by detectors: {', '.join(row['used_by'])}")
        print("  top-activating contexts (the token in «»)" + (f" in {args.corpus}:" if corpus else ":"))
        for c in row["top_contexts"]:
            print(f"    {c}" if isinstance(c, str) else f"    [{c['activation']:6.2f}] {c['context']}")
        print()
    return 0
