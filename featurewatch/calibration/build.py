"""``featurewatch build-pack``: a model and an SAE (given or trained) turned into a calibrated pack.

Stages, each timed and reported (``STAGES``):

``check``        the recipe's files found and prepared, the SAE read, the model loaded, hookpoint and
                 width matched — every error a user can fix comes out here, before any long work;
``sae``          train one (``train-sae``'s pipeline, resumable from its own checkpoints) or take the
                 given one, and write it into the pack in featurewatch's (SAELens) layout;
``activations``  one forward pass over every prepared file, cached by content (shared by all
                 detectors and by later builds), and each record's SAE features pooled per phase;
``features``     feature statistics and top contexts (from training, a ``--features`` file, or measured
                 on the calibration text), labels applied, and the SAE's quality;
``detectors``    each recipe detector through :mod:`.job` — leave-one-group-out, decision chosen,
                 per-phase thresholds — with its report;
``card``         ``pack.json``, ``features.json``, ``build.json`` and the model card ``README.md``;
                 the pack is assembled in the work directory and moved into place only when whole.

``--resume`` reuses the ``features`` and ``detectors`` results of an earlier build whose inputs
are unchanged; the activation cache and SAE training resume by themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .job import DetectorJob, PreparedJob, jsonable
from .recipe import Recipe

STAGES = ("check", "sae", "activations", "features", "detectors", "card")
FEW_CONTEXTS = 2  # top contexts kept for a feature no detector reads (all are kept for those read)
STATS_TOKENS = 30_000  # tokens feature statistics are measured on when the SAE's quality is already known
MIN_CONTEXTS = 3  # a feature a detector reads gets at least this many (gathered from the calibration text)


@dataclass
class TrainOptions:
    """``--train-sae``: what ``train-sae`` would be given (its ``--out`` is the build's work directory)."""

    corpus: list[Path]
    hookpoint: str
    tokens: int
    mix: list[float] | None = None
    wrap_documents: float = 0.0
    ctx: int = 256
    config: Any = None  # training.train.TrainConfig
    eval_tokens: int = 60_000
    ce_tokens: int = 16_000


@dataclass
class BuildRequest:
    """Everything ``build-pack`` was asked for."""

    out: Path
    work: Path
    recipe: Recipe
    recipe_where: str
    data: list[Path]
    model: str | None = None
    saes: list[tuple[Path, str | None]] = field(default_factory=list)  # (path, hookpoint or None: the file's)
    train: TrainOptions | None = None
    detectors: list[str] | None = None
    group_by: str | None = None
    name: str | None = None
    version: str = "0.1.0"
    description: str | None = None
    baseline: Path | None = None
    features: Path | None = None
    labels: Path | None = None
    eval_tokens: int = 20_000
    ce_tokens: int = 4_000
    resume: bool = False
    force: bool = False
    argv: list[str] = field(default_factory=list)


class Stages:
    """Announces each stage on stderr and keeps its wall time."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}
        self._t = 0.0
        self._name = ""

    def start(self, name: str, what: str) -> None:
        self._name, self._t = name, time.time()
        self.log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")

    def done(self, note: str = "") -> None:
        s = time.time() - self._t
        self.seconds[self._name] = round(s, 1)
        self.log(f"      {self._name} done in {_duration(s)}" + (f" — {note}" if note else ""))


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def label_keys(sae: Any) -> set[str]:
    """The fingerprints a labels file may be keyed by: :func:`.sources.sae_fingerprint` and the older form
    ``(d_in, d_sae)-<sha256[:16]>`` (examples/feature_labels.json)."""
    from .sources import sae_fingerprint

    w = sae.W_enc.detach().float().flatten()[::9973].cpu().numpy().tobytes()
    return {sae_fingerprint(sae), f"{tuple(sae.W_enc.shape)}-" + hashlib.sha256(w).hexdigest()[:16]}


def read_labels(path: Path, sae: Any) -> dict[int, str]:
    """``{"sae": fingerprint, "labels": {id: label}}``, checked against ``sae`` (ids mean nothing elsewhere)."""
    try:
        raw = json.loads(path.read_text("utf-8"))
        key, labels = raw["sae"], {int(k): str(v) for k, v in raw["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--labels {path}: expected {{\"sae\": FINGERPRINT, \"labels\": {{id: label}}}} "
                          f"({exc})") from None
    if key not in label_keys(sae):
        raise ConfigError(f"--labels {path}: written for SAE {key}; this SAE is {sorted(label_keys(sae))[0]} — "
                          "feature ids mean other features in another SAE; drop --labels or give that SAE")
    from ..errors import FeatureOutOfRange
    from ..sae import check_feature_ids

    try:
        check_feature_ids(sae, labels, what="labelled feature")
    except FeatureOutOfRange as exc:
        raise ConfigError(f"--labels {path}: {exc}") from None
    return labels


# --------------------------------------------------------------------------- the build
def build_pack(req: BuildRequest, *, log: Callable[[str], None], progress: Any = None) -> dict[str, Any]:
    """Run every stage; return the build report (also written to ``OUT/build.json``)."""
    from .recipe import jobs as recipe_jobs

    st = Stages(log)
    t0 = time.time()
    # ------------------------------------------------------------------ check
    st.start("check", "recipe, data, SAE, model")
    _check_out(req)
    req.work.mkdir(parents=True, exist_ok=True)
    cache = req.work / "cache"
    job_list, skipped = recipe_jobs(req.recipe, req.data, only=req.detectors, group_by=req.group_by,
                                    where=req.recipe_where)
    for note in skipped:
        log(f"      skipped {note}")
    from .job import prepare_job

    preps: list[PreparedJob] = []
    for job in job_list:
        preps.append(prepare_job(job, cache, where=req.recipe_where))
        p = preps[-1]
        log(f"      {job.name}: {p.n_labelled} labelled records in {len(p.groups)} groups, {p.n_pool} pool records")
    imported = [_read_sae(path, hp) for path, hp in req.saes]
    if req.train is not None:
        from ..models import normalize_hookpoint

        req.train.hookpoint = normalize_hookpoint(req.train.hookpoint)
        for c in req.train.corpus:
            if not c.is_file():
                raise ConfigError(f"--corpus {c}: no such file")
    if req.labels is not None and not req.labels.is_file():
        raise ConfigError(f"--labels {req.labels}: no such file")
    baseline = None
    if req.baseline is not None:
        from ..pack import load_pack as _load

        baseline = _load(req.baseline)
    if req.features is not None and not req.features.is_file():
        raise ConfigError(f"--features {req.features}: no such file")
    from .. import models

    loaded = models.load_model(req.model)
    width = models.model_width(loaded.model)
    hookpoints = [hp for _, hp, _ in imported] + ([req.train.hookpoint] if req.train else [])
    for hp in hookpoints:
        models.resolve_hookpoint(loaded.model, hp)  # HookpointNotFound names the layers the model has
    for (path, _), (sae, hp, _) in zip(req.saes, imported):
        if sae.d_in != width:
            raise ConfigError(f"--sae {path}: reads vectors of width {sae.d_in}, but {loaded.name} has a residual "
                              f"stream of width {width} at {hp}; this SAE was trained on another model")
    if len(set(hookpoints)) != len(hookpoints):
        raise ConfigError(f"two SAEs for one hookpoint ({', '.join(hookpoints)}); give one per hookpoint")
    st.done(f"{len(job_list)} detector(s), model {loaded.name} (width {width}), "
            f"SAE at {', '.join(hookpoints)}")
    # ------------------------------------------------------------------ sae
    staging = req.work / "pack"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "sae").mkdir(parents=True)
    saes: dict[str, Any] = {}
    sae_info: dict[str, dict[str, Any]] = {}
    if req.train is not None:
        st.start("sae", f"train-sae at {req.train.hookpoint} ({req.train.tokens:,} tokens; resumes from "
                        f"{req.work / 'train-sae'})")
        from ..sae import SparseAutoencoder
        from ..training.pipeline import train_sae

        t = req.train
        trained_dir = req.work / "train-sae" / "sae" / t.hookpoint
        train_key = _key([str(c) for c in t.corpus], [c.stat().st_size for c in t.corpus], req.model, t.hookpoint,
                         t.tokens, t.mix, t.wrap_documents, t.ctx, vars(t.config) if t.config else None,
                         t.eval_tokens, t.ce_tokens)
        key_file = req.work / "train-sae" / "build-key.json"
        if (req.resume and (trained_dir / "report.json").is_file() and key_file.is_file()
                and json.loads(key_file.read_text("utf-8")).get("key") == train_key):
            report = json.loads((trained_dir / "report.json").read_text("utf-8"))
            log(f"      the SAE trained by an earlier build with the same options, reused ({trained_dir})")
        else:
            report = train_sae(corpus=t.corpus, out=req.work / "train-sae", model=req.model, hookpoint=t.hookpoint,
                               tokens=t.tokens, mix=t.mix, wrap_documents=t.wrap_documents, ctx=t.ctx, cfg=t.config,
                               progress=progress, eval_tokens=t.eval_tokens, ce_tokens=t.ce_tokens)
            key_file.write_text(json.dumps({"key": train_key}) + "\n")
        saes[t.hookpoint] = SparseAutoencoder.load(trained_dir)
        sae_info[t.hookpoint] = {"source": f"featurewatch train-sae on {', '.join(str(c) for c in t.corpus)}",
                                 "format": "featurewatch (SAELens layout)", "quality": _quality(report),
                                 "stats": req.work / "train-sae" / "features.json"}
    else:
        st.start("sae", "take the given SAE(s) into the pack")
    for sae, hp, (fmt, path) in imported:
        saes[hp] = sae
        info: dict[str, Any] = {"source": str(path), "path": str(path), "format": fmt}
        report_file = (path if path.is_dir() else path.parent) / "report.json"
        if report_file.is_file():
            with contextlib.suppress(ValueError):  # an unreadable report: the quality is measured instead
                trained = json.loads(report_file.read_text("utf-8"))
                info["quality"] = _quality(trained)
                if trained.get("corpus"):  # train-sae's report: say what it was trained on
                    tokens = trained.get("trained_tokens")
                    info["source"] += (f" (featurewatch train-sae on {trained['corpus']}"
                                       + (f", {tokens:,} tokens)" if isinstance(tokens, int) else ")"))
        sae_info[hp] = info
    sources = {hp: Path(i["path"]) for hp, i in sae_info.items() if "path" in i}
    if req.train is not None:
        sources[req.train.hookpoint] = req.work / "train-sae" / "sae" / req.train.hookpoint
    for hp, sae in saes.items():
        src = sources[hp]
        if (src / "cfg.json").is_file() and (src / "sae_weights.safetensors").is_file():
            shutil.copytree(src, staging / "sae" / hp)  # our own layout: the files as they are (dtype kept)
        else:
            sae.save(staging / "sae" / hp)  # another layout, converted (featurewatch reads both the same)
    main_hp = hookpoints[-1] if req.train is not None else hookpoints[0]
    sae = saes[main_hp]
    st.done(f"{', '.join(f'{hp}: {s.d_sae} features ({s.architecture})' for hp, s in saes.items())}")
    # ------------------------------------------------------------------ activations
    from .sources import load_rows, sae_fingerprint

    unique: dict[Path, list[dict[str, Any]]] = {}
    for p in preps:
        for path, recs in p.prepared:
            unique.setdefault(path, recs)
    n_rec = sum(len(r) for r in unique.values())
    st.start("activations", f"one forward pass over {len(unique)} prepared files ({n_rec} records, cached in "
                            f"{cache})")
    max_tokens = req.recipe.max_tokens
    from .data import acts_cache_path, load_labelled

    cached = sum(acts_cache_path(load_labelled(path), main_hp, max_tokens=max_tokens, cache_dir=cache,
                                 model_name=loaded.name).is_file() for path in unique)
    load_rows(list(unique.items()), model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name, sae=sae,
              hookpoint=main_hp, phases=["prompt", "completion"], max_tokens=max_tokens, cache_dir=cache,
              progress=progress, log=lambda m: log("      " + m))
    st.done(f"{cached} of {len(unique)} files were in the cache")
    # ------------------------------------------------------------------ features
    st.start("features", "feature statistics, labels, SAE quality")
    fp = sae_fingerprint(sae)
    labels = read_labels(req.labels, sae) if req.labels else {}
    stats_file = req.work / f"features-{fp}.json"
    quality_file = req.work / f"quality-{fp}.json"
    stats_src = req.features or sae_info[main_hp].get("stats")
    if stats_src is not None:
        stats = _read_stats(Path(stats_src), main_hp, sae)
        how = f"from {stats_src}"
    elif req.resume and stats_file.is_file():
        stats = json.loads(stats_file.read_text("utf-8"))[main_hp]
        how = f"reused from {stats_file}"
    else:
        stats = None
        how = "measured on the calibration text"
    if "quality" not in sae_info[main_hp] and req.resume and quality_file.is_file():
        sae_info[main_hp]["quality"] = json.loads(quality_file.read_text("utf-8"))
    if stats is None or "quality" not in sae_info[main_hp]:
        from ..records import load_records
        from ..training.evaluate import evaluate_sae

        records = [r for path in unique for r in load_records(path)]
        known = "quality" in sae_info[main_hp]  # then only the statistics are measured: fewer tokens, no CE splice
        report = evaluate_sae(loaded.model, loaded.tokenizer, sae, records, main_hp, ctx=min(256, max_tokens + 64),
                              eval_tokens=min(req.eval_tokens, STATS_TOKENS) if known else req.eval_tokens,
                              ce_tokens=0 if known else req.ce_tokens, progress=progress,
                              stats_path=stats_file if stats is None else None)
        if not known:
            quality = _quality(report)
            quality["measured_on"] = f"the calibration text ({report['eval_tokens']} tokens)"
            quality_file.write_text(json.dumps(quality) + "\n")
            sae_info[main_hp]["quality"] = quality
        if stats is None:
            stats = json.loads(stats_file.read_text("utf-8"))[main_hp]
    for row in stats:
        if row["id"] in labels:
            row["label"] = labels[row["id"]]
    infos = {int(r["id"]): r for r in stats}
    st.done(f"{len(stats)} features, {len(labels)} labels; statistics {how}")
    # ------------------------------------------------------------------ detectors
    st.start("detectors", ", ".join(j.name for j in job_list))
    reports: dict[str, dict[str, Any]] = {}
    from .job import fit_job

    labels_key = _key(sorted(labels.items()))
    reused: list[str] = []
    for prep in preps:
        job = prep.job
        key = _key(_job_fields(job), [str(p) for p, _ in prep.prepared], fp, main_hp, max_tokens, labels_key,
                   str(req.baseline))
        done_dir = req.work / "detectors" / job.name
        done = done_dir / "report.json"
        t1 = time.time()
        if req.resume and done.is_file() and json.loads(done.read_text("utf-8")).get("key") == key:
            report = json.loads(done.read_text("utf-8"))
            log(f"      {job.name}: unchanged since the last build, reused")
            reused.append(job.name)
        else:
            if done_dir.exists():
                shutil.rmtree(done_dir)
            rows = load_rows(prep.prepared, model=loaded.model, tokenizer=loaded.tokenizer, model_name=loaded.name,
                             sae=sae, hookpoint=main_hp, phases=job.watch, max_tokens=max_tokens, cache_dir=cache)
            log(f"      {job.name}: {len(rows)} rows; leave-one-{job.group_by}-out over {len(prep.groups)} groups")
            report = fit_job(prep, rows, sae=sae, hookpoint=main_hp, out_dir=done_dir / "specs",
                             features_info=infos, progress=lambda m: log("        " + m),
                             baseline=baseline if baseline is not None and job.name in baseline.detectors else None)
            report["key"] = key
            report["seconds"] = round(time.time() - t1, 1)
            done.write_text(json.dumps(report, indent=1, default=jsonable) + "\n")
        reports[job.name] = report
        chosen = report["kinds"][report["chosen"]]["loso"]
        log(f"      {job.name}: {report['chosen']}, out-of-source AUROC {_f(chosen['auroc'])}, worst group "
            f"{_f(chosen['worst_auroc'])}")
        for w in report["written"].values():
            w["file"] = str(req.out / Path(w["file"]).name)  # where the spec will be once the pack is in place
        for item in (done_dir / "specs").iterdir():
            dst = staging / item.name
            if item.is_dir():
                shutil.copytree(item, dst, dirs_exist_ok=True)
            else:
                shutil.copy(item, dst)
    st.done()
    # ------------------------------------------------------------------ card
    st.start("card", "pack.json, features.json, README.md")
    read = {f["id"] for r in reports.values() for w in r["written"].values() for f in _spec_features(staging, w)}
    few = sorted(i for i in read if len(infos[i].get("top_contexts") or []) < MIN_CONTEXTS)
    if few:  # a feature a detector reads shows what a person checks its label against
        from .contexts import cached_contexts

        files = [(path, acts_cache_path(load_labelled(path), main_hp, max_tokens=max_tokens, cache_dir=cache,
                                        model_name=loaded.name)) for path in unique]
        found = cached_contexts(files, sae, loaded.tokenizer, few, max_tokens=max_tokens, top=5)
        for i in few:
            infos[i]["top_contexts"] = list(infos[i].get("top_contexts") or []) + [
                c for c in found[i] if c not in (infos[i].get("top_contexts") or [])][:5]
        log(f"      top contexts gathered from the calibration text for {len(few)} read features that had fewer "
            f"than {MIN_CONTEXTS}")
    for row in stats:
        if row["id"] not in read:
            row["top_contexts"] = row.get("top_contexts", [])[:FEW_CONTEXTS]
    (staging / "features.json").write_text(json.dumps({main_hp: stats}, ensure_ascii=False) + "\n")
    name = req.name or req.out.name
    built = [j.name for j in job_list]
    defaults = [d for d in (req.recipe.default_detectors or built) if d in built]
    manifest = {
        "name": name, "version": req.version, "model": loaded.name,
        "hookpoints": {hp: f"sae/{hp}" for hp in saes}, "default_detectors": defaults,
        "description": req.description or req.recipe.description or f"detectors built by featurewatch build-pack "
                                                                    f"for {loaded.name}",
        "provenance": {
            "sae": "; ".join(f"{hp}: {i['source']} ({i['format']})" for hp, i in sae_info.items()),
            "detectors": f"featurewatch build-pack ({req.recipe_where}), leave-one-{job_list[0].group_by}-out",
            "data": sorted({d for p in preps for d in p.data}),
        },
    }
    (staging / "pack.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    st.done()
    build: dict[str, Any] = {
        "featurewatch": _version(), "date": time.strftime("%Y-%m-%d"), "argv": req.argv,
        "recipe": req.recipe_where, "recipe_body": req.recipe.model_dump(), "data": [str(d) for d in req.data],
        "skipped": skipped, "model": loaded.name, "hookpoint": main_hp, "sae": {hp: {k: v for k, v in i.items()
                                                                                  if k != "stats"}
                                                                             for hp, i in sae_info.items()},
        "sae_fingerprint": fp, "labels": len(labels), "stages": st.seconds,
        "activations": {"files": len(unique), "records": n_rec, "from_cache": cached},
        "reused": reused,
        "detectors": {n: {"chosen": r["chosen"], "reason": r["reason"], "seconds": r.get("seconds")}
                      for n, r in reports.items()},
    }
    from .card import model_card
    from .recipe import readme_licences

    licences = {**readme_licences(req.data), **req.recipe.licences}
    build["stages"]["total"] = round(time.time() - t0, 1)
    (staging / "build.json").write_text(json.dumps(build, indent=1, default=jsonable) + "\n")
    (staging / "README.md").write_text(model_card(staging, manifest, build, reports, preps, licences), "utf-8")
    _move_into_place(staging, req.out)
    from ..pack import load_pack

    load_pack(req.out)  # the pack loads as the monitor will load it
    log(f"pack written to {req.out} in {_duration(time.time() - t0)} "
        f"({', '.join(f'{k} {_duration(v)}' for k, v in st.seconds.items() if k != 'total')})")
    return {"pack": str(req.out), **build, "reports": reports}


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def _version() -> str:
    from .. import __version__

    return __version__


def _job_fields(job: DetectorJob) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(job).items() if k != "files"} | {
        "files": [vars(f) | {"path": str(f.path)} for f in job.files]}


def _spec_features(pack: Path, written: dict[str, Any]) -> list[dict[str, Any]]:
    spec = json.loads(Path(pack / Path(written["file"]).name).read_text("utf-8"))
    return list(spec.get("features") or []) + list(spec.get("evidence_features") or [])


def _quality(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("l0", "explained_variance", "fvu", "ce_increase", "ce_loss_score", "kl_div", "dead_fraction",
            "dense_fraction_gt_1e-2", "eval_tokens")
    return {k: report[k] for k in keys if k in report}


def _read_sae(path: Path, hookpoint: str | None) -> tuple[Any, str, tuple[str, Path]]:
    """An SAE in any layout featurewatch reads; its hookpoint from ``@HOOKPOINT`` or the file's own hook name."""
    from ..errors import FeatureWatchError
    from ..models import normalize_hookpoint
    from ..sae import SparseAutoencoder

    if not path.exists():
        raise ConfigError(f"--sae {path}: no such file or directory")
    try:
        sae = SparseAutoencoder.load(path)
    except FeatureWatchError as exc:
        raise ConfigError(f"--sae {path}: {exc}") from None
    hp = hookpoint or sae.hook_name
    if not hp:
        raise ConfigError(f"--sae {path}: the file does not say where it reads the model; give the hookpoint as "
                          f"--sae {path}@layers.N")
    try:
        hp = normalize_hookpoint(hp)
    except FeatureWatchError as exc:
        raise ConfigError(f"--sae {path}: {exc}; give the hookpoint as --sae {path}@layers.N") from None
    fmt = _format_name(path)
    return sae, hp, (fmt, path)


def _format_name(path: Path) -> str:
    if path.is_file() and path.suffix == ".npz" or (path / "params.npz").is_file():
        return "Gemma Scope (params.npz)"
    if (path / "cfg.json").is_file():
        return "SAELens (cfg.json + sae_weights.safetensors)"
    if (path / "sae.safetensors").is_file():
        return "EleutherAI sparsify (cfg.json + sae.safetensors)"
    return "SAE file"


def _read_stats(path: Path, hookpoint: str, sae: Any) -> list[dict[str, Any]]:
    """Feature statistics from a ``features.json`` (train-sae's or a pack's): ``{hookpoint: [rows]}``."""
    from ..models import normalize_hookpoint

    try:
        raw = json.loads(path.read_text("utf-8"))
        by_hp = {normalize_hookpoint(k): v for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--features {path}: expected {{hookpoint: [feature rows]}} ({exc})") from None
    rows = by_hp.get(hookpoint)
    if not isinstance(rows, list):
        raise ConfigError(f"--features {path}: has no rows for {hookpoint} (it has {', '.join(by_hp) or 'none'})")
    if len(rows) != sae.d_sae:
        raise ConfigError(f"--features {path}: {len(rows)} feature rows for an SAE of {sae.d_sae} features; "
                          "it describes another SAE")
    return [dict(r) for r in rows]


def _check_out(req: BuildRequest) -> None:
    out = req.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the pack")
    if out.is_dir() and any(out.iterdir()) and not (out / "build.json").is_file() and not req.force:
        raise ConfigError(f"--out {out} holds files build-pack did not write; choose another --out, or pass --force "
                          "to replace it once the new pack is whole")
    if req.work.resolve() == out.resolve() or out.resolve() in req.work.resolve().parents:
        raise ConfigError(f"--work {req.work} is inside --out {out}; keep the work directory outside the pack")


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished pack (the old one stays until the new one is whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    shutil.copytree(staging, out)
    if old.exists():
        shutil.rmtree(old)


def say(msg: str) -> None:
    print(f"build-pack: {msg}", file=sys.stderr, flush=True)
