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

RESULTS = Path(__file__).resolve().parent.parent / "experiments" / "results"
TABLE = RESULTS / "recipe_table_default.json"
GATE_RUN = RESULTS / "search-cpu" / "gate-bonferroni" / "per_article_rouge1.json"


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


def test_drop_gate_on_the_gate_runs_100_articles():
    """The per-article ROUGE-1 the gate-active search recorded (all 100 aclsum test papers, its article order).
    INT8 weight-only's drop, +0.82 [-0.31, 1.96], is within noise of FP16: error spending keeps most of the error
    for the ceiling, so it passes there (bound 1.91); Bonferroni's 1 % per look failed it (2.17), the verdict
    the committed table contradicts. INT4 AWQ g64 (+2.23) fails under both. Each verdict rests on all 100."""
    rec = json.loads(GATE_RUN.read_text())["per_article_rouge1"]
    base = np.array(rec["fp16"])
    bounds = tuple(block_bounds(8, 100))
    int8 = base - np.array(rec["int8_wo"])
    awq = base - np.array(rec["int4_awq-g64"])
    v = sequential_verdict(Gate("drop", 2.0, 0.95, bounds), int8)
    assert v.status == "pass" and v.n == 100 and v.bound == pytest.approx(1.912, abs=1e-3)
    old = sequential_verdict(Gate("drop", 2.0, 0.95, bounds, spending="bonferroni"), int8)
    assert old.status == "fail" and old.bound == pytest.approx(2.17, abs=0.01)
    for spending in ("obrien-fleming", "bonferroni"):
        a = sequential_verdict(Gate("drop", 2.0, 0.95, bounds, spending=spending), awq)
        assert a.status == "fail" and a.n == 100 and a.mean == pytest.approx(2.226, abs=1e-3)


def test_error_spending_spends_nothing_before_min_pass_and_all_of_it_by_the_ceiling():
    gate = Gate("drop", 2.0, 0.95, (8, 16, 32, 64, 100))
    levels = [gate.pass_confidence(n, n == 100) for n in gate.bounds]
    assert levels[:2] == [None, None]
    spent = [1 - c for c in levels[2:]]
    assert sum(spent) == pytest.approx(0.05 * gate.spend_share) and spent[0] < spent[1] < spent[2]
    assert spent[0] < 0.001 and spent[2] > 0.7 * sum(spent)  # O'Brien-Fleming: almost nothing early, most last
    # A ceiling reached early (a short split) spends what is left.
    assert 1 - gate.pass_confidence(64, True) == pytest.approx(0.05 * gate.spend_share - spent[0])


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
    """Repeated looks inflate the false-pass rate; the search's rule (error spending + min 32 for a pass) keeps
    it near the nominal 5 % on the most skewed recipe of the table (full measurement: experiments.sequential_error)."""
    drops = scores["fp16"] - scores["smoothquant-a0.5"]
    bounds = tuple(block_bounds(8, 100))
    naive = false_pass_rate(drops, Gate("drop", 2.0, 0.95, bounds, spending="none", min_pass=0), shift_to=2.0,
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


class _Timed:
    """A runtime whose decode steps take the times it is given, round after round: the comparison's input as
    data (like the hand-made facts above), so its bookkeeping is checked without timing noise. Real runtimes
    go through compare() in tests/test_search.py."""

    device = __import__("torch").device("cpu")
    vocab = 2000

    def __init__(self, ms_per_round):
        self.rounds, self.calls = iter(ms_per_round), 0

    def generate(self, prompts, n, ignore_eos=True):
        from types import SimpleNamespace

        self.calls += 1
        if self.calls == 1:  # the warm-up
            return SimpleNamespace(ttft_s=0.001, step_s=[0.001])
        ms = next(self.rounds)
        return SimpleNamespace(ttft_s=ms / 1e3, step_s=[ms / 1e3] * n)


def test_comparison_stops_timing_a_candidate_shown_slower_and_resolves_the_rest():
    from experiments.confirm import compare

    wiggle = [1.0, 1.01, 0.99, 1.005, 0.995] * 20
    runtimes = {"a": _Timed([50 * w for w in wiggle]), "b": _Timed([50 * w for w in wiggle[1:] + wiggle[:1]]),
                "slow": _Timed([400 * w for w in wiggle[3:] + wiggle[:3]])}
    rec = compare(runtimes, batch_size=1, input_len=4, output_len=3, seed=0, resolution=0.03, max_seconds=60)
    assert rec["dropped_after_rounds"] == {"slow": 3}  # 8x slower: out after the first possible look
    assert len(rec["rounds_ms"]["slow"]) == 3 and len(rec["rounds_ms"]["a"]) == rec["rounds"] > 3
    assert rec["rounds"] in (6, 12) and rec["leader"] in ("a", "b") and not rec["capped"]  # ends at a look
    other = "b" if rec["leader"] == "a" else "a"
    assert rec["verdicts"][other] == "tie" and rec["ratios"][other]["high"] <= 1.03
    assert rec["ratios"]["slow"]["low"] > 7 and rec["verdicts"]["slow"] == "slower"
    assert rec["tie"] == ["a", "b"]  # as fast as each other within the resolution: a tie, broken by the rule


def test_comparison_level_is_corrected_for_its_looks_and_ratios():
    from experiments.confirm import decision_level, look_rounds

    assert look_rounds(3, 60) == [3, 6, 12, 24, 48, 60]
    # 6 scheduled looks + a capped one, 3 ratios: 0.05 / 21 per interval
    assert decision_level(0.95, 4, 3, 60) == pytest.approx(1 - 0.05 / 21)
    assert decision_level(0.95, 2, 3, 60) == pytest.approx(1 - 0.05 / 7)


def test_a_difference_inside_the_resolution_is_a_tie_however_precise():
    """Shown slower needs the interval above 1 *and* the estimate past the resolution: 2 % slower with ±0.5 %
    noise is a tie (the rule picks), 6 % slower is slower."""
    from experiments.confirm import compare

    rng = np.random.default_rng(1)
    drift = 50 * np.exp(rng.normal(0, 0.2, 60))
    noise = lambda: np.exp(rng.normal(0, 0.005, 60))  # noqa: E731
    rec = compare({"a": _Timed(drift * noise()), "b": _Timed(1.02 * drift * noise()),
                   "c": _Timed(1.06 * drift * noise())},
                  batch_size=1, input_len=4, output_len=3, seed=0, resolution=0.03, max_seconds=60)
    assert rec["ratios"]["b"]["low"] > 1.0  # b is measurably slower...
    assert rec["verdicts"]["b"] == "tie" and rec["verdicts"]["c"] == "slower"  # ...but not by the resolution
    assert rec["tie"] == ["a", "b"]


def _old_rule_splits(ta, tb) -> bool:
    """The rule before the corrected level: a 95 % interval read after every round from the third, stopping at
    ±3 % half-width or 60 rounds; the slower one is out of the tie when its interval lies above 1."""
    from experiments.stats import ratio_ci

    for k in range(3, 61):
        a, b = ta[:k], tb[:k]
        q = ratio_ci(b, a) if np.log(a).mean() <= np.log(b).mean() else ratio_ci(a, b)
        if q.half_width <= 0.03 or k == 60:
            return q.low > 1.0


def test_equal_candidates_are_called_different_at_most_at_the_nominal_rate():
    """Two recipes on the same kernels (AWQ and GPTQ g64), timed with 5 % run-to-run noise over a ±20 % drift
    shared by the round: over 300 simulated comparisons through compare() itself, one is shown slower in at most
    5 % of them (measured 3.3 %), the corrected level's promise. The earlier rule split them in 9.7 %."""
    from experiments.confirm import compare

    rng = np.random.default_rng(7)
    split, old_split = 0, 0
    for _ in range(300):
        drift = 50 * np.exp(rng.normal(0, 0.2, 60))
        ta, tb = drift * np.exp(rng.normal(0, 0.05, 60)), drift * np.exp(rng.normal(0, 0.05, 60))
        rec = compare({"a": _Timed(ta), "b": _Timed(tb)}, batch_size=1, input_len=4, output_len=3, seed=0,
                      resolution=0.03, max_seconds=600)
        split += rec["tie"] != ["a", "b"]
        old_split += _old_rule_splits(ta, tb)
    assert split / 300 <= 0.05
    assert old_split / 300 > 0.05


FINAL_COMPARISONS = RESULTS / "search-cpu" / "final-comparisons.json"


def test_recorded_default_runs_replay_to_one_tie_set():
    """The final interleaved comparisons of three fresh default searches (committed rounds), read at their last
    look with the corrected rule: every run's tie set is {int4_awq-g64, int4_gptq-g64} (so the stated rule names
    one answer), where the 95 % interval alone split them in run B."""
    from experiments.confirm import decision_level, verdicts
    from experiments.stats import ratio_ci

    rec = json.loads(FINAL_COMPARISONS.read_text())
    level = decision_level(rec["confidence"], 4, rec["min_rounds"], rec["max_rounds"])
    for run, times in rec["runs"].items():
        rounds = max(map(len, times.values()))
        active = [n for n, t in times.items() if len(t) == rounds]
        _, _, v = verdicts(times, active, level=level, resolution=rec["resolution"])
        assert sorted(n for n in v if v[n] != "slower") == ["int4_awq-g64", "int4_gptq-g64"], run
        assert v["fp16"] == v["int8_wo"] == "slower", run
    b = rec["runs"]["B"]
    assert ratio_ci(b["int4_gptq-g64"], b["int4_awq-g64"]).low > 1.0  # what the old rule read as "slower"


def test_holm_adjusts_in_the_given_order_and_paired_t_p_is_the_t_test():
    """Holm's step-down by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 → 0.02, 0.03, 0.06, 0.04, kept
    monotone (0.06); the paired p is scipy's one-sample t-test of the differences, with the degenerate cases."""
    from scipy import stats as st

    from experiments.stats import holm, paired_t_p

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
    diffs = [0.5, 1.0, 1.5, 0.2, 0.9, 1.3]
    assert paired_t_p(diffs) == pytest.approx(st.ttest_1samp(diffs, 0.0).pvalue, rel=1e-12)
    assert paired_t_p([0.0, 0.0]) == 1.0 and paired_t_p([2.0]) == 1.0 and paired_t_p([0.3, 0.3]) == 0.0
