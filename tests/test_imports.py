"""The package's import graph: demo models apart, no circles, lower floors never import higher ones.

Every module under ``cascadevlm/`` is parsed with :mod:`ast` (imports inside functions count too: a
deferred import is still a dependency), so the test needs no import of the package and sees code paths
that a run never takes. Only ``if TYPE_CHECKING:`` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cascadevlm"
ROOT = "cascadevlm"

#: Scaffolding: may import anything, imported by no product module.
SCAFFOLDING = ("zoo", "testing")

#: Floor of each part of the package, lowest first; a module may import its own floor or lower ones.
FLOORS: dict[str, int] = {
    # the bottom: records, errors, logging, the entry points' flag style
    "errors": 0,
    "flags": 0,
    "logs": 0,
    "records": 0,
    # the data layer, provenance of weights, and the gate rule and routing (pure functions of records)
    "provenance": 1,
    "data": 1,
    "gating": 1,
    # the two stages, each knowing nothing of the other, and reports computed from records
    "clip": 2,
    "lvlm": 2,
    "report": 2,
    # the only place both stages meet (and its console: the LVLM stage's counts)
    "cascade": 3,
    "progress": 3,
    # entries
    "cli": 4,
    "rethreshold": 4,  # records -> a new run directory (an entry: python -m cascadevlm.rethreshold)
    "serve": 4,  # the cascade over HTTP (an entry: python -m cascadevlm.serve)
}


#: Entry points that live beside the code they drive (``python -m ...``): on the entries' floor, with cli.
#: Each is listed here on purpose; a library module importing ``cascadevlm.cli`` is still refused.
ENTRY_MODULES = {
    "cascadevlm.clip.adapters.sweep",  # method x k x seeds: train.py fit in one process, then the table
    "cascadevlm.study",  # a grid of runs (evaluate.py / train.py fit) in one process, then the table
    "cascadevlm.cascade.settings",  # k x seeds: a case of the study
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an ``ImportFrom`` refers to."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST):
    """Every import node of a module, except those under ``if TYPE_CHECKING:`` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _imports(node)


def _graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports (at any depth of its code)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if ".venv" not in p.parts}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        edges = set()
        for target in targets:
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            while target not in files and "." in target:  # `import a.b.c` of a name inside a module
                target = target.rsplit(".", 1)[0]
            if target in files and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def _part(module: str) -> str:
    """Top-level part of the package a module belongs to (``clip`` for ``cascadevlm.clip.adapters.coop``)."""
    if module in ENTRY_MODULES:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


GRAPH = _graph()


def test_the_graph_sees_the_package():
    # guards the parser itself: known edges, including a deferred one inside a function
    assert len(GRAPH) > 50
    assert "cascadevlm.records" in GRAPH["cascadevlm.cascade.evaluate"]
    assert "cascadevlm.data.raw_formats._common" in GRAPH["cascadevlm.data.registry"]  # inside a function


def test_no_product_module_imports_the_demo_models_or_test_scaffolding():
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _part(module) not in SCAFFOLDING
        for target in targets
        if _part(target) in SCAFFOLDING
    )
    assert not offenders, "product code reaches into scaffolding: " + "; ".join(offenders)


def test_no_module_level_import_circles():
    assert not _cycles(GRAPH), f"import circles: {_cycles(GRAPH)}"


def test_no_package_level_import_circles():
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        packages.setdefault(_part(module), set()).update(
            _part(t) for t in targets if _part(t) != _part(module)
        )
    assert not _cycles(packages), f"package-level import circles: {_cycles(packages)}"


def test_entry_modules_exist():
    assert ENTRY_MODULES <= set(GRAPH), f"gone: {sorted(ENTRY_MODULES - set(GRAPH))}"


def test_every_part_of_the_package_has_a_floor():
    parts = {_part(m) for m in GRAPH} - {""} - set(SCAFFOLDING)
    assert parts <= set(FLOORS), f"add {sorted(parts - set(FLOORS))} to FLOORS in tests/test_imports.py"


@pytest.mark.parametrize("part", sorted(FLOORS))
def test_lower_floors_never_import_higher_ones(part):
    offenders = sorted(
        f"{module} (floor {FLOORS[part]}) imports {target} (floor {FLOORS[_part(target)]})"
        for module, targets in GRAPH.items()
        if _part(module) == part
        for target in targets
        if _part(target) in FLOORS and FLOORS[_part(target)] > FLOORS[part]
    )
    assert not offenders, "; ".join(offenders)
