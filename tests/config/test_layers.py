"""The package's three wings stay apart: the import graph of `gateway/vilms` has no circle, `config` imports
nothing from `deploy` or `serve`, and `serve` (what the gateway image runs) nothing from `deploy`.

Read from the source with `ast`, so a function-level import that dodges a circle counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "gateway" / "vilms"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every vilms module `path` imports, anywhere in the file (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "vilms")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vilms":
                continue
            for alias in node.names:  # `from vilms.deploy import weights` names a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[-1] in ("config", "deploy", "serve") else "top"


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("lower, forbidden", [("config", {"deploy", "serve", "top"}), ("serve", {"deploy", "top"}),
                                              ("deploy", {"serve", "top"})])
def test_no_arrow_runs_back_up(graph: dict[str, set[str]], lower: str, forbidden: set[str]) -> None:
    """`vilms.errors` is the one shared leaf; the CLI (top) may import every wing, no wing the CLI."""
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() if wing(m) == lower
                   for d in deps if wing(d) in forbidden and d != "vilms.errors")
    assert not wrong, wrong


def test_the_shared_leaf_imports_nothing(graph: dict[str, set[str]]) -> None:
    assert graph["vilms.errors"] == set()


def test_every_function_fits_a_screen() -> None:
    """Functions a screen long (nested functions count inside the one that holds them): the longest is under 60."""
    long = sorted((node.end_lineno - node.lineno + 1, f"{path.relative_to(PKG)}:{node.lineno} {node.name}")
                  for path in PKG.rglob("*.py") for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
                  and node.end_lineno - node.lineno + 1 >= 60)
    assert not long, long


def test_routes_ask_the_engine_not_its_name() -> None:
    """The API routes (serve/api) never branch on an engine's name: engines own their differences
    (Engine.complete, forward, forwarded, listing), so a new engine adapter needs no route edited."""
    found = []
    for path in (PKG / "serve" / "api").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Attribute) and side.attr == "engine" for side in [node.left, *node.comparators]):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found
