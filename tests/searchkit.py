"""Helpers shared by the crash, concurrency, garbage-model and security tests of the search (real processes).

Every search runs the real CLI (``python -m quant.search``) on the tiny random LLaMa of ``tests/test_search.py``
with its FAST flags, its own ``QUANT_SUITE_CACHE`` and results folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.test_search import FAST

REPO = Path(__file__).resolve().parent.parent
# --eval-seed 0 and --seed 0 are the defaults; written out so the reference and the reruns say the same thing.
SEARCH_FLAGS = [*FAST, "--n-trials", "4", "--seed", "0", "--eval-seed", "0"]


def make_search_model(path: Path, default_model) -> Path:
    """The tiny model of tests/test_search.py (same shape, seed and fp16 values, so the same numbers), stored in
    float32 so that the search converts it into the cache: the model.convert kill point is on its path."""
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(path, hidden=64, intermediate=128, layers=2, tokenizer_from=default_model.hf_dir,
                           float32=True)


def env_for(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("QUANT_SUITE_KILL_AT", "QUANT_SUITE_TRACE",
                                                             "QUANT_SEARCH_STORAGE")}
    env.update(QUANT_SUITE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)  # may point the cache elsewhere
    return env


def search_cmd(model: Path, results: Path, *extra: str, flags=SEARCH_FLAGS) -> list[str]:
    return [sys.executable, "-m", "quant.search", "--model", str(model), *flags, "--results-dir", str(results), *extra]


def run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit status 2, no traceback, and the last stderr line is the one ``error: ...`` line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), lines[-3:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


# -- the study as data ------------------------------------------------------------------------------------------
def load_study(storage: str, name: str = "quant-search"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def finished(study) -> list:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.trials if t.state in done]


def trial_key(t) -> tuple:
    return (json.dumps(t.params, sort_keys=True), t.user_attrs.get("recipe_hash"), t.state.name)


def outcome(study) -> dict:
    """What a rerun must reproduce: the finished trials as a multiset, each recipe's (deterministic) ROUGE-1,
    the feasible recipes, and the answer."""
    from experiments.report import summarize_study

    done = finished(study)
    summary = summarize_study(study)
    feasible = sorted({t.user_attrs["recipe_hash"] for t in done if result(t).get("feasible")})
    return {
        "trials": Counter(trial_key(t) for t in done),
        "rouge1": {t.user_attrs.get("recipe_hash"): result(t).get("rouge1") for t in done},
        "feasible": feasible,
        "best": summary.best.recipe if summary.best else None,
        "closest": summary.closest.recipe if summary.closest else None,
    }


def result(trial) -> dict:
    return trial.user_attrs.get("result") or {}


def assert_same_answer(got: dict, ref: dict) -> None:
    assert got["trials"] == ref["trials"], f"finished trials differ:\n{got['trials']}\nvs the uninterrupted run\n{ref['trials']}"
    assert got["rouge1"] == ref["rouge1"], "a recipe's ROUGE-1 differs from the uninterrupted run's"
    assert got["feasible"] == ref["feasible"]
    if len(ref["feasible"]) <= 1:
        # One feasible recipe (or none: the closest, by ROUGE): the answer does not depend on timing noise.
        assert got["best"] == ref["best"] and got["closest"] == ref["closest"]
    else:  # several feasible: the fastest wins, and tiny-model latencies are noise; the set itself must agree
        assert got["best"] is not None and recipe_hash(got["best"]) in ref["feasible"]


def recipe_hash(recipe: dict) -> str:
    from quant.recipes import Recipe

    return Recipe.from_dict(recipe).hash


# -- the cache: nothing half-written may ever be read back ------------------------------------------------------
def validate_cache(cache: Path) -> dict:
    """Every published cache entry is complete and valid; returns counts per kind. ``.tmp-*`` are ignored (what a
    kill leaves) but must never be what a record or a trial points at."""
    from safetensors import safe_open

    from calibration.stats import ActivationStats
    from quant.checkpoint import load_checkpoint

    counts = Counter()
    for folder in sorted((cache / "models").glob("[!.]*")):
        json.loads((folder / "config.json").read_text())
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt"):
                pass
        assert (folder / "tokenizer.json").is_file() and (folder / "source.json").is_file(), folder
        counts["models"] += 1
    for folder in sorted((cache / "checkpoints").glob("[!.]*")):
        if folder.is_dir():
            load_checkpoint(folder)
            counts["checkpoints"] += 1
    for folder in sorted((cache / "calib").glob("[!.]*")):
        ActivationStats.load(folder)
        counts["calib"] += 1
    for path in sorted((cache / "evaluations").glob("[!.]*.json")):
        record = json.loads(path.read_text())
        assert record["evaluation_key"] == path.stem, path
        assert ".tmp-" not in record["checkpoint"]["path"], f"{path} points at a temporary folder"
        assert Path(record["checkpoint"]["path"]).is_dir(), f"{path} points at a missing checkpoint"
        # A latency timed while other processes took the cores is not cached (experiments/stages.py): how many
        # latency records exist depends on the machine's load, every other record on the search alone.
        counts["latency" if record.get("stage") == "latency" else "evaluations"] += 1
    return counts


def tmp_leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*") if ".tmp-" in p.name)


def assert_trials_point_at_published_checkpoints(study) -> None:
    from quant.checkpoint import load_checkpoint

    for t in finished(study):
        path = (result(t).get("checkpoint") or {}).get("path")
        if path:
            assert ".tmp-" not in path, f"trial {t.number} used a temporary folder {path}"
            load_checkpoint(Path(path))


# -- one reference search shared by the crash-test files (and by the xdist workers running them) --------------
def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder shared by every xdist worker of this test session (or private to a run without xdist)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp().parent / f"shared-{run_id}" if run_id else tmp_path_factory.getbasetemp()
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


THRESHOLD = ["--min-rouge1", "0.5"]  # one recipe of the tiny model passes: the answer does not hang on timing


def crash_reference(tmp_path_factory, default_model) -> dict:
    """The uninterrupted search every kill test compares with (built once per session, under a lock)."""
    import fcntl

    root = shared_dir(tmp_path_factory, "crash-reference")
    model, cache, results = root / "tiny", root / "cache", root / "results"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            for stale in (model, cache, results):
                shutil.rmtree(stale, ignore_errors=True)
            make_search_model(model, default_model)
            proc = run(search_cmd(model, results, *THRESHOLD), env_for(cache))
            assert proc.returncode == 0, proc.stderr[-3000:]
            (root / "done").write_text("ok")
    study = load_study(f"sqlite:///{results / 'study.db'}")
    done = finished(study)
    assert len(done) == 4
    quantized = next(t for t in done
                     if t.user_attrs["recipe"]["kind"] != "fp16" or t.user_attrs["recipe"]["kv_cache"] != "none")
    fp16 = next(t for t in done if t.params == {"kind": "fp16", "kv_cache": "none"})
    records: dict[str, list[str]] = {}  # recipe hash → its stage records (proxy, blocks, latency)
    for p in sorted((cache / "evaluations").glob("*.json")):
        records.setdefault(json.loads(p.read_text())["recipe_hash"], []).append(f"evaluations/{p.name}")
    checkpoint = quantized.user_attrs["result"]["checkpoint"]["path"]
    return {
        "model": model, "cache": cache, "outcome": outcome(study), "counts": validate_cache(cache),
        "drop": {
            "models": ["models"], "calib": ["calib"],
            "quantized": [f"checkpoints/{Path(checkpoint).name}", *records[quantized.user_attrs["recipe_hash"]]],
            "quantized-record": records[quantized.user_attrs["recipe_hash"]],
            "fp16-record": records[fp16.user_attrs["recipe_hash"]],
        },
    }


def snapshot(reference: dict, dest: Path, drop: str | None) -> Path:
    """The reference cache, hard-linked (entries are only ever replaced by rename), minus what ``drop`` names."""
    shutil.copytree(reference["cache"], dest, copy_function=os.link)
    for rel in reference["drop"][drop] if drop else ():
        target = dest / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dest


def kill_then_rerun(reference: dict, tmp_path: Path, spec: str, drop: str | None, tmp_where: str | None):
    """SIGKILL at ``spec``, check what it left, rerun, check the answer equals the reference's."""
    import signal

    from quant.recipes import Recipe

    cache = snapshot(reference, tmp_path / "cache", drop)
    results, trace = tmp_path / "results", tmp_path / "trace.jsonl"
    cmd = search_cmd(reference["model"], results, *THRESHOLD)

    killed = run(cmd, env_for(cache, QUANT_SUITE_KILL_AT=spec, QUANT_SUITE_TRACE=str(trace)))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    events = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    assert [e["point"] for e in events if e["event"] == "killed"] == [spec.split("@")[0]], "died elsewhere"
    if tmp_where:  # the kill really fell between a temporary write and its rename
        where = {"cache": cache, "results": results}[tmp_where]
        assert tmp_leftovers(where), f"no .tmp-* left in {tmp_where}: the kill missed the write"
    validate_cache(cache)  # nothing half-written was published

    again = run(cmd, env_for(cache))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    study = load_study(f"sqlite:///{results / 'study.db'}")
    assert not [t.number for t in study.trials if t.state.name in ("RUNNING", "WAITING")], "a trial was left behind"
    got = outcome(study)
    assert_same_answer(got, reference["outcome"])
    assert_trials_point_at_published_checkpoints(study)
    counts = validate_cache(cache)
    assert counts.pop("latency", 0) <= len(finished(study)), "more latency records than recipes measured"
    assert counts == {k: v for k, v in reference["counts"].items() if k != "latency"}, \
        "the rerun's cache differs from the reference's"

    # The outputs are complete: the report, the plots, and the chosen recipe, which loads as a recipe.
    assert (results / "report.md").read_text().startswith("# Study")
    for png in ("tradeoff.png", "recipes.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    best = got["best"]  # the rerun's own answer (with several feasible recipes, timing picks among them)
    if best is None:
        assert "no recipe passes" in again.stdout and not (results / "best_recipe.yaml").exists()
    else:
        assert "chosen recipe:" in again.stdout
        assert Recipe.load(results / "best_recipe.yaml") == Recipe.from_dict(best)
    return again


def signal_at(reference: dict, tmp_path: Path, spec: str, drop: str | None, sig: str) -> None:
    """SIGINT (``sig="INT"``) or SIGTERM (``"TERM"``) at ``spec``: they unwind, so the search ends with its one-line
    notice and exit 130 / 143, and leaves no temporary file or folder; the published cache stays valid."""
    cache = snapshot(reference, tmp_path / "cache", drop)
    results, trace = tmp_path / "results", tmp_path / "trace.jsonl"
    proc = run(search_cmd(reference["model"], results, *THRESHOLD),
               env_for(cache, QUANT_SUITE_KILL_AT=f"{spec}:{sig}", QUANT_SUITE_TRACE=str(trace)))
    code, notice = {"INT": (130, "interrupted (Ctrl-C)"), "TERM": (143, "terminated (SIGTERM)")}[sig]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == notice, proc.stderr[-2000:]
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [e["point"] for e in events if e["event"] == "killed"] == [spec.split("@")[0]], "signalled elsewhere"
    assert not tmp_leftovers(cache) and not tmp_leftovers(tmp_path / "results"), "a temporary file stayed"
    validate_cache(cache)

