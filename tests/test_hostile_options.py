"""Every option of every CLI, enumerated from its own parser, with hostile values of its type.

The options are not listed here: each CLI's ``main`` is entered once with argparse's ``parse_args`` intercepted,
which hands over the parser it built, so an option added later is covered without anyone remembering. Each case
then runs the real ``main`` in this interpreter (one import of torch for all of them), in an empty work folder
with an empty cache, and ends it where the heavy work would begin: the fault point ``model.resolve``
(``QUANT_SUITE_STOP_AT``, quant/faults.py), reached only once every flag has been checked.

A case is handled when either
- the value is refused: exit status 2, no traceback, the last stderr line is the only ``error:`` line, and, for
  a value no option may take, no "backend: auto → ..." notice came before it; or
- the value is a legitimate one (zero for a seed, a huge sample count that is clamped...) and the command gets
  as far as resolving the model -- except for the values no option may take: negative numbers, nan, ±inf,
  overflowing floats, words where numbers belong and empty numbers, which must be refused;
and, either way, nothing appeared or changed in the work folder or the cache.

``experiments.regret`` and ``experiments.sequential_error`` are left out: benchmarks whose every valid run is
the long job itself (no model to stop at). Their numeric flags use the same argparse types as the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
from pathlib import Path

import pytest

from quant import faults
from quant.errors import ArgumentParser

CLIS = {  # module → the arguments it cannot run without (a search needs a gate; a checkpoint check, a folder)
    "quant.search": ["--min-rouge1", "14"],
    "quant.build": [],
    "experiments.evaluate": [],
    "experiments.plot": [],
    "calibration.__main__": [],
    "quant.checkpoint": ["no-such-checkpoint"],
    "experiments.recipe_table": [],
    "experiments.bench_runtime": [],
}
NEVER = ["-1", "nan", "inf", "-inf", "1e400", "abc", ""]  # no numeric option may take these
NUMERIC_MAYBE = ["0", "99999999999999999999"]  # refused or legitimate, never a traceback
TEXT = ["", " ", "-", "x" * 4096, "/proc/quant-hostile/x"]


class _Parser(BaseException):
    pass


def _parser_of(module: str) -> argparse.ArgumentParser:
    main = importlib.import_module(module).main

    def grab(self, args=None, namespace=None):
        raise _Parser(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ArgumentParser, "parse_args", grab)
        try:
            main([])
        except _Parser as got:
            return got.args[0]
    raise AssertionError(f"{module} never parsed its arguments")


def _numeric(action) -> bool:
    t = action.type
    return t in (int, float) or getattr(t, "__name__", "") in ("positive_int", "seed_int")


def _cases():
    for module, base in CLIS.items():
        parser = _parser_of(module)
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            opt = action.option_strings[0]
            if action.choices:
                values = [("bogus", True), ("", True)]
            elif _numeric(action):
                values = [(v, True) for v in NEVER] + [(v, False) for v in NUMERIC_MAYBE]
            else:
                values = [(v, False) for v in TEXT]
            own = [] if opt in ("--max-rouge1-drop", "--min-rouge1") else base  # the search's gate, given alone
            for value, must_refuse in values:  # --opt=VALUE: "-1" or "" can only be given so
                yield pytest.param(module, [*own, f"{opt}={value}"], must_refuse, id=f"{module} {opt}={value[:12]!r}")


def _state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cases():
    return list(_cases())


def test_every_option_of_every_cli_takes_hostile_values(cases, tmp_path, monkeypatch):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(faults.STOP_ENV, "model.resolve")
    for var in ("QUANT_SEARCH_STORAGE", faults.KILL_ENV, faults.TRACE_ENV):
        monkeypatch.delenv(var, raising=False)
    problems = []
    for case in cases:
        module, argv, must_refuse = case.values
        before = _state(tmp_path)
        err = io.StringIO()
        code = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = importlib.import_module(module).main(argv)
            except faults.Stop:
                code = "stopped"
            except BaseException as exc:  # noqa: BLE001 -- any escape is the defect this test looks for
                code = f"escaped {type(exc).__name__}: {exc}"
        lines = err.getvalue().strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        refused = (code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err.getvalue()
                   # a bad number is refused before the backend notice; a missing file may be found after it
                   and not (must_refuse and any(line.startswith("backend:") for line in lines)))
        if not (refused or (code == "stopped" and not must_refuse)):
            problems.append(f"{case.id}: {code} {lines[-1:] if lines else ''}")
        if _state(tmp_path) != before:
            problems.append(f"{case.id}: wrote {sorted(set(_state(tmp_path)) ^ set(before))[:3]}")
    assert len(cases) > 300
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)
