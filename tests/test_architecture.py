"""The import graph: one direction of layers (pyproject's import-linter contract), no circle, every module placed.

These read the real source tree with grimp (import-linter's graph builder), function-level imports included.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import tomllib
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("quant", "calibration", "experiments")
# The documented commands `python -m quant.search` / `quant.build` are shims over experiments.*: the one
# sanctioned edge from quant up to experiments.
ENTRY_SHIMS = {"quant.search": "experiments.search", "quant.build": "experiments.build"}


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*ROOTS, cache_dir=None)


def test_import_linter_contracts_hold_with_nothing_ignored():
    contracts = _config()["contracts"]
    assert any(c["type"] == "layers" for c in contracts)
    assert all(not c.get("ignore_imports") for c in contracts), "no contract may ignore an import"
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)  # lint-imports reads ./pyproject.toml
    try:
        with contextlib.redirect_stdout(out):
            code = lint_imports(no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    assert code == 0, out.getvalue()


def test_every_module_sits_in_a_layer():
    """A new module must be placed in the contract; else its imports go unchecked."""
    named = {m.strip() for c in _config()["contracts"] for layer in c.get("layers", [])
             for m in layer.replace(":", "|").split("|")}
    graph = _graph()
    packages = {m for m in graph.modules if graph.find_children(m)}
    unplaced = sorted(m for m in graph.modules - packages
                      if not any(m == n or m.startswith(n + ".") for n in named))
    assert not unplaced, f"modules in no layer of pyproject's import-linter contract: {unplaced}"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_circle_between_modules():
    graph = _graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycle(edges) is None


def test_no_import_circle_between_packages_but_the_entry_shims():
    graph = _graph()
    edges: dict[str, set[str]] = {}
    for m in graph.modules:
        for target in graph.find_modules_directly_imported_by(m):
            if ENTRY_SHIMS.get(m) == target:
                continue
            a, b = m.split(".")[0], target.split(".")[0]
            if a != b:
                edges.setdefault(a, set()).add(b)
    assert _cycle(edges) is None, edges


def test_entry_shims_only_import_their_command():
    for shim, target in ENTRY_SHIMS.items():
        tree = ast.parse((REPO / (shim.replace(".", "/") + ".py")).read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [(target, ["main"])]
