"""The labelled data the concept benchmarks read: ``dev/multi`` of the shared data, several public sources per label.

Each concept's files are prepared exactly as ``featurewatch calibrate --group-by source`` prepares them
(:func:`featurewatch.calibration.sources.prepare`: grouped by ``source``, kind-tagged, capped per cell,
documents wrapped), with the same wrappers and the same benign pools (another concept's file) as
``examples/calibrate_default_pack.sh`` gives the detector of that name. Every figure a benchmark gives
from them is leave-one-source-out: a source is scored by what was chosen or fitted on the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAIL = ("plain", "quoted", "reply")


@dataclass(frozen=True)
class File:
    name: str  # under dev/multi
    negatives: bool = False  # a benign pool: every record a negative
    wrap: tuple[str, ...] = ()
    max_chars: int | None = None


# concept → (watched phases, its files): labelled files first, then benign pools
CONCEPTS: dict[str, tuple[tuple[str, ...], tuple[File, ...]]] = {
    "scam-email": (("prompt", "completion"), (File("scam.jsonl", wrap=MAIL, max_chars=500),
                                              File("dangerous.jsonl", negatives=True))),
    "dangerous-content": (("prompt", "completion"), (File("dangerous.jsonl"),
                                                     File("dangerous_completion.jsonl", max_chars=800),
                                                     File("scam.jsonl", negatives=True, wrap=MAIL, max_chars=500))),
    "deception": (("completion",), (File("deception.jsonl"),
                                    File("dangerous_completion.jsonl", negatives=True, max_chars=800))),
    "sycophancy": (("completion",), (File("sycophancy.jsonl"), File("deception.jsonl", negatives=True))),
}


def default_data() -> str:
    return os.environ.get("DATA", str(ROOT.parent / "shared" / "data"))


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
