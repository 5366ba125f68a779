"""A copy of the shipped pack with demo thresholds, for tests of plumbing (alerts, blocks, metrics).

The recalibrated pack is quiet rather than sharp: on this 135 M model its readouts score even a
textbook phishing email or a bomb request below the shipped thresholds (benchmarks/RESULTS.md). Tests
whose subject is delivery (a server, a chain, an engine) must not depend on that; they lower the
named detectors' thresholds to a demo value and say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from featurewatch.pack import DEFAULT_PACK, resolve_pack_path

DEMO_THRESHOLD = 0.0


def write_demo_pack(dst: Path, detectors: tuple[str, ...] = ("scam-email", "dangerous-content"),
                    threshold: float = DEMO_THRESHOLD, phases: tuple[str, ...] | None = None) -> Path:
    """Copy the default pack to ``dst`` with ``detectors``' thresholds set to ``threshold``.

    ``phases``: only these phases' thresholds (default: every phase and the combined score).
    """
    shutil.copytree(resolve_pack_path(DEFAULT_PACK), dst)
    for name in detectors:
        path = dst / f"{name}.json"
        spec = json.loads(path.read_text())
        if phases is None:
            spec["threshold"] = threshold
        thresholds = {p: spec.get("phase_thresholds", {}).get(p, spec["threshold"]) for p in spec["phases"]}
        spec["phase_thresholds"] = {p: threshold if phases is None or p in phases else t
                                    for p, t in thresholds.items()}
        path.write_text(json.dumps(spec, indent=2))
    return dst
