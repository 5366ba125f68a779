"""Build recipes: which detectors a pack holds, and the files and settings each is calibrated from.

A recipe is a JSON file (``featurewatch build-pack --recipe FILE``; the built-in
``safety`` recipe is the default pack's four detectors over the shared data
layout). File names in it are relative: each is looked up in the ``--data``
directories in order, so one recipe serves any machine that has the data::

    {
      "group_by": "source",               # the field whole groups are left out by
      "target_fpr": 0.02, "max_tokens": 160, "max_features": 32, "max_per_group": 60,
      "pools": [{"file": "corpus/chat_train.jsonl", "max_per_group": 10}],   # benign negatives for all
      "detectors": {
        "scam-email": {
          "description": "...", "watch": ["prompt", "completion"], "severity": "warning", "min_tokens": 8,
          "inputs": [{"file": "dev/multi/scam.jsonl", "wrap": ["plain", "quoted", "reply"], "max_chars": 500}],
          "negatives": [{"file": "dev/multi/dangerous.jsonl"}]
        }
      }
    }

An ``optional`` file that no data directory holds is skipped and said so (in
the log and the pack's model card); a required one is an error before any
model loads. ``licences`` maps a source (the ``group_by`` value) to its
licence for the model card (a key also covers its sub-sources: ``alpaca_eval`` covers
``alpaca_eval/gemma-7b-it``); sources it does not name are looked up in the
data directories' README tables (a table with a "source" and a "licence"
column), else shown as not stated.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from .job import DetectorJob, InputFile
from .sources import DOCUMENT_WRAPPERS

BUILT_IN = ("safety",)


class RecipeFile(BaseModel):
    """One file of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="path relative to a --data directory (or absolute)")
    wrap: list[str] = Field(default_factory=list, description=f"document wrappers: {', '.join(DOCUMENT_WRAPPERS)}")
    max_per_group: int | None = Field(default=None, ge=1, description="cap per (group, kind, label, wrapper) cell")
    max_chars: int | None = Field(default=None, ge=1, description="judged contents cut near N characters")
    optional: bool = Field(default=False, description="skip (and say so) when no data directory has it")


class RecipeDetector(BaseModel):
    """One detector of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    watch: list[Literal["prompt", "completion"]] = Field(min_length=1)
    severity: Literal["info", "warning", "critical"] = "warning"
    action: Literal["alert", "suppress", "block"] = "alert"
    min_tokens: int = Field(default=8, ge=1)
    target_fpr: float | None = Field(default=None, gt=0, lt=1, description="default: the recipe's")
    kinds: list[Literal["sae", "probe", "mean-diff"]] | None = Field(
        default=None, description="decisions compared (default: all three; the best worst-group AUROC ships)")
    inputs: list[RecipeFile] = Field(min_length=1, description="labelled files (label 0/1, the group_by field)")
    negatives: list[RecipeFile] = Field(default_factory=list, description="benign pools for this detector")
    pools: bool = Field(default=True, description="also read the recipe-wide pools")


class Recipe(BaseModel):
    """A build recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    group_by: str = "source"
    target_fpr: float = Field(default=0.02, gt=0, lt=1)
    max_tokens: int = Field(default=160, ge=1)
    max_features: int = Field(default=32, ge=1, le=256)
    prior_tokens: float = Field(default=4.0, ge=0)
    max_per_group: int | None = Field(default=60, ge=1)
    threshold_on: list[Literal["neg", "pool", "hard_neg"]] = Field(default=["neg", "pool"], min_length=1)
    pools: list[RecipeFile] = Field(default_factory=list)
    default_detectors: list[str] | None = None
    licences: dict[str, str] = Field(default_factory=dict)
    detectors: dict[str, RecipeDetector] = Field(min_length=1)


def load_recipe(name_or_path: str) -> tuple[Recipe, str]:
    """A built-in recipe by name, or a recipe file; returns it and where it came from."""
    if name_or_path in BUILT_IN:
        text = resources.files("featurewatch").joinpath(f"data/recipes/{name_or_path}.json").read_text("utf-8")
        where = f"built-in recipe {name_or_path!r}"
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(f"--recipe {name_or_path}: no such file and not a built-in recipe "
                              f"({', '.join(BUILT_IN)})")
        text, where = p.read_text("utf-8"), str(p)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"{where}: {errs}") from None
    for name, det in recipe.detectors.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError(f"{where}: detector name {name!r}: use lower-case letters, digits and dashes")
        for f in [*det.inputs, *det.negatives, *recipe.pools]:
            bad = [w for w in f.wrap if w not in DOCUMENT_WRAPPERS]
            if bad:
                raise ConfigError(f"{where}: {name}: {f.file}: unknown wrapper {', '.join(bad)} "
                                  f"(valid: {', '.join(DOCUMENT_WRAPPERS)})")
    unknown = [d for d in recipe.default_detectors or [] if d not in recipe.detectors]
    if unknown:
        raise ConfigError(f"{where}: default_detectors names {', '.join(unknown)}, not among its detectors")
    return recipe, where


def resolve(file: str, data: list[Path]) -> Path | None:
    """The first ``data`` directory's copy of ``file`` (an absolute path stands for itself)."""
    p = Path(file)
    if p.is_absolute():
        return p if p.is_file() else None
    for d in data:
        if (d / p).is_file():
            return d / p
    return None


def jobs(recipe: Recipe, data: list[Path], *, only: list[str] | None = None, group_by: str | None = None,
         where: str = "recipe") -> tuple[list[DetectorJob], list[str]]:
    """The recipe's detectors as calibration jobs over files found in ``data``; also the notes on skipped files.

    A required file that no data directory holds is an error naming the directories searched.
    """
    names = list(recipe.detectors)
    if only:
        unknown = [n for n in only if n not in recipe.detectors]
        if unknown:
            raise ConfigError(f"--detectors {','.join(only)}: {', '.join(unknown)} not in {where} "
                              f"(it has {', '.join(names)})")
        names = [n for n in names if n in only]
    out: list[DetectorJob] = []
    skipped: list[str] = []
    searched = ", ".join(str(d) for d in data) or "no --data directory"
    for name in names:
        det = recipe.detectors[name]
        files: list[InputFile] = []
        for f, negatives in ([(f, False) for f in det.inputs] + [(f, True) for f in det.negatives]
                             + ([(f, True) for f in recipe.pools] if det.pools else [])):
            path = resolve(f.file, data)
            if path is None:
                if f.optional:
                    skipped.append(f"{name}: {f.file} (optional; not in {searched})")
                    continue
                raise ConfigError(f"{where}: {name}: {f.file} is in none of the data directories ({searched}); "
                                  "pass --data DIR for the directory that holds it")
            if any(x.path == path and x.negatives == negatives for x in files):
                continue
            files.append(InputFile(path, negatives=negatives, wrap=tuple(f.wrap),
                                   max_per_group=f.max_per_group or recipe.max_per_group, max_chars=f.max_chars))
        if not any(not f.negatives for f in files):
            raise ConfigError(f"{where}: {name}: none of its labelled inputs is in the data directories ({searched})")
        out.append(DetectorJob(
            name=name, files=files, watch=list(det.watch), group_by=group_by or recipe.group_by,
            description=det.description, kinds=list(det.kinds or ("sae", "probe", "mean-diff")),
            target_fpr=det.target_fpr or recipe.target_fpr, min_tokens=det.min_tokens,
            prior_tokens=recipe.prior_tokens, max_features=recipe.max_features, max_tokens=recipe.max_tokens,
            threshold_on=tuple(recipe.threshold_on), severity=det.severity, action=det.action))
    return out, skipped


def readme_licences(data: list[Path]) -> dict[str, str]:
    """``source → licence`` from markdown tables in the data directories' README.md (first one wins)."""
    out: dict[str, str] = {}
    for d in data:
        readme = d / "README.md"
        if not readme.is_file():
            continue
        header: list[str] | None = None
        for line in readme.read_text("utf-8", errors="replace").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
            if cells is None:
                header = None
                continue
            if header is None:
                header = [c.lower() for c in cells]
                continue
            if set("".join(cells)) <= set("-: "):
                continue
            if "source" in header and any(h.startswith("licen") for h in header):
                src = cells[header.index("source")].strip("` ")
                lic = cells[next(i for i, h in enumerate(header) if h.startswith("licen"))]
                if src and len(cells) == len(header):
                    out.setdefault(src, lic)
    return out
