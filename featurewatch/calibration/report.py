"""What a detector measures on held-out data, and what its readout reads.

``evaluate_runs`` reads what the runtime scored and fired on every (record, phase)
— the pooled score against the phase's own threshold — and reports per (phase,
group, wrapper): AUROC, recall and FPR at the shipped threshold.
For a cell holding only negatives (look-alike notices, small talk) the AUROC
is against the positives of the same phase and wrapper: "can the detector tell
this hard negative from the real thing?". ``explain`` lists a readout's
features with weights, labels, top contexts and their share of the score.

Specs are read as plain dicts (the JSON on disk), so this module also works on
specs that carry fields the installed runtime does not know yet.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .metrics import auroc
from .wrappers import wrapper_family


def threshold_of(spec: dict[str, Any], phase: str) -> float:
    """The phase's own threshold, else the spec's default."""
    return float((spec.get("phase_thresholds") or {}).get(phase, spec["threshold"]))


def _r(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def group_of(record: Any, group_by: str | None) -> str:
    """The cell a record is reported in: its ``group`` (else ``source``) field, or with ``group_by`` that
    field's value — a negative of the multi-source data also by its kind (``spamassassin/hard_neg``)."""
    extra = record.extra
    if group_by is None:
        return str(extra.get("group", extra.get("source", "")))
    value = str(extra.get(group_by, ""))
    kind = extra.get("group")
    return f"{value}/{kind}" if kind in ("neg", "hard_neg") else value


def evaluate_runs(spec: dict[str, Any], records: list[Any], runs: list[Any], *, label_phase: str | None = None,
                  group_by: str | None = None) -> list[dict[str, Any]]:
    """The same table from the runtime's own results (``Monitor.score_records``): its scores and its alerts.

    A record's label counts in the phase that holds its content (from its ``wrapper`` tag, or
    ``label_phase``); its other phases are negatives. ``records`` need ``label`` and ``group``/``source``
    (or the ``group_by`` field). A ``wrapper`` field that is not one of ours (the shared data's
    ``original``/``neutral``) says nothing about the phase: the record's shape does.
    """
    from .wrappers import WRAPPERS, phase_of_content

    score, fire, y, phase, group, family = [], [], [], [], [], []
    for rec, run in zip(records, runs):
        tag = str(rec.extra.get("wrapper") or "")
        if wrapper_family(tag) not in WRAPPERS:
            tag = native_tag(rec)
        own = label_phase or phase_of_content(tag)
        for ph, by_detector in run.phase_scores.items():  # {phase: {detector: pooled score}}
            value = by_detector.get(spec["name"])
            if ph not in spec.get("phases", [ph]) or value is None or math.isnan(value):
                continue
            score.append(value)
            fire.append(any(a.detector == spec["name"] and a.phase == ph for a in run.alerts))
            y.append(int(rec.extra["label"]) if ph == own else 0)
            phase.append(ph)
            group.append(group_of(rec, group_by))
            family.append(wrapper_family(tag))
    return table(spec, np.array(score), np.array(fire, dtype=bool), np.array(y), np.array(phase),
                 np.array(group), np.array(family))


def native_tag(record: Any) -> str:
    """The wrapper tag of an unwrapped record: a document is ``plain``, a chat ending in a reply ``native``."""
    if getattr(record, "text", None) is not None:
        return "plain"
    msgs = getattr(record, "messages", None) or ()
    return "native" if msgs and msgs[-1]["role"] == "assistant" else "request"


def table(spec: dict[str, Any], score: np.ndarray, fire: np.ndarray, y_all: np.ndarray, phase: np.ndarray,
          grp: np.ndarray, fam: np.ndarray) -> list[dict[str, Any]]:
    """Rows per phase and (group, wrapper): ``group``/``wrapper`` "(all)" pool every group/wrapper of the phase."""
    out = []
    for ph in ("prompt", "completion"):
        if ph not in spec.get("phases", ["prompt", "completion"]):
            continue
        thr = threshold_of(spec, ph)
        in_ph = phase == ph
        cells = [("(all)", "(all)")] + [("(all)", w) for w in sorted(set(fam[in_ph]))]
        cells += sorted({(g, w) for g, w in zip(grp[in_ph], fam[in_ph])})
        cells += sorted({(g, "(all)") for g in grp[in_ph]})
        for g, w in cells:
            sel = in_ph & ((grp == g) if g != "(all)" else True) & ((fam == w) if w != "(all)" else True)
            y = y_all[sel]
            if len(y) == 0:
                continue
            # AUROC against the other class of the same phase and wrapper when the cell has one class
            ref = in_ph & ((fam == w) if w != "(all)" else True)
            if y.min() == y.max():
                other = ref & (y_all != y[0])
                s_au = np.concatenate([score[sel], score[other]])
                y_au = np.concatenate([y, y_all[other]])
            else:
                s_au, y_au = score[sel], y
            f = fire[sel]
            n_pos, n_neg = int(y.sum()), int((1 - y).sum())
            out.append({"phase": ph, "group": g, "wrapper": w, "n_pos": n_pos, "n_neg": n_neg,
                        "auroc": _r(auroc(s_au, y_au)) if len(set(y_au.tolist())) == 2 else None,
                        "recall": _r(f[y == 1].mean()) if n_pos else None,
                        "fpr": _r(f[y == 0].mean()) if n_neg else None,
                        "threshold": round(thr, 4)})
    return out


def explain(spec: dict[str, Any], features_info: dict[int, dict[str, Any]], X_pos: np.ndarray | None = None,
            *, contexts: int = 3) -> dict[str, Any]:
    """A readout as a person can check it: per feature id, weight, label, top contexts, share of the score.

    ``share``: each feature's part of ``Σ |wᵢ·aᵢ|``, with ``aᵢ`` its mean pooled activation on
    the positives ``X_pos`` (n, d_sae) when given (``share_basis: "positives"``), else its
    largest activation in the pack's feature statistics (``"max_activation"``: what the
    feature can add to a score); None when neither is known. Rows are sorted by share.
    """
    feats = spec.get("features") or spec.get("evidence_features") or []
    w = np.array([f["weight"] for f in feats])
    shares = None
    mean_pos = None
    basis = None
    if X_pos is not None and len(feats):
        mean_pos = X_pos[:, [f["id"] for f in feats]].mean(0)
        c = np.abs(w * mean_pos)
        shares, basis = c / max(float(c.sum()), 1e-12), "positives"
    elif len(feats):
        peak = np.array([float(features_info.get(f["id"], {}).get("max_activation") or 0.0) for f in feats])
        if (peak > 0).all():
            c = np.abs(w * peak)
            shares, basis = c / max(float(c.sum()), 1e-12), "max_activation"
    rows = []
    for j, f in enumerate(feats):
        info = features_info.get(f["id"], {})
        rows.append({"id": f["id"], "weight": round(float(f["weight"]), 4),
                     "label": f.get("label") or info.get("label"),
                     "mean_activation_pos": _r(float(mean_pos[j])) if mean_pos is not None else None,
                     "share": _r(float(shares[j])) if shares is not None else None,
                     "top_contexts": list(info.get("top_contexts", []))[:contexts]})
    rows.sort(key=lambda r: -(r["share"] if r["share"] is not None else abs(r["weight"])))
    return {"detector": spec["name"], "kind": spec.get("kind", "sae"), "bias": spec.get("bias", 0.0),
            "threshold": spec["threshold"], "phase_thresholds": spec.get("phase_thresholds"),
            "pooling": spec.get("pooling"), "hysteresis": spec.get("hysteresis", 0.0), "features": rows,
            "explains": "evidence" if spec.get("kind") == "probe" and feats else "score",
            "out_of_source": (spec.get("calibration") or {}).get("out_of_source"),
            "share_basis": basis,
            "largest_share": rows[0]["share"] if rows and rows[0]["share"] is not None else None}
