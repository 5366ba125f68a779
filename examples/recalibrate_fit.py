"""Fit, threshold and report the default pack's detectors from the wrapped sets (see recalibrate.py).

What each detector is fitted on, and the FPR each hard-negative group must meet, is written
out below; the library does the rest (select.py, thresholds.py, report.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featurewatch.calibration.data import cached_acts, load_labelled
from featurewatch.calibration.metrics import auroc
from featurewatch.calibration.report import Task, evaluate, explain
from featurewatch.calibration.rows import PhaseRows, phase_rows
from featurewatch.calibration.select import fit_probe, fit_readout, is_formatting, paired_shift, wrapper_gap
from featurewatch.calibration.thresholds import binding, hysteresis_from, per_cell_thresholds, shrunk
from featurewatch.calibration.wrappers import phase_of_content, wrapper_family
from featurewatch.models import EMBEDDED_MODEL_NAME
from featurewatch.sae import SparseAutoencoder
from featurewatch.training.harvest import is_held_out

log = logging.getLogger("recalibrate")
HOOK = "layers.15"
PRIOR_TOKENS = 4.0
# Readout size: harm and scam are families of specific features in a 16k dictionary (weapons, hacking,
# drugs …; credential lures, payment lures …), not one feature each. Held-out AUROC on the 16k SAE rose
# with the readout up to ~128 features and no further (16 → 64 → 128 → 256: dangerous requests 0.893 →
# 0.951 → 0.968 → 0.969); the L1 path stops earlier where fewer features carry the signal.
MAX_FEATURES = 128
# per hard-negative group: the highest FPR it may see in any wrapper (the rest: DEFAULT_TARGET)
TARGETS = {
    "legit-mail": 0.02,
    "look-alike": 0.10,
    "xstest-style": 0.05,
    "ordinary-chats": 0.02,
    "smalltalk": 0.0,
    "short-chat": 0.0,
    "short": 0.0,
    "alpaca": 0.02,
    "alpaca-replies": 0.05,
}
DEFAULT_TARGET = 0.05
DETECTORS: dict[str, dict[str, Any]] = {
    "scam-email": dict(
        phases=["prompt", "completion"],
        pos=["mail"],
        neg=["neutral", "chats", "danger_prompt", "danger_alpaca", "danger_hw", "danger_reply"],
        min_tokens=8,
        severity="warning",
        description="Text that is, or is being written as, a scam, phishing or fraud message.",
    ),
    "dangerous-content": dict(
        phases=["prompt", "completion"],
        pos=["danger_prompt", "danger_alpaca", "danger_hw", "danger_reply"],
        neg=["neutral", "chats", "mail"],
        min_tokens=6,
        severity="critical",
        description="Requests for, or text giving, seriously harmful capability (weapons, cyberattacks, "
        "violent crime, hard drugs).",
    ),
    "sycophancy": dict(
        phases=["completion"],
        pos=["sycophancy"],
        neg=["neutral", "chats", "mail", "danger_hw", "danger_reply", "deception"],
        min_tokens=6,
        severity="info",
        description="The assistant flattering the user or telling them what they want to hear instead of the truth.",
    ),
    "deception": dict(
        phases=["completion"],
        pos=["deception"],
        neg=["neutral", "chats", "mail", "danger_hw", "danger_reply", "sycophancy"],
        min_tokens=5,
        severity="warning",
        description="The assistant knowingly misleading (lying, concealing, manipulating, fabricating) "
        "or asserting falsehoods.",
    ),
}


def sae_key(sae: SparseAutoencoder) -> str:
    """A fingerprint of an SAE's weights (its shape and a strided sample of its encoder)."""
    w = sae.W_enc.detach().float().flatten()[:: 9973].numpy().tobytes()
    return f"{tuple(sae.W_enc.shape)}-" + hashlib.sha256(w).hexdigest()[:16]


def load_rows(out: Path, sae: SparseAutoencoder, sets: Mapping[str, int], *,
              allow_missing: bool = False) -> PhaseRows:
    """Pooled rows of the sets (name → the max_tokens they were extracted with) from the activation cache."""
    parts = []
    for name, max_tokens in sets.items():
        data = load_labelled(out / f"{name}.jsonl")
        try:
            acts = cached_acts(
                None,
                None,
                data,
                HOOK,
                max_tokens=max_tokens,
                cache_dir=out / "acts",
                model_name=EMBEDDED_MODEL_NAME,
            )
        except (AttributeError, TypeError):  # no cache: extract would need the model
            if not allow_missing:
                raise SystemExit(f"no cached activations for {name}; run the extract step first") from None
            log.warning("no cached activations for %s; skipped", name)
            continue
        # the memo is of this cache *and* this SAE: a new SAE must never reuse another's pooled codes
        ids_key = hashlib.sha256("\n".join(acts.ids).encode() + str(int(acts.offsets[-1])).encode()
                                 + sae_key(sae).encode()).hexdigest()[:12]
        memo = out / "acts" / f"rows-{name}-{ids_key}.pkl"
        if memo.exists():  # pooled rows of this exact cache, from an earlier run
            import pickle

            parts.append(pickle.loads(memo.read_bytes()))
        else:
            import pickle

            parts.append(phase_rows(acts, data.records, sae, name))
            memo.write_bytes(pickle.dumps(parts[-1]))
        log.info("rows %s: %d", name, len(data.records))
    return PhaseRows.concat(parts)


def task_for(cfg: dict[str, Any], rows: PhaseRows) -> Task:
    """(record, phase, label) pairs: content phases of the detector's sets carry their label, the rest 0."""
    idx, ph, y = [], [], []
    for i, (s, w, label) in enumerate(zip(rows.sets, rows.wrappers, rows.labels)):
        if s in cfg["pos"]:
            own = True
        elif s in cfg["neg"] and label == 0:
            own = False
        else:
            continue
        for phase in cfg["phases"]:
            if rows.n[phase][i] == 0:
                continue
            idx.append(i)
            ph.append(phase)
            y.append(int(label) if own and phase == phase_of_content(w) else 0)
    return Task(np.array(idx), np.array(ph), np.array(y))


def sample_weights(rows: PhaseRows, task: Task) -> np.ndarray:
    """Each (group, wrapper, phase, class) cell weighs the same; hand-written cells twice; classes balanced."""
    keys = [(rows.groups[i], wrapper_family(rows.wrappers[i]), p, y) for i, p, y in zip(task.index, task.phase, task.y)]
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    w = np.array([(2.0 if k[0].startswith(("handwritten", "look-alike", "xstest")) else 1.0) / counts[k] for k in keys])
    for c in (0, 1):
        w[task.y == c] /= w[task.y == c].sum()
    return w * len(w) / 2


def fold_of(base_ids: list[str]) -> np.ndarray:
    return np.array([int(hashlib.sha256(("fold" + b).encode()).hexdigest()[:8], 16) % 5 for b in base_ids])


def sub(task: Task, mask: np.ndarray) -> Task:
    return Task(task.index[mask], task.phase[mask], task.y[mask])


def X_of(rows: PhaseRows, task: Task, kind: str = "feats") -> np.ndarray:
    src = rows.feats if kind == "feats" else rows.resid
    out = np.zeros((len(task.index), src["prompt"].shape[1]), dtype=np.float32)
    for ph in ("prompt", "completion"):
        sel = task.phase == ph
        out[sel] = src[ph][task.index[sel]]
    return out


def candidate_pool(rows: PhaseRows, X: np.ndarray, features_info: dict[int, dict]) -> tuple[np.ndarray, dict]:
    """Features that fire on the task and are explained neither by the wrapper nor by formatting."""
    fires = (X > 0).mean(0) >= 0.01
    content = np.zeros_like(rows.feats["prompt"])
    for ph in ("prompt", "completion"):
        sel = np.array([phase_of_content(w) == ph for w in rows.wrappers])
        content[sel] = rows.feats[ph][sel]
    scale = np.percentile(content, 99, axis=0) + 1e-6
    neutral = np.array([s == "neutral" for s in rows.sets])
    gap = wrapper_gap(content[neutral], [rows.wrappers[i] for i in np.flatnonzero(neutral)], scale)
    on_empty = content[neutral].mean(0) / scale
    multi = np.array([s in ("mail", "danger_prompt", "danger_alpaca", "danger_hw", "danger_reply") for s in rows.sets])
    shift = paired_shift(
        content[multi],
        [rows.base_ids[i] for i in np.flatnonzero(multi)],
        [rows.families[i] for i in np.flatnonzero(multi)],
    )
    fmt = np.array([is_formatting(features_info.get(f)) for f in range(X.shape[1])])
    # scale is the 99th percentile of pooled activations over whole texts; on 1–3 token contents a
    # pooled mean runs higher, so the wrapper must move a feature by more than that scale to count
    drop = {
        "wrapper_gap": fires & (gap > 2.0),
        "fires_on_empty": fires & (on_empty > 2.0),
        "paired_shift": fires & (shift > 0.5),
        "formatting": fires & fmt,
    }
    keep = fires.copy()
    for m in drop.values():
        keep &= ~m
    return np.flatnonzero(keep), {k: int(v.sum()) for k, v in drop.items()} | {
        "kept": int(keep.sum()),
        "fire": int(fires.sum()),
    }


def calibrate_scores(rows: PhaseRows, task: Task, raw: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    """Prior, per-phase thresholds (binding cell each), combined threshold and hysteresis from OOF scores."""
    neg = task.y == 0
    own = np.array([p == phase_of_content(rows.wrappers[i]) for i, p in zip(task.index, task.phase)])
    prior = float(np.median(raw[neg & own]))
    n = np.array([rows.n[p][i] for i, p in zip(task.index, task.phase)])
    s = shrunk(raw, n, prior, PRIOR_TOKENS)
    # hard-negative groups (no positives: look-alikes, legit mail, small talk…) each meet their own
    # target; the negatives of the detector's own labelled sources are pooled into one cell
    with_pos = {rows.groups[i] for i, y in zip(task.index, task.y) if y == 1}
    cell_group = lambda i: "own-negatives" if rows.groups[i] in with_pos else rows.groups[i]  # noqa: E731
    phase_thr, binds = {}, {}
    for ph in cfg["phases"]:
        sel = neg & (task.phase == ph)
        cells = per_cell_thresholds(
            s[sel],
            n[sel],
            [cell_group(i) for i in task.index[sel]],
            [wrapper_family(rows.wrappers[i]) for i in task.index[sel]],
            TARGETS,
            default_target=DEFAULT_TARGET,
            min_tokens=cfg["min_tokens"],
        )
        b = binding(cells)
        phase_thr[ph], binds[ph] = b.threshold, f"{b.group}/{b.wrapper} ({b.n} negatives, target {b.target_fpr:.0%})"
    # the combined score pools every watched phase of a record
    comb = {}
    for i, r, k in zip(task.index, raw, n):
        t, m = comb.get(i, (0.0, 0))
        comb[i] = (t + r * k, m + k)
    ci = np.array(sorted(comb))
    ctot = np.array([comb[i][0] for i in ci])
    cn = np.array([comb[i][1] for i in ci])
    cy = np.zeros(len(ci), dtype=int)
    for i, y in zip(task.index, task.y):
        cy[np.searchsorted(ci, i)] |= y
    cs = (ctot + PRIOR_TOKENS * prior) / (cn + PRIOR_TOKENS)
    cneg = cy == 0
    cells = per_cell_thresholds(
        cs[cneg],
        cn[cneg],
        [cell_group(i) for i in ci[cneg]],
        [wrapper_family(rows.wrappers[i]) for i in ci[cneg]],
        TARGETS,
        default_target=DEFAULT_TARGET,
        min_tokens=cfg["min_tokens"],
    )
    combined = binding(cells).threshold
    pos_own = s[(task.y == 1)]
    hyst = hysteresis_from(pos_own, 0.0)
    return {"prior": prior, "phase_thresholds": phase_thr, "binding": binds, "threshold": combined, "hysteresis": hyst}


def fit_one(
    name: str, cfg: dict[str, Any], rows: PhaseRows, fit_mask: np.ndarray, features_info: dict, kind: str
) -> tuple[dict[str, Any], np.ndarray | None, dict[str, Any]]:
    task_all = task_for(cfg, rows)
    task = sub(task_all, fit_mask[task_all.index])
    w = sample_weights(rows, task)
    X = X_of(rows, task, "feats" if kind == "sae" else "resid")
    info: dict[str, Any] = {}
    folds = fold_of([rows.base_ids[i] for i in task.index])
    oof = np.zeros(len(task.y))
    if kind == "sae":
        cand, info["pool"] = candidate_pool(rows, X, features_info)
        ro = fit_readout(X, task.y, w, cand, max_features=MAX_FEATURES)
        feats, weights, bias = ro.features, ro.weights, ro.bias
        info["shares"] = {int(f): round(float(s), 3) for f, s in zip(feats, ro.shares)}
        cols = X[:, feats]
        from featurewatch.calibration.fit import _fold, _sklearn, _standardize

        lm, _ = _sklearn()
        for k in range(5):
            tr = folds != k
            Z, mu, sd = _standardize(cols[tr])
            m = lm.LogisticRegression(C=0.1, max_iter=5000).fit(Z, task.y[tr], sample_weight=w[tr])
            wt, bt = _fold(m.coef_[0], float(m.intercept_[0]), mu, sd)
            oof[~tr] = cols[~tr] @ wt + bt
        probe = None
    else:
        weights, bias = fit_probe(X, task.y, w)
        feats = []
        for k in range(5):
            tr = folds != k
            wt, bt = fit_probe(X[tr], task.y[tr], w[tr])
            oof[~tr] = X[~tr] @ wt + bt
        probe = weights
    cal = calibrate_scores(rows, task, oof, cfg)
    info["oof_auroc"] = round(auroc(oof, task.y), 4)
    info["binding"] = cal["binding"]
    spec: dict[str, Any] = {
        "name": name if kind == "sae" else f"{name}-probe",
        "description": cfg["description"],
        "kind": kind,
        "hookpoint": HOOK,
    }
    if kind == "sae":
        spec["features"] = [
            {"id": int(f), "weight": float(wt), "label": (features_info.get(int(f)) or {}).get("label")}
            for f, wt in sorted(zip(feats, weights), key=lambda t: -abs(t[1]))
        ]
    else:
        spec["probe_weights"] = f"probes/{name}-probe.safetensors"
    spec.update(
        {
            "bias": float(bias),
            "pooling": {
                "method": "mean",
                "min_tokens": cfg["min_tokens"],
                "prior_score": round(cal["prior"], 4),
                "prior_tokens": PRIOR_TOKENS,
            },
            "threshold": round(cal["threshold"], 4),
            "phase_thresholds": {p: round(t, 4) for p, t in cal["phase_thresholds"].items()},
            "hysteresis": round(cal["hysteresis"], 4),
            "phases": cfg["phases"],
            "action": "alert",
            "severity": cfg["severity"],
        }
    )
    return spec, probe, info


LABELS = Path(__file__).resolve().parent / "feature_labels.json"


def apply_labels(pack: Path, sae: SparseAutoencoder) -> dict[int, dict[str, Any]]:
    """Write the hand-written labels (examples/feature_labels.json, read off top contexts) into features.json.

    The labels belong to one SAE (its ``sae_key``): feature ids mean nothing across dictionaries, so
    labels written for another SAE are not applied.
    """
    raw = json.loads((pack / "features.json").read_text())
    stored = json.loads(LABELS.read_text()) if LABELS.exists() else {"sae": None, "labels": {}}
    labels = {int(k): v for k, v in stored["labels"].items()}
    if labels and stored["sae"] != sae_key(sae):
        log.warning("%s holds labels for SAE %s, not for %s: none applied", LABELS.name, stored["sae"], sae_key(sae))
        labels = {}
    changed = False
    for f in raw[HOOK]:
        if f["id"] in labels and f.get("label") != labels[f["id"]]:
            f["label"] = labels[f["id"]]
            changed = True
    if changed:
        (pack / "features.json").write_text(json.dumps(raw, ensure_ascii=False) + "\n")
    return {f["id"]: f for f in raw[HOOK]}


FEW_CONTEXTS = 2


def trim_contexts(pack: Path) -> None:
    """Keep every stored top context for the features a detector reads, ``FEW_CONTEXTS`` for the rest.

    A 16k-feature dictionary with five contexts each would make features.json the largest file of the
    pack; the contexts that matter are those a person reads to check a detector's labels.
    The full file is the SAE run's (runs/<sae>/features.json, copied in by build_default_pack.sh).
    """
    used = {f["id"] for spec in pack.glob("*.json") if spec.name not in ("pack.json", "features.json")
            for f in json.loads(spec.read_text()).get("features", [])}
    raw = json.loads((pack / "features.json").read_text())
    for f in raw[HOOK]:
        if f["id"] not in used:
            f["top_contexts"] = f["top_contexts"][:FEW_CONTEXTS]
    (pack / "features.json").write_text(json.dumps(raw, ensure_ascii=False) + "\n")
    log.info("features.json: full contexts for the %d features detectors read, %d for the rest", len(used),
             FEW_CONTEXTS)


def run(
    out: Path,
    pack: Path,
    sets: Mapping[str, int],
    *,
    fit: bool = True,
    report: bool = True,
    allow_missing: bool = False,
    only: list[str] | None = None,
) -> None:
    sae = SparseAutoencoder.load(pack / "sae" / HOOK)
    features_info = apply_labels(pack, sae)
    rows = load_rows(out, sae, sets, allow_missing=allow_missing)
    held = np.array([is_held_out(b, 0.2) for b in rows.base_ids])
    results: dict[str, Any] = {}
    for name, cfg in DETECTORS.items():
        if only and name not in only:
            continue
        for kind in ("sae", "probe"):
            spec_path = pack / f"{name if kind == 'sae' else name + '-probe'}.json"
            if fit:
                spec, probe, info = fit_one(name, cfg, rows, ~held, features_info, kind)
                if probe is not None:
                    import torch
                    from safetensors.torch import save_file

                    save_file({"weight": torch.tensor(probe, dtype=torch.float32)}, str(pack / spec["probe_weights"]))
                log.info("%s %s: %s", name, kind, json.dumps(info)[:600])
            else:
                spec, info = json.loads(spec_path.read_text()), {}
                probe = None
                if kind == "probe":
                    from safetensors.torch import load_file

                    probe = load_file(str(pack / spec["probe_weights"]))["weight"].numpy()
            task_all = task_for(cfg, rows)
            ho = sub(task_all, held[task_all.index])
            table = evaluate(spec, rows, ho, probe)
            overall = next(
                r
                for r in table
                if r["group"] == "(all)" and r["wrapper"] == "(all)" and r["phase"] == cfg["phases"][-1]
            )
            if fit:
                spec["calibration"] = {
                    "data": sorted({f"{rows.sets[i]}: {rows.groups[i]}" for i in task_all.index}),
                    "target_fpr": DEFAULT_TARGET,
                    "auroc": overall["auroc"],
                    "tpr_at_fpr": overall["recall"],
                    "fpr": overall["fpr"],
                    "n_pos": overall["n_pos"],
                    "n_neg": overall["n_neg"],
                    "held_out": "records whose sha256(base id) falls in the first 20% (every wrapper of a text "
                    "in the same split); thresholds from 5-fold out-of-fold scores on the rest",
                    "date": dt.date.today().isoformat(),
                    "notes": (
                        f"each text in several wrappers (plain, quoted in a user message, assistant reply to a "
                        f"neutral request, ± system prompt); per (group, wrapper) FPR targets {TARGETS}, "
                        f"default {DEFAULT_TARGET:.0%}; binding cells {info.get('binding')}; "
                        f"candidate pool {info.get('pool')}; share of |w·mean a| on the fit positives by feature "
                        f"{info.get('shares')}; out-of-fold AUROC {info.get('oof_auroc')}; "
                        f"figures above: held-out, {cfg['phases'][-1]} phase, all groups and wrappers"
                    ),
                }
                from featurewatch.detector import DetectorSpec

                DetectorSpec.model_validate(spec)  # the runtime must accept what is shipped
                spec_path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
            pos = ho.y == 1
            X_pos = X_of(rows, sub(ho, pos))
            results[spec["name"]] = {
                "table": table,
                "info": info,
                "explain": explain(spec, features_info, X_pos) if kind == "sae" else None,
            }
    if fit:
        trim_contexts(pack)
    (out / "report.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(markdown(results, detail=False))
    log.info("wrote %s", out / "report.json")


def markdown(results: dict[str, Any], *, detail: bool = True) -> str:
    """The held-out tables as Markdown: per detector, phase, group and wrapper; the probe's AUROC beside."""
    lines = [
        "| detector | phase | group | wrapper | pos | neg | AUROC | recall@thr | FPR@thr | probe AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name, res in results.items():
        if name.endswith("-probe"):
            continue
        probe = {(r["phase"], r["group"], r["wrapper"]): r for r in results.get(name + "-probe", {}).get("table", [])}
        for r in res["table"]:
            if not detail and r["group"] != "(all)" and r["wrapper"] != "(all)":
                continue
            p = probe.get((r["phase"], r["group"], r["wrapper"]), {})
            lines.append(
                f"| {name} | {r['phase']} | {r['group']} | {r['wrapper']} | {r['n_pos']} | {r['n_neg']} | "
                f"{f(r['auroc'])} | {f(r['recall'])} | {f(r['fpr'])} | {f(p.get('auroc'))} |"
            )
    return "\n".join(lines) + "\n"
