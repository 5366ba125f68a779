"""``featurewatch calibrate --group-by FIELD``: leave-one-source-out calibration.

Everything that can be wrong with the inputs (a missing file, a record without
a label, a group field that is missing or not a string, an unknown wrapper, a
``--wrap`` that names no input) is found before the model loads. The fitting is
:mod:`featurewatch.calibration.loso`; this module reads the options, prints the
per-group report and writes the specs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._common import CLIError, check_input, check_output_dir, load_model, load_pack_checked, progress

EVIDENCE_FEATURES = 64  # SAE features a dense decision is explained with (watched for evidence only)
GAP = 0.05  # in-split vs out-of-source AUROC: a larger gap is said plainly


def _match(option: str, spec: str, name: str, paths: list[str]) -> str:
    """The --input/--negatives path a ``FILE=…`` option names: a path as given, or a unique file name."""
    exact = [p for p in paths if p == name]
    match = exact or [p for p in paths if Path(p).name == Path(name).name]
    if not match:
        raise CLIError(f"{option} {spec!r}: {name} is not one of the --input/--negatives files")
    if len(match) > 1:
        raise CLIError(f"{option} {spec!r}: {name} names several inputs ({', '.join(match)}); give the path as "
                       "passed to --input")
    return match[0]


def _caps(option: str, specs: list[str], paths: list[str]) -> dict[str, int | None]:
    """``--max-per-group``/``--max-chars`` ``N`` (every file) and ``FILE=N`` (one file) as {path: N}."""
    out: dict[str, int | None] = {p: None for p in paths}
    for spec in sorted(specs, key=lambda s: "=" in s):  # the plain default first, per-file caps over it
        name, sep, value = spec.rpartition("=")
        try:
            cap = int(value)
        except ValueError:
            cap = 0
        if cap < 1:
            raise CLIError(f"{option} {spec!r}: expected N or FILE=N with an integer N >= 1")
        for p in ([_match(option, spec, name, paths)] if sep else paths):
            out[p] = cap
    return out


def _wraps(specs: list[str], paths: list[str]) -> dict[str, tuple[str, ...]]:
    """``--wrap FILE=W,W`` as {path as given: wrappers}; FILE is a path as given or a unique file name."""
    from ..calibration.sources import DOCUMENT_WRAPPERS

    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        ws = tuple(w.strip() for w in value.split(",") if w.strip())
        if not sep or not ws:
            raise CLIError(f"--wrap {spec!r}: expected FILE=W[,W], e.g. --wrap scam.jsonl=plain,quoted,reply")
        bad = [w for w in ws if w not in DOCUMENT_WRAPPERS]
        if bad:
            raise CLIError(f"--wrap {spec!r}: unknown wrapper {', '.join(bad)} (valid: {', '.join(DOCUMENT_WRAPPERS)})")
        out[_match("--wrap", spec, name, paths)] = ws
    return out


def _say(msg: str) -> None:
    print(f"calibrate: {msg}", file=sys.stderr, flush=True)


def cmd_calibrate_grouped(args: argparse.Namespace) -> int:
    import re

    from ..calibration.loso import DECISIONS, calibrate, explained_by
    from ..calibration.sources import prepare, write_prepared
    from ..detector import DETECTOR_NAME, Calibration, DetectorSpec, FeatureWeight, OutOfSource, Pooling
    from ..pack import resolve_pack_path
    from .calibrate import _watch

    if not re.match(DETECTOR_NAME, args.name) or not re.match(DETECTOR_NAME, args.name + "-probe"):
        raise CLIError(f"--name {args.name!r}: use lower-case letters, digits and dashes, starting with a letter")
    if args.weight:
        raise CLIError("--weight: with --group-by every (group, kind, phase, label) cell weighs the same; "
                       "drop --weight or --group-by")
    if args.kind == "both":
        raise CLIError("--kind both: with --group-by pick sae, probe, mean-diff, or auto (compare them)")
    paths = list(args.input) + list(args.negatives)
    for path in paths:
        check_input(path, "--input" if path in args.input else "--negatives")
    wraps = _wraps(args.wrap, paths)
    caps = _caps("--max-per-group", args.max_per_group, paths)
    chars = _caps("--max-chars", args.max_chars, paths)
    watch = _watch(args)
    on = tuple(k.strip() for k in args.threshold_on.split(",") if k.strip())
    if not on or set(on) - {"neg", "pool", "hard_neg"}:
        raise CLIError(f"--threshold-on {args.threshold_on!r}: a comma-separated subset of neg, pool, hard_neg")
    kinds = list(DECISIONS) if args.kind in (None, "auto") else [args.kind]
    cache = check_output_dir(args.cache, "--cache") if args.cache else None
    if cache is None:
        raise CLIError("--cache '': --group-by keeps its prepared records and activations in the cache; give a "
                       "directory")
    prepared: list[tuple[Path, list[dict[str, Any]]]] = []
    for path in paths:
        recs = prepare(path, group_by=args.group_by, negatives=path not in args.input,
                       wrap_with=wraps.get(path, ()), max_per_group=caps[path], max_chars=chars[path])
        prepared.append((write_prepared(recs, cache, Path(path).parent.name + "-" + Path(path).stem), recs))
    own = [r for p, recs in zip(paths, prepared) if p in args.input for r in recs[1]]
    labels = {int(r["label"]) for r in own}
    if labels != {0, 1}:
        raise CLIError(f"--input: the records are all label {labels.pop() if labels else '?'}; calibration needs "
                       "positives and negatives")
    groups = sorted({str(r["fw_group"]) for r in own})
    if len(groups) < 2:
        raise CLIError(f"--group-by {args.group_by}: the --input records hold one group ({groups[0]}); "
                       "leaving one out needs at least two")
    baseline = _baseline_pack(args)
    pack = load_pack_checked(args)
    out_dir = check_output_dir(args.out, "--out") if args.out else resolve_pack_path(args.pack or pack.path)
    hp = next(iter(pack.saes))
    sae = pack.saes[hp]
    _say(f"{len(own)} labelled records in {len(groups)} groups by {args.group_by}; "
         f"{sum(len(r) for p, (_, r) in zip(paths, prepared) if p not in args.input)} pool records")
    loaded = load_model(args)
    from ..calibration.sources import load_rows

    rows = load_rows(prepared, model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name, sae=sae,
                     hookpoint=hp, phases=watch, max_tokens=args.max_tokens, cache_dir=cache, progress=progress(),
                     log=_say)
    for ph in watch:
        if not ((rows.phase == ph) & (rows.y == 0) & np.isin(rows.kind, list(on))).any():
            raise CLIError(f"--watch {','.join(watch)}: no {'/'.join(on)} negative has {ph}-phase tokens to set its "
                           f"threshold on; add records with a {ph} phase, --threshold-on more kinds, or watch fewer "
                           "phases")
    infos = {i: info.model_dump() for i, info in pack.features.get(hp, {}).items()}
    cal = calibrate(rows, watch, kinds=kinds, target_fpr=args.target_fpr, min_tokens=args.min_tokens,
                    prior_tokens=args.prior_tokens, max_features=args.max_features, features_info=infos,
                    threshold_kinds=on, progress=_say)
    out_dir.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    data = [f"{p} ({', '.join(sorted({str(r['fw_group']) for r in recs}))})" + ("" if p in args.input else
                                                                                 " [negatives]")
            for p, (_, recs) in zip(paths, prepared)]

    def out_of_source(kind: str) -> OutOfSource:
        res = cal.results[kind]
        loso = res["loso"]
        worst = min((r for r in loso["groups"] if r["group"] in groups and r.get("auroc") is not None),
                    key=lambda r: r["auroc"], default=None)
        return OutOfSource(
            group_by=args.group_by, decision=kind,  # type: ignore[arg-type]
            reason=cal.reason if kind == cal.chosen else f"variant measured beside {cal.chosen}",
            auroc=loso["auroc"], worst_auroc=loso["worst_auroc"], worst_group=worst["group"] if worst else None,
            in_split_auroc=res.get("in_split", {}).get("auroc"), recall=loso["recall"], fpr=loso["fpr"],
            groups=loso["groups"],
            compared={k: {"auroc": v["loso"]["auroc"], "worst_auroc": v["loso"]["worst_auroc"],
                          "in_split_auroc": v.get("in_split", {}).get("auroc")} for k, v in cal.results.items()})

    def write(name: str, kind: str, decision: Any, thr: Any) -> dict[str, Any]:
        loso = cal.results[kind]["loso"]
        calibration = Calibration(
            data=data, target_fpr=args.target_fpr, auroc=loso["auroc"], tpr_at_fpr=loso["recall"], fpr=loso["fpr"],
            n_pos=int((rows.y == 1).sum()), n_neg=int((rows.y == 0).sum()),
            held_out=f"leave-one-{args.group_by}-out: each group scored by a fit without it (benign pools left "
                     "out per file); thresholds at the target FPR on every negative of the phase",
            date=today, notes=f"mean-pooled content tokens at {hp}; thresholds set on {thr.pool}",
            out_of_source=out_of_source(kind))
        common: dict[str, Any] = dict(
            name=name, description=args.description or f"{args.name} ({kind})", hookpoint=hp, bias=decision.bias,
            threshold=max(thr.phase.values()), phase_thresholds=thr.phase, phases=watch,
            hysteresis=round(thr.hysteresis, 4),
            pooling=Pooling(method="mean", min_tokens=args.min_tokens, prior_score=round(thr.prior, 4),
                            prior_tokens=args.prior_tokens),
            action=args.action, severity=args.severity, calibration=calibration)
        explained = None
        if kind == "sae":
            features = [FeatureWeight(id=f, weight=float(w), label=_label(pack, hp, f))
                        for f, w in sorted(zip(decision.features, decision.weights), key=lambda t: -abs(t[1]))]
            spec = DetectorSpec(kind="sae", features=features, **common)
        else:
            import torch
            from safetensors.torch import save_file

            (out_dir / "probes").mkdir(exist_ok=True)
            rel = f"probes/{name}.safetensors"
            save_file({"weight": torch.tensor(decision.weights, dtype=torch.float32)}, str(out_dir / rel))
            W_dec = sae.W_dec.detach().float().cpu().numpy()
            b_dec = sae.b_dec.detach().float().cpu().numpy()
            ids, c, offset, carried = explained_by(decision.weights, W_dec, b_dec, rows.feats[rows.y == 1],
                                                   top=EVIDENCE_FEATURES)
            spec = DetectorSpec(kind="probe", probe_weights=rel, evidence_offset=offset,
                                evidence_features=[FeatureWeight(id=i, weight=float(w), label=_label(pack, hp, i))
                                                   for i, w in zip(ids, c)], **common)
            explained = round(carried, 4)
        spec.save(out_dir / f"{name}.json")
        return {"file": str(out_dir / f"{name}.json"), "kind": kind, "thresholds": thr.phase, "prior": thr.prior,
                "features": decision.features, "explained_share": explained,
                "excluded": decision.excluded}

    from ..calibration.loso import set_thresholds

    report: dict[str, Any] = {"detector": args.name, "hookpoint": hp, "group_by": args.group_by, "phases": watch,
                              "chosen": cal.chosen, "reason": cal.reason, "groups": groups, "kinds": cal.results,
                              "written": {}, "argv": sys.argv[1:]}
    if baseline is not None:
        report["baseline"] = _score_baseline(baseline, args.name, rows, sae)
    report["written"][args.name] = write(args.name, cal.chosen, cal.decision, cal.thresholds)
    if cal.chosen == "probe":  # the -probe variant (a judge for redteam, a column in eval) is the same decision
        report["written"][args.name + "-probe"] = write(args.name + "-probe", "probe", cal.decision, cal.thresholds)
    elif cal.probe is not None:
        thr = set_thresholds(rows, np.nan_to_num(cal.oof["probe"], nan=-np.inf), watch, target_fpr=args.target_fpr,
                             min_tokens=args.min_tokens, prior_tokens=args.prior_tokens, kinds=on)
        report["written"][args.name + "-probe"] = write(args.name + "-probe", "probe", cal.probe, thr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    if args.json:
        print(json.dumps(report, default=_jsonable))
        return 0
    _print_report(report, args)
    return 0


def _baseline_pack(args: argparse.Namespace) -> Any:
    """The ``--baseline`` pack, checked before the model loads: it must hold the detector being fitted."""
    if not args.baseline:
        return None
    from ..pack import load_pack

    base = load_pack(args.baseline)
    if args.name not in base.detectors:
        raise CLIError(f"--baseline {args.baseline}: has no detector {args.name!r} to compare with "
                       f"(it has {', '.join(sorted(base.detectors))})")
    return base


def _score_baseline(base: Any, name: str, rows: Any, sae: Any) -> dict[str, Any]:
    """The baseline pack's detector (and its -probe) on the same rows, as the runtime scores them, per group."""
    from ..calibration.loso import Thresholds, fires_at, summary
    from ..calibration.sources import sae_fingerprint

    out: dict[str, Any] = {"pack": str(base.path)}
    for spec_name in (name, name + "-probe"):
        spec = base.detectors.get(spec_name)
        if spec is None:
            continue
        if spec.kind == "sae":
            base_sae = base.saes.get(spec.hookpoint)
            if base_sae is None or sae_fingerprint(base_sae) != sae_fingerprint(sae):
                out[spec_name] = {"error": "reads another SAE: its feature ids mean other features here"}
                continue
            ids = [f.id for f in spec.features]
            raw = rows.feats[:, ids] @ np.array([f.weight for f in spec.features]) + spec.bias
        else:
            raw = rows.resid @ base.probe_weight(spec).numpy() + spec.bias
        watched = np.isin(rows.phase, list(spec.phases))
        raw = np.where(watched, raw, np.nan)
        thr = Thresholds(spec.pooling.prior_score or 0.0, {p: spec.threshold_for(p) for p in spec.phases},
                         spec.hysteresis, {})
        k = spec.pooling.prior_tokens if spec.pooling.prior_score is not None else 0.0
        fired = fires_at(rows, raw, thr, min_tokens=spec.pooling.min_tokens, prior_tokens=k)
        res = summary(rows, raw, fired)
        res["in_split_auroc"] = spec.calibration.auroc if spec.calibration else None
        out[spec_name] = res
    return out


def _label(pack: Any, hp: str, feature: int) -> str | None:
    info = pack.features.get(hp, {}).get(feature)
    return info.label if info is not None and info.label else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def _print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    from ..display import table

    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{report['detector']}: leave-one-{report['group_by']}-out over {len(report['groups'])} groups")
    rows = []
    for kind, res in report["kinds"].items():
        loso = res["loso"]
        rows.append([kind + (" ◀" if kind == report["chosen"] else ""), f(res.get("in_split", {}).get("auroc")),
                     f(loso["auroc"]), f(loso["worst_auroc"]), f(loso["recall"]), f(loso["fpr"])])
    print(table(rows, ["decision", "in-split AUROC", "out-of-source AUROC", "worst group", "recall", "FPR"]))
    for name, res in (report.get("baseline") or {}).items():
        if isinstance(res, dict) and "auroc" in res:
            print(f"baseline {name} ({report['baseline']['pack']}): its own held-out AUROC {f(res['in_split_auroc'])}; "
                  f"on these records AUROC {f(res['auroc'])}, worst group {f(res['worst_auroc'])}, recall "
                  f"{f(res['recall'])}, FPR {f(res['fpr'])}")
    print(f"chosen: {report['chosen']} — {report['reason']}")
    for kind, res in report["kinds"].items():
        gap = res.get("gap")
        if gap is not None and gap > GAP:
            print(f"warning: {kind}: in-split AUROC is {gap:.3f} above out-of-source — a split inside the same "
                  "sources overstates how this detector does on text from anywhere else")
    chosen = report["kinds"][report["chosen"]]["loso"]
    print(table([[g["group"], g["n_pos"], g["n_neg"], f(g.get("auroc")), f(g.get("auroc_pos")), f(g.get("auroc_neg")),
                  f(g.get("recall")), f(g.get("fpr_neg")), f(g.get("fpr_hard_neg")), f(g.get("fpr_pool"))]
                 for g in chosen["groups"]],
                ["left out", "pos", "neg", "AUROC", "vs all neg", "all pos vs", "recall", "FPR neg", "FPR hard",
                 "FPR pool"]))
    print("AUROC: within the group where it has both labels, else its one class against the other class of every "
          "group; worst group: the lowest of these over the labelled groups")
    for _name, w in report["written"].items():
        thr = ", ".join(f"{p} {t:.3f}" for p, t in w["thresholds"].items())
        extra = f"; {len(w['features'])} features" if w["features"] else ""
        if w.get("excluded"):
            extra += f"; candidates {w['excluded']}"
        if w.get("explained_share") is not None:
            extra += f"; {w['explained_share']:.0%} of the positives' |feature contributions| in its evidence features"
        print(f"wrote {w['file']} ({w['kind']}; thresholds {thr}{extra})")
