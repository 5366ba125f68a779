"""``featurewatch discover``, ``calibrate``, ``eval`` and ``explain``.

Find features, fit detectors, measure them and show them.

The fitting and measuring live in :mod:`featurewatch.calibration`; this module
reads the options, checks them before the model loads, and prints reports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..detector import MAX_SAE_FEATURES
from ._common import (
    NON_NEGATIVE,
    POSITIVE,
    CLIError,
    add_model_args,
    check_input,
    check_output_dir,
    float_range,
    int_range,
    load_model,
    load_pack_checked,
    progress,
)

PHASE_CHOICES = ["prompt", "completion", "all"]


def register(sub: Any) -> None:
    p = sub.add_parser("discover", help="rank SAE features that separate positive from negative records")
    p.add_argument("--pos", required=True, help="JSONL records showing the behaviour")
    p.add_argument("--neg", required=True, help="JSONL records not showing it")
    p.add_argument("--phase", choices=PHASE_CHOICES, default="all", help="phase whose tokens are pooled")
    p.add_argument("--top", type=POSITIVE, default=20, help="features to list (>= 1)")
    _common(p, detectors=False)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("calibrate", help="fit a detector (SAE readout and dense probe) from labelled records")
    p.add_argument("--name", required=True, help="detector name, e.g. scam-email (lower case, digits, dashes)")
    p.add_argument("--input", action="append", required=True, help="labelled JSONL (repeatable)")
    p.add_argument("--description", default="")
    p.add_argument("--phase", choices=PHASE_CHOICES, default="all", help="phase whose tokens are pooled for fitting")
    p.add_argument("--watch", default=None, help="phases the detector watches, comma-separated (default: --phase)")
    p.add_argument("--kind", choices=["sae", "probe", "both", "mean-diff", "auto"], default=None,
                   help="sae readout, dense probe, or both (default); with --group-by also mean-diff (difference "
                        "of source-balanced class means) and auto (default there): every kind is measured "
                        "leaving one group out and the best worst-group AUROC ships (the SAE readout within 0.02)")
    p.add_argument("--max-features", type=int_range(1, MAX_SAE_FEATURES), default=64,
                   help=f"features in the SAE readout (1 … {MAX_SAE_FEATURES}, the spec's limit)")
    p.add_argument("--target-fpr", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.01,
                   help="false-positive rate the threshold is set at, in (0, 1)")
    p.add_argument("--min-tokens", type=POSITIVE, default=8,
                   help="tokens a phase needs before a running (mid-generation) decision; the final verdict needs none")
    p.add_argument("--action", choices=["alert", "suppress", "block"], default="alert")
    p.add_argument("--severity", choices=["info", "warning", "critical"], default="warning")
    p.add_argument("--weight", action="append", default=[], metavar="FILE=W",
                   help="relative weight of an input file (default 1; each file is class-balanced)")
    p.add_argument("--out", help="pack directory to write the specs into (default: the --pack)")
    p.add_argument("--group-by", metavar="FIELD",
                   help="leave-one-group-out calibration over this record field (e.g. source): feature selection, "
                        "weights and thresholds come from scores of whole groups the fit did not see, and the "
                        "report gives each left-out group's AUROC, recall and FPR")
    p.add_argument("--negatives", action="append", default=[], metavar="FILE",
                   help="with --group-by: a benign pool (ordinary chats, other concepts' data); every record is a "
                        "negative whatever its label, in every phase it has (repeatable)")
    p.add_argument("--wrap", action="append", default=[], metavar="FILE=W[,W]",
                   help="with --group-by: put each document of FILE in one of these wrappers (plain, quoted, "
                        "request, reply; chosen by hash of its id); with reply, a chat's last reply also goes "
                        "behind a neutral user turn")
    p.add_argument("--max-per-group", action="append", default=[], metavar="[FILE=]N",
                   help="with --group-by: at most N records per (group, kind, label, wrapper) cell, by hash of id; "
                        "FILE=N for one file (repeatable)")
    p.add_argument("--max-chars", action="append", default=[], metavar="[FILE=]N",
                   help="with --group-by: judged contents cut near N characters (at a word boundary); FILE=N for "
                        "one file (repeatable)")
    p.add_argument("--prior-tokens", type=float_range(0), default=4.0,
                   help="with --group-by: weight (in tokens) of the prior the mean score is shrunk toward")
    p.add_argument("--threshold-on", default="neg,pool", metavar="KINDS",
                   help="with --group-by: negatives the per-phase thresholds are set on, of neg (a labelled file's "
                        "ordinary negatives), pool (--negatives files), hard_neg (look-alikes); default neg,pool — "
                        "hard negatives are then reported per group, not thresholded on")
    p.add_argument("--report", metavar="OUT.json", help="with --group-by: write the whole report as JSON")
    p.add_argument("--baseline", metavar="PACK",
                   help="with --group-by: also score the same records with this pack's detector of the same name "
                        "(and its -probe) at its own thresholds, per group, beside the new fit (same SAE needed)")
    _common(p, detectors=False)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="measure detectors per phase, source and wrapper at their shipped thresholds")
    p.add_argument("--input", action="append", required=True, metavar="FILE[=DETECTOR,...]",
                   help="labelled JSONL (repeatable); with =DETECTOR,... its labels count for those detectors "
                        "only, and for the others its label-0 records are negatives")
    p.add_argument("--split", choices=["held-out", "fit", "all"], default="all",
                   help="which hash split of the records to use (held-out = never used by calibrate)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="records per forward pass (>= 1)")
    p.add_argument("--detail", action="store_true", help="every (source, wrapper) cell, not only the margins")
    p.add_argument("--group-by", metavar="FIELD",
                   help="report per value of this record field (e.g. source; negatives of the multi-source data "
                        "also per kind), and say where a group's AUROC is more than 0.05 from the AUROC the "
                        "detector was calibrated with")
    _common(p, detectors=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="what a detector reads: features, weights, labels, top contexts, shares "
                            "(at each feature's max activation)")
    p.add_argument("detector", metavar="DETECTOR", help="detector name in the pack")
    p.add_argument("--contexts", type=POSITIVE, default=3, help="top contexts shown per feature")
    p.add_argument("--neighbours", type=NON_NEGATIVE, default=3, metavar="K",
                   help="nearest features by decoder cosine listed per readout feature (default 3; 0: none)")
    p.add_argument("--input", action="append", default=[], metavar="F.jsonl",
                   help="labelled JSONL (repeatable): each readout feature's and neighbour's AUROC on it, and a "
                        "flag where a neighbour separates the data better (loads the model)")
    _common(p, detectors=False)
    p.set_defaults(func=cmd_explain)


def _common(p: argparse.ArgumentParser, *, detectors: bool) -> None:
    add_model_args(p, detectors=detectors)
    p.add_argument("--max-records", type=POSITIVE, help="use at most this many records per file (hash order)")
    p.add_argument("--max-tokens", type=POSITIVE, default=256, help="tokens kept per record (>= 1)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "featurewatch" / "acts"),
                   help="activation cache directory ('' disables)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _cache(args: argparse.Namespace) -> Path | None:
    return check_output_dir(args.cache, "--cache") if args.cache else None


def _pooled(args: argparse.Namespace, pack: Any, paths: list[str], phase: str, sae: bool) -> list[Any]:
    from ..calibration.data import pooled_sets

    cache = _cache(args)
    hookpoint = next(iter(pack.saes))
    loaded = load_model(args)
    return pooled_sets(loaded.model, loaded.tokenizer, loaded.name, pack.saes[hookpoint], hookpoint, list(paths),
                       phase=phase, with_features=sae, max_records=args.max_records, max_tokens=args.max_tokens,
                       cache_dir=cache, progress=progress())


# --------------------------------------------------------------------------- discover
def cmd_discover(args: argparse.Namespace) -> int:
    from ..calibration.discover import contrast
    from ..display import feature_name, table

    check_input(args.pos, "--pos")
    check_input(args.neg, "--neg")
    pack = load_pack_checked(args)
    pos, neg = _pooled(args, pack, [args.pos, args.neg], args.phase, sae=True)
    hp = next(iter(pack.saes))
    rows = contrast(pos.features, neg.features, top=args.top)
    for r in rows:
        r["name"] = feature_name(pack, hp, r["feature"], 60)
        info = pack.features.get(hp, {}).get(r["feature"])
        r["top_contexts"] = info.top_contexts[:3] if info else []
    n_pos, n_neg = len(pos.features), len(neg.features)
    if args.json:
        print(json.dumps({"hookpoint": hp, "n_pos": n_pos, "n_neg": n_neg, "features": rows}))
        return 0
    print(f"features separating {args.pos} ({n_pos}) from {args.neg} ({n_neg}) at {hp}, pooled over {args.phase}:")
    print(table([[r["name"], r["auroc"], r["effect_size"], r["fires_pos"], r["fires_neg"]] for r in rows],
                ["feature", "AUROC", "effect d", "fires+", "fires-"]))
    return 0


# --------------------------------------------------------------------------- calibrate
def _parse_weights(specs: list[str], inputs: list[str]) -> dict[str, float]:
    """``--weight FILE=W`` options as {file name: weight}; each must name an --input and give a weight > 0."""
    names = {Path(p).name for p in inputs}
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            weight = float(value) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise CLIError(f"--weight {spec!r}: expected FILE=W with a number W > 0, e.g. --weight mine.jsonl=8")
        if Path(name).name not in names:
            raise CLIError(f"--weight {spec!r}: {name} is not one of the --input files ({', '.join(sorted(names))})")
        out[Path(name).name] = weight
    return out


def _watch(args: argparse.Namespace) -> list[str]:
    if not args.watch:
        return ["prompt", "completion"] if args.phase == "all" else [args.phase]
    phases = [p.strip() for p in args.watch.split(",")]
    bad = [p for p in phases if p not in ("prompt", "completion")]
    if bad or not phases:
        raise CLIError(f"--watch {args.watch!r}: valid phases are prompt, completion (comma-separated)")
    return phases


def cmd_calibrate(args: argparse.Namespace) -> int:
    import re

    if args.group_by:
        from .calibrate_grouped import cmd_calibrate_grouped

        return cmd_calibrate_grouped(args)
    grouped_only = [o for o, v in (("--negatives", args.negatives), ("--wrap", args.wrap),
                                   ("--max-per-group", args.max_per_group), ("--max-chars", args.max_chars),
                                   ("--report", args.report)) if v]
    if grouped_only or args.kind in ("mean-diff", "auto"):
        raise CLIError(f"{', '.join(grouped_only) or '--kind ' + args.kind}: needs --group-by FIELD "
                       "(leave-one-source-out calibration), e.g. --group-by source")
    args.kind = args.kind or "both"

    from ..calibration.data import HELD_OUT, split_mask
    from ..calibration.fit import file_weights, fit_detector, measure
    from ..calibration.metrics import auroc, rates_at, rounded, tpr_at_fpr
    from ..detector import DETECTOR_NAME, Calibration, DetectorSpec, FeatureWeight, Pooling
    from ..display import feature_name
    from ..pack import resolve_pack_path

    # everything that can be wrong is checked before the model loads
    if not re.match(DETECTOR_NAME, args.name) or not re.match(DETECTOR_NAME, args.name + "-probe"):
        raise CLIError(f"--name {args.name!r}: use lower-case letters, digits and dashes, starting with a letter")
    for path in args.input:
        check_input(path, "--input")
    relative = _parse_weights(args.weight, args.input)
    watch = _watch(args)
    pack = load_pack_checked(args)
    out_dir = check_output_dir(args.out, "--out") if args.out else resolve_pack_path(args.pack or pack.path)
    kinds: list[Literal["sae", "probe"]] = ["sae", "probe"] if args.kind == "both" else [args.kind]
    per_file = _pooled(args, pack, args.input, args.phase, sae="sae" in kinds)
    hp = next(iter(pack.saes))
    fit_masks = [split_mask(s.data.records, "fit") for s in per_file]
    w = file_weights([s.data.labels[m] for s, m in zip(per_file, fit_masks)],
                     [s.data.path.name for s in per_file], relative)
    y_fit = np.concatenate([s.data.labels[m] for s, m in zip(per_file, fit_masks)])
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"detector": args.name, "hookpoint": hp, "phase": args.phase, "kinds": {}}
    for kind in kinds:
        def x(s: Any, kind: str = kind) -> np.ndarray:
            return s.features if kind == "sae" else s.residuals

        X_fit = np.concatenate([x(s)[m] for s, m in zip(per_file, fit_masks)])
        fit = fit_detector(X_fit, y_fit, w, kind=kind, max_features=args.max_features, target_fpr=args.target_fpr)
        held: dict[str, Any] = {}
        all_s, all_y = [], []
        for s, m in zip(per_file, fit_masks):
            Xh, yh = x(s)[~m], s.data.labels[~m]
            held[s.data.path.name] = measure(fit, Xh, yh, args.target_fpr)
            all_s.append(fit.score(Xh))
            all_y.append(yh)
        scores, y = np.concatenate(all_s), np.concatenate(all_y)
        overall = {"auroc": auroc(scores, y), "tpr_at_target_fpr": tpr_at_fpr(scores, y, args.target_fpr),
                   **rates_at(scores, y, fit.threshold)}
        name = args.name if kind == "sae" else f"{args.name}-probe"
        calibration = Calibration(
            data=[f"{Path(p).name} ({', '.join(sorted(set(s.data.sources)))})" for p, s in zip(args.input, per_file)],
            target_fpr=args.target_fpr, auroc=rounded(overall["auroc"]), tpr_at_fpr=rounded(overall["tpr"]),
            fpr=rounded(overall["fpr"]), n_pos=int(y.sum()), n_neg=int((1 - y).sum()),
            held_out=f"records whose sha256(id) falls in the first {HELD_OUT:.0%}; threshold from 5-fold "
                     "out-of-fold scores on the rest",
            date=dt.date.today().isoformat(),
            notes=f"fitted on mean-pooled {args.phase}-phase activations at {hp}; per-file held-out: "
                  + "; ".join(f"{k} AUROC {v['auroc']}" for k, v in held.items()))
        common: dict[str, Any] = dict(
            name=name, description=args.description or f"{args.name} ({kind})", kind=kind, hookpoint=hp,
            bias=fit.bias, threshold=fit.threshold, phases=watch,
            pooling=Pooling(method="mean", min_tokens=args.min_tokens), action=args.action,
            severity=args.severity, calibration=calibration)
        if kind == "sae":
            features = []
            for f, wt in zip(fit.features, fit.weights):
                shown = feature_name(pack, hp, f, 200)
                features.append(FeatureWeight(id=f, weight=float(wt), label=shown.split(" ", 1)[-1]
                                              if " " in shown else None))
            spec = DetectorSpec(features=features, **common)
        else:
            import torch
            from safetensors.torch import save_file

            (out_dir / "probes").mkdir(exist_ok=True)
            rel = f"probes/{name}.safetensors"
            save_file({"weight": torch.tensor(fit.weights, dtype=torch.float32)}, str(out_dir / rel))
            spec = DetectorSpec(probe_weights=rel, **common)
        spec.save(out_dir / f"{name}.json")
        report["kinds"][kind] = {"file": str(out_dir / f"{name}.json"), "threshold": fit.threshold,
                                 "features": fit.features, "fit_oof_auroc": round(fit.train_auroc, 4),
                                 "held_out": held, "held_out_overall": {k: rounded(v) for k, v in overall.items()}}
    if args.json:
        print(json.dumps(report))
        return 0
    for kind, r in report["kinds"].items():
        print(f"{kind}: wrote {r['file']} (threshold {r['threshold']:.3f}, out-of-fold AUROC {r['fit_oof_auroc']})")
        for f, m in r["held_out"].items():
            print(f"   held-out {f}: AUROC {m['auroc']}  TPR@{args.target_fpr:.0%}FPR {m['tpr_at_target_fpr']}"
                  f"  TPR {m['tpr']} FPR {m['fpr']} at threshold")
    return 0


# --------------------------------------------------------------------------- eval
def _input_owners(spec: str) -> tuple[str, set[str] | None]:
    path, sep, owners = spec.partition("=")
    return path, ({o for o in owners.split(",") if o} if sep else None)


def cmd_eval(args: argparse.Namespace) -> int:
    """Score every record once with all detectors (and -probe variants) through the monitor; tabulate."""
    from ..calibration.data import load_labelled, split_mask
    from ..calibration.report import evaluate_runs
    from ..display import table
    from ..monitor import Monitor

    inputs = [_input_owners(s) for s in args.input]
    for path, _ in inputs:
        check_input(path, "--input")
    labelled = [load_labelled(path, max_records=args.max_records) for path, _ in inputs]  # bad lines fail now
    pack = load_pack_checked(args)
    names = args.detectors or pack.manifest.default_detectors or sorted(pack.detectors)
    for _, owners in inputs:
        unknown = sorted((owners or set()) - set(names))
        if unknown:
            raise CLIError(f"--input …={','.join(unknown)}: not among the evaluated detectors {', '.join(names)}")
    specs = pack.select(names)
    probes = [f"{n}-probe" for n in names if f"{n}-probe" in pack.detectors and f"{n}-probe" not in names]
    loaded = load_model(args)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=names + probes, model_name=loaded.name,
                      capture_text=False)
    scored: list[tuple[set[str] | None, list[Any], list[Any]]] = []
    try:
        for (path, owners), data in zip(inputs, labelled):
            records = [r for r, m in zip(data.records, split_mask(data.records, args.split)) if m]
            bar = progress()(total=len(records), desc=f"eval {Path(path).name}", unit="rec")
            runs = [run for _, run in monitor.score_records(records, batch_size=args.batch_size,
                                                            max_tokens=args.max_tokens, on_batch=bar.update)]
            bar.close()
            scored.append((owners, records, runs))
    finally:
        monitor.detach()
    rows: list[dict[str, Any]] = []
    for spec in specs:
        recs, runs = [], []
        for owners, records, file_runs in scored:
            for r, run in zip(records, file_runs):
                if owners is None or spec.name in owners or r.extra.get("label") == 0:
                    recs.append(r)
                    runs.append(run)
        own = evaluate_runs(spec.model_dump(), recs, runs, group_by=args.group_by)
        probe = {}
        if f"{spec.name}-probe" in probes:
            probe_spec = pack.detectors[f"{spec.name}-probe"].model_dump()
            probe = {(c["phase"], c["group"], c["wrapper"]): c
                     for c in evaluate_runs(probe_spec, recs, runs, group_by=args.group_by)}
        for cell in own:
            p = probe.get((cell["phase"], cell["group"], cell["wrapper"]), {})
            rows.append({"detector": spec.name, **cell, "probe_auroc": p.get("auroc")})
    if not args.detail:
        rows = [c for c in rows if c["group"] == "(all)" or c["wrapper"] == "(all)"]
    warnings = _calibration_gaps(rows, {s.name: s for s in specs}) if args.group_by else []
    if args.json:
        print(json.dumps({"split": args.split, "group_by": args.group_by, "rows": rows, "warnings": warnings}))
        return 0
    print(table([[r["detector"], r["phase"], r["group"], r["wrapper"], r["n_pos"], r["n_neg"], r["auroc"],
                  r["recall"], r["fpr"], r["threshold"], r["probe_auroc"]] for r in rows],
                ["detector", "phase", args.group_by or "source", "wrapper", "pos", "neg", "AUROC", "rec@thr",
                 "FPR@thr", "threshold", "probe AUROC"]))
    for w in warnings:
        print(f"warning: {w}")
    return 0


GAP = 0.05


def _calibration_gaps(rows: list[dict[str, Any]], specs: dict[str, Any]) -> list[str]:
    """Groups whose AUROC is more than ``GAP`` from the AUROC the detector was calibrated with, said plainly."""
    out = []
    for r in rows:
        spec = specs.get(r["detector"])
        cal = spec.calibration if spec is not None else None
        if cal is None or r["auroc"] is None or r["group"] == "(all)" or r["wrapper"] != "(all)":
            continue
        oos = cal.out_of_source
        ref, what = (oos.in_split_auroc, "in-split") if oos and oos.in_split_auroc is not None else (cal.auroc, "")
        if ref is None or abs(r["auroc"] - ref) <= GAP:
            continue
        out.append(f"{r['detector']} ({r['phase']}) on {r['group']}: AUROC {r['auroc']:.3f}, "
                   f"{'below' if r['auroc'] < ref else 'above'} the {what + ' ' if what else ''}AUROC it was "
                   f"calibrated with ({ref:.3f}) by more than {GAP}")
    return out


# --------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    """Print a detector's readout: features by share of the score (each at its max activation)."""
    from ..calibration.report import explain
    from ..pack import DEFAULT_PACK, load_pack

    pack = load_pack(args.pack or DEFAULT_PACK)
    if args.detector not in pack.detectors:
        raise CLIError(f"detector {args.detector!r} is not in pack {pack.name}; "
                       f"valid: {', '.join(sorted(pack.detectors))}")
    spec = pack.detectors[args.detector]
    for path in args.input:
        check_input(path, "--input")
    if args.input and spec.kind != "sae":
        raise CLIError(f"--input: {spec.name} is a dense probe; it has no features whose neighbours could be "
                       "compared")
    infos = {i: info.model_dump() for i, info in pack.features.get(spec.hookpoint, {}).items()}
    out = explain(spec.model_dump(), infos, contexts=args.contexts)
    if spec.kind == "sae" and (args.neighbours or args.input):
        _readout_neighbours(args, pack, spec, out)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    phases = ", ".join(f"{p} {spec.threshold_for(p):.3f}" for p in spec.phases)
    print(f"{spec.name} ({spec.kind}, {spec.hookpoint}): {spec.description}")
    print(f"  score per token = {spec.bias:.3f} + Σ wᵢ·aᵢ, mean over each watched phase's content tokens, "
          f"shrunk toward {spec.pooling.prior_score} by {spec.pooling.prior_tokens:g} tokens")
    print(f"  fires at: {phases}; needs {spec.pooling.min_tokens} tokens; re-arms {spec.hysteresis:.3f} below")
    _print_out_of_source(spec)
    if spec.kind == "probe" and not spec.evidence_features:
        print("  a dense probe over the raw residual: no features to list")
        return 0
    if spec.kind == "probe":
        print(f"  a dense probe over the raw residual, explained in SAE features: score = Σ aᵢ·(w·dᵢ) + "
              f"{spec.evidence_offset:+.3f} (w·b_dec) + w·error + bias; the features below are watched for "
              "evidence, and an alert also gives the part they leave unexplained")
    if out["share_basis"] == "max_activation":
        print("  share = |wᵢ · max activationᵢ| / Σ: what each feature can add to the score at its largest")
    elif out["share_basis"] is None:
        print("  share: — (the pack's features.json gives no max activation for every feature)")
    data = out.get("data")
    if data:
        print(f"  AUROC: of each feature's mean {data['phase']} activation on {data['n_pos']} positives vs "
              f"{data['n_neg']} negatives ({', '.join(data['inputs'])}), oriented by the weight's sign")
    for r in out["features"]:
        share = f"{r['share']:.0%}" if r["share"] is not None else "—"
        auroc = f"  AUROC {r['auroc']:.3f}" if r.get("auroc") is not None else ""
        print(f"  #{r['id']:<5} w={r['weight']:+8.3f}  share {share:>4}{auroc}  {r['label'] or '(unlabelled)'}")
        for c in r["top_contexts"]:
            print(f"        {c}")
        for n in r.get("neighbours", []):
            extra = ""
            if n.get("auroc") is not None:
                extra = f", AUROC {n['auroc']:.3f}" + ("  ▲ separates the data better" if n["better"] else "")
            print(f"        near {n['name']} (cos {n['cosine']:+.2f}{extra})")
    if data:
        flagged = [(r["id"], n["feature"]) for r in out["features"] for n in r.get("neighbours", []) if n["better"]]
        if flagged:
            print(f"  hint: {len({f for f, _ in flagged})} readout feature(s) have a neighbour that separates the "
                  "data better (the readout may have picked the wrong member of a cluster): "
                  + ", ".join(f"#{f} → #{g}" for f, g in flagged))
        else:
            print(f"  no neighbour separates the data better than the readout feature it is near (margin "
                  f"{BETTER_MARGIN})")
    if spec.calibration and spec.calibration.notes:
        print(f"  calibration: {spec.calibration.notes}")
    return 0


def _print_out_of_source(spec: Any) -> None:
    """The calibration's leave-one-source-out figures, if the spec has them."""
    oos = spec.calibration.out_of_source if spec.calibration else None
    if oos is None:
        return
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"  out of source (leave-one-{oos.group_by}-out): AUROC {f(oos.auroc)}, worst group {f(oos.worst_auroc)} "
          f"({oos.worst_group}), recall {f(oos.recall)}, FPR {f(oos.fpr)}; in-split AUROC {f(oos.in_split_auroc)}")
    print(f"  decision: {oos.decision} — {oos.reason}")
    for g in oos.groups:
        parts = [f"{k.replace('_', ' ')} {f(g[k])}" for k in ("auroc_pos", "auroc_neg", "recall", "fpr_neg",
                                                             "fpr_hard_neg", "fpr_pool") if g.get(k) is not None]
        print(f"    {g['group']:<28} " + ", ".join(parts))


BETTER_MARGIN = 0.02
"""A neighbour "separates the data better" when its AUROC beats the readout feature's by more than this."""


def _readout_neighbours(args: argparse.Namespace, pack: Any, spec: Any, out: dict[str, Any]) -> None:
    """Add each readout feature's nearest neighbours (decoder cosine) to ``out``; with ``--input``, their AUROCs."""
    from ..models import normalize_hookpoint
    from ..neighbours import decoder_neighbours, describe

    hp = normalize_hookpoint(spec.hookpoint)
    sae = pack.saes[hp]
    k = args.neighbours or 3
    for row in out["features"]:
        row["neighbours"] = [describe(pack, hp, n, "cosine") for n in decoder_neighbours(sae, row["id"], k)]
    if not args.input:
        return
    from ..calibration.fit import feature_aurocs

    phase = spec.phases[0] if len(spec.phases) == 1 else "all"
    sets = _pooled(args, pack, args.input, phase, sae=True)
    X = np.concatenate([s.features for s in sets])
    y = np.concatenate([s.data.labels for s in sets])
    if y.min() == y.max():
        raise CLIError(f"--input: the records are all label {int(y[0])}; AUROC needs positives and negatives")
    au = feature_aurocs(X, y)
    out["data"] = {"inputs": [Path(p).name for p in args.input], "phase": phase, "n_pos": int(y.sum()),
                   "n_neg": int(len(y) - y.sum()), "margin": BETTER_MARGIN}
    for row in out["features"]:
        def oriented(feature: int, weight: float = row["weight"]) -> float:
            return round(float(au[feature] if weight > 0 else 1 - au[feature]), 4)

        row["auroc"] = oriented(row["id"])
        for n in row["neighbours"]:
            n["auroc"] = oriented(n["feature"])
            n["better"] = n["auroc"] > row["auroc"] + BETTER_MARGIN
