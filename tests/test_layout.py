"""The shape of the house (docs/architecture.md): few modules at the top, imports one way (web -> core -> engines)
with no circle, not even through an import made only for type checking, and classes and functions short
enough to read at once. Read from the source with `ast`, so every import counts, wherever it stands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
TOP_MODULES = 12  # at most, directly in app/
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 40

# What each layer may import of the app. The top (cli, config, startup) wires the layers together and may
# import any of them; audio.py is a leaf every layer shares.
ALLOWED = {
    "app.engines": ("app.engines", "app.audio"),
    "app.core": ("app.core", "app.engines", "app.audio"),
    "app.web": ("app.web", "app.core", "app.engines", "app.audio", "app.config", "app.startup"),
    "app.audio": (),
}
# Libraries a layer must not touch: the core speaks typed Python events, never a wire format.
FORBIDDEN = {
    "app.core": ("litestar", "uvicorn", "json", "msgspec.json", "app.web"),
    "app.engines": ("litestar", "uvicorn", "app.core", "app.web", "app.config", "app.startup", "app.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(APP.rglob("*.py"))}


def imported(name: str) -> set[str]:
    """Every module `name` imports (at the top, in a function, or under TYPE_CHECKING): app modules by
    their full name, others by the name written."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from app.core import events` imports the module app.core.events
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found - {name}


GRAPH = {name: {m for m in imported(name) if m in MODULES} for name in MODULES}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_at_most_twelve_modules_stand_directly_in_app():
    top = sorted(p.name for p in APP.glob("*.py"))
    assert len(top) <= TOP_MODULES, top


def test_packages_import_nothing_so_a_submodule_never_pulls_in_its_siblings():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            assert not imported(name), f"{name}/__init__.py imports {imported(name)}"


def test_no_import_circle_among_app_modules():
    circles = _circles(GRAPH)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_one_way(layer):
    wrong = {
        name: sorted(m for m in GRAPH[name] if not within(m, ALLOWED[layer]))
        for name in MODULES if within(name, (layer,))
    }
    assert not {name: ms for name, ms in wrong.items() if ms}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_what_belongs_to_another(layer):
    wrong = {
        name: sorted(m for m in imported(name) if within(m, FORBIDDEN[layer]))
        for name in MODULES if within(name, (layer,))
    }
    assert not {name: ms for name, ms in wrong.items() if ms}


def test_classes_and_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES,
                     ast.AsyncFunctionDef: MAX_FUNCTION_LINES}.get(type(node))
            if limit is None:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if (lines := node.end_lineno - first + 1) > limit:
                long.append(f"{name}.{node.name}: {lines} lines (at most {limit})")
    assert not long, long


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected group of modules, from its first module by name."""
    circles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        path = _path_back(graph, start)
        if path is not None:
            circles.append(path)
            done.update(path)
    return circles


def _path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import path from `start` back to itself, if there is one (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for dep in sorted(graph.get(node, ())):
                if dep == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if dep not in came_from:
                    came_from[dep] = node
                    nxt.append(dep)
        frontier = nxt
    return None
