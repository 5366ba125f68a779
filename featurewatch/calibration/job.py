"""One detector's leave-one-group-out calibration, from its files to the specs it writes.

This is the single road every detector takes, whether it comes from
``featurewatch calibrate --group-by`` (one detector, options on the command
line) or from ``featurewatch build-pack`` (a recipe of several):

1. :func:`prepare_job` reads, groups, caps and wraps the files
   (:mod:`.sources`) and checks what can be checked without a model: both
   labels present, at least two groups, a negative to set each watched phase's
   threshold on;
2. the caller extracts activations (:func:`.sources.load_rows`, cached);
3. :func:`fit_job` runs the recipe (:func:`.loso.calibrate`), explains a dense
   decision in SAE features, writes ``NAME.json`` and ``NAME-probe.json`` into
   the pack directory and returns the report.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError

EVIDENCE_FEATURES = 64  # SAE features a dense decision is explained with (watched for evidence only)
THRESHOLD_KINDS = ("neg", "pool", "hard_neg")


@dataclass(frozen=True)
class InputFile:
    """One file a detector reads: labelled data, or (``negatives``) a benign pool."""

    path: Path
    negatives: bool = False
    wrap: tuple[str, ...] = ()
    max_per_group: int | None = None
    max_chars: int | None = None


@dataclass
class DetectorJob:
    """Everything one detector's calibration needs."""

    name: str
    files: list[InputFile]
    watch: list[str]
    group_by: str = "source"
    description: str = ""
    kinds: Sequence[str] = ("sae", "probe", "mean-diff")
    target_fpr: float = 0.02
    min_tokens: int = 8
    prior_tokens: float = 4.0
    max_features: int = 32
    max_tokens: int = 160
    threshold_on: tuple[str, ...] = ("neg", "pool")
    severity: str = "warning"
    action: str = "alert"


@dataclass
class PreparedJob:
    """A job's files read and prepared: ``prepared`` pairs each file's cached copy with its records."""

    job: DetectorJob
    prepared: list[tuple[Path, list[dict[str, Any]]]]
    groups: list[str]
    n_labelled: int
    n_pool: int
    data: list[str] = field(default_factory=list)  # "path (groups)" per file, for the spec's provenance


def prepare_job(job: DetectorJob, cache: Path, *, where: str = "--input") -> PreparedJob:
    """Read and prepare a job's files into ``cache``; every check that needs no model happens here."""
    from .sources import prepare, write_prepared

    bad = set(job.threshold_on) - set(THRESHOLD_KINDS)
    if not job.threshold_on or bad:
        raise ConfigError(f"{job.name}: threshold_on {','.join(job.threshold_on)!r}: a subset of "
                          f"{', '.join(THRESHOLD_KINDS)}")
    prepared: list[tuple[Path, list[dict[str, Any]]]] = []
    for f in job.files:
        recs = prepare(f.path, group_by=job.group_by, negatives=f.negatives, wrap_with=f.wrap,
                       max_per_group=f.max_per_group, max_chars=f.max_chars)
        prepared.append((write_prepared(recs, cache, f.path.parent.name + "-" + f.path.stem), recs))
    own = [r for f, (_, recs) in zip(job.files, prepared) if not f.negatives for r in recs]
    labels = {int(r["label"]) for r in own}
    if labels != {0, 1}:
        raise ConfigError(f"{job.name}: the labelled records ({where}) are "
                          + (f"all label {labels.pop()}" if labels else "missing")
                          + "; calibration needs positives and negatives")
    groups = sorted({str(r["fw_group"]) for r in own})
    if len(groups) < 2:
        raise ConfigError(f"{job.name}: group by {job.group_by}: the labelled records hold one group "
                          f"({groups[0]}); leaving one out needs at least two")
    for ph in job.watch:  # a negative with tokens in the phase, to set its threshold on
        def has_phase(r: dict[str, Any], ph: str = ph) -> bool:
            ends_reply = "messages" in r and r["messages"][-1]["role"] == "assistant"
            return ends_reply if ph == "completion" else True

        ok = any(has_phase(r) for f, (_, recs) in zip(job.files, prepared) for r in recs
                 if r["label"] == 0 and (("pool" if f.negatives else r["fw_kind"]) in job.threshold_on))
        if not ok:
            raise ConfigError(f"{job.name}: watches {ph} but no {'/'.join(job.threshold_on)} negative has a "
                              f"{ph} phase to set its threshold on; add records with one (a chat ending in the "
                              "assistant's reply), set thresholds on more kinds, or watch fewer phases")
    data = [f"{f.path} ({', '.join(sorted({str(r['fw_group']) for r in recs}))})"
            + (" [negatives]" if f.negatives else "") for f, (_, recs) in zip(job.files, prepared)]
    return PreparedJob(job, prepared, groups, len(own),
                       sum(len(recs) for f, (_, recs) in zip(job.files, prepared) if f.negatives), data)


def fit_job(prep: PreparedJob, rows: Any, *, sae: Any, hookpoint: str, out_dir: Path,
            features_info: dict[int, dict[str, Any]] | None = None, baseline: Any = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Calibrate one detector on its rows, write its specs into ``out_dir`` and return the report."""
    from ..detector import Calibration, DetectorSpec, FeatureWeight, OutOfSource, Pooling
    from .loso import calibrate, explained_by, set_thresholds

    job = prep.job
    for ph in job.watch:
        if not ((rows.phase == ph) & (rows.y == 0) & np.isin(rows.kind, list(job.threshold_on))).any():
            raise ConfigError(f"{job.name}: no {'/'.join(job.threshold_on)} negative has {ph}-phase tokens to set "
                              f"its threshold on; add records with a {ph} phase, set thresholds on more kinds, or "
                              "watch fewer phases")
    infos = features_info or {}
    cal = calibrate(rows, job.watch, kinds=list(job.kinds), target_fpr=job.target_fpr, min_tokens=job.min_tokens,
                    prior_tokens=job.prior_tokens, max_features=job.max_features, features_info=infos,
                    threshold_kinds=job.threshold_on, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    groups = prep.groups

    def label(feature: int) -> str | None:
        info = infos.get(feature) or {}
        return info.get("label") or None

    def out_of_source(kind: str) -> OutOfSource:
        res = cal.results[kind]
        loso = res["loso"]
        worst = min((r for r in loso["groups"] if r["group"] in groups and r.get("auroc") is not None),
                    key=lambda r: r["auroc"], default=None)
        return OutOfSource(
            group_by=job.group_by, decision=kind,  # type: ignore[arg-type]
            reason=cal.reason if kind == cal.chosen else f"variant measured beside {cal.chosen}",
            auroc=loso["auroc"], worst_auroc=loso["worst_auroc"], worst_group=worst["group"] if worst else None,
            in_split_auroc=res.get("in_split", {}).get("auroc"), recall=loso["recall"], fpr=loso["fpr"],
            groups=loso["groups"],
            compared={k: {"auroc": v["loso"]["auroc"], "worst_auroc": v["loso"]["worst_auroc"],
                          "in_split_auroc": v.get("in_split", {}).get("auroc")} for k, v in cal.results.items()})

    def write(name: str, kind: str, decision: Any, thr: Any) -> dict[str, Any]:
        loso = cal.results[kind]["loso"]
        calibration = Calibration(
            data=prep.data, target_fpr=job.target_fpr, auroc=loso["auroc"], tpr_at_fpr=loso["recall"],
            fpr=loso["fpr"], n_pos=int((rows.y == 1).sum()), n_neg=int((rows.y == 0).sum()),
            held_out=f"leave-one-{job.group_by}-out: each group scored by a fit without it (benign pools left "
                     "out per file); thresholds at the target FPR on every negative of the phase",
            date=today, notes=f"mean-pooled content tokens at {hookpoint}; thresholds set on {thr.pool}",
            out_of_source=out_of_source(kind))
        common: dict[str, Any] = dict(
            name=name, description=job.description or f"{job.name} ({kind})", hookpoint=hookpoint,
            bias=decision.bias, threshold=max(thr.phase.values()), phase_thresholds=thr.phase, phases=job.watch,
            hysteresis=round(thr.hysteresis, 4),
            pooling=Pooling(method="mean", min_tokens=job.min_tokens, prior_score=round(thr.prior, 4),
                            prior_tokens=job.prior_tokens),
            action=job.action, severity=job.severity, calibration=calibration)
        explained = None
        if kind == "sae":
            features = [FeatureWeight(id=f, weight=float(w), label=label(f))
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
                                evidence_features=[FeatureWeight(id=i, weight=float(w), label=label(i))
                                                   for i, w in zip(ids, c)], **common)
            explained = round(carried, 4)
        spec.save(out_dir / f"{name}.json")
        return {"file": str(out_dir / f"{name}.json"), "kind": kind, "thresholds": thr.phase, "prior": thr.prior,
                "features": decision.features, "explained_share": explained, "excluded": decision.excluded}

    report: dict[str, Any] = {"detector": job.name, "hookpoint": hookpoint, "group_by": job.group_by,
                              "phases": job.watch, "chosen": cal.chosen, "reason": cal.reason, "groups": groups,
                              "kinds": cal.results, "written": {}}
    if baseline is not None:
        report["baseline"] = score_baseline(baseline, job.name, rows, sae)
    report["written"][job.name] = write(job.name, cal.chosen, cal.decision, cal.thresholds)
    if cal.chosen == "probe":  # the -probe variant (a judge for redteam, a column in eval) is the same decision
        report["written"][job.name + "-probe"] = write(job.name + "-probe", "probe", cal.decision, cal.thresholds)
    elif cal.probe is not None:
        thr = set_thresholds(rows, np.nan_to_num(cal.oof["probe"], nan=-np.inf), job.watch,
                             target_fpr=job.target_fpr, min_tokens=job.min_tokens, prior_tokens=job.prior_tokens,
                             kinds=job.threshold_on)
        report["written"][job.name + "-probe"] = write(job.name + "-probe", "probe", cal.probe, thr)
    return report


def score_baseline(base: Any, name: str, rows: Any, sae: Any) -> dict[str, Any]:
    """A pack's detector of this name (and its -probe) on the same rows, as the runtime scores them, per group."""
    from .loso import Thresholds, fires_at, summary
    from .sources import sae_fingerprint

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


def jsonable(obj: Any) -> Any:
    """``json.dumps(default=…)`` for the numpy values a report holds."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)
