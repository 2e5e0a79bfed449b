"""The packages' dependency rule (docs/design.md, "Packages"): which package may import which, and no
import circles between modules. Read from the source: imports inside functions and under
``if TYPE_CHECKING:`` count too, as a circle hidden there is still one for the reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each package may import of servemesh's own (itself always).
MAY_IMPORT = {
    "schemas": set(),
    "telemetry": {"schemas"},
    "broker": {"schemas", "telemetry"},
    "workers": {"broker", "schemas", "telemetry"},
    "router": {"broker", "schemas", "telemetry"},
    "servemesh": {"broker", "schemas", "telemetry", "workers", "router"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The servemesh modules a module imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] in MAY_IMPORT)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in MAY_IMPORT:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = [p for package in MAY_IMPORT for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(ast.parse(p.read_text(), str(p)), modules) - {_module_name(p)} for p in paths}


def test_every_package_imports_only_what_it_may() -> None:
    broken = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if (package := module.split(".")[0]) != (other := target.split(".")[0]) and other not in MAY_IMPORT[package]
    )
    assert not broken, "\n".join(broken)


def test_no_import_circles() -> None:
    graph = _graph()
    # A package's __init__ importing its own modules is how packages work, not a circle.
    edges = {m: {t for t in ts if t in graph and not t.startswith(m + ".")} for m, ts in graph.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)
    assert not circles, "\n".join(" → ".join(c) for c in circles)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_the_rule_covers_every_package(package: str) -> None:
    # A package that gained no modules would make the checks above pass vacuously.
    assert list((ROOT / package).rglob("*.py")), package
