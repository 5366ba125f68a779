"""``featurewatch calibrate --group-by FIELD``: leave-one-source-out calibration.

Everything that can be wrong with the inputs (a missing file, a record without
a label, a group field that is missing or not a string, an unknown wrapper, a
``--wrap`` that names no input) is found before the model loads. The fitting is
:mod:`featurewatch.calibration.job` (the road `build-pack` takes too); this module reads the options, prints the
per-group report and writes the specs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._common import CLIError, check_input, check_output_dir, load_model, load_pack_checked, progress

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

    from ..calibration.job import DetectorJob, InputFile, fit_job, jsonable, prepare_job
    from ..calibration.loso import DECISIONS
    from ..calibration.sources import load_rows
    from ..detector import DETECTOR_NAME
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
    on = tuple(k.strip() for k in args.threshold_on.split(",") if k.strip())
    if not on or set(on) - {"neg", "pool", "hard_neg"}:
        raise CLIError(f"--threshold-on {args.threshold_on!r}: a comma-separated subset of neg, pool, hard_neg")
    cache = check_output_dir(args.cache, "--cache") if args.cache else None
    if cache is None:
        raise CLIError("--cache '': --group-by keeps its prepared records and activations in the cache; give a "
                       "directory")
    job = DetectorJob(
        name=args.name, description=args.description, watch=_watch(args), group_by=args.group_by,
        files=[InputFile(Path(p), negatives=p not in args.input, wrap=wraps.get(p, ()), max_per_group=caps[p],
                         max_chars=chars[p]) for p in paths],
        kinds=list(DECISIONS) if args.kind in (None, "auto") else [args.kind], target_fpr=args.target_fpr,
        min_tokens=args.min_tokens, prior_tokens=args.prior_tokens, max_features=args.max_features,
        max_tokens=args.max_tokens, threshold_on=on, severity=args.severity, action=args.action)
    prep = prepare_job(job, cache)
    baseline = _baseline_pack(args)
    pack = load_pack_checked(args)
    out_dir = check_output_dir(args.out, "--out") if args.out else resolve_pack_path(args.pack or pack.path)
    hp = next(iter(pack.saes))
    sae = pack.saes[hp]
    _say(f"{prep.n_labelled} labelled records in {len(prep.groups)} groups by {args.group_by}; "
         f"{prep.n_pool} pool records")
    loaded = load_model(args)
    rows = load_rows(prep.prepared, model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name, sae=sae,
                     hookpoint=hp, phases=job.watch, max_tokens=args.max_tokens, cache_dir=cache, progress=progress(),
                     log=_say)
    infos = {i: info.model_dump() for i, info in pack.features.get(hp, {}).items()}
    report = fit_job(prep, rows, sae=sae, hookpoint=hp, out_dir=out_dir, features_info=infos, baseline=baseline,
                     progress=_say)
    report["argv"] = args.argv
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=jsonable) + "\n")
    if args.json:
        print(json.dumps(report, default=jsonable))
        return 0
    print_report(report)
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


def print_report(report: dict[str, Any]) -> None:
    """The per-group report a person reads (``calibrate --group-by`` and ``build-pack`` print it)."""
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
