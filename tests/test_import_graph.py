"""Imports run one way: the protocol core imports no transport, both front doors import the
core, and no package has an import cycle.

The graph is read from the source (every ``import`` statement, including those under
``TYPE_CHECKING`` and inside functions: a cycle hidden in a function is still a cycle), not
from what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "presence_core"
# What a core without I/O must not import: event loops, sockets, WebSocket and HTTP stacks,
# and either front door.
TRANSPORTS = (
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "http",
    "websockets",
    "uvicorn",
    "starlette",
    "uvloop",
    "presence_core.server",
    "presence_core.asgi",
    "presence_core.driver",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _nodes(tree: ast.AST, runtime_only: bool) -> list[ast.AST]:
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if runtime_only and _type_checking(node):
            todo.extend(getattr(node, "orelse", []))
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports_of(path: Path, runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts ``x.y`` when
    that is one of our modules, else ``x``); with ``runtime_only``, not those under
    ``if TYPE_CHECKING:``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in _nodes(tree, runtime_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    return found


MODULES = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
GRAPH = {
    name: {m for m in imports_of(path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


RUNTIME = {
    name: {m for m in imports_of(path, runtime_only=True) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    assert "presence_core.protocol.core" in GRAPH
    assert "presence_core.tracker" in GRAPH["presence_core.server.server"] or any(
        m.startswith("presence_core.tracker") for m in GRAPH["presence_core.server.server"]
    )


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith("presence_core.protocol"))
)
def test_the_protocol_core_imports_no_transport(module: str) -> None:
    imported = imports_of(MODULES[module])
    bad = sorted(m for m in imported if any(m == t or m.startswith(t + ".") for t in TRANSPORTS))
    assert not bad, f"{module} imports {bad}: the protocol core must stay without I/O"


@pytest.mark.parametrize("door", ["presence_core.server.server", "presence_core.asgi"])
def test_both_doors_drive_the_core(door: str) -> None:
    reach = set()
    todo = [door]
    while todo:  # what the door imports, directly or through the driver
        for m in GRAPH[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    assert "presence_core.protocol.core" in reach


def test_the_server_package_and_the_core_have_no_import_cycle() -> None:
    def within(prefix: str) -> dict[str, set[str]]:
        return {
            m: {t for t in targets if t.startswith(prefix)}
            for m, targets in GRAPH.items()
            if m.startswith(prefix)
        }

    # Package __init__ modules re-export their own modules: an edge into the package itself
    # from one of its modules is the usual `from . import x`, not a cycle of concepts.
    for prefix in ("presence_core.server", "presence_core.protocol"):
        graph = within(prefix)
        graph.pop(prefix, None)
        for targets in graph.values():
            targets.discard(prefix)
        assert not cycles(graph), f"import cycles in {prefix}: {cycles(graph)}"


def test_the_core_does_not_import_the_doors_even_indirectly() -> None:
    reach: set[str] = set()
    todo = [m for m in MODULES if m.startswith("presence_core.protocol")]
    while todo:
        for m in GRAPH[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    doors = sorted(
        m
        for m in reach
        if m.startswith(("presence_core.server", "presence_core.asgi", "presence_core.driver"))
    )
    assert not doors, f"the protocol core reaches {doors}"


def test_no_module_of_the_package_imports_another_that_imports_it_back_at_run_time() -> None:
    """Type-only imports (under TYPE_CHECKING) may point back, as annotations need; nothing
    that runs may."""
    graph = {m: set(targets) for m, targets in RUNTIME.items()}
    for package in [m for m in MODULES if MODULES[m].name == "__init__.py"]:
        graph.pop(package, None)  # re-exports, not concepts
        for targets in graph.values():
            targets.discard(package)
    assert not cycles(graph), f"run-time import cycles: {cycles(graph)}"
