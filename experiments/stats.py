"""The search's statistics: paired accuracy gates with sequential looks, and latency ratios with intervals.

Pure functions over per-article scores and per-run timings (no model, no I/O), so every decision the search
makes can be replayed on recorded numbers (tests/test_stats.py does, on the committed 50-paper table).

Intervals are Student-t intervals of a mean (deterministic: no resampling RNG in a decision). Paired, because
ROUGE-1 varies 7-9 points from paper to paper but a candidate and the FP16 baseline scored on the *same* papers
differ far less; latency ratios are paired by round of an interleaved measurement for the same reason (machine
load drifts between rounds, and hits every candidate of a round alike).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st


@functools.lru_cache(maxsize=4096)  # a few (level, df) pairs per search; thousands of calls when resampled
def t_quantile(p: float, df: int) -> float:
    return float(_st.t.ppf(p, df))


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): two-sided Student-t interval of the mean; one value bounds nothing: (x, -inf, inf)."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if x.size < 2:
        return m, -math.inf, math.inf
    half = t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def paired_t_p(diffs) -> float:
    """Two-sided p-value of the paired Student-t test that the mean difference is 0: 1.0 for fewer than two
    differences or all of them 0 (no evidence either way), 0.0 for a constant non-zero difference."""
    x = np.asarray(diffs, dtype=float)
    if x.size < 2 or not x.any():
        return 1.0
    sd = float(x.std(ddof=1))
    if sd == 0.0:
        return 0.0
    return float(2 * _st.t.sf(abs(float(x.mean())) / (sd / math.sqrt(x.size)), x.size - 1))


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest of m is multiplied by m - i + 1,
    kept monotone, capped at 1. Rejecting where the adjusted value is at most alpha keeps the chance of any false
    rejection in the family at most alpha, whatever the tests' dependence."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (p.size - np.arange(p.size))))
    out = np.empty_like(p)
    out[order] = adj
    return [float(v) for v in out]


def one_sided_bound(values, confidence: float, *, upper: bool) -> float:
    """The one-sided Student-t bound of the mean at ``confidence`` (upper or lower); the mean for one value."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if x.size < 2:
        return math.inf if upper else -math.inf
    half = t_quantile(confidence, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m + half if upper else m - half


# -------------------------------------------------------------------------------------------- accuracy gate
@dataclass(frozen=True)
class Gate:
    """The accuracy rule of a search, applied to one candidate's per-article scores.

    ``kind == "absolute"``: the values are the candidate's ROUGE-1 per article; it passes when their mean (or, with
    ``confidence``, the mean's one-sided *lower* bound) is ≥ ``threshold``.
    ``kind == "drop"``: the values are per-article drops, FP16 baseline minus candidate on the same article; it
    passes when their mean (or its one-sided *upper* bound) is ≤ ``threshold``.

    Sequential: the candidate is scored on growing prefixes of the same article order, ``bounds`` articles at each
    look (experiments/stages.block_bounds: 8, 16, 32, 64, 100 by default), and the gate looks after each, stopping
    at the first look whose bound is on one side of the threshold. Looking K times at a 1 - a bound errs up to K
    times as often as one look (measured: experiments/results/sequential_error.*), so the looks share the error:

    * A *pass* with ``confidence`` (the error a user asked to bound) spends a = 1 - confidence over the looks with
      the O'Brien-Fleming-type spending function of Lan & DeMets, A(t) = 2 - 2 Phi(z_{1-a/2} / sqrt(t)) at
      information fraction t = articles / ceiling: a look spends A(t_k) - A(t_{k-1}), almost nothing early and
      most of a at the ceiling, so the final look is nearly as powerful as a single look would be (a union bound
      over the looks keeps the total at most a). Bonferroni's a/K per look, the earlier rule, cost a fifth of
      the power at the ceiling: INT8 weight-only's +0.82 [-0.31, 1.96] drop on 100 papers failed its 2.17 bound.
      Also, a pass needs ``min_pass`` articles (32) before the ceiling: on 8 or 16 articles a right-skewed drop
      distribution (most papers unchanged, a few much worse) often shows no bad paper yet and the t bound is too
      low. Looks before ``min_pass`` spend nothing.
    * A *fail* (and, without ``confidence``, an early pass) needs the bound at 1 - a/K (Bonferroni, a = 0.05
      without ``confidence``): a fail may come at any look; failing early wrongly discards a good recipe at most
      that often.
    Without ``confidence`` the verdict at the ceiling is the point estimate on all the articles scored; early
    stops agree with it except at the small error rate above. Both rates: ``python -m experiments.sequential_error``.
    """

    kind: str  # "absolute" | "drop"
    threshold: float
    confidence: float | None
    bounds: tuple[int, ...]  # articles scored at each look; the last is the ceiling
    # "obrien-fleming" (the search's), "bonferroni", or "none" (every look at the nominal level): the last two
    # only to measure what they cost
    spending: str = "obrien-fleming"
    min_pass: int = 32  # with ``confidence``: fewest articles a pass may rest on (before the ceiling)
    # Share of 1 - confidence that O'Brien-Fleming spending spends: the t bound is anti-conservative on
    # right-skewed per-article drops, and spending all of it erred up to 6.3 % at a nominal 5 % (measured,
    # experiments/results/README.md); 0.8 brings the measured worst back to the nominal level.
    spend_share: float = 0.8

    @property
    def alpha(self) -> float:
        return 1 - (self.confidence or 0.95)

    @property
    def look_confidence(self) -> float:
        """The Bonferroni level of one look (fails; passes without ``confidence``)."""
        return 1 - self.alpha / (1 if self.spending == "none" else len(self.bounds))

    def pass_confidence(self, n: int, final: bool) -> float | None:
        """The one-sided confidence a pass on ``n`` articles needs; None where no pass may rest on this look."""
        if self.confidence is None or self.spending != "obrien-fleming":
            return None if self.confidence is not None and n < self.min_pass and not final else self.look_confidence
        if n < self.min_pass and not final:
            return None
        ceiling, alpha = self.bounds[-1], self.alpha * self.spend_share
        before = max((b for b in self.bounds if self.min_pass <= b < n), default=0)
        spent = _obf_spent(alpha, before / ceiling)
        spend = (alpha if final else _obf_spent(alpha, min(n / ceiling, 1.0))) - spent
        return 1 - spend

    def decide(self, values, *, final: bool | None = None) -> "Verdict":
        """Verdict after scoring ``values`` (all the articles so far). ``final``: no more articles can be added
        (default: the ceiling is reached)."""
        x = np.asarray(values, dtype=float)
        final = x.size >= self.bounds[-1] if final is None else final
        good_low = self.kind == "absolute"  # absolute: higher is better; drop: lower is better
        mean = float(x.mean())
        level = self.pass_confidence(x.size, final)
        # The bound a pass rests on, on the failing side (at the Bonferroni level where no pass may be made)...
        bound = one_sided_bound(x, level or self.look_confidence, upper=not good_low)
        # ...and the one on the passing side, which proves a failure early.
        other = one_sided_bound(x, self.look_confidence, upper=good_low)
        ok = (lambda v: v >= self.threshold) if good_low else (lambda v: v <= self.threshold)
        if level is not None and ok(bound):
            status = "pass"
        elif not ok(other):
            status = "fail"
        elif final:
            status = "pass" if self.confidence is None and ok(mean) else "fail"
        else:
            status = "continue"
        return Verdict(status=status, n=int(x.size), mean=mean, bound=bound)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bounds"] = list(self.bounds)
        return d


@dataclass(frozen=True)
class Verdict:
    status: str  # pass | fail | continue
    n: int  # articles the verdict rests on
    mean: float
    bound: float  # the one-sided bound on the failing side, at the look's corrected level

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@functools.lru_cache(maxsize=1024)
def _obf_spent(alpha: float, t: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type error spent by information fraction t (0 at t = 0, alpha at t = 1)."""
    if t <= 0:
        return 0.0
    return float(2 - 2 * _st.norm.cdf(_st.norm.ppf(1 - alpha / 2) / math.sqrt(t)))


def sequential_verdict(gate: Gate, values) -> Verdict:
    """Replay the sequential rule on a full list of per-article values (in scoring order)."""
    x = list(values)
    for i, n in enumerate(gate.bounds):
        v = gate.decide(x[:n], final=i == len(gate.bounds) - 1)
        if v.status != "continue":
            return v
    return v


def false_pass_rate(diffs, gate: Gate, *, shift_to: float, trials: int = 2000, seed: int = 0) -> float:
    """How often the sequential rule passes a candidate whose true mean sits exactly at ``shift_to`` (on the
    threshold, or beyond it on the failing side): articles resampled with replacement from ``diffs`` after shifting
    them so that their mean is ``shift_to``. The measured error rate of the rule, repeated looks included."""
    x = np.asarray(diffs, dtype=float)
    x = x - x.mean() + shift_to
    rng = np.random.default_rng(seed)
    n = gate.bounds[-1]
    passes = sum(sequential_verdict(gate, rng.choice(x, size=n)).passed for _ in range(trials))
    return passes / trials


# -------------------------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class Ratio:
    """Candidate ÷ reference time per output token, from rounds of an interleaved measurement."""

    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval (0.03 = ±3 %)."""
        return (self.high - self.low) / 2 / self.ratio


def ratio_ci(times, reference, confidence: float = 0.95) -> Ratio:
    """Paired by round: the t interval of the mean log ratio, exponentiated."""
    logs = np.log(np.asarray(times, dtype=float)) - np.log(np.asarray(reference, dtype=float))
    m, lo, hi = mean_ci(logs, confidence)
    return Ratio(ratio=math.exp(m), low=math.exp(lo), high=math.exp(hi), rounds=int(logs.size))


def spearman(a, b) -> float | None:
    """Rank correlation of two equally long sequences (None for fewer than 3 pairs or a constant one)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(_st.spearmanr(a, b).statistic)
