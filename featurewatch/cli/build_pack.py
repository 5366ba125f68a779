"""``featurewatch build-pack``: your model and an SAE (yours, public, or trained here) → a calibrated pack.

The stages and what each writes: :mod:`featurewatch.calibration.build`; the
recipe format: :mod:`featurewatch.calibration.recipe`; the per-detector road
(the same one ``calibrate --group-by`` takes): :mod:`featurewatch.calibration.job`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._common import CLIError, check_output_dir, progress
from .train import add_train_options


def register(sub: Any) -> None:
    p = sub.add_parser("build-pack", help="build a calibrated detector pack for a model: SAE (given or trained), "
                       "leave-one-source-out detectors, model card")
    p.add_argument("--model", help="hub id, local directory or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="the pack directory to write (replaced only once the new pack is "
                   "whole)")
    p.add_argument("--sae", action="append", default=[], metavar="PATH[@HOOKPOINT]",
                   help="an SAE in any layout featurewatch reads (featurewatch/SAELens directory, EleutherAI "
                   "sparsify directory, Gemma Scope params.npz); @HOOKPOINT (layers.N or blocks.N.hook_resid_post) "
                   "where the file does not say; repeatable (detectors read the first)")
    p.add_argument("--train-sae", action="store_true", help="train the SAE here first (with the training options "
                   "below and --corpus)")
    p.add_argument("--corpus", action="append", default=[], help="with --train-sae: JSONL text to train on "
                   "(repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="directory the recipe's files are looked up in (repeatable, searched in order)")
    p.add_argument("--recipe", default="safety", help="a recipe JSON file, or a built-in recipe: safety (the "
                   "default pack's four detectors over the shared data layout)")
    p.add_argument("--detectors", metavar="A,B", help="build only these of the recipe's detectors")
    p.add_argument("--group-by", metavar="FIELD", help="the field whole groups are left out by (default: the "
                   "recipe's, normally source)")
    p.add_argument("--work", help="work directory: caches, training checkpoints, per-detector results "
                   "(default: OUT.build beside the pack)")
    p.add_argument("--resume", action="store_true", help="reuse the feature statistics and detector fits of an "
                   "earlier build in --work whose inputs are unchanged (activations and SAE training always resume)")
    p.add_argument("--force", action="store_true", help="replace an --out directory build-pack did not write")
    p.add_argument("--name", help="pack name (default: the --out directory's name)")
    p.add_argument("--version", default="0.1.0", help="pack version (default 0.1.0)")
    p.add_argument("--features", metavar="FILE", help="feature statistics and top contexts (train-sae's or a "
                   "pack's features.json) instead of measuring them on the calibration text")
    p.add_argument("--labels", metavar="FILE", help="feature labels {\"sae\": fingerprint, \"labels\": {id: label}} "
                   "for this SAE (e.g. examples/feature_labels.json)")
    p.add_argument("--description", help="the pack's description in pack.json and on its card (default: the "
                   "recipe's)")
    p.add_argument("--baseline", metavar="PACK", help="also score the same records with this pack's detectors of "
                   "the same names, per group (the pack as it was, to compare)")
    p.add_argument("--json", action="store_true", help="print the build report as JSON")
    g = p.add_argument_group("training (with --train-sae; as train-sae takes them)")
    add_train_options(g)
    p.set_defaults(func=cmd_build_pack)


def _sae_arg(spec: str) -> tuple[Path, str | None]:
    path, sep, hp = spec.rpartition("@")
    if not sep or not path:
        return Path(spec), None
    if not hp:
        raise CLIError(f"--sae {spec!r}: nothing after '@'; give PATH@layers.N or just PATH")
    return Path(path), hp


def cmd_build_pack(args: argparse.Namespace) -> int:
    from ..calibration.build import BuildRequest, TrainOptions, build_pack, say
    from ..calibration.recipe import load_recipe

    if bool(args.sae) == bool(args.train_sae):
        raise CLIError("give the SAE with --sae PATH[@HOOKPOINT], or --train-sae (with --corpus) to train one — "
                       "one of the two" if not args.sae else "--sae and --train-sae: give one of the two")
    if args.train_sae and not args.corpus:
        raise CLIError("--train-sae needs --corpus FILE (the text to train the SAE on)")
    if args.corpus and not args.train_sae:
        raise CLIError("--corpus is the text --train-sae trains on; add --train-sae or drop --corpus")
    if args.train_sae and args.k > args.d_sae:
        raise CLIError(f"--k {args.k} is larger than --d-sae {args.d_sae}; choose --k <= --d-sae")
    if args.mix is not None and len(args.mix) != len(args.corpus):
        raise CLIError(f"--mix has {len(args.mix)} share(s) for {len(args.corpus)} --corpus file(s); give one per "
                       "corpus")
    if not args.data:
        raise CLIError("--data DIR: where the recipe's labelled files are (e.g. --data ../shared/data)")
    data = []
    for d in args.data:
        if not Path(d).is_dir():
            raise CLIError(f"--data {d}: not a directory")
        data.append(Path(d))
    out = check_output_dir(args.out, "--out")
    work = check_output_dir(args.work, "--work") if args.work else out.with_name(out.name + ".build")
    recipe, where = load_recipe(args.recipe)
    only = [d.strip() for d in args.detectors.split(",") if d.strip()] if args.detectors else None
    train = None
    if args.train_sae:
        from ..training.train import TrainConfig

        train = TrainOptions(corpus=[Path(c) for c in args.corpus], hookpoint=args.hookpoint, tokens=args.tokens,
                             mix=args.mix, wrap_documents=args.wrap_documents, ctx=args.ctx,
                             config=TrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.epochs, lr=args.lr,
                                                seed=args.seed, batch_size=args.batch_size),
                             eval_tokens=args.eval_tokens, ce_tokens=args.ce_tokens)
    req = BuildRequest(out=out, work=work, recipe=recipe, recipe_where=where, data=data, model=args.model,
                       saes=[_sae_arg(s) for s in args.sae], train=train, detectors=only, group_by=args.group_by,
                       name=args.name, version=args.version, description=args.description,
                       baseline=Path(args.baseline) if args.baseline else None,
                       features=Path(args.features) if args.features else None,
                       labels=Path(args.labels) if args.labels else None, eval_tokens=args.eval_tokens,
                       ce_tokens=args.ce_tokens, resume=args.resume, force=args.force,
                       argv=args.argv[args.argv.index("build-pack") + 1:])
    report = build_pack(req, log=say, progress=progress())
    if args.json:
        from ..calibration.job import jsonable

        print(json.dumps(report, default=jsonable))
        return 0
    from .calibrate_grouped import print_report

    for r in report["reports"].values():
        print_report(r)
        print()
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["stages"].items())
    print(f"pack {report['pack']} ({len(report['reports'])} detectors); card {Path(report['pack']) / 'README.md'}")
    print(f"stage wall times: {stages}")
    return 0
