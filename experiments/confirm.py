"""Interleaved latency comparison: which candidates are really the fastest, with a stated resolution.

Every candidate's runtime is loaded in this one process and warmed up; then rounds run one timed generation of
the workload per candidate, the order rotating each round (A B C, B C A, C A B, ...) so that no candidate always
runs first after a pause. Time per output token of each candidate is divided by the leader's *of the same
round* (load drifts between rounds and hits a whole round alike), and the interval of the mean log ratio gives
each ratio's CI (experiments/stats.py). Rounds continue until every ratio's half-width is within the
resolution (default ±3 %) or the time cap is hit (reported as such).

Tie set: the leader and every candidate whose ratio interval reaches down to 1 (not shown slower). The pick
among a tie set is :func:`pick`'s rule, never the timer's luck.
"""
from __future__ import annotations

import math
import time

from experiments.latency import LoadProbe, synthetic_prompts, timed_run, warm_up
from experiments.stats import ratio_ci

KV_BYTES = {"none": 2, "int8": 1, "fp8": 1}
PICK_RULE = ("among the tie set: fewest weight bytes read per decode step, then fewest KV-cache bytes per "
             "element, then higher ROUGE-1, then recipe label")


def compare(runtimes: dict, *, batch_size: int, input_len: int, output_len: int, seed: int,
            resolution: float = 0.03, max_seconds: float = 90.0, min_rounds: int = 3, max_rounds: int = 60,
            confidence: float = 0.95) -> dict:
    """``runtimes``: name → loaded runtime. Returns the comparison record (JSON-able).

    A candidate shown slower than the leader stops being timed: it cannot be in the tie set, and the rounds it
    would take go to the candidates that still can (a 13-way comparison with 8x slower candidates otherwise
    spends its time cap on them). Dropping is irreversible and tested after every round, so it needs the ratio
    interval at a 20-fold smaller error (99.75 % for 95 %) wholly above 1: after 3 rounds that drops an 8x slower
    candidate but not a 5 % slower one, whose 3 ratios may happen to agree closely (a search's final comparison
    once dropped a tied candidate so). Its ratio is over the rounds it ran, paired with the leader's same rounds."""
    names = sorted(runtimes)
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
        if rounds < min_rounds:
            continue
        leader, ratios = _ratios(times, active, confidence)
        _, strict = _ratios(times, active, 1 - (1 - confidence) / 20)
        for n in [n for n in active if n != leader and strict[n].low > 1.0]:
            active.remove(n)
            dropped[n] = rounds
        if all(ratios[n].half_width <= resolution for n in active if n != leader):
            break
        if time.monotonic() - t0 >= max_seconds or rounds >= max_rounds:
            capped = True
            break
    leader, ratios = _ratios(times, active, confidence)
    tie = [n for n in names if n == leader or ratios[n].low <= 1.0]
    return {
        "candidates": names, "leader": leader, "tie": tie, "rounds": rounds, "capped": capped,
        "dropped_after_rounds": dropped, "seconds": time.monotonic() - t0, "resolution": resolution,
        "confidence": confidence, "loaded_rounds": loaded_rounds,
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
