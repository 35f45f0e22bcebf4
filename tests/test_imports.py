"""The modules of qrs import one another in one direction: no cycle, lazy imports inside functions included."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the qrs modules it imports anywhere in its source (top level or inside functions)."""
    modules = {_module_name(p): p for p in (SRC / "qrs").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        graph[name] = found - {name}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"qrs.predict", "qrs.runtime", "qrs.scoring"} <= graph.keys()
    assert "qrs.runtime" in graph["qrs.predict"]  # the onnx backend, imported lazily by Scorer.load
    assert "qrs.predict" not in graph["qrs.runtime"] and "qrs.scoring" in graph["qrs.runtime"]
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None

