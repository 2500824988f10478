"""Crash safety, second half: SIGKILL a real search during evaluations, trial commits and report writing.

Same method as tests/test_faults.py (read its docstring): real self-SIGKILL of the search process at a named
``quant.faults`` point, checks of what it left, the same command again, and the answer compared with the one
uninterrupted reference run both files share.
"""
from __future__ import annotations

import pytest

from tests import searchkit as kit

pytestmark = pytest.mark.slow

# (QUANT_SUITE_KILL_AT, what to remove from the reference cache first, where a .tmp-* must be left by the kill)
SCENARIOS = [
    ("eval.summaries", "fp16-record", None),  # the FP16 baseline, measured before any trial
    ("eval.latency", "quantized-record", None),
    ("eval.record", "quantized-record", "cache"),
    ("trial.commit@2", None, None),  # trial 1 measured, not yet COMPLETE: marked FAIL, re-run, counted once
    ("trial.committed@2", None, None),
    ("report.write", None, "results"),
    ("best.write", None, "results"),
    ("plot.write@2", None, "results"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


@pytest.mark.parametrize("spec,drop,tmp_where", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_sigkill_while_measuring_or_reporting_then_rerun(spec, drop, tmp_where, reference, tmp_path):
    again = kit.kill_then_rerun(reference, tmp_path, spec, drop, tmp_where)
    if spec.startswith("trial.commit@"):
        assert "their worker died; marked FAIL" in again.stderr


# Ctrl-C / SIGTERM at the evaluation and report points (the trial commit points: tests/test_search.py).
SIGNALLED = [(spec, drop, sig) for (spec, drop, _), sig in
             zip([s for s in SCENARIOS if not s[0].startswith("trial.")], ["TERM", "INT"] * len(SCENARIOS))]


@pytest.mark.parametrize("spec,drop,sig", SIGNALLED, ids=[f"{s[0]}:{s[2]}" for s in SIGNALLED])
def test_ctrl_c_and_sigterm_while_measuring_or_reporting(spec, drop, sig, reference, tmp_path):
    kit.signal_at(reference, tmp_path, spec, drop, sig)


def test_kill_twice_in_a_row_then_rerun(reference, tmp_path):
    """Two crashes in one study (the second run dies too, later), then the rerun: still the same answer."""
    cache = kit.snapshot(reference, tmp_path / "cache", None)
    results = tmp_path / "results"
    cmd = kit.search_cmd(reference["model"], results, *kit.THRESHOLD)
    # Run 1 dies committing trial 1; run 2 re-runs it as trial 2 and dies committing trial 3.
    for spec in ("trial.commit@2", "trial.commit@2"):
        proc = kit.run(cmd, kit.env_for(cache, QUANT_SUITE_KILL_AT=spec))
        assert proc.returncode == -9, (spec, proc.stderr[-2000:])
    again = kit.run(cmd, kit.env_for(cache))
    assert again.returncode == 0, again.stderr[-3000:]
    study = kit.load_study(f"sqlite:///{results / 'study.db'}")
    kit.assert_same_answer(kit.outcome(study), reference["outcome"])
    assert sum(t.state.name == "FAIL" for t in study.trials) == 2
