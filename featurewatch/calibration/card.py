"""The model card ``build-pack`` writes into a pack (``PACK/README.md``).

Everything on it is read from what the build measured (the SAE's quality, each
detector's leave-one-group-out report, the data the recipe found) — nothing is
typed by hand, so the card cannot drift from the pack it describes. The
"Known gaps" section is generated from the same numbers with plain rules
(``GAP_RULES``), so a weak detector says so on its own card.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .job import PreparedJob

WEAK_GROUP = 0.80  # a left-out group below this AUROC is a known gap
SPLIT_GAP = 0.05  # in-split AUROC this far above out-of-source is a known gap
LOW_RECALL = 0.5
GAP_RULES = (f"a left-out group with AUROC < {WEAK_GROUP}; in-split AUROC more than {SPLIT_GAP} above "
             f"out-of-source; recall < {LOW_RECALL} at the shipped threshold; features read without a label; "
             "optional data that was not found")


def _f(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(pack: Path, manifest: dict[str, Any], build: dict[str, Any], reports: dict[str, dict[str, Any]],
               preps: list[PreparedJob], licences: dict[str, str]) -> str:
    """The card's markdown."""
    out: list[str] = []
    add = out.append
    add(f"# {manifest['name']} {manifest['version']} — featurewatch detector pack for {manifest['model']}\n")
    add(f"{manifest['description']}\n")
    add("Built by `featurewatch build-pack`; this card is generated from the build's own measurements "
        "(`build.json` holds them all). Load it as the default pack loads: `Monitor(model, tokenizer, "
        "pack=\"PATH/TO/THIS/DIR\")`, `featurewatch score --pack DIR`, `featurewatch explain DETECTOR --pack DIR`, "
        "the page (`featurewatch ui --pack DIR`) and the vLLM plugin (`FEATUREWATCH_PACK=DIR`).\n")
    add("## Model and SAE\n")
    add(f"- **Model:** {manifest['model']}")
    for hp, info in build["sae"].items():
        cfg = json.loads((pack / "sae" / hp / "cfg.json").read_text("utf-8"))
        k = f", k = {cfg['k']}" if cfg.get("k") else ""
        add(f"- **SAE at `{hp}`:** {cfg.get('d_sae')} features over width {cfg.get('d_in')}, "
            f"{cfg.get('architecture')}{k}; from {info['source']} ({info['format']}); fingerprint "
            f"`{build['sae_fingerprint']}`")
        q = info.get("quality")
        if q:
            parts = [f"L0 {_f(q.get('l0'), 1)}", f"explained variance {_f(q.get('explained_variance'))}",
                     f"ΔCE {_f(q.get('ce_increase'))} nats/token" if "ce_increase" in q else None,
                     f"CE loss score {_f(q.get('ce_loss_score'))}" if "ce_loss_score" in q else None,
                     f"dead {_f(q.get('dead_fraction'))}", f"dense (>1 %) {_f(q.get('dense_fraction_gt_1e-2'))}"]
            where = q.get("measured_on") or "its held-out training text"
            add(f"- **SAE quality** (on {where}): " + ", ".join(p for p in parts if p))
        else:
            add("- **SAE quality:** not measured")
    add("")
    add("## Data\n")
    add(f"Leave-one-{preps[0].job.group_by}-out: every figure below scores a {preps[0].job.group_by} with a fit "
        "that never saw it. Benign pools are negatives for every detector that reads them.\n")
    groups: dict[str, Counter[str]] = {}
    for p in preps:
        for f, (_, recs) in zip(p.job.files, p.prepared):
            for r in recs:
                groups.setdefault(str(r["fw_group"]), Counter())[f.path.name] += 1
    rows = [f"| {_cell(g)} | {_cell(', '.join(sorted(files)))} | {sum(files.values())} | "
            f"{_cell(licence_of(g, licences))} |"
            for g, files in sorted(groups.items())]
    add("| source | file(s) | records read | licence |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    add("## Detectors\n")
    add("| detector | decision | watches | thresholds | out-of-source AUROC | worst left-out group | in-split AUROC "
        "| recall | FPR |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        res = r["kinds"][r["chosen"]]
        loso = res["loso"]
        thr = ", ".join(f"{ph} {t:.3f}" for ph, t in r["written"][name]["thresholds"].items())
        worst = min((g for g in loso["groups"] if g.get("auroc") is not None and g["group"] in r["groups"]),
                    key=lambda g: g["auroc"], default=None)
        add(f"| {name} | {r['chosen']} | {', '.join(r['phases'])} | {thr} | {_f(loso['auroc'])} | "
            f"{_f(worst['auroc']) + ' (' + _cell(worst['group']) + ')' if worst else '—'} | "
            f"{_f(res.get('in_split', {}).get('auroc'))} | {_f(loso['recall'])} | {_f(loso['fpr'])} |")
    add("")
    for name, r in reports.items():
        spec = json.loads((pack / f"{name}.json").read_text("utf-8"))
        add(f"### {name}\n")
        add(f"{spec.get('description', '')}\n")
        add(f"Decision: **{r['chosen']}** — {r['reason']}. Compared: " + "; ".join(
            f"{k} {_f(v['loso']['auroc'])} (worst {_f(v['loso']['worst_auroc'])})" for k, v in r["kinds"].items())
            + ". Severity " + spec.get("severity", "warning") + f", action {spec.get('action', 'alert')}.\n")
        feats = spec.get("features") or spec.get("evidence_features") or []
        what = "reads" if spec.get("features") else "is explained by (evidence only; the decision is dense)"
        if feats:
            add(f"It {what} {len(feats)} SAE features; the heaviest:\n")
            add("| feature | weight | label |\n|---|---|---|")
            for f in feats[:10]:
                add(f"| {f['id']} | {f['weight']:+.3f} | {_cell(f.get('label') or '(no label)')} |")
            add("")
        add("| left out | pos | neg | AUROC | recall | FPR neg | FPR pool |\n|---|---|---|---|---|---|---|")
        for g in sorted(r["kinds"][r["chosen"]]["loso"]["groups"],
                        key=lambda g: (g.get("auroc") is None, g.get("auroc") or 0)):
            add(f"| {_cell(g['group'])} | {g['n_pos']} | {g['n_neg']} | {_f(g.get('auroc'))} | {_f(g.get('recall'))} "
                f"| {_f(g.get('fpr_neg'))} | {_f(g.get('fpr_pool'))} |")
        add("")
    add("## Known gaps\n")
    add(f"Found by rule ({GAP_RULES}):\n")
    gaps = known_gaps(pack, build, reports)
    add("\n".join(f"- {g}" for g in gaps) if gaps else "- none of the rules fired")
    add("")
    add("## How it was built\n")
    add("```\nfeaturewatch build-pack " + " ".join(build["argv"]) + "\n```\n")
    acts = build.get("activations") or {}
    warm = (f" The activations of {acts['from_cache']} of its {acts['files']} files came from an earlier build's "
            "cache, so that stage took less than a first build does." if acts.get("from_cache") else "")
    if build.get("reused"):
        warm += (f" The fits of {', '.join(build['reused'])} were reused from an earlier build with the same inputs "
                 "(--resume); the seconds each took there: " + ", ".join(
                     f"{n} {build['detectors'][n]['seconds']:.0f}" for n in build["reused"]
                     if build["detectors"][n].get("seconds") is not None) + ".")
    add("Stage wall times of this build (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in build["stages"].items())
        + "." + warm + "\n")
    return "\n".join(out) + "\n"


def licence_of(source: str, licences: dict[str, str]) -> str:
    """A source's licence: its own entry, else its family's (``alpaca_eval`` for ``alpaca_eval/gemma-7b-it``)."""
    parts = source.split("/")
    for n in range(len(parts), 0, -1):
        if "/".join(parts[:n]) in licences:
            return licences["/".join(parts[:n])]
    return "not stated in the data README or the recipe"


def known_gaps(pack: Path, build: dict[str, Any], reports: dict[str, dict[str, Any]]) -> list[str]:
    """The card's "Known gaps", by the rules in ``GAP_RULES``."""
    gaps: list[str] = []
    for name, r in reports.items():
        res = r["kinds"][r["chosen"]]
        loso = res["loso"]
        weak = [g for g in loso["groups"] if g["group"] in r["groups"] and g.get("auroc") is not None
                and g["auroc"] < WEAK_GROUP]
        if weak:
            gaps.append(f"{name}: weak on " + ", ".join(f"{g['group']} (AUROC {g['auroc']:.3f})" for g in weak))
        if res.get("gap") is not None and res["gap"] > SPLIT_GAP:
            gaps.append(f"{name}: in-split AUROC is {res['gap']:.3f} above out-of-source — a split inside the "
                        "fitted sources overstates it")
        if loso.get("recall") is not None and loso["recall"] < LOW_RECALL:
            gaps.append(f"{name}: recall {loso['recall']:.3f} at the shipped threshold")
        spec = json.loads((pack / f"{name}.json").read_text("utf-8"))
        unlabelled = [f["id"] for f in spec.get("features") or [] if not f.get("label")]
        if unlabelled:
            gaps.append(f"{name}: {len(unlabelled)} of the features it reads have no label "
                        f"({', '.join(map(str, unlabelled[:8]))}{'…' if len(unlabelled) > 8 else ''})")
    gaps += [f"data not found: {s}" for s in build.get("skipped", [])]
    return gaps
