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


def test_the_layers_the_map_draws_are_the_imports() -> None:
    """Every arrow ``lower ← upper`` of "Imports go one way" holds: no module on the left imports (even
    through others, type-only imports included) a module on the right."""
    from test_architecture_layers import import_graph

    graph = import_graph()
    section = DOC.split("Imports go one way", 1)[1].split("The monitor is handed its sinks", 1)[0]
    reach: dict[str, set[str]] = {}

    def reached(module: str) -> set[str]:
        if module not in reach:
            reach[module] = set()
            for nxt in graph[module]:
                reach[module] |= {nxt} | reached(nxt)
        return reach[module]

    arrows = 0
    for clause in re.split(r"[;\n]\s*(?:- )?", section.replace("\n  ", " ")):
        groups = [re.findall(r"`([a-z_]+)`", part) for part in clause.split("←")]
        for lower, upper in zip(groups, groups[1:]):
            for low in lower:
                for up in upper:
                    low_m, up_m = f"featurewatch.{low}", f"featurewatch.{up}"
                    assert low_m in graph and up_m in graph, f"docs/architecture.md names no module {low} or {up}"
                    assert up_m not in reached(low_m), f"docs say {low} ← {up}, but {low} imports {up}"
                    arrows += 1
    assert arrows > 30
    assert "`state` (a run's state" in section and "`session.SessionHost`" in section
