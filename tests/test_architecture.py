"""The package's layout: no import cycles, counting every import (module level, inside functions, under
``TYPE_CHECKING``), and no module over 500 lines. Modules are read with :mod:`ast`, never imported.

An import of a submodule is an edge to that submodule only (the parent packages' ``__init__`` that Python
runs first are not counted); ``from pkg import name`` is an edge to ``pkg.name`` where that is a module,
else to ``pkg``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "asymlora"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is a module of the package (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, this: str, modules: set[str]) -> set[str]:
    """The package modules that ``path`` (module ``this``) imports anywhere in its body. ``from pkg import sub`` counts as an
    import of ``pkg.sub`` where ``sub`` is a module; a package's own ``__init__`` is not counted as
    imported by its submodules' relative imports of siblings."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this if is_package else this.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = resolve(name, modules)
            if target is not None and target != this:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted((SRC / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, module_name(p), modules) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every module of
    one imports every other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first within it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if succ not in parents:
                    parents[succ] = node
                    nxt.append(succ)
        frontier = nxt
    return sorted(component)


def describe(graph: dict[str, set[str]], cycles: list[list[str]]) -> str:
    return "; ".join(f"{{{', '.join(c)}}}, e.g. {' -> '.join(cycle_path(graph, set(c)))}" for c in cycles)


def test_cycle_finder_finds_cycles_and_only_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c", "e"}, "c": {"a"}, "d": {"a"}, "e": {"b"}}
    assert find_cycles(graph) == [["a", "b", "c", "e"]]
    assert cycle_path(graph, {"a", "b", "c", "e"}) == ["a", "b", "c", "a"]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_imports_counted_inside_functions_and_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from asymlora.a import X\n"
                      "def f():\n    import asymlora.b.c\n    from asymlora.b import d\n"
                      "from . import e\nfrom .b import helper\nimport torch\nfrom asymlora import version_name\n")
    modules = {"asymlora", "asymlora.a", "asymlora.b", "asymlora.b.c", "asymlora.b.d", "asymlora.e", "asymlora.x"}
    assert imports_of(source, "asymlora.x", modules) == {"asymlora", "asymlora.a", "asymlora.b", "asymlora.b.c",
                                                         "asymlora.b.d", "asymlora.e"}


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + describe(graph, cycles)


def test_no_cycles_among_core_modules() -> None:
    """The adapter core and evaluation: no cycle touches them."""
    core = ("asymlora.config", "asymlora.layer", "asymlora.routing", "asymlora.model", "asymlora.persistence",
            "asymlora.merge", "asymlora.version", "asymlora.analyze", "asymlora.evaluate")
    graph = import_graph()
    cycles = [c for c in find_cycles(graph) if any(m == p or m.startswith(p + ".") for m in c for p in core)]
    assert not cycles, "import cycles: " + describe(graph, cycles)


def test_library_never_imports_the_cli() -> None:
    """Only the CLI (``asymlora.cli``, ``asymlora.commands.*``) imports command modules."""
    cli = ("asymlora.cli", "asymlora.commands")
    is_cli = lambda m: any(m == c or m.startswith(c + ".") for c in cli)  # noqa: E731
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if is_cli(t)) for m, targets in graph.items() if not is_cli(m)}
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"library modules importing CLI modules: {offenders}"


@pytest.mark.parametrize("path", sorted((SRC / PACKAGE).rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)}: {lines} lines (at most {MAX_LINES})"
