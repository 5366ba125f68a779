"""The ``featurewatch`` package has no import cycle, type-only imports included.

What counts as an edge ``a → b``: an ``import``/``from … import`` (absolute ``featurewatch.…`` or relative)
written at module level of ``a`` — directly, or inside a module-level ``if``/``try``/``with`` block,
``if TYPE_CHECKING:`` included — that names module ``b`` of the package (``from .pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``). A package's ``__init__`` is a module like
any other. Imports inside functions and methods do not count: they run when called, after every module
has loaded, and are how lazy imports (``featurewatch.__init__``'s ``__getattr__``, optional extras,
a command's module) are written; a reader need not hold them in their head to understand the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "featurewatch"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is loaded (or that a type checker reads there)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            found += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            found += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for handler in node.handlers:
                found += _module_level(handler.body)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += _module_level(node.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module → the package's modules it imports`` (see the module docstring for what counts)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import featurewatch.a.b` names a.b; else its package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_core_modules() -> None:
    graph = import_graph()
    assert "featurewatch.monitor" in graph and "featurewatch.ui.server" in graph
    assert "featurewatch.readout" in graph["featurewatch.monitor"]
    assert "featurewatch.sinks" in graph["featurewatch.integrations.vllm.engine"]  # a relative `from ...sinks`


def test_the_finder_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (module-level imports, TYPE_CHECKING included): " + " → ".join(cycle or [])


def test_nothing_below_the_monitor_imports_it() -> None:
    graph = import_graph()
    core = ["session", "state", "detection", "intervention", "runbook", "generation", "scoring"]
    for name in core:
        module = f"featurewatch.{name}"
        if module in graph:
            assert "featurewatch.monitor" not in graph[module], f"{module} imports featurewatch.monitor"
