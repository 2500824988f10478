"""The import graph: one direction of layers (pyproject's import-linter contract), no circle, every module placed.

These read the real source tree with grimp (import-linter's graph builder), function-level imports included.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
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


_MUTATORS = {"append", "extend", "update", "clear", "pop", "popitem", "setdefault", "add", "discard", "remove",
             "insert", "sort"}


def _module_state_writes(source: str) -> list[str]:
    """Writes, inside functions, to module-level state: ``global``, ``NAME[...] =`` / ``NAME.append(...)`` on a
    module-level name, and ``module.NAME =`` / ``module.NAME[...] =`` on an imported module."""
    tree = ast.parse(source)
    top = {n.id for stmt in tree.body if isinstance(stmt, (ast.Assign, ast.AnnAssign))
           for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]) for n in ast.walk(t)
           if isinstance(n, ast.Name)}
    modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names}
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        local = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
        local |= {t.id for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                  for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        shared = top - local
        for n in ast.walk(fn):
            if isinstance(n, ast.Global):
                found.append(f"line {n.lineno}: global {', '.join(n.names)}")
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
            for t in targets:
                base = t.value if isinstance(t, ast.Subscript) else t
                if isinstance(t, ast.Subscript) and isinstance(base, ast.Name) and base.id in shared:
                    found.append(f"line {n.lineno}: {base.id}[...] =")
                # os.environ is exempt: the process environment is how libraries and child processes are told.
                if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id in modules \
                        and ast.unparse(base) != "os.environ":
                    found.append(f"line {n.lineno}: {base.value.id}.{base.attr}{'[...]' * (t is not base)} =")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _MUTATORS \
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in shared:
                found.append(f"line {n.lineno}: {n.func.value.id}.{n.func.attr}(...)")
    return found


def test_state_write_finder_finds_each_kind():
    src = ("import m\nTABLE = {}\nFLAG = False\n"
           "def f(x):\n    global FLAG\n    TABLE[x] = 1\n    TABLE.update(a=1)\n    m.KNOB = 2\n    m.T[0] = 1\n"
           "def g(TABLE):\n    TABLE[0] = 1\n    local = {}\n    local[0] = 1\n")
    assert sorted(w.split(": ", 1)[1] for w in _module_state_writes(src)) == sorted(
        ["global FLAG", "TABLE[...] =", "TABLE.update(...)", "m.KNOB =", "m.T[...] ="])


def test_no_module_level_variable_is_written_after_import():
    """Kernel choice and every other setting are values passed in (e.g. quant.runtime.schemes.base.KernelConfig)."""
    writes = {str(p.relative_to(REPO)): w for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))
              if (w := _module_state_writes(p.read_text()))}
    assert not writes, writes


def test_tests_set_kernels_through_the_config():
    patched = [f"{p.name}:{i}" for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if "monkeypatch.set" in line and any(m in line for m in ("(linear", "(ck,", "(cuda_kernels", "ck."))]
    assert not patched, patched


# The start-up budget (docs/architecture.md): a command's --help, and so its refusal of a bad flag, imports no
# heavy package -- measured 0.2-0.3 s for these on the 2-core CI box, against 2-4 s once torch is imported.
# Heavy packages are imported inside the functions that need them, after the flags are read; project modules
# that pull none of them are imported at module top.
HEAVY = ("torch", "transformers", "optuna", "modelopt", "datasets", "matplotlib", "safetensors", "triton", "numpy",
         "scipy", "gguf", "rouge_score")
LIGHT_CLIS = ("quant.search", "quant.build", "experiments.evaluate", "experiments.plot", "experiments.recipe_table",
              "experiments.regret", "experiments.kernel_quality", "calibration")
STARTUP_BUDGET_S = 2.5  # the best of three runs; a loaded CI box has room


@pytest.mark.parametrize("module", LIGHT_CLIS)
def test_help_stays_inside_the_start_up_budget(module):
    probe = ("import contextlib, io, runpy, sys, time\n"
             f"sys.argv = [{module!r}, '--help']\n"
             "t0 = time.perf_counter()\n"
             "try:\n"
             "    with contextlib.redirect_stdout(io.StringIO()):\n"
             f"        runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
             "except SystemExit:\n"
             "    pass\n"
             f"print(time.perf_counter() - t0, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        seconds, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
        assert heavy == "[]", f"{module} --help imports {heavy}"
        runs.append(float(seconds))
    assert min(runs) < STARTUP_BUDGET_S, f"{module} --help took {min(runs):.2f} s at best (budget {STARTUP_BUDGET_S} s)"


def _optuna_private_uses(source: str) -> list[str]:
    """Private optuna modules imported, and private attributes read off a study, trial, storage or sampler."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("optuna") \
                and any(part.startswith("_") for part in n.module.split(".")):
            found.append(f"line {n.lineno}: from {n.module} import ...")
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
            base = ast.unparse(n.value).lower()
            if any(word in base for word in ("optuna", "study", "trial", "storage", "sampler")):
                found.append(f"line {n.lineno}: {ast.unparse(n)}")
    return found


def test_private_optuna_finder_finds_each_kind():
    src = "from optuna.storages._rdb import x\ns = study._storage\nt = frozen_trial._trial_id\nok = self._hidden\n"
    assert _optuna_private_uses(src) == ["line 1: from optuna.storages._rdb import ...", "line 2: study._storage",
                                         "line 3: frozen_trial._trial_id"]


def test_no_optuna_private_attribute_anywhere():
    uses = {str(p.relative_to(REPO)): u for root in (*ROOTS, "tests") for p in sorted((REPO / root).rglob("*.py"))
            if p.name != Path(__file__).name and (u := _optuna_private_uses(p.read_text()))}
    assert not uses, uses
