"""CLI commands for detectors: ``discover``, ``calibrate``, ``eval``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("discover", help="rank SAE features that separate positive from negative records")
    p.add_argument("--pos", required=True, help="JSONL records showing the behaviour")
    p.add_argument("--neg", required=True, help="JSONL records not showing it")
    p.add_argument("--phase", choices=["prompt", "completion", "all"], default="all")
    p.add_argument("--top", type=int, default=20)
    _common(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("calibrate", help="fit a detector (SAE readout and dense probe) from labelled records")
    p.add_argument("--name", required=True, help="detector name, e.g. scam-email")
    p.add_argument("--input", action="append", required=True, help="labelled JSONL (repeatable)")
    p.add_argument("--description", default="")
    p.add_argument("--phase", choices=["prompt", "completion", "all"], default="all",
                   help="phase whose tokens are pooled for fitting")
    p.add_argument("--watch", default=None, help="phases the detector watches, comma-separated (default: --phase)")
    p.add_argument("--kind", choices=["sae", "probe", "both"], default="both")
    p.add_argument("--max-features", type=int, default=64)
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--min-tokens", type=int, default=8,
                   help="tokens a phase needs before a running (mid-generation) decision; the final verdict needs none")
    p.add_argument("--action", choices=["alert", "suppress", "block"], default="alert")
    p.add_argument("--severity", choices=["info", "warning", "critical"], default="warning")
    p.add_argument("--weight", action="append", default=[], metavar="FILE=W",
                   help="relative weight of an input file (default 1; each file is class-balanced)")
    p.add_argument("--out", help="pack directory to write the specs into (default: the --pack)")
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="measure detectors on labelled records, next to probe and keyword baselines")
    p.add_argument("--input", action="append", required=True, help="labelled JSONL (repeatable)")
    p.add_argument("--split", choices=["held-out", "fit", "all"], default="all",
                   help="which hash split of the records to use (held-out = never used by calibrate)")
    p.add_argument("--batch-size", type=int, default=8)
    _common(p)
    p.set_defaults(func=cmd_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pack", default=None, help="pack name or path (default: smollm2-135m-instruct)")
    p.add_argument("--detector", action="append", dest="detectors", metavar="NAME")
    p.add_argument("--max-records", type=int, help="use at most this many records per file (hash order)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "featurewatch" / "acts"),
                   help="activation cache directory ('' disables)")
    p.add_argument("--json", action="store_true")


def _progress() -> Any:
    from ..cli import _progress as progress

    return progress()


def _pooled(args: argparse.Namespace, paths: list[str], phase: str, sae: bool) -> tuple[Any, list[Any]]:
    """Per file: (Labelled, pooled SAE features or None, pooled residuals)."""
    from ..models import load_model
    from ..pack import DEFAULT_PACK, load_pack
    from .data import cached_acts, load_labelled

    pack = load_pack(args.pack or DEFAULT_PACK)
    hookpoint = next(iter(pack.saes))
    loaded = load_model(args.model)
    out = []
    for path in paths:
        data = load_labelled(path, max_records=args.max_records)
        acts = cached_acts(loaded.model, loaded.tokenizer, data, hookpoint, max_tokens=args.max_tokens,
                           cache_dir=Path(args.cache) if args.cache else None, model_name=loaded.name,
                           progress=_progress())
        ph = None if phase == "all" else phase
        feats, has = acts.pooled(ph, pack.saes[hookpoint]) if sae else (None, None)
        resid, has = acts.pooled(ph)
        if not bool(has.all()):
            missing = [data.records[i].line for i in np.flatnonzero(~has.numpy())][:5]
            raise ConfigError(f"{path}: {int((~has).sum())} record(s) have no {phase}-phase tokens "
                              f"(lines {missing}…); pick another --phase or fix the records")
        out.append((data, None if feats is None else feats.numpy(), resid.numpy()))
    return pack, out


def cmd_discover(args: argparse.Namespace) -> int:
    from ..display import feature_name, table
    from .discover import contrast

    pack, [(pos, fpos, _), (neg, fneg, _)] = _pooled(args, [args.pos, args.neg], args.phase, sae=True)
    hp = next(iter(pack.saes))
    rows = contrast(fpos, fneg, top=args.top)
    for r in rows:
        r["name"] = feature_name(pack, hp, r["feature"], 60)
        info = pack.features.get(hp, {}).get(r["feature"])
        r["top_contexts"] = info.top_contexts[:3] if info else []
    if args.json:
        print(json.dumps({"hookpoint": hp, "n_pos": len(fpos), "n_neg": len(fneg), "features": rows}))
        return 0
    print(f"features separating {args.pos} ({len(fpos)}) from {args.neg} ({len(fneg)}) at {hp}, "
          f"pooled over {args.phase}:")
    print(table([[r["name"], r["auroc"], r["effect_size"], r["fires_pos"], r["fires_neg"]] for r in rows],
                ["feature", "AUROC", "effect d", "fires+", "fires-"]))
    return 0


def _weights(data_list: list[Any], mask_list: list[np.ndarray], spec: list[str]) -> np.ndarray:
    """Class-balanced weights per file, scaled by the file's --weight; each file sums to its weight."""
    rel = {}
    for s in spec:
        name, _, value = s.partition("=")
        rel[Path(name).name] = float(value)
    out = []
    for data, mask in zip(data_list, mask_list):
        y = data.labels[mask]
        w = np.zeros(len(y))
        for label in (0, 1):
            n = int((y == label).sum())
            if n:
                w[y == label] = 0.5 / n
        if (y == 0).sum() == 0 or (y == 1).sum() == 0:
            w *= 2  # a single-class file: its one class carries the file's whole weight
        out.append(w * rel.get(data.path.name, 1.0) * len(y))
    total = np.concatenate(out)
    return total / total.mean()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..detector import Calibration, DetectorSpec, FeatureWeight, Pooling
    from ..display import feature_name
    from ..pack import resolve_pack_path
    from .data import HELD_OUT, split_mask
    from .fit import fit_detector, measure

    kinds = ["sae", "probe"] if args.kind == "both" else [args.kind]
    pack, per_file = _pooled(args, args.input, args.phase, sae="sae" in kinds)
    hp = next(iter(pack.saes))
    out_dir = Path(args.out) if args.out else resolve_pack_path(args.pack or pack.path)
    watch = args.watch.split(",") if args.watch else (["prompt", "completion"] if args.phase == "all"
                                                      else [args.phase])
    fit_masks = [split_mask(d.records, "fit") for d, _, _ in per_file]
    w = _weights([d for d, _, _ in per_file], fit_masks, args.weight)
    y_fit = np.concatenate([d.labels[m] for (d, _, _), m in zip(per_file, fit_masks)])
    report: dict[str, Any] = {"detector": args.name, "hookpoint": hp, "phase": args.phase, "kinds": {}}
    for kind in kinds:
        col = 1 if kind == "sae" else 2
        X_fit = np.concatenate([t[col][m] for t, m in zip(per_file, fit_masks)])
        fit = fit_detector(X_fit, y_fit, w, kind=kind, max_features=args.max_features,
                           target_fpr=args.target_fpr)
        held: dict[str, Any] = {}
        all_s, all_y = [], []
        for t, m in zip(per_file, fit_masks):
            data = t[0]
            Xh, yh = t[col][~m], data.labels[~m]
            held[data.path.name] = measure(fit, Xh, yh, args.target_fpr)
            all_s.append(fit.score(Xh))
            all_y.append(yh)
        from .metrics import auroc, rates_at, tpr_at_fpr

        s, y = np.concatenate(all_s), np.concatenate(all_y)
        overall = {"auroc": auroc(s, y), "tpr_at_target_fpr": tpr_at_fpr(s, y, args.target_fpr),
                   **rates_at(s, y, fit.threshold)}
        name = args.name if kind == "sae" else f"{args.name}-probe"
        calibration = Calibration(
            data=[f"{Path(p).name} ({', '.join(sorted(set(t[0].sources)))})" for p, t in zip(args.input, per_file)],
            target_fpr=args.target_fpr, auroc=_r(overall["auroc"]), tpr_at_fpr=_r(overall["tpr"]),
            fpr=_r(overall["fpr"]), n_pos=int(y.sum()), n_neg=int((1 - y).sum()),
            held_out=f"records whose sha256(id) falls in the first {HELD_OUT:.0%}; threshold from 5-fold "
                     "out-of-fold scores on the rest",
            date=dt.date.today().isoformat(),
            notes=f"fitted on mean-pooled {args.phase}-phase activations at {hp}; per-file held-out: "
                  + "; ".join(f"{k} AUROC {v['auroc']}" for k, v in held.items()))
        common = dict(name=name, description=args.description or f"{args.name} ({kind})", kind=kind,
                      hookpoint=hp, bias=fit.bias, threshold=fit.threshold, phases=watch,
                      pooling=Pooling(method="mean", min_tokens=args.min_tokens), action=args.action,
                      severity=args.severity, calibration=calibration)
        if kind == "sae":
            spec = DetectorSpec(features=[FeatureWeight(id=f, weight=float(wt),
                                                        label=feature_name(pack, hp, f, 200).split(" ", 1)[-1]
                                                        if " " in feature_name(pack, hp, f, 200) else None)
                                          for f, wt in zip(fit.features, fit.weights)], **common)
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
                                 "held_out": held, "held_out_overall": {k: _r(v) for k, v in overall.items()}}
    if args.json:
        print(json.dumps(report))
    else:
        for kind, r in report["kinds"].items():
            print(f"{kind}: wrote {r['file']} (threshold {r['threshold']:.3f}, out-of-fold AUROC {r['fit_oof_auroc']})")
            for f, m in r["held_out"].items():
                print(f"   held-out {f}: AUROC {m['auroc']}  TPR@{args.target_fpr:.0%}FPR {m['tpr_at_target_fpr']}"
                      f"  TPR {m['tpr']} FPR {m['fpr']} at threshold")
    return 0


def _r(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..display import table
    from ..models import load_model
    from ..monitor import Monitor
    from ..pack import DEFAULT_PACK, load_pack
    from .data import load_labelled, split_mask
    from .keywords import keyword_score
    from .metrics import auroc, rates_at, tpr_at_fpr

    pack = load_pack(args.pack or DEFAULT_PACK)
    names = args.detectors or pack.manifest.default_detectors or sorted(pack.detectors)
    specs = pack.select(names)
    with_probes = names + [f"{n}-probe" for n in names if f"{n}-probe" in pack.detectors and n + "-probe" not in names]
    loaded = load_model(args.model)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=with_probes, model_name=loaded.name,
                      capture_text=False)
    rows: list[dict[str, Any]] = []
    try:
        for path in args.input:
            data = load_labelled(path, max_records=args.max_records)
            mask = split_mask(data.records, args.split)
            records = [r for r, m in zip(data.records, mask) if m]
            labels = data.labels[mask]
            sources = [s for s, m in zip(data.sources, mask) if m]
            bar = _progress()(total=len(records), desc=f"eval {Path(path).name}", unit="rec")
            runs = [run for _, run in monitor.score_records(records, batch_size=args.batch_size,
                                                            max_tokens=args.max_tokens, on_batch=bar.update)]
            bar.close()
            for spec in specs:
                watched_text = [_watched_text(r, spec.phases) for r in records]
                groups = {"all": np.ones(len(records), dtype=bool)}
                for src in sorted(set(sources)):
                    groups[src] = np.array([s == src for s in sources])
                for group, g in groups.items():
                    if group != "all" and len(groups) == 2:
                        continue  # one source: its row equals "all"
                    y = labels[g]
                    s = np.array([run.scores.get(spec.name, math.nan) for run, k in zip(runs, g) if k])
                    sp = np.array([run.scores.get(spec.name + "-probe", math.nan) for run, k in zip(runs, g) if k])
                    kw = np.array([keyword_score(spec.name, t) for t, k in zip(watched_text, g) if k])
                    at = rates_at(s, y, spec.threshold)
                    rows.append({
                        "detector": spec.name, "file": Path(path).name, "source": group,
                        "n_pos": int(y.sum()), "n_neg": int((1 - y).sum()),
                        "auroc": _r(auroc(s, y)), "tpr_at_1pct_fpr": _r(tpr_at_fpr(s, y, 0.01)),
                        "precision": _r(at["precision"]), "recall": _r(at["recall"]), "fpr": _r(at["fpr"]),
                        "probe_auroc": _r(auroc(sp, y)) if not np.isnan(sp).all() else None,
                        "probe_tpr_at_1pct_fpr": _r(tpr_at_fpr(sp, y, 0.01)) if not np.isnan(sp).all() else None,
                        "keyword_auroc": _r(auroc(kw, y)),
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


def _watched_text(record: Any, phases: list[str]) -> str:
    if record.text is not None:
        return record.text if "prompt" in phases else ""
    msgs = list(record.messages)
    completion = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""
    prompt_msgs = msgs[:-1] if completion else msgs
    parts = []
    if "prompt" in phases:
        parts += [m["content"] for m in prompt_msgs]
    if "completion" in phases:
        parts.append(completion)
    return "\n".join(parts)
