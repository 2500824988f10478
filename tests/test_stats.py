"""The search's statistics and policy on recorded numbers: no model runs here.

The gate's verdicts are replayed on the per-article ROUGE-1 of the committed 50-paper table
(experiments/results/recipe_table_default.json, every recipe scored on the same papers as FP16); the policy is
driven with hand-made facts, so each of its rules is checked without timing noise.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.stages import block_bounds
from experiments.stats import Gate, false_pass_rate, mean_ci, one_sided_bound, ratio_ci, sequential_verdict, spearman

TABLE = Path(__file__).resolve().parent.parent / "experiments" / "results" / "recipe_table_default.json"


@pytest.fixture(scope="module")
def scores() -> dict[str, np.ndarray]:
    records = json.loads(TABLE.read_text())["records"]
    return {r["recipe_label"]: np.array(r["rouge"]["per_sample_rouge1"]) for r in records}


def test_block_bounds_double_and_end_at_the_ceiling():
    assert block_bounds(8, 100) == [8, 16, 32, 64, 100]
    assert block_bounds(8, 50) == [8, 16, 32, 50]
    assert block_bounds(8, 8) == [8] and block_bounds(3, 3) == [3]


def test_intervals_match_textbook_values():
    x = [1.0, 2.0, 3.0, 4.0]
    m, lo, hi = mean_ci(x, 0.95)
    assert m == 2.5 and hi - m == pytest.approx(3.182446 * np.std(x, ddof=1) / 2, rel=1e-5)  # t(0.975, 3)
    assert one_sided_bound(x, 0.95, upper=True) == pytest.approx(2.5 + 2.353363 * np.std(x, ddof=1) / 2, rel=1e-5)
    assert one_sided_bound([5.0], 0.95, upper=True) == math.inf  # one value bounds nothing


def test_drop_gate_on_the_committed_table_matches_its_verdicts(scores):
    """The committed table: INT8 weight-only within noise of FP16 (+0.07 on 50 papers), INT4 AWQ g64 not (-4.2).
    With --max-rouge1-drop 2 --confidence 0.95 and the search's looks (8, 16, 32, 50 on this table) the gate
    passes the first and fails the second, each on the articles it needed."""
    base = scores["fp16"]
    gate = Gate("drop", 2.0, 0.95, tuple(block_bounds(8, 50)))
    int8 = sequential_verdict(gate, base - scores["int8_wo"])
    awq = sequential_verdict(gate, base - scores["int4_awq-g64"])
    assert int8.status == "pass" and int8.n >= gate.min_pass and int8.bound <= 2.0
    assert awq.status == "fail" and awq.mean > 2.0
    # SmoothQuant alpha 0.5 (-4.4) fails too; alpha 0.8 (-1.9 on average) cannot be shown within 2 on 50 papers.
    assert sequential_verdict(gate, base - scores["smoothquant-a0.5"]).status == "fail"
    assert sequential_verdict(gate, base - scores["smoothquant-a0.8"]).status == "fail"
    # Without --confidence the verdict is the point estimate: alpha 0.8's mean drop 1.88 is within 2.
    point = Gate("drop", 2.0, None, tuple(block_bounds(8, 50)))
    assert sequential_verdict(point, base - scores["smoothquant-a0.8"]).status == "pass"


def test_absolute_gate_decides_clear_cases_on_the_first_block(scores):
    gate = Gate("absolute", 14.0, None, tuple(block_bounds(8, 100)))
    for label, s in scores.items():
        v = sequential_verdict(gate, s)
        assert v.status == "pass" and v.n == 8, label  # ROUGE-1 ~35 on 8 papers is far above 14
    assert sequential_verdict(Gate("absolute", 60.0, None, (8, 16)), scores["fp16"]).status == "fail"


def test_a_pass_with_confidence_needs_min_pass_articles():
    diffs = [0.0, 0.1, -0.1, 0.0, 0.05, -0.05, 0.0, 0.0] * 8  # clearly within 2 after 8 articles
    gate = Gate("drop", 2.0, 0.95, (8, 16, 32, 64))
    assert gate.decide(diffs[:8]).status == "continue"
    assert gate.decide(diffs[:32]).status == "pass"
    assert Gate("drop", 2.0, None, (8, 16, 32, 64)).decide(diffs[:8]).status == "pass"


def test_the_corrected_rule_keeps_its_error_rate_where_the_naive_one_does_not(scores):
    """Repeated looks inflate the false-pass rate; the search's rule (Bonferroni + min 32 for a pass) keeps it
    near the nominal 5 % on the most skewed recipe of the table (full measurement: experiments.sequential_error)."""
    drops = scores["fp16"] - scores["smoothquant-a0.5"]
    bounds = tuple(block_bounds(8, 100))
    naive = false_pass_rate(drops, Gate("drop", 2.0, 0.95, bounds, corrected=False, min_pass=0), shift_to=2.0,
                            trials=600, seed=3)
    rule = false_pass_rate(drops, Gate("drop", 2.0, 0.95, bounds), shift_to=2.0, trials=600, seed=3)
    assert naive > 0.10 and rule < 0.08 and rule < naive / 2


def test_ratio_ci_is_paired_by_round():
    rng = np.random.default_rng(0)
    drift = np.exp(rng.normal(0, 0.3, 40))  # load changes between rounds by ±30 %
    ref = 50.0 * drift
    cand = 1.10 * ref * np.exp(rng.normal(0, 0.01, 40))
    q = ratio_ci(cand, ref)
    assert q.low < 1.10 < q.high and q.half_width < 0.01
    assert ratio_ci([50.0, 52.0], [50.0, 52.0]).ratio == 1.0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
