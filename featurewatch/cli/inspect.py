"""``featurewatch inspect``: a feature's statistics, top-activating contexts and neighbours, for labelling.

``--neighbours K`` adds the K nearest features by decoder cosine (and, with
``--corpus``, by co-activation there), each with its label, density and top
context; ``--map OUT.png`` draws the neighbourhood (:mod:`featurewatch.neighbours`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import NON_NEGATIVE, POSITIVE, CLIError, check_input, load_model, open_output, progress

MAP_NEIGHBOURS = 32
"""The most neighbours ``--map`` draws: every point is labelled, and past a few dozen the labels are ink."""


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="a feature's statistics and top-activating contexts")
    p.add_argument("features", type=NON_NEGATIVE, nargs="+", metavar="FEATURE", help="feature id(s) in the SAE")
    p.add_argument("--pack", default=None, help="pack name or directory (default: smollm2-135m-instruct)")
    p.add_argument("--hookpoint", help="the SAE's hookpoint, layers.N or SAELens blocks.N.hook_resid_post "
                                       "(default: the pack's first)")
    p.add_argument("--corpus", help="JSONL records to find top contexts in (default: the pack's stored ones)")
    p.add_argument("--records", type=POSITIVE, default=400, help="records of --corpus to scan (>= 1)")
    p.add_argument("--model", help="model for --corpus (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--neighbours", type=POSITIVE, metavar="K", help=(
        "the K nearest features by decoder cosine (and by co-activation on --corpus), with label, density and "
        "top context"))
    p.add_argument("--map", metavar="OUT.png", help=(
        "write a 2-D map of one FEATURE's neighbourhood: PCA of the decoder directions of it and its "
        f"--neighbours K (default 8, at most {MAP_NEIGHBOURS}) nearest, points labelled"))
    p.add_argument("--json", action="store_true", help="one JSON object per feature")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..display import feature_name
    from ..models import normalize_hookpoint
    from ..pack import DEFAULT_PACK, load_pack
    from ..records import load_records

    corpus = check_input(args.corpus, "--corpus") if args.corpus else None
    # every line of the corpus is checked now: a malformed one is an error naming it, before the model loads
    records = load_records(corpus) if corpus is not None else []
    if args.map and args.neighbours and args.neighbours > MAP_NEIGHBOURS:
        raise CLIError(f"--neighbours {args.neighbours}: --map labels every point, so it draws at most "
                       f"{MAP_NEIGHBOURS} neighbours; give --neighbours 1 … {MAP_NEIGHBOURS}")
    pack = load_pack(args.pack or DEFAULT_PACK)
    hp = normalize_hookpoint(args.hookpoint) if args.hookpoint else next(iter(pack.saes))  # SAELens names too
    sae = pack.saes.get(hp)
    if sae is None:
        raise CLIError(f"--hookpoint {hp}: pack {pack.name} has no SAE there; valid: {', '.join(pack.saes)}")
    from ..sae import check_feature_ids

    check_feature_ids(sae, args.features, hookpoint=hp)
    if args.map:
        if len(args.features) != 1:
            raise CLIError(f"--map draws one feature's neighbourhood; give one FEATURE, not {len(args.features)}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--map needs matplotlib: pip install 'featurewatch[plot]'") from None
        open_output(args.map, "--map").close()  # a bad path fails now, not after the corpus pass
    k = args.neighbours or (8 if args.map else 0)
    live: dict[int, list[Any]] = {}
    coactive: dict[int, list[Any]] = {}
    if corpus is not None:
        from ..calibration.discover import top_contexts
        from ..neighbours import coactivation_neighbours

        loaded = load_model(args)
        live = top_contexts(loaded.model, loaded.tokenizer, sae, hp, str(corpus), list(args.features),
                            n_records=args.records, progress=progress())
        if args.neighbours:
            coactive = coactivation_neighbours(loaded.model, loaded.tokenizer, sae, hp,
                                               records[:args.records], list(args.features),
                                               args.neighbours, progress=progress())
    out = []
    for feature in args.features:
        summary = pack.feature_summary(hp, feature)
        row = {"feature": feature, "hookpoint": hp, "name": feature_name(pack, hp, feature, 200),
               "label": summary["label"], "max_activation": summary["max_activation"],
               "density": summary["density"], "used_by": [u["detector"] for u in summary["used_by"]],
               "top_contexts": live.get(feature, []) if corpus else summary["top_contexts"]}
        if args.neighbours:
            row["neighbours"] = neighbours_of(pack, hp, feature, args.neighbours, coactive.get(feature)
                                              if corpus else None)
        out.append(row)
    if args.map:
        from ..neighbours import decoder_neighbours, draw_map

        feature = args.features[0]
        near = decoder_neighbours(sae, feature, k)
        names = {f: feature_name(pack, hp, f, 60) for f in [feature, *(n.feature for n in near)]}
        labels = {f: name.split(" ", 1)[1] if " " in name else "" for f, name in names.items()}
        path = draw_map(sae, feature, near, labels, args.map,
                        title=f"#{feature} and its {len(near)} nearest by decoder cosine ({pack.name}, {hp})")
        print(f"map written to {path}", file=sys.stderr)
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
        for kind, title in (("decoder", "by decoder cosine"), ("coactivation", f"by co-activation in {args.corpus} "
                                                                                "(Jaccard of firing tokens)")):
            if kind in row.get("neighbours", {}):
                print(f"  nearest features {title}:")
                for n in row["neighbours"][kind]:
                    print("    " + neighbour_line(n, "cosine" if kind == "decoder" else "jaccard"))
        print()
    return 0


def neighbours_of(pack: Any, hp: str, feature: int, k: int, coactive: list[Any] | None) -> dict[str, Any]:
    """``{"decoder": [...], "coactivation": [...]}`` (the latter only when a corpus was read)."""
    from ..neighbours import decoder_neighbours, describe

    out = {"decoder": [describe(pack, hp, n, "cosine") for n in decoder_neighbours(pack.saes[hp], feature, k)]}
    if coactive is not None:
        out["coactivation"] = [describe(pack, hp, n, "jaccard") for n in coactive]
    return out


def neighbour_line(n: dict[str, Any], key: str) -> str:
    density = "—" if n["density"] is None else f"{n['density']:.4f}"
    context = f"  {n['top_context']}" if n["top_context"] else ""
    name = n["name"].split(" ", 1)[1] if " " in n["name"] else "(unlabelled)"
    return f"#{n['feature']:<6} {key} {n[key]:+.3f}  density {density}  {name}{context}"
