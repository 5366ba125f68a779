"""docs/architecture.md is the map of the code: every module it names exists, every module is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _map_rows() -> list[str]:
    section = DOC.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.M)


def test_every_module_in_the_map_exists() -> None:
    rows = _map_rows()
    assert len(rows) > 20
    for name in rows:
        path = ROOT / name if name.startswith(("featurewatch/", "detectors/")) else ROOT / "featurewatch" / name
        assert path.exists(), f"docs/architecture.md names {name}, which does not exist"


def test_every_module_of_the_package_is_in_the_map() -> None:
    named = set(_map_rows())
    top = {p.name for p in (ROOT / "featurewatch").glob("*.py")} - {"__init__.py"}
    packages = {p.name + "/" for p in (ROOT / "featurewatch").iterdir() if (p / "__init__.py").exists()}
    missing = sorted((top | packages) - {n.removeprefix("featurewatch/") for n in named})
    assert not missing, f"add these to the module map in docs/architecture.md: {missing}"
