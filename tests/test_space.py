"""The search space and the policy that plans trials, driven with hand-made facts (no model, no timer).

What the policy promises: the same facts give the same next step (so identical runs explore identical recipes);
raw timings never order anything, only a recorded interleaved comparison's tie set; emulated recipes are never
planned; the FP16 baseline comes first; a recipe measured (or being measured by another worker) is never
planned again.
"""
from __future__ import annotations

from quant.space import BASELINE, Fact, Space, confirmation_key, contenders, next_action

LAYERS = tuple(f"layers.{i}.mlp.proj" for i in range(6))


def space(device="cpu", kinds=("fp16", "int8_wo", "smoothquant", "int4_awq", "fp8")):
    return Space(kinds=kinds, group_sizes=(32, 64), ranked_layers=LAYERS, device=device)


def fact(sp, params, status="pass", tpot=(10.0, 11.0), proxy=0.01, number=0):
    return Fact(params=params, hash=sp.recipe(params).hash, status=status, emulated=bool(sp.emulated(params)),
                tpot_ci=tpot, proxy=proxy, number=number)


def run_policy(sp, outcome, *, seed=0, confirm=None, limit=300):
    """Drive the policy to the end: ``outcome(params)`` → (status, tpot interval); ``confirm(hashes)`` → tie."""
    facts, confirmations, trials = [], [], []
    for _ in range(limit):
        a = next_action(sp, facts, confirmations, seed=seed)
        if a.what == "done":
            return trials, confirmations, a.reason
        if a.what == "confirm":
            confirmations.append({"key": confirmation_key(a.candidates), "tie": confirm(a.candidates)})
            continue
        status, tpot = outcome(a.params)
        trials.append(a.params)
        facts.append(fact(sp, a.params, status, tpot, number=len(trials)))
    raise AssertionError("the policy did not stop")


def test_full_space_and_its_latency_classes():
    sp = space()
    params = sp.enumerate()
    # fp16 x 3 KV + (int8_wo, fp8: 3 KV x 3 fallback) + smoothquant 7 alphas x 9 + int4_awq 2 groups x 9
    assert len(params) == 3 + 9 + 9 + 63 + 18 == sp.size()
    assert len({sp.recipe(p).hash for p in params}) == len(params), "two params spell one recipe"
    classes = {Space.latency_class(p) for p in params}
    assert len(classes) == 3 + 9 + 9 + 9 + 18  # alpha is not a latency dimension
    assert sp.recipe({"kind": "int8_wo", "kv_cache": "none", "fp16_fallback": 2}).exclude == tuple(sorted(LAYERS[:2]))


def test_emulated_recipes_are_never_planned_on_the_cpu():
    sp = space("cpu")
    assert sp.emulated({"kind": "fp16", "kv_cache": "int8"}) == ["kv_cache"]
    trials, _, reason = run_policy(sp, lambda p: ("pass", (10.0, 11.0)), confirm=lambda c: sorted(c))
    assert trials[0] == BASELINE
    assert all(not sp.emulated(p) for p in trials)
    assert not any(p["kind"] == "fp8" for p in trials) or not space("cpu").emulated({"kind": "fp8", "kv_cache": "none"})
    assert reason.startswith("converged")
    # On a GPU the KV caches are native: planned there.
    gpu_trials, _, _ = run_policy(space("cuda"), lambda p: ("pass", (10.0, 11.0)), confirm=lambda c: sorted(c))
    assert any(p["kv_cache"] != "none" for p in gpu_trials)


def test_same_facts_same_plan_and_raw_timings_do_not_steer_it():
    """Two runs whose trial timings differ by noise (but whose interleaved comparisons agree) plan the same."""
    sp = space()
    speed = {"fp16": 50.0, "int8_wo": 40.0, "smoothquant": 41.0, "int4_awq": 60.0}

    def outcome(noise):
        def f(p):
            t = speed[p["kind"]] * (1 + 0.01 * p.get("fp16_fallback", 0)) * noise
            return "pass", (t * 0.9, t * 1.1)
        return f

    def tie(c):  # the interleaved comparison's verdict: int8_wo and smoothquant within 3 %
        return sorted(h for h in c if h in {sp.recipe(p).hash for p in sp.enumerate()
                                            if p["kind"] in ("int8_wo", "smoothquant")}) or sorted(c)[:1]

    a, ca, _ = run_policy(sp, outcome(1.0), confirm=tie)
    b, cb, _ = run_policy(sp, outcome(1.07), confirm=tie)
    assert a == b and [c["key"] for c in ca] == [c["key"] for c in cb]
    # The leaders' neighbours (other fallback depths) were measured; AWQ (slower) was not refined.
    assert {(p["kind"], p.get("fp16_fallback")) for p in a} >= {("int8_wo", 2), ("int8_wo", 4), ("smoothquant", 2)}
    assert not any(p["kind"] == "int4_awq" and p["group_size"] != 64 for p in a)


def test_seed_orders_the_screen_only():
    sp = space()
    firsts = {tuple(next_action(sp, [fact(sp, BASELINE)], [], seed=s).params["kind"] for _ in [0]) for s in range(8)}
    assert len(firsts) > 1, "--seed should change which kind is screened first"
    assert next_action(sp, [], [], seed=5).params == BASELINE


def test_a_failing_class_faster_than_the_leaders_gets_its_accuracy_variants():
    sp = space(kinds=("fp16", "smoothquant"))
    sq = sp.representative("smoothquant")
    facts = [fact(sp, BASELINE, tpot=(50.0, 52.0)), fact(sp, sq, "fail", tpot=(30.0, 31.0))]
    a = next_action(sp, facts, [], seed=0)
    assert a.what == "trial" and a.params["kind"] == "smoothquant" and a.params["alpha"] in (0.7, 0.9)  # nearest 0.8


def test_taken_recipes_are_skipped_and_measured_ones_never_replanned():
    sp = space(kinds=("fp16", "int8_wo"))
    first = next_action(sp, [], [], seed=0).params
    taken = frozenset({sp.recipe(first).hash})
    assert next_action(sp, [], [], seed=0, taken=taken).params != first
    trials, _, _ = run_policy(sp, lambda p: ("pass", (10.0, 11.0)), confirm=lambda c: sorted(c))
    assert len({sp.recipe(p).hash for p in trials}) == len(trials)


def test_contenders_are_one_per_latency_class_whatever_their_trials_timed():
    """Raw trial intervals, timed minutes apart, exclude no one: only the interleaved comparison does."""
    sp = space(kinds=("fp16", "smoothquant"))
    a = fact(sp, {**sp.representative("smoothquant"), "alpha": 0.8}, tpot=(10.0, 12.0), proxy=0.05)
    b = fact(sp, {**sp.representative("smoothquant"), "alpha": 0.6}, tpot=(10.5, 11.0), proxy=0.02)
    slow = fact(sp, BASELINE, tpot=(20.0, 21.0), proxy=0.0)
    emul = fact(sp, {"kind": "fp16", "kv_cache": "int8"}, tpot=(1.0, 2.0))
    failed = fact(sp, {**sp.representative("smoothquant"), "alpha": 0.5}, status="fail", tpot=(5.0, 6.0))
    got = contenders([a, b, slow, emul, failed])
    assert sorted(f.hash for f in got) == sorted([b.hash, slow.hash]), \
        "same class: the better proxy represents it; the slower-timed class stays in; emulated and failing out"
