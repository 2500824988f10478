"""Crash safety: SIGKILL a real search at named points, run the same command again, get the same answer.

Fault injection is real, not mocked: ``QUANT_SUITE_KILL_AT=NAME[@N]`` makes the search process send *itself*
SIGKILL when it reaches ``quant.faults.point(NAME)`` (the N-th time) -- inside model conversion, calibration
statistics, ModelOpt's quantization loop, checkpoint export, between a temporary write and its rename, during
the summaries and the latency measurement, between a trial's measurement and its commit, and while the report
and plots are written. SIGKILL cannot be caught or cleaned up after, so what is left on disk is what a power cut
or the OOM killer would leave.

For every point: the killed run must have died by SIGKILL at that point; the published cache must still be
valid (every checkpoint, statistics entry, evaluation record and model conversion loads and validates); the
same command then completes, and its finished trials (params, recipe hash), each recipe's ROUGE-1, the
feasible set and the chosen recipe equal those of one uninterrupted reference run with the same seed and flags;
no trial points at a temporary folder. ``--min-rouge1 0.5`` makes the answer independent of timing noise on
the tiny model (one recipe passes; see searchkit.assert_same_answer).

To stay within minutes, each kill run starts from a copy (hard links: cache files are only ever replaced by
rename, never edited) of the reference's cache with just the entries removed that the point needs to be
rebuilt, so the killed run reaches its point after seconds. This file kills the cache builders (model
conversion, calibration statistics, ModelOpt, checkpoint export, engine build); tests/test_faults_trials.py
kills evaluations, trial commits and the report, against the same (session-shared) reference run.
"""
from __future__ import annotations

import os
import signal
import sys

import pytest

from tests import searchkit as kit

pytestmark = pytest.mark.slow

# (QUANT_SUITE_KILL_AT, what to remove from the reference cache first, where a .tmp-* must be left by the kill)
SCENARIOS = [
    ("model.convert", "models", "cache"),
    ("calib.collect", "calib", None),
    ("calib.write", "calib", "cache"),
    ("quantize.modelopt", "quantized", None),
    ("checkpoint.export", "quantized", "cache"),
    ("checkpoint.rename", "quantized", "cache"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


@pytest.mark.parametrize("spec,drop,tmp_where", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_sigkill_while_building_cache_entries_then_rerun(spec, drop, tmp_where, reference, tmp_path):
    kit.kill_then_rerun(reference, tmp_path, spec, drop, tmp_where)


def test_sigkill_in_engine_build_then_rerun(tmp_path, reference):
    """The TensorRT-LLM engine cache (quant.build with a test double of trtllm-build on PATH, see
    tests/test_trtllm_backend.py): killed just before the engine folder's rename, the rerun builds it again and
    never serves the temporary folder."""
    from tests.test_trtllm_backend import DOUBLE

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtllm-build").write_text(DOUBLE.format(python=sys.executable))
    (bin_dir / "trtllm-build").chmod(0o755)
    model = reference["model"]
    cache = kit.snapshot(reference, tmp_path / "cache", None)  # model and fp16 checkpoint cached, no engine
    env = kit.env_for(cache, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                      TRTLLM_DOUBLE_COUNT=str(tmp_path / "count.txt"), TRTLLM_DOUBLE_MODE="ok")
    cmd = [sys.executable, "-m", "quant.build", "--model", str(model), "--batch-size", "2", "--input-len", "16",
           "--output-len", "8"]
    killed = kit.run(cmd, {**env, "QUANT_SUITE_KILL_AT": "engine.rename"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    engines = tmp_path / "cache" / "engines"
    assert [p.name for p in engines.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")] == []
    assert kit.tmp_leftovers(engines), "the kill fell outside the engine's temporary folder"
    again = kit.run(cmd, env)
    assert again.returncode == 0, again.stderr[-3000:]
    built = [p for p in engines.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
    assert len(built) == 1 and f"engine       {built[0]}" in again.stdout
    from quant.trtllm import validate_engine_dir

    validate_engine_dir(built[0])
    assert len((tmp_path / "count.txt").read_text().splitlines()) == 2, "built once per run, the killed one included"


# Ctrl-C / SIGTERM at the same cache-building points (the signal alternates, one run per point): unlike SIGKILL
# they unwind, so the command ends with its one-line notice and the documented code and leaves *no* temporary
# folder; the published cache stays valid. That the same command then resumes to the same answer is shown at
# the trial points by tests/test_search.py (the rerun here would only repeat what the SIGKILL tests above show).
SIGNALLED = [(spec, drop, sig) for (spec, drop, _), sig in zip(SCENARIOS, ["INT", "TERM"] * len(SCENARIOS))]


@pytest.mark.parametrize("spec,drop,sig", SIGNALLED, ids=[f"{s[0]}:{s[2]}" for s in SIGNALLED])
def test_ctrl_c_and_sigterm_while_building_cache_entries(spec, drop, sig, reference, tmp_path):
    kit.signal_at(reference, tmp_path, spec, drop, sig)
