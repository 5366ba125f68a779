"""``featurewatch discover``, ``calibrate`` and ``eval``: find features, fit detectors, measure them.

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

from ._common import (
    POSITIVE,
    CLIError,
    add_model_args,
    check_input,
    check_output_dir,
    float_range,
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
    p.add_argument("--kind", choices=["sae", "probe", "both"], default="both")
    p.add_argument("--max-features", type=POSITIVE, default=64, help="features in the SAE readout (>= 1)")
    p.add_argument("--target-fpr", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.01,
                   help="false-positive rate the threshold is set at, in (0, 1)")
    p.add_argument("--min-tokens", type=POSITIVE, default=8,
                   help="tokens a phase needs before a running (mid-generation) decision; the final verdict needs none")
    p.add_argument("--action", choices=["alert", "suppress", "block"], default="alert")
    p.add_argument("--severity", choices=["info", "warning", "critical"], default="warning")
    p.add_argument("--weight", action="append", default=[], metavar="FILE=W",
                   help="relative weight of an input file (default 1; each file is class-balanced)")
    p.add_argument("--out", help="pack directory to write the specs into (default: the --pack)")
    _common(p, detectors=False)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="measure detectors on labelled records, next to probe and keyword baselines")
    p.add_argument("--input", action="append", required=True, help="labelled JSONL (repeatable)")
    p.add_argument("--split", choices=["held-out", "fit", "all"], default="all",
                   help="which hash split of the records to use (held-out = never used by calibrate)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="records per forward pass (>= 1)")
    _common(p, detectors=True)
    p.set_defaults(func=cmd_eval)


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
def cmd_eval(args: argparse.Namespace) -> int:
    from ..calibration.data import load_labelled, split_mask
    from ..calibration.keywords import keyword_score, watched_text
    from ..calibration.metrics import auroc, rates_at, rounded, tpr_at_fpr
    from ..display import table
    from ..monitor import Monitor

    for path in args.input:
        check_input(path, "--input")
    labelled = [load_labelled(path, max_records=args.max_records) for path in args.input]  # bad lines fail now
    pack = load_pack_checked(args)
    names = args.detectors or pack.manifest.default_detectors or sorted(pack.detectors)
    specs = pack.select(names)
    with_probes = names + [f"{n}-probe" for n in names if f"{n}-probe" in pack.detectors and f"{n}-probe" not in names]
    loaded = load_model(args)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=with_probes, model_name=loaded.name,
                      capture_text=False)
    rows: list[dict[str, Any]] = []
    try:
        for path, data in zip(args.input, labelled):
            mask = split_mask(data.records, args.split)
            records = [r for r, m in zip(data.records, mask) if m]
            labels = data.labels[mask]
            sources = [s for s, m in zip(data.sources, mask) if m]
            bar = progress()(total=len(records), desc=f"eval {Path(path).name}", unit="rec")
            runs = [run for _, run in monitor.score_records(records, batch_size=args.batch_size,
                                                            max_tokens=args.max_tokens, on_batch=bar.update)]
            bar.close()
            for spec in specs:
                texts = [watched_text(r, spec.phases) for r in records]
                groups = {"all": np.ones(len(records), dtype=bool)}
                for src in sorted(set(sources)):
                    groups[src] = np.array([s == src for s in sources])
                for group, g in groups.items():
                    if group != "all" and len(groups) == 2:
                        continue  # one source: its row equals "all"
                    y = labels[g]
                    s = np.array([run.scores.get(spec.name, math.nan) for run, k in zip(runs, g) if k])
                    sp = np.array([run.scores.get(spec.name + "-probe", math.nan) for run, k in zip(runs, g) if k])
                    kw = np.array([keyword_score(spec.name, t) for t, k in zip(texts, g) if k])
                    at = rates_at(s, y, spec.threshold)
                    has_probe = not np.isnan(sp).all()
                    rows.append({
                        "detector": spec.name, "file": Path(path).name, "source": group,
                        "n_pos": int(y.sum()), "n_neg": int((1 - y).sum()),
                        "auroc": rounded(auroc(s, y)), "tpr_at_1pct_fpr": rounded(tpr_at_fpr(s, y, 0.01)),
                        "precision": rounded(at["precision"]), "recall": rounded(at["recall"]),
                        "fpr": rounded(at["fpr"]),
                        "probe_auroc": rounded(auroc(sp, y)) if has_probe else None,
                        "probe_tpr_at_1pct_fpr": rounded(tpr_at_fpr(sp, y, 0.01)) if has_probe else None,
                        "keyword_auroc": rounded(auroc(kw, y)),
                    })
    finally:
        monitor.detach()
    if args.json:
        print(json.dumps({"split": args.split, "rows": rows}))
        return 0
    print(table([[r["detector"], r["file"], r["source"], r["n_pos"], r["n_neg"], r["auroc"], r["tpr_at_1pct_fpr"],
                  r["precision"], r["recall"], r["probe_auroc"], r["probe_tpr_at_1pct_fpr"], r["keyword_auroc"]]
                 for r in rows],
                ["detector", "file", "source", "pos", "neg", "AUROC", "TPR@1%", "prec@thr", "rec@thr",
                 "probe AUROC", "probe TPR@1%", "keyword AUROC"]))
    return 0
