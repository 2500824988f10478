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

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num-samples", "3", "--max-output-len", "6", "--batch-size", "2", "--input-len", "16", "--output-len", "3",
        "--latency-repeats", "1", "--ppl-docs", "1", "--ppl-seq-len", "32", "--calib-samples", "2",
        "--calib-seq-len", "32", "--no-progress", "--recipes", "fp16,int8_wo,fp8"]


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


@pytest.mark.slow
def _build_from_study(results):
    return _run([sys.executable, "-m", "quant.build", "--from-study", "quant-search",
                 "--storage", f"sqlite:///{results / 'study.db'}"])


def test_search_picks_fastest_feasible_and_writes_report(tiny_model, tmp_path):
    results = tmp_path / "res"
    proc = _run(_cmd(tiny_model, results, "--min-rouge1", "0", "--n-trials", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen recipe:" in proc.stdout
    study = optuna.load_study(study_name="quant-search", storage=f"sqlite:///{results / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(_finished(study)) == 4 and done
    assert done[0].params["kind"] == "fp16", "the FP16 baseline is measured first"
    for t in done:
        for key in ("recipe", "rouge1", "rouge1_ci", "tpot_ms", "ttft_ms", "tokens_per_s", "checkpoint", "constraint"):
            assert key in t.user_attrs, key
        assert t.value == t.user_attrs["tpot_ms"]
    fastest = min(done, key=lambda t: t.value)
    best = (results / "best_recipe.yaml").read_text()
    assert fastest.user_attrs["recipe"]["kind"] in best
    for name, min_bytes in (("tradeoff.png", 10_000), ("recipes.png", 5_000), ("history.html", 50_000),
                            ("report.md", 200), ("trials.csv", 100)):
        path = results / name
        assert path.is_file() and path.stat().st_size > min_bytes, name
    assert (results / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rebuild the winner from the study alone.
    build = _build_from_study(results)
    assert build.returncode == 0, build.stderr[-2000:]
    assert fastest.user_attrs["checkpoint"] in build.stdout and "trtllm-build --checkpoint_dir" in build.stdout


@pytest.mark.slow
def test_no_recipe_passes_reports_closest(tiny_model, tmp_path):
    results = tmp_path / "res"
    proc = _run(_cmd(tiny_model, results, "--min-rouge1", "100", "--n-trials", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    cmd = _cmd(tiny_model, results, "--min-rouge1", "0", "--n-trials", "5", "--seed", "3")
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
    assert again.returncode == 0, again.stderr[-3000:]
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
    # 12 trials over a space with 7 SmoothQuant alphas: enough distinct recipes that both workers get work.
    cmds = [_cmd(tiny_model, tmp_path / f"w{i}", "--min-rouge1", "0", "--n-trials", "12", "--storage", url,
                 "--study-name", name, "--seed", str(i), "--recipes", "fp16,int8_wo,smoothquant,fp8")
            for i in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ.copy()) for c in cmds]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name=name, storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    finished = _finished(study)
    # MaxTrialsCallback is checked before each trial, so each worker may start one more than needed.
    assert 12 <= len(finished) <= 13
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
