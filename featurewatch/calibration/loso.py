"""Leave-one-source-out calibration: every number a detector ships comes from sources it did not see.

Rows are (record, phase) pairs: the phase that holds a record's judged content
carries its label; the neutral request in front of a reply we wrapped
ourselves is a negative of the prompt phase; a benign pool (``--negatives``)
gives negatives in every phase it has tokens in. Each row has a *fold*: its
group (``--group-by``, e.g. the public source) for the detector's own data,
its file for a benign pool.

For each fold the whole recipe — candidate features, the provenance filter,
feature selection, weights — runs on the other folds and scores the fold
left out. Those out-of-fold scores set the prior and the per-phase
thresholds, and the report gives, per left-out group, AUROC, recall at the
shipped threshold and FPR per negative kind, beside a split *by record*
inside the same data (what the old recipe reported), so the gap between the
two is visible.

Decisions compared (``DECISIONS``):

* ``sae`` — a sparse logistic readout over SAE features (L1 path, then L2),
  among candidates that fire, are not formatting, and are not provenance;
* ``probe`` — L2 logistic regression on the pooled residual;
* ``mean-diff`` — the difference of class means of pooled residuals, each
  class's mean taken over its groups' means (every source counts once), the
  "mass-mean" direction of Marks & Tegmark (2023); a 1-D logistic fit gives
  scale and bias.

A dense decision is explained in SAE features at run time
(:func:`explained_by`): score = Σᵢ aᵢ·(w·dᵢ) + w·b_dec + w·ε + b, so each
feature's share is exact and what the dictionary does not carry is reported
as the unexplained share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fit import _fold, _sklearn, _standardize, feature_aurocs, l1_path
from .metrics import auroc, rounded, threshold_at_fpr
from .select import is_formatting
from .thresholds import hysteresis_from, shrunk

DECISIONS = ("sae", "probe", "mean-diff")
PHASES = ("prompt", "completion")


@dataclass
class Rows:
    """(record, phase) rows of one detector's task with pooled activations."""

    feats: np.ndarray  # (n, d_sae) mean SAE activations over the phase's content tokens
    resid: np.ndarray  # (n, d_model) mean residuals
    n_tokens: np.ndarray  # (n,) content tokens in the phase
    phase: np.ndarray  # (n,) "prompt" | "completion"
    y: np.ndarray  # (n,) 0/1
    group: np.ndarray  # (n,) group-by value (source)
    kind: np.ndarray  # (n,) pos | neg | hard_neg | pool (a benign pool's rows)
    fold: np.ndarray  # (n,) what is left out together: the group, or a benign pool's file
    base: np.ndarray  # (n,) base record id (wrappers of one text share it)
    file: np.ndarray  # (n,) the input file's stem

    def __len__(self) -> int:
        return len(self.y)

    def take(self, mask: np.ndarray) -> "Rows":
        return Rows(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in Rows.__dataclass_fields__))


def sample_weights(rows: Rows) -> np.ndarray:
    """Each (group, kind, phase, label) cell weighs the same, then the two classes weigh the same."""
    keys = list(zip(rows.group, rows.kind, rows.phase, rows.y))
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    w = np.array([1.0 / counts[k] for k in keys])
    for c in (0, 1):
        sel = rows.y == c
        if sel.any():
            w[sel] /= w[sel].sum()
    return w * len(w) / 2


# --------------------------------------------------------------------------- filters
def provenance(F: np.ndarray, y: np.ndarray, groups: np.ndarray, fires: np.ndarray, *, marks: float = 0.9,
               carries: float = 0.6, min_rows: int = 10) -> np.ndarray:
    """Features that mark one source rather than the concept.

    A feature is provenance when, inside one label, it separates one source from that label's
    other sources (AUROC ≥ ``marks``, firing more on the one), and without that source it carries
    no signal for the label (AUROC pos vs neg ≤ ``carries``). A feature of a concept sub-type that
    one source happens to hold more of still separates the labels on the other sources and stays.
    """
    drop = np.zeros(F.shape[1], dtype=bool)
    cand = np.flatnonzero(fires)
    if not len(cand):
        return drop
    X = F[:, cand]
    for label in (0, 1):
        in_label = y == label
        srcs = [g for g in np.unique(groups[in_label]) if (in_label & (groups == g)).sum() >= min_rows]
        if len(srcs) < 2:
            continue
        for g in srcs:
            one = in_label & (groups == g)
            sel = in_label
            au = feature_aurocs(X[sel], one[sel].astype(int))
            marker = au >= marks
            if not marker.any():
                continue
            rest = groups != g
            if len(np.unique(y[rest])) < 2:
                continue
            idx = np.flatnonzero(marker)
            au_label = feature_aurocs(X[rest][:, idx], y[rest].astype(int))
            strength = np.abs(au_label - 0.5) + 0.5
            drop[cand[idx[strength <= carries]]] = True
    return drop


def candidate_features(rows: Rows, features_info: dict[int, Any] | None = None, *, min_fire: float = 0.01
                       ) -> tuple[np.ndarray, dict[str, int]]:
    """Features that fire on ≥ ``min_fire`` of the rows, minus formatting and provenance features."""
    fires = (rows.feats > 0).mean(0) >= min_fire
    infos = features_info or {}
    fmt = np.zeros_like(fires)
    for f in np.flatnonzero(fires):
        fmt[f] = is_formatting(infos.get(int(f)))
    own = rows.kind != "pool"
    prov = provenance(rows.feats[own], rows.y[own], rows.group[own], fires & ~fmt)
    keep = fires & ~fmt & ~prov
    return np.flatnonzero(keep), {"fire": int(fires.sum()), "formatting": int((fires & fmt).sum()),
                                  "provenance": int((fires & ~fmt & prov).sum()), "kept": int(keep.sum())}


# --------------------------------------------------------------------------- decisions
@dataclass
class Decision:
    """A fitted linear decision in raw units: ``score = X[:, features] @ weights + bias`` (dense: all of X)."""

    kind: str
    weights: np.ndarray
    bias: float
    features: list[int] = field(default_factory=list)  # sae only
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.kind != "sae"

    def score(self, rows: Rows) -> np.ndarray:
        X = rows.resid if self.dense else rows.feats[:, self.features]
        return X @ self.weights + self.bias


def fit_decision(kind: str, rows: Rows, *, max_features: int = 32, features_info: dict[int, Any] | None = None,
                 C_sae: float = 0.1, C_probe: float = 0.01, seed: int = 0) -> Decision:
    """Fit one decision kind on ``rows``."""
    linear_model, _ = _sklearn()
    w = sample_weights(rows)
    y = rows.y.astype(int)
    if kind == "sae":
        cand, excluded = candidate_features(rows, features_info)
        if not len(cand):
            raise ValueError("no candidate SAE feature fires on the data")
        au = feature_aurocs(rows.feats[:, cand], y)
        pool = cand[np.argsort(-np.abs(au - 0.5))[:300]]
        Z, _, _ = _standardize(rows.feats[:, pool])
        chosen = l1_path(Z, y, w, max_features=max_features, Cs=np.logspace(0, -3, 16), max_iter=2000, seed=seed)
        if chosen is None:
            chosen = np.arange(min(max_features, len(pool)))
        feats = sorted(int(f) for f in pool[chosen])
        cols = rows.feats[:, feats]
        Zc, mu, sd = _standardize(cols)
        m = linear_model.LogisticRegression(C=C_sae, max_iter=5000).fit(Zc, y, sample_weight=w)
        weights, bias = _fold(m.coef_[0], float(m.intercept_[0]), mu, sd)
        return Decision("sae", weights, bias, feats, excluded)
    if kind == "probe":
        Z, mu, sd = _standardize(rows.resid)
        m = linear_model.LogisticRegression(C=C_probe, max_iter=5000).fit(Z, y, sample_weight=w)
        weights, bias = _fold(m.coef_[0], float(m.intercept_[0]), mu, sd)
        return Decision("probe", weights, bias)
    if kind == "mean-diff":
        means = {}
        for c in (0, 1):
            sel = y == c
            per_group = [rows.resid[sel & (rows.group == g)].mean(0) for g in np.unique(rows.group[sel])]
            means[c] = np.mean(per_group, axis=0)
        direction = means[1] - means[0]
        direction /= max(float(np.linalg.norm(direction)), 1e-12)
        proj = (rows.resid @ direction)[:, None]
        m = linear_model.LogisticRegression(C=1.0, max_iter=5000).fit(proj, y, sample_weight=w)
        return Decision("mean-diff", direction * float(m.coef_[0, 0]), float(m.intercept_[0]))
    raise ValueError(f"unknown decision kind {kind!r}; valid: {', '.join(DECISIONS)}")


# --------------------------------------------------------------------------- out-of-fold scores
def out_of_fold(kind: str, rows: Rows, folds: np.ndarray, *, progress: Callable[[str], None] | None = None,
                **kw: Any) -> np.ndarray:
    """Each row scored by the decision fitted without its fold (NaN where the rest lacks a class)."""
    oof = np.full(len(rows), np.nan)
    for f in np.unique(folds):
        test = folds == f
        train = rows.take(~test)
        if len(np.unique(train.y)) < 2:
            continue
        if progress:
            progress(f"{kind}: leaving out {f}")
        oof[test] = fit_decision(kind, train, **kw).score(rows.take(test))
    return oof


def record_folds(rows: Rows, k: int = 5) -> np.ndarray:
    """A split by record (base id hash), the in-split comparison: every wrapper of a text in one fold."""
    import hashlib

    return np.array([int(hashlib.sha256(("fold" + str(b)).encode()).hexdigest()[:8], 16) % k for b in rows.base])


# --------------------------------------------------------------------------- thresholds
@dataclass
class Thresholds:
    prior: float
    phase: dict[str, float]
    hysteresis: float
    pool: dict[str, dict[str, Any]]  # phase → what the threshold was set on


THRESHOLD_KINDS = ("neg", "pool")


def set_thresholds(rows: Rows, scores: np.ndarray, phases: Sequence[str], *, target_fpr: float, min_tokens: int,
                   prior_tokens: float, kinds: Sequence[str] = THRESHOLD_KINDS) -> Thresholds:
    """Prior and per-phase thresholds from out-of-fold scores of the benign negatives of each phase.

    The negatives a threshold is set on are those of ``kinds``: by default ordinary text (``neg``,
    and the benign ``pool``s), a large mixed set; hard negatives (look-alikes, commercial spam,
    refusals) are reported per group, not thresholded on. Scores are shrunk toward the prior as the
    runtime pools them; a row below ``min_tokens`` never fires, so it is left out of the quantile
    but counts in the FPR's denominator.
    """
    ok = np.isfinite(scores)
    neg = (rows.y == 0) & ok & np.isin(rows.kind, list(kinds))
    prior = float(np.median(scores[neg])) if neg.any() else 0.0
    s = shrunk(scores, rows.n_tokens, prior, prior_tokens)
    out, pool = {}, {}
    for ph in phases:
        sel = neg & (rows.phase == ph)
        if not sel.any():
            raise ValueError(f"no negatives in the {ph} phase to set its threshold on")
        live = sel & (rows.n_tokens >= min_tokens)
        allowed = round(target_fpr * int(sel.sum()))
        thr = threshold_at_fpr(s[live], min(allowed / max(int(live.sum()), 1) + 1e-12, 1.0)) if live.any() else 0.0
        out[ph] = float(thr)
        pool[ph] = {"negatives": int(sel.sum()), "groups": int(len(np.unique(rows.group[sel]))),
                    "target_fpr": target_fpr}
    pos = (rows.y == 1) & ok
    return Thresholds(prior, out, hysteresis_from(s[pos], 0.0), pool)


def fires_at(rows: Rows, scores: np.ndarray, thr: Thresholds, *, min_tokens: int, prior_tokens: float) -> np.ndarray:
    """The runtime's final verdict on each row at the shipped thresholds."""
    s = shrunk(scores, rows.n_tokens, thr.prior, prior_tokens)
    t = np.array([thr.phase.get(p, math.inf) for p in rows.phase])
    return np.isfinite(scores) & (rows.n_tokens >= min_tokens) & (s >= t)


# --------------------------------------------------------------------------- report
def group_report(rows: Rows, scores: np.ndarray, fired: np.ndarray) -> list[dict[str, Any]]:
    """Per group (left out when scored): AUROC of its positives vs every negative, of every positive vs
    its negatives, within the group when it has both, recall and FPR per negative kind at the shipped
    thresholds; ``auroc`` is the group's own figure (within where it can be, else the one it has)."""
    ok = np.isfinite(scores)
    pos_all, neg_all = (rows.y == 1) & ok, (rows.y == 0) & ok
    out = []
    for g in sorted(np.unique(rows.group)):
        in_g = (rows.group == g) & ok
        r: dict[str, Any] = {"group": str(g), "n_pos": int((in_g & pos_all).sum()),
                             "n_neg": int((in_g & neg_all).sum())}
        if r["n_pos"]:
            sel = (in_g & pos_all) | neg_all
            r["auroc_pos"] = rounded(auroc(scores[sel], rows.y[sel]))
            r["recall"] = rounded(float(fired[in_g & pos_all].mean()))
        if r["n_neg"]:
            sel = (in_g & neg_all) | pos_all
            r["auroc_neg"] = rounded(auroc(scores[sel], rows.y[sel]))
            for kind in ("neg", "hard_neg", "pool"):
                k = in_g & neg_all & (rows.kind == kind)
                if k.any():
                    r[f"fpr_{kind}"] = rounded(float(fired[k].mean()))
        if r["n_pos"] and r["n_neg"]:
            r["auroc_within"] = rounded(auroc(scores[in_g], rows.y[in_g]))
        # the group's own figure: its positives against its own negatives where it has both (scores of one
        # fold's fit, so no other source's scale enters), else against the other class of every group
        r["auroc"] = r.get("auroc_within", r.get("auroc_pos", r.get("auroc_neg")))
        out.append(r)
    return out


def summary(rows: Rows, scores: np.ndarray, fired: np.ndarray) -> dict[str, Any]:
    ok = np.isfinite(scores)
    table = group_report(rows, scores, fired)
    own = [r for r in table if r["group"] in set(rows.group[rows.kind != "pool"])]
    aurocs = [r["auroc"] for r in own if r.get("auroc") is not None]
    neg = (rows.y == 0) & ok
    pos = (rows.y == 1) & ok
    return {
        "auroc": rounded(auroc(scores[ok], rows.y[ok])),
        "worst_auroc": min(aurocs) if aurocs else None,
        "mean_auroc": rounded(float(np.mean(aurocs))) if aurocs else None,
        "recall": rounded(float(fired[pos].mean())) if pos.any() else None,
        "fpr": rounded(float(fired[neg].mean())) if neg.any() else None,
        "groups": table,
    }


def choose(results: dict[str, dict[str, Any]], *, margin: float = 0.02) -> tuple[str, str]:
    """The decision with the best worst-group out-of-source AUROC; the SAE readout wins ties within
    ``margin`` (a readout a person can read is worth a little AUROC). Returns (kind, reason)."""
    def key(k: str) -> tuple[float, float]:
        s = results[k]["loso"]
        return (s["worst_auroc"] if s["worst_auroc"] is not None else -1.0, s["mean_auroc"] or -1.0)

    best = max(results, key=key)
    reason = (f"best worst-source AUROC out of source: {best} {key(best)[0]:.3f} (mean {key(best)[1]:.3f}); "
              + ", ".join(f"{k} {key(k)[0]:.3f}" for k in results if k != best))
    if best != "sae" and "sae" in results and key("sae")[0] >= key(best)[0] - margin:
        return "sae", (f"SAE readout within {margin} of the best ({best} {key(best)[0]:.3f} vs sae "
                       f"{key('sae')[0]:.3f} worst-source AUROC): its evidence is its own features")
    return best, reason


# --------------------------------------------------------------------------- explaining a dense decision
def explained_by(weights: np.ndarray, W_dec: np.ndarray, b_dec: np.ndarray, F_pos: np.ndarray, *, top: int = 64
                 ) -> tuple[list[int], np.ndarray, float, float]:
    """The SAE features that carry a dense direction's score on the positives.

    ``w·x = Σᵢ aᵢ (w·dᵢ) + w·b_dec + w·ε``. Returns the ``top`` features by mean ``|aᵢ (w·dᵢ)|`` on
    the positives, their per-activation weights ``w·dᵢ``, the offset ``w·b_dec``, and the share of
    ``Σ |aᵢ (w·dᵢ)|`` over every feature that the chosen ones carry on the positives.
    """
    c = W_dec @ weights  # (d_sae,)
    contrib = np.abs(F_pos * c[None, :]).mean(0)
    order = np.argsort(-contrib)[:top]
    total = float(contrib.sum())
    return ([int(i) for i in order], c[order], float(b_dec @ weights),
            float(contrib[order].sum() / total) if total > 0 else 0.0)


# --------------------------------------------------------------------------- rows from cached activations
def pooled_phases(acts: Any, sae: Any, *, cache: Any = None) -> dict[str, Any]:
    """Per phase: mean SAE features, mean residuals and content-token counts of each record.

    ``cache`` (a path) memoises the result for this activation cache *and* this SAE (its fingerprint
    is in the name the caller gives), since encoding every token into 16k features is the slow part.
    """
    import torch

    if cache is not None and cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    n_rec = len(acts.ids)
    record_of = torch.repeat_interleave(torch.arange(n_rec), acts.offsets.diff())
    out: dict[str, Any] = {}
    for ph in PHASES:
        sel = acts.completion if ph == "completion" else ~acts.completion
        out[f"n_{ph}"] = torch.bincount(record_of[sel], minlength=n_rec).numpy()
        f, _ = acts.pooled(ph, sae)
        r, _ = acts.pooled(ph)
        out[f"feats_{ph}"] = f.numpy().astype(np.float32)
        out[f"resid_{ph}"] = r.numpy().astype(np.float32)
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, **out)
        tmp.replace(cache)
    return out


def task_rows(records: Sequence[dict[str, Any]], pooled: dict[str, Any], phases: Sequence[str]) -> Rows:
    """The (record, phase) rows of one prepared file for a detector watching ``phases``."""
    from .sources import judged_phase

    idx, ph, y, kind, fold = [], [], [], [], []
    for i, r in enumerate(records):
        judged = judged_phase(r)
        pool = bool(r.get("fw_negatives"))
        for p in PHASES:
            if p not in phases or pooled[f"n_{p}"][i] == 0:
                continue
            if pool:
                label, k = 0, "pool"
            elif p == judged:
                label, k = int(r["label"]), str(r["fw_kind"])
            elif "base_id" in r and judged == "completion":
                label, k = 0, "neg"  # our neutral request in front of a reply we wrapped
            else:
                continue  # e.g. the original (harmful) request in front of a reply: not this row's label
            idx.append(i)
            ph.append(p)
            y.append(label)
            kind.append(k)
            fold.append(f"file:{r['fw_file']}" if pool else str(r["fw_group"]))
    ii = np.array(idx, dtype=int)
    phase = np.array(ph)
    feats = np.zeros((len(ii), pooled["feats_prompt"].shape[1]), dtype=np.float32)
    resid = np.zeros((len(ii), pooled["resid_prompt"].shape[1]), dtype=np.float32)
    n_tok = np.zeros(len(ii), dtype=int)
    for p in PHASES:
        sel = phase == p
        feats[sel] = pooled[f"feats_{p}"][ii[sel]]
        resid[sel] = pooled[f"resid_{p}"][ii[sel]]
        n_tok[sel] = pooled[f"n_{p}"][ii[sel]]
    return Rows(feats, resid, n_tok, phase, np.array(y, dtype=int),
                np.array([str(records[i]["fw_group"]) for i in ii], dtype=object), np.array(kind, dtype=object),
                np.array(fold, dtype=object), np.array([str(records[i].get("base_id", records[i]["id"])) for i in ii],
                                                       dtype=object),
                np.array([str(records[i]["fw_file"]) for i in ii], dtype=object))


# --------------------------------------------------------------------------- the recipe
@dataclass
class Calibrated:
    """What ``calibrate --group-by`` ships for one detector, and the evidence for it."""

    decision: Decision
    chosen: str
    reason: str
    thresholds: Thresholds
    results: dict[str, dict[str, Any]]  # kind → {"loso": summary, "in_split": summary, "gap": float}
    oof: dict[str, np.ndarray]  # kind → out-of-source scores (for reports)
    probe: Decision | None = None  # the logistic probe, always fitted (the "-probe" variant)


def calibrate(rows: Rows, phases: Sequence[str], *, kinds: Sequence[str] = DECISIONS, target_fpr: float = 0.02,
              min_tokens: int = 8, prior_tokens: float = 4.0, max_features: int = 32,
              threshold_kinds: Sequence[str] = THRESHOLD_KINDS,
              features_info: dict[int, Any] | None = None, in_split: bool = True,
              progress: Callable[[str], None] | None = None) -> Calibrated:
    """Leave-one-source-out for each decision kind, the choice, the final fit and the thresholds."""
    kw: dict[str, Any] = {"max_features": max_features, "features_info": features_info}
    results: dict[str, dict[str, Any]] = {}
    oof: dict[str, np.ndarray] = {}
    for kind in kinds:
        scores = out_of_fold(kind, rows, rows.fold, progress=progress, **kw)
        thr = set_thresholds(rows, np.nan_to_num(scores, nan=-np.inf), phases, target_fpr=target_fpr,
                             min_tokens=min_tokens, prior_tokens=prior_tokens, kinds=threshold_kinds)
        fired = fires_at(rows, scores, thr, min_tokens=min_tokens, prior_tokens=prior_tokens)
        res: dict[str, Any] = {"loso": summary(rows, scores, fired)}
        if in_split:
            split = out_of_fold(kind, rows, record_folds(rows), progress=progress, **kw)
            res["in_split"] = {"auroc": rounded(auroc(split[np.isfinite(split)], rows.y[np.isfinite(split)]))}
            a, b = res["in_split"]["auroc"], res["loso"]["auroc"]
            res["gap"] = rounded(a - b) if a is not None and b is not None else None
        results[kind] = res
        oof[kind] = scores
    chosen, reason = choose(results) if len(kinds) > 1 else (kinds[0], f"the only decision asked for ({kinds[0]})")
    final = fit_decision(chosen, rows, **kw)
    scores = oof[chosen]
    thr = set_thresholds(rows, np.nan_to_num(scores, nan=-np.inf), phases, target_fpr=target_fpr,
                         min_tokens=min_tokens, prior_tokens=prior_tokens, kinds=threshold_kinds)
    probe = final if chosen == "probe" else (fit_decision("probe", rows, **kw) if "probe" in kinds else None)
    return Calibrated(final, chosen, reason, thr, results, oof, probe)
