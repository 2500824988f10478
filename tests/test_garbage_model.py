"""The garbage-model guard end to end: a model whose logits are NaN never passes as a fast recipe.

A tiny LLaMa (safetensors, given as --model) with one NaN in its lm_head: the decoder runs fine (its
calibration statistics are finite, ModelOpt quantizes it), but every checkpoint made from it yields NaN logits.
experiments/health.py flags each evaluation, and the search prunes the trial with the reason
"garbage model: NaN/Inf in the logits" -- so it can never be the chosen recipe, whatever its latency.
"""
from __future__ import annotations

import sys

import pytest

from quant.errors import EXIT_NO_PASS
from tests import searchkit as kit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, default_model):
    from safetensors.torch import load_file, save_file

    path = kit.make_search_model(tmp_path_factory.mktemp("garbage") / "nan-tiny", default_model)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["lm_head.weight"][123, 7] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


def test_nan_model_trials_are_pruned_and_never_chosen(nan_model, tmp_path):
    results = tmp_path / "results"
    proc = kit.run(kit.search_cmd(nan_model, results, "--min-rouge1", "0", "--n-trials", "3",
                                  "--recipes", "fp16,int8_wo"), kit.env_for(tmp_path / "cache"))
    assert proc.returncode == EXIT_NO_PASS, proc.stderr[-3000:]  # every trial pruned: nothing passes
    study = kit.load_study(f"sqlite:///{results / 'study.db'}")
    done = kit.finished(study)
    assert len(done) == 3
    for t in done:
        assert t.state.name == "PRUNED", (t.number, t.state, t.user_attrs)
        assert t.user_attrs["pruned_reason"].startswith("garbage model: NaN/Inf in the logits"), t.user_attrs
    assert {t.params["kind"] for t in done} >= {"fp16"}
    assert "no recipe passes ROUGE-1 ≥ 0.00" in proc.stdout and "garbage model: NaN/Inf" in proc.stdout
    assert "chosen recipe" not in proc.stdout and not (results / "best_recipe.yaml").exists()
    report = (results / "report.md").read_text()
    assert "garbage model: NaN/Inf in the logits" in report and "pass |" not in report
    # Nothing to build from it either.
    build = kit.run([sys.executable, "-m", "quant.build", "--from-study", "quant-search",
                     "--storage", f"sqlite:///{results / 'study.db'}"], kit.env_for(tmp_path / "cache"))
    assert "has no feasible trial" in kit.error_line(build)


def test_relative_threshold_against_a_nan_baseline_is_refused(nan_model, tmp_path):
    results = tmp_path / "results"
    proc = kit.run(kit.search_cmd(nan_model, results, "--max-rouge1-drop", "1", "--n-trials", "1",
                                  "--recipes", "fp16"), kit.env_for(tmp_path / "cache"))
    line = kit.error_line(proc)
    assert "FP16 baseline" in line and "garbage model" in line and "NaN/Inf in the logits" in line
