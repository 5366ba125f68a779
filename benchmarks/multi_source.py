"""The labelled data the concept benchmarks read: ``dev/multi`` of the shared data, several public sources per label.

Each concept's files are the built-in ``safety`` recipe's (``featurewatch build-pack``'s, so the default
pack's) that live in ``dev/multi``, prepared exactly as the build prepares them
(:func:`featurewatch.calibration.sources.prepare`: grouped by ``source``, kind-tagged, capped per cell,
documents wrapped, the same wrappers and character limits, the other concepts' files as benign pools).
Every figure a benchmark gives from them is leave-one-source-out: a source is scored by what was chosen
or fitted on the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class File:
    name: str  # under dev/multi
    negatives: bool = False  # a benign pool: every record a negative
    wrap: tuple[str, ...] = ()
    max_chars: int | None = None


def _concepts() -> dict[str, tuple[tuple[str, ...], tuple[File, ...]]]:
    """concept → (watched phases, its dev/multi files: labelled files first, then benign pools), from the recipe."""
    from featurewatch.calibration.recipe import load_recipe

    recipe, _ = load_recipe("safety")
    out = {}
    for name, det in recipe.detectors.items():
        files = [File(f.file.removeprefix("dev/multi/"), negatives=neg, wrap=tuple(f.wrap), max_chars=f.max_chars)
                 for fs, neg in ((det.inputs, False), (det.negatives, True)) for f in fs
                 if f.file.startswith("dev/multi/")]
        out[name] = (tuple(det.watch), tuple(files))
    return out


CONCEPTS = _concepts()


def default_data() -> str:
    return os.environ.get("DATA", str(ROOT.parent / "shared" / "data"))


def checked(concepts_arg: str, data_arg: str) -> tuple[list[str], Path] | None:
    """The ``--concepts`` and ``--data`` a benchmark was given, checked; None (after saying why) when unusable."""
    import sys

    concepts = [c for c in concepts_arg.split(",") if c]
    unknown = sorted(set(concepts) - set(CONCEPTS))
    if unknown:
        print(f"error: unknown concept(s) {unknown}; choose among {list(CONCEPTS)}", file=sys.stderr)
        return None
    data = Path(data_arg)
    lacking = missing(data, concepts)
    if lacking:
        print(f"error: {data} lacks {', '.join(map(str, lacking))} (pass --data DIR; see ../shared/data/README.md)",
              file=sys.stderr)
        return None
    return concepts, data


def missing(data: Path, concepts: list[str]) -> list[Path]:
    """The files the concepts need that ``data`` lacks."""
    return sorted({data / "dev" / "multi" / f.name for c in concepts for f in CONCEPTS[c][1]
                   if not (data / "dev" / "multi" / f.name).is_file()})


def prepared(data: Path, concept: str, *, max_per_group: int | None,
             cache: Path) -> list[tuple[Path, list[dict[str, Any]]]]:
    """The concept's files prepared as ``calibrate --group-by source`` does, written under ``cache/prepared``."""
    from featurewatch.calibration.sources import prepare, write_prepared

    out = []
    for f in CONCEPTS[concept][1]:
        path = data / "dev" / "multi" / f.name
        recs = prepare(path, group_by="source", negatives=f.negatives, wrap_with=f.wrap, max_per_group=max_per_group,
                       max_chars=f.max_chars)
        out.append((write_prepared(recs, cache, path.parent.name + "-" + path.stem), recs))
    return out
