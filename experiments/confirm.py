"""Interleaved latency comparison: which candidates are really the fastest, with a stated resolution.

Every candidate's runtime is loaded in this one process and warmed up; then rounds run one timed generation of
the workload per candidate, the order rotating each round (A B C, B C A, C A B, ...) so that no candidate always
runs first after a pause. Time per output token of each candidate is divided by the leader's *of the same
round* (load drifts between rounds and hits a whole round alike), and the interval of the mean log ratio gives
each ratio's CI (experiments/stats.py).

Verdicts, reproducible by construction (:func:`verdicts`):

* **slower**: the ratio's interval lies wholly above 1 *and* its estimate exceeds 1 + resolution. A difference
  smaller than the resolution (default 3 %) is a tie by definition: two INT4 recipes on the same kernels (AWQ and
  GPTQ at one group size) must tie on every run, not come out 1.10x apart on one run and 0.96x on the next, which
  is what an interval alone did on the 2-core box (experiments/results/README.md).
* **tie**, resolved: the interval lies below 1 + resolution.
* open otherwise: rounds go on until nothing is open or the time cap is hit; what is still open then is a tie
  (not shown slower).

The intervals are taken at a level corrected for every decision the comparison may make: the verdicts are read
only at the rounds of :func:`look_rounds` (3, 6, 12, 24, 48, then the last), and the error 1 - confidence is
split over those looks and the candidates' ratios (Bonferroni), so that a truly equal pair is called different
with probability at most 1 - confidence over the whole comparison. (Reading a 95 % interval after every round,
the earlier rule, did so far more often: up to 21 looks at 3 ratios.)

A candidate shown slower stops being timed (irreversibly; the corrected level covers every look): it cannot be
in the tie set, and the rounds it would take go to the ones that still can. The pick among a tie set is
:func:`pick`'s rule, never the timer's luck.
"""
from __future__ import annotations

import math
import time

from experiments.latency import LoadProbe, synthetic_prompts, timed_run, warm_up
from experiments.stats import ratio_ci

KV_BYTES = {"none": 2, "int8": 1, "fp8": 1}
PICK_RULE = ("among the tie set: fewest weight bytes read per decode step, then fewest KV-cache bytes per "
             "element, then higher ROUGE-1, then recipe label")


def look_rounds(min_rounds: int, max_rounds: int) -> list[int]:
    """The rounds after which verdicts are read: ``min_rounds`` doubling, then ``max_rounds`` (a time cap ends the
    comparison at one more look, counted in :func:`decision_level`)."""
    out, r = [], min_rounds
    while r < max_rounds:
        out.append(r)
        r *= 2
    return out + [max_rounds]


def decision_level(confidence: float, n_candidates: int, min_rounds: int, max_rounds: int) -> float:
    """The two-sided confidence of each interval a verdict is read from: 1 - confidence split over every look
    (the scheduled ones and a capped one) and every ratio to a leader (Bonferroni)."""
    looks = len(look_rounds(min_rounds, max_rounds)) + 1
    return 1 - (1 - confidence) / (looks * max(n_candidates - 1, 1))


def shown_slower(q, resolution: float) -> bool:
    """The "slower" rule for a :class:`experiments.stats.Ratio` to the reference: interval above 1, estimate above
    1 + resolution."""
    return q.low > 1.0 and q.ratio > 1.0 + resolution


def verdicts(times: dict[str, list[float]], active: list[str], *, level: float, resolution: float):
    """(leader, ratios, verdict per candidate: "leader" | "slower" | "tie" | "open") from the rounds so far.

    Pure, so a recorded comparison replays exactly (tests/test_stats.py replays the committed default runs)."""
    leader, ratios = _ratios(times, active, level)
    out = {}
    for n, q in ratios.items():
        if n == leader:
            out[n] = "leader"
        elif shown_slower(q, resolution):
            out[n] = "slower"
        elif q.high <= 1.0 + resolution:
            out[n] = "tie"
        else:
            out[n] = "open"
    return leader, ratios, out


def compare(runtimes: dict, *, batch_size: int, input_len: int, output_len: int, seed: int,
            resolution: float = 0.03, max_seconds: float = 90.0, min_rounds: int = 3, max_rounds: int = 60,
            confidence: float = 0.95) -> dict:
    """``runtimes``: name → loaded runtime. Returns the comparison record (JSON-able); its ``ratios`` are at the
    corrected ``level`` the verdicts were read from."""
    names = sorted(runtimes)
    level = decision_level(confidence, len(names), min_rounds, max_rounds)
    looks = set(look_rounds(min_rounds, max_rounds))
    vocab = min(rt.vocab for rt in runtimes.values())
    prompts = synthetic_prompts(batch_size, input_len, vocab, seed)
    for name in names:
        warm_up(runtimes[name], prompts, output_len)
    times: dict[str, list[float]] = {n: [] for n in names}
    active, dropped = list(names), {}
    loaded_rounds, t0, rounds = 0, time.monotonic(), 0
    capped = False
    while True:
        probe = LoadProbe()
        for name in active[rounds % len(active):] + active[:rounds % len(active)]:
            times[name].append(timed_run(runtimes[name], prompts, output_len)[1])
        loaded_rounds += probe.stop()["loaded"]
        rounds += 1
        out_of_time = time.monotonic() - t0 >= max_seconds and rounds >= min_rounds
        if rounds not in looks and not out_of_time:
            continue
        _, _, verdict = verdicts(times, active, level=level, resolution=resolution)
        for n in [n for n in active if verdict[n] == "slower"]:
            active.remove(n)
            dropped[n] = rounds
        if "open" not in verdict.values() or rounds >= max_rounds:
            break
        if out_of_time:
            capped = True
            break
    leader, ratios, verdict = verdicts(times, active, level=level, resolution=resolution)
    # What was dropped stays slower: its ratio is over the rounds it ran, against the leader's same rounds.
    verdict.update({n: "slower" for n in dropped})
    tie = [n for n in names if verdict[n] != "slower"]
    return {
        "candidates": names, "leader": leader, "tie": tie, "verdicts": verdict, "rounds": rounds, "capped": capped,
        "dropped_after_rounds": dropped, "seconds": time.monotonic() - t0, "resolution": resolution,
        "confidence": confidence, "level": level, "loaded_rounds": loaded_rounds,
        "workload": {"batch_size": batch_size, "input_len": input_len, "output_len": output_len},
        "ratios": {n: {"ratio": q.ratio, "low": q.low, "high": q.high, "half_width": q.half_width}
                   for n, q in ratios.items()},
        "tpot_ms": {n: math.exp(sum(map(math.log, t)) / len(t)) for n, t in times.items()},
        "rounds_ms": times,
        "rule": PICK_RULE,
    }


def _ratios(times: dict[str, list[float]], active: list[str], confidence: float):
    """The leader (lowest geometric-mean time among the candidates still timed) and every candidate's ratio to
    it, paired by round over the rounds the candidate ran (all of them, or those before it was dropped)."""
    geo = {n: sum(map(math.log, times[n])) / len(times[n]) for n in active}
    leader = min(geo, key=lambda n: (geo[n], n))
    return leader, {n: ratio_ci(t, times[leader][:len(t)], confidence) for n, t in times.items()}


def pick(tie: list[str], facts: dict[str, dict]) -> str:
    """The stated rule (:data:`PICK_RULE`); ``facts[name]`` has weight_bytes, kv_cache, rouge1, label."""
    return min(tie, key=lambda n: (facts[n]["weight_bytes"], KV_BYTES[facts[n]["kv_cache"]], -facts[n]["rouge1"],
                                   facts[n]["label"]))
