"""Four search workers on one study and one cache, on SQLite (the default storage) and on PostgreSQL.

Real processes started together, sharing ``QUANT_SUITE_CACHE``. Checked from the study, the workers' output
and a trace that the product itself writes (``QUANT_SUITE_TRACE``, see quant/faults.py: one ``O_APPEND`` line
when a build lock is acquired and released, when a checkpoint is built, when an evaluation runs):

- no trial lost or duplicated: trial numbers unique, each COMPLETE trial reported by exactly one worker, every
  trial a worker reported is COMPLETE in the study, nothing left RUNNING/WAITING, the budget met;
- no two workers inside the same build lock at once (the trace, in append order, never shows a second
  ``lock.acquired`` for a key before the holder's ``lock.released``); each checkpoint built once, each
  evaluation run once -- all four workers start with the same FP16 baseline, so they do contend for one key;
- no corrupted cache: every published entry validates afterwards; trials point at published checkpoints;
- no latency timed while another worker worked on the device (all four share this box's CPU).

The PostgreSQL test needs a server: ``.ci/run`` starts one and sets QUANT_TEST_PG_URL (locally it skips
without one; in CI, CI=1, it fails instead).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from quant.errors import EXIT_NO_PASS
from tests import searchkit as kit
from tests.test_search import _pg_url

pytestmark = pytest.mark.slow
WORKERS = 4
N_TRIALS = 6  # distinct recipes
# ROUGE-1 100: nothing passes, so the policy tries accuracy variants (7 alphas, fallback depths): work for all.
FLAGS = [*kit.SEARCH_FLAGS, "--min-rouge1", "100", "--recipes", "fp16,int8_wo,smoothquant,fp8"]


def _launch(model: Path, results: Path, cache: Path, trace: Path, storage_args: list[str], env_extra: dict,
            workers: int = WORKERS):
    procs = []
    for i in range(workers):
        cmd = kit.search_cmd(model, results, *storage_args, "--seed", str(i), "--n-trials", str(N_TRIALS),
                             flags=FLAGS)
        procs.append(subprocess.Popen(cmd, cwd=kit.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=kit.env_for(cache, QUANT_SUITE_TRACE=str(trace), **env_extra)))
    return [(p, *p.communicate(timeout=900)) for p in procs]


def _check(outs, study, cache: Path, trace: Path) -> dict:
    for proc, _out, err in outs:
        assert proc.returncode == EXIT_NO_PASS, err[-3000:]  # nothing passes ROUGE-1 100
        assert "Traceback" not in err and "database is locked" not in err
    # -- trials: none lost, none duplicated
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert not [t.number for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    complete = {t.number for t in study.trials if t.state.name == "COMPLETE"}
    finished = kit.finished(study)
    measured = [t for t in finished if t.user_attrs.get("repeat_of") is None]
    hashes = [t.user_attrs["recipe_hash"] for t in measured]
    # Two workers that claim one recipe at the same instant: the later trial is a repeat and measures nothing
    # (quant/study_store.claim; its interleavings are replayed deterministically in tests/test_study_store.py).
    assert max(Counter(hashes).values()) == 1, "a recipe was measured by two trials"
    # The budget (distinct recipes) is checked before each claim: each worker may start one more than it.
    assert N_TRIALS <= len(set(hashes)) <= N_TRIALS + len(outs) - 1
    per_worker = [{int(line.split()[1].rstrip(":")) for line in err.splitlines() if line.startswith("trial ")}
                  for _, _, err in outs]
    assert sum(len(s) for s in per_worker) == len(set().union(*per_worker)), "a trial was reported by two workers"
    assert set().union(*per_worker) == complete, "a reported trial is not COMPLETE, or a COMPLETE one unreported"
    assert sum(1 for s in per_worker if s) >= 2, "the work was not shared"
    # -- the locks: never two holders of one key at once, in the order the events were appended
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    holder: dict[str, int | None] = defaultdict(lambda: None)
    contended = Counter()
    for e in events:
        if e["event"] == "lock.acquired":
            assert holder[e["key"]] is None, f"{e['key']}: pid {e['pid']} entered while {holder[e['key']]} held it"
            holder[e["key"]] = e["pid"]
            contended[e["key"]] += 1
        elif e["event"] == "lock.released":
            assert holder[e["key"]] == e["pid"]
            holder[e["key"]] = None
    # -- the device: a latency (exclusive claim) never overlaps another worker's work on it (experiments/device_use)
    sharing: dict[str, set] = defaultdict(set)
    timing: dict[str, int | None] = defaultdict(lambda: None)
    timed = 0
    for e in events:
        key = e.get("key")
        if e["event"] == "device.shared":
            assert timing[key] is None, f"pid {e['pid']} worked on {key} while pid {timing[key]} timed a latency"
            sharing[key].add(e["pid"])
        elif e["event"] == "device.exclusive":
            assert timing[key] is None and not sharing[key], \
                f"pid {e['pid']} timed a latency on {key} while {timing[key] or sharing[key]} used it"
            timing[key], timed = e["pid"], timed + 1
        elif e["event"] == "device.released":
            sharing[key].discard(e["pid"])
            timing[key] = None if timing[key] == e["pid"] else timing[key]
    assert timed, "no latency was timed under the device's exclusive claim"
    builds = Counter(e["key"] for e in events if e["event"] == "checkpoint.build")
    evals = Counter(e["key"] for e in events if e["event"] == "evaluation.run")
    # A latency timed while the other workers took the cores is reported but not cached (measured again if asked)
    uncached = Counter(e["key"] for e in events if e["event"] == "evaluation.uncached")
    evals -= uncached
    assert builds and max(builds.values()) == 1, f"a checkpoint was built twice: {builds}"
    assert evals and max(evals.values()) == 1, f"an evaluation ran twice: {evals}"
    assert max(contended.values()) >= 2, "no key was ever contended: the test did not test the lock"
    # -- the cache
    counts = kit.validate_cache(cache)
    assert counts["checkpoints"] == len(builds) and counts["evaluations"] + counts["latency"] == len(evals)
    kit.assert_trials_point_at_published_checkpoints(study)
    pids = {e["pid"] for e in events}
    return {"workers": len(outs), "trials": len(finished), "processes_in_trace": len(pids),
            "builds": len(builds), "evaluations": len(evals), "lock_entries": sum(contended.values())}


def test_four_workers_on_the_default_sqlite_storage(tmp_path, tiny_for_workers):
    """The default storage (sqlite in --results-dir) shared by four processes, from an empty cache: the model
    conversion and the calibration statistics race too (atomic renames), checkpoints and evaluations lock."""
    results, cache, trace = tmp_path / "results", tmp_path / "cache", tmp_path / "trace.jsonl"
    outs = _launch(tiny_for_workers, results, cache, trace, [], {})
    study = kit.load_study(f"sqlite:///{results / 'study.db'}")
    figures = _check(outs, study, cache, trace)
    print("sqlite:", figures)


def test_four_workers_on_postgresql(tmp_path, crash_cache):
    url = _pg_url()
    name = f"concurrency-{os.getpid()}-{int(time.time())}"
    results, trace = tmp_path / "results", tmp_path / "trace.jsonl"
    # Model and statistics from the shared reference cache; every checkpoint and evaluation built here.
    cache = kit.snapshot(crash_cache, tmp_path / "cache", None)
    for sub in ("checkpoints", "evaluations"):
        shutil.rmtree(cache / sub)
    # The URL (with its password) reaches the workers through the environment, as the README recommends.
    outs = _launch(crash_cache["model"], results, cache, trace, ["--study-name", name], {"QUANT_SEARCH_STORAGE": url})
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    try:
        figures = _check(outs, study, cache, trace)
    finally:
        optuna.delete_study(study_name=name, storage=url)
    print("postgresql:", figures)


@pytest.fixture(scope="module")
def crash_cache(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


@pytest.fixture(scope="module")
def tiny_for_workers(tmp_path_factory, default_model):
    return kit.make_search_model(tmp_path_factory.mktemp("workers") / "tiny", default_model)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_two_workers_on_one_gpu_never_time_a_latency_while_the_other_uses_it(tmp_path, tiny_for_workers):
    """Both workers given --gpu 0: each says it shares the GPU, and the trace shows no latency overlapping the
    other's work on it (the device check in _check)."""
    results, cache, trace = tmp_path / "results", tmp_path / "cache", tmp_path / "trace.jsonl"
    outs = _launch(tiny_for_workers, results, cache, trace, ["--gpu", "0", "--device", "cuda"], {}, workers=2)
    assert any("other worker(s) on it" in err for _, _, err in outs), [err[:2000] for _, _, err in outs]
    study = kit.load_study(f"sqlite:///{results / 'study.db'}")
    _check(outs, study, cache, trace)
    devices = {json.dumps(t.user_attrs["device"]["uuid"]) for t in kit.finished(study)}
    assert len(devices) == 1
