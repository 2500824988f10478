"""The search end to end on a tiny random LLaMa (real ModelOpt, real runtime, real optuna storage).

A tiny model keeps each trial to seconds; what is tested is the search machinery: constraint handling,
reporting, resume after SIGKILL, concurrent workers on one PostgreSQL study, build of the winner.
The PostgreSQL tests need a real server: `.ci/run` starts one and sets QUANT_TEST_PG_URL; without it they
skip locally and fail in CI (CI=1).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from quant.errors import EXIT_NO_PASS

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num-samples", "3", "--max-output-len", "6", "--batch-size", "2", "--input-len", "16", "--output-len", "3",
        "--latency-repeats", "1", "--ppl-docs", "1", "--ppl-seq-len", "32", "--calib-samples", "2",
        "--calib-seq-len", "32", "--no-progress", "--recipes", "fp16,int8_wo,fp8", "--confirm-seconds", "3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model):
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("search") / "tiny", hidden=64, intermediate=128, layers=2,
                           tokenizer_from=default_model.hf_dir)


def _cmd(model, results, *extra):
    return [sys.executable, "-m", "quant.search", "--model", str(model), *FAST, "--results-dir", str(results), *extra]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def _finished(study):
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def _build_from_study(results):
    return _run([sys.executable, "-m", "quant.build", "--from-study", "quant-search",
                 "--storage", f"sqlite:///{results / 'study.db'}"])


# What only a library prints: its warnings, progress bars, ModelOpt's notes (quant.quiet holds them without -v).
THIRD_PARTY = ("Warning", "warn(", "site-packages", "it/s]", "current rank", "Loading weights", "Inserted",
               "No module named")


@pytest.mark.slow
def test_search_measures_pairs_compares_and_writes_report(tiny_model, tmp_path):
    results = tmp_path / "res"
    proc = _run(_cmd(tiny_model, results, "--min-rouge1", "0", "--n-trials", "4",
                     "--recipes", "fp16,int8_wo,smoothquant"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen recipe:" in proc.stdout
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if any(mark in line for mark in THIRD_PARTY)], proc.stderr[-3000:]
    assert len(lines) <= 30, "\n".join(lines)
    study = optuna.load_study(study_name="quant-search", storage=f"sqlite:///{results / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # The budget, unless the policy converged first (nothing left one step from the leading tie set).
    stopped = study.user_attrs["stopped"]
    assert len(_finished(study)) == len(done) and (len(done) == 4 or stopped.startswith("converged")), stopped
    assert len(done) >= 3
    assert done[0].params == {"kind": "fp16", "kv_cache": "none"}, "the FP16 baseline is measured first"
    hashes = [t.user_attrs["recipe_hash"] for t in done]
    assert len(set(hashes)) == len(done), "a recipe was measured twice"
    for t in done:
        r = t.user_attrs["result"]
        for key in ("latency", "emulated", "gate") + (() if r["gate"]["status"] == "slower" else
                                                       ("n", "rouge1", "rouge1_ci", "drop", "drop_ci", "proxy")):
            assert key in r, key
        if r["gate"]["status"] != "slower":  # (a recipe shown slower than a passing one is not scored)
            assert r["rouge1_ci"][0] <= r["rouge1"] <= r["rouge1_ci"][1]
        else:  # ... shown so interleaved, never by two trials' own intervals
            iv = r["gate"]["interleaved"]
            assert iv["rounds"] >= 3 and 1.0 < iv["ci"][0] <= iv["ratio"] <= iv["ci"][1], iv
        assert r["latency"]["tpot_ci"][0] <= r["latency"]["tpot_mean_ms"] <= r["latency"]["tpot_ci"][1]
        assert t.value == r["latency"]["tpot_mean_ms"]
        assert not r["emulated"], "the policy planned a recipe whose latency is emulated here"
    base = done[0].user_attrs["result"]
    assert base["drop"] == 0.0 and base["proxy"]["nll_gap"] == 0.0
    # The answer: the contenders were compared interleaved (or there was one), the pick follows the rule.
    answer = study.user_attrs["answer"]
    chosen = next(t for t in done if t.user_attrs["recipe_hash"] == answer["chosen"])
    if len(answer["tie"]) > 1 or answer["confirmation"]:
        (c,) = [c for c in study.user_attrs["confirmations"] if c["key"] == answer["confirmation"]]
        assert c["rounds"] >= 3 and c["leader"] in c["candidates"] and set(answer["tie"]) <= set(c["candidates"])
        assert all(c["ratios"][h]["low"] <= 1.0 for h in c["tie"] if h != c["leader"])
        assert "Interleaved latency comparison" in (results / "report.md").read_text()
    from quant.recipes import Recipe

    assert Recipe.load(results / "best_recipe.yaml") == Recipe.from_dict(chosen.user_attrs["result"]["recipe"])
    report = (results / "report.md").read_text()
    assert "paired drop" in report and "Tie set" in report and "Rule applied" in report
    header = (results / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"n", "rouge1_ci", "drop_ci", "proxy", "tpot_ci", "emulated", "loaded"} <= set(header)
    for name, min_bytes in (("tradeoff.png", 10_000), ("recipes.png", 5_000), ("history.html", 50_000),
                            ("report.md", 200), ("trials.csv", 100)):
        path = results / name
        assert path.is_file() and path.stat().st_size > min_bytes, name
    assert (results / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun of the same command measures nothing again: the budget is met, the answer is the same.
    again = _run(_cmd(tiny_model, results, "--min-rouge1", "0", "--n-trials", "4",
                      "--recipes", "fp16,int8_wo,smoothquant"))
    assert again.returncode == 0 and not [l for l in again.stderr.splitlines() if l.startswith("trial ")]
    assert optuna.load_study(study_name="quant-search", storage=f"sqlite:///{results / 'study.db'}"
                             ).user_attrs["answer"]["chosen"] == answer["chosen"]
    # Rebuild the winner from the study alone.
    build = _build_from_study(results)
    assert build.returncode == 0, build.stderr[-2000:]
    assert chosen.user_attrs["result"]["checkpoint"]["path"] in build.stdout
    assert "trtllm-build --checkpoint_dir" in build.stdout


@pytest.mark.slow
def test_no_recipe_passes_reports_closest(tiny_model, tmp_path):
    results = tmp_path / "res"
    proc = _run(_cmd(tiny_model, results, "--min-rouge1", "100", "--n-trials", "2"))
    assert proc.returncode == EXIT_NO_PASS, proc.stderr[-3000:]  # 3: finished, nothing passes
    assert "no recipe passes ROUGE-1 ≥ 100.00; closest:" in proc.stdout
    assert not (results / "best_recipe.yaml").exists()
    build = _build_from_study(results)
    assert build.returncode == 2 and "has no feasible trial" in build.stderr


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(tiny_model, tmp_path):
    """Kill while a trial runs; the rerun keeps every finished trial, repeats none, and completes the study.

    Its own cache folder: with the evaluations of the other tests cached, every trial ends in milliseconds and the
    poll below would never see one running."""
    results = tmp_path / "res"
    # Nothing passes ROUGE-1 100: the policy tries accuracy variants (alphas, fallback), enough for 5 trials.
    cmd = _cmd(tiny_model, results, "--min-rouge1", "100", "--n-trials", "5", "--seed", "3",
               "--recipes", "fp16,int8_wo,smoothquant")
    storage = f"sqlite:///{results / 'study.db'}"
    env = {**os.environ, "QUANT_SUITE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 400
    killed_with = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="quant-search", storage=storage)
        except Exception:
            continue
        states = [t.state for t in study.trials]
        if states.count(optuna.trial.TrialState.COMPLETE) >= 2 and states[-1] == optuna.trial.TrialState.RUNNING:
            proc.send_signal(signal.SIGKILL)
            killed_with = {t.number: (t.value, t.user_attrs.get("recipe_hash")) for t in study.trials
                           if t.state == optuna.trial.TrialState.COMPLETE}
            break
    proc.wait()
    assert killed_with, "the search finished before it could be killed mid-trial"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == EXIT_NO_PASS, again.stderr[-3000:]
    study = optuna.load_study(study_name="quant-search", storage=storage)
    after = {t.number: (t.value, t.user_attrs.get("recipe_hash")) for t in study.trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(after[n] == v for n, v in killed_with.items()), "a finished trial changed or vanished"
    assert len(_finished(study)) == 5
    # The killed trial stays behind as RUNNING or FAIL (heartbeat); it is never counted as a result.
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) + \
        sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials) == 5
    # No finished trial was re-evaluated: the rerun said "(cached)" for nothing it had already finished.
    rerun_numbers = {int(line.split()[1].rstrip(":")) for line in again.stderr.splitlines() if line.startswith("trial ")}
    assert not rerun_numbers & set(killed_with)


@pytest.mark.slow
@pytest.mark.parametrize("where,sig,code", [("trial.commit@2", "INT", 130), ("trial.committed@2", "TERM", 143)])
def test_ctrl_c_and_sigterm_report_what_finished_and_resume(tiny_model, tmp_path, where, sig, code):
    """Ctrl-C inside a trial (measured, not yet COMPLETE), SIGTERM (a job scheduler's stop) between trials: the signal at
    a fault point (quant/faults.py), so the place is the same on every run. One line, exit 130 / 143, no
    traceback; report.md written with what finished; no trial left RUNNING or WAITING; the same command resumes
    and completes the budget without measuring a finished trial again."""
    results = tmp_path / "res"
    cmd = _cmd(tiny_model, results, "--min-rouge1", "100", "--n-trials", "4", "--seed", "3",
               "--recipes", "fp16,int8_wo,smoothquant")
    env = {**os.environ, "QUANT_SUITE_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**env, "QUANT_SUITE_KILL_AT": f"{where}:{sig}"})
    assert first.returncode == code, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert first.stderr.strip().splitlines()[-1] == ("terminated (SIGTERM)" if sig == "TERM" else "interrupted (Ctrl-C)")
    storage = f"sqlite:///{results / 'study.db'}"
    study = optuna.load_study(study_name="quant-search", storage=storage)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and "WAITING" not in states
    assert study.user_attrs["stopped"] == f"interrupted ({'SIGTERM' if sig == 'TERM' else 'Ctrl-C'})"
    finished = {t.number for t in _finished(study)}
    assert finished and (results / "report.md").is_file()
    assert all(f"| {n} |" in (results / "report.md").read_text() for n in finished)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == EXIT_NO_PASS, again.stderr[-3000:]
    study = optuna.load_study(study_name="quant-search", storage=storage)
    assert len([t for t in _finished(study) if t.user_attrs.get("repeat_of") is None]) == 4
    rerun = {int(line.split()[1].rstrip(":")) for line in again.stderr.splitlines() if line.startswith("trial ")}
    assert not rerun & finished


def _pg_url():
    url = os.environ.get("QUANT_TEST_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("QUANT_TEST_PG_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server (set QUANT_TEST_PG_URL; .ci/start-postgres starts one)")
    return url


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(tiny_model, tmp_path):
    url = _pg_url()
    name = f"workers-{os.getpid()}-{int(time.time())}"
    # ROUGE-1 100: nothing passes, so the policy has accuracy variants enough for 6 trials.
    cmds = [_cmd(tiny_model, tmp_path / f"w{i}", "--min-rouge1", "100", "--n-trials", "6", "--storage", url,
                 "--study-name", name, "--seed", str(i), "--recipes", "fp16,int8_wo,smoothquant,fp8")
            for i in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ.copy()) for c in cmds]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == EXIT_NO_PASS, err[-3000:]
    study = optuna.load_study(study_name=name, storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    measured = [t for t in _finished(study) if t.user_attrs.get("repeat_of") is None]
    hashes = [t.user_attrs["recipe_hash"] for t in measured]
    assert len(hashes) == len(set(hashes)), "a recipe was measured twice"
    # The budget is checked before each claim, so each worker may start one more than needed.
    assert 6 <= len(measured) <= 7
    per_worker = [{int(l.split()[1].rstrip(":")) for l in err.splitlines() if l.startswith("trial ")} for _, err in outs]
    assert per_worker[0] and per_worker[1], "both workers ran trials"
    assert not per_worker[0] & per_worker[1], "a trial was run by both workers"
    assert per_worker[0] | per_worker[1] == {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


@pytest.mark.parametrize("args, fragment", [
    (["--min-rouge1", "150"], "--min-rouge1 must be in [0, 100]"),
    (["--min-rouge1", "14", "--max-rouge1-drop", "1"], "not allowed with argument"),
    ([], "one of the arguments --min-rouge1 --max-rouge1-drop is required"),
    (["--min-rouge1", "14", "--n-trials", "0"], "must be > 0"),
    (["--min-rouge1", "14", "--storage", "notaurl"], "cannot open storage"),
    (["--min-rouge1", "14", "--storage", "postgresql://quant:secret@127.0.0.1:1/nodb"], "cannot open storage"),
    (["--min-rouge1", "14", "--recipes", "int3"], "unknown kind(s) int3"),
    (["--min-rouge1", "14", "--recipes", "smoothquant,int8_wo", "--serve-with", "vllm"], "no kind left to search"),
])
def test_bad_search_input(tmp_path, args, fragment):
    proc = _run([sys.executable, "-m", "quant.search", *args, "--results-dir", str(tmp_path / "r")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and fragment in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert "secret" not in proc.stderr, "a storage password leaked into the output"


def test_unknown_study_for_build(tmp_path):
    db = tmp_path / "s.db"
    optuna.create_study(study_name="other", storage=f"sqlite:///{db}")
    proc = _run([sys.executable, "-m", "quant.build", "--from-study", "nope", "--storage", f"sqlite:///{db}"], timeout=120)
    assert proc.returncode == 2 and "no study named 'nope'" in proc.stderr.splitlines()[-1]
