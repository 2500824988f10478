"""The search space, its latency classes, and the policy that picks which recipe to measure next.

Space (the full one by default): recipe kind × SmoothQuant alpha × INT4 group size × KV-cache dtype × FP16
fallback of the k linears with the strongest activation outliers; ``--serve-with`` narrows kinds, group sizes and
KV caches to what one server loads (:mod:`quant.servers`).

A **latency class** is what decides speed: (kind, group size, KV cache, fallback depth). SmoothQuant's alpha
only moves scales between activations and weights, so every alpha of a class runs the same kernels on the same
shapes; alpha is an accuracy knob, measured by ROUGE, never by a timer.

The policy is deterministic given what has been measured, so identical runs explore identical recipes; the only
measurement noise it listens to is the *resolved* outcome of an interleaved latency comparison (a tie set), never
a raw timing:

1. the FP16 baseline, then one representative per kind (KV cache none, no fallback, alpha 0.8, the largest
   group size that divides the model), in an order seeded by ``--seed``;
2. the passing latency classes (one representative each) are compared interleaved (experiments/confirm.py),
   whatever their trials' own intervals say → the leading tie set;
3. every latency class one step from a leader (another fallback depth, group size or KV cache) is measured,
   leaders with the smaller proxy gap first; a class faster than the leaders whose representative failed the
   accuracy gate gets its accuracy variants (other alphas, deeper fallback);
4. back to 2 until no new neighbour remains (converged) or the budget of distinct trials is spent.

Recipes whose latency would be emulated on the device (FP8 GEMMs and quantized KV caches on a CPU without native
support) are not planned there: they could never be picked, so they would only spend the budget.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from quant.errors import UserError
from quant.recipes import GROUP_SIZES, GROUPED, KIND_DEFAULTS, KV_ALGO, KV_CACHE, QUANT_ALGO, Recipe

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_ALPHA = KIND_DEFAULTS["smoothquant"]["alpha"]  # where the alpha search starts
FALLBACK_K = (0, 2, 4)
BASELINE = {"kind": "fp16", "kv_cache": "none"}


def narrow(kinds, config: dict, server) -> tuple[list[str], tuple[int, ...], tuple[str, ...], list[str]]:
    """What of ``kinds`` the model's shapes and ``server`` (a :mod:`quant.servers` entry) allow: (kinds, INT4 group
    sizes, KV caches, one reason per dropped kind)."""
    dims = (config["hidden_size"], config["intermediate_size"])
    groups = tuple(g for g in GROUP_SIZES if all(d % g == 0 for d in dims) and g in server.group_sizes)
    kv_caches = tuple(kv for kv in KV_CACHE if server.refusal(Recipe("fp16", kv_cache=kv)) is None)
    kept, dropped = [], []
    for kind in kinds:
        if kind in GROUPED and not groups:
            dropped.append(f"{kind}: no group size in {GROUP_SIZES} divides the model's hidden and intermediate "
                           f"sizes {dims} and is run by {server.label}")
            continue
        recipe = Recipe(kind, **({"group_size": max(groups)} if kind in GROUPED else {}))
        why = server.refusal(recipe)
        if why is None:
            try:
                recipe.validate_for(config)
            except UserError as exc:
                why = str(exc)
        if why is None:
            kept.append(kind)
        else:
            dropped.append(why if why.startswith(kind) else f"{kind}: {why}")
    return kept, groups, kv_caches, dropped


@dataclass(frozen=True)
class Space:
    kinds: tuple[str, ...]
    group_sizes: tuple[int, ...]  # those dividing the model's dims
    ranked_layers: tuple[str, ...]  # linears by outlier strength (calibration statistics), strongest first
    device: str
    kv_caches: tuple[str, ...] = KV_CACHE  # those the target server reads (quant.servers)

    # -- recipes and their params (the optuna trial's params, as the dashboard shows them) ------------------
    def recipe(self, params: dict) -> Recipe:
        p = dict(params)
        k = p.pop("fp16_fallback", 0)
        return Recipe.from_dict({**p, "exclude": tuple(self.ranked_layers[:k])})

    def contains(self, params: dict) -> bool:
        """Whether a measured trial's recipe belongs to this space (a study rerun with a narrower ``--serve-with``
        keeps its trials, but its policy and answer only see the recipes this space holds)."""
        return params.get("kind") in self.kinds and params.get("kv_cache", "none") in self.kv_caches and \
            (params["kind"] not in GROUPED or params.get("group_size") in self.group_sizes)

    def size(self) -> int:
        return len(self.enumerate())

    def enumerate(self) -> list[dict]:
        out = []
        for kind in self.kinds:
            for kv in self.kv_caches:
                if kind == "fp16":
                    out.append({"kind": kind, "kv_cache": kv})
                    continue
                for k in FALLBACK_K:
                    for extra in self._accuracy_params(kind):
                        out.append({"kind": kind, **extra, "kv_cache": kv, "fp16_fallback": k})
        return out

    def choices(self) -> dict[str, tuple]:
        """Every parameter's categorical choices (what optuna's distributions and the dashboard show)."""
        return {"kind": self.kinds, "alpha": ALPHAS, "group_size": self.group_sizes or (None,),
                "kv_cache": self.kv_caches, "fp16_fallback": FALLBACK_K}

    def _accuracy_params(self, kind: str) -> list[dict]:
        if kind == "smoothquant":
            return [{"alpha": a} for a in ALPHAS]
        if kind in GROUPED:
            return [{"group_size": g} for g in self.group_sizes]
        return [{}]

    @staticmethod
    def latency_class(params: dict) -> tuple:
        return (params["kind"], params.get("group_size"), params["kv_cache"], params.get("fp16_fallback", 0))

    def emulated(self, params: dict) -> list[str]:
        from quant.runtime.torch_runtime import emulated_parts

        return emulated_parts(QUANT_ALGO[params["kind"]], KV_ALGO[params["kv_cache"]], self.device)

    def representative(self, kind: str) -> dict:
        if kind == "fp16":
            return dict(BASELINE)
        p = {"kind": kind, "kv_cache": "none", "fp16_fallback": 0}
        if kind == "smoothquant":
            p["alpha"] = DEFAULT_ALPHA
        if kind in GROUPED:
            p["group_size"] = max(self.group_sizes)
        return dict(sorted(p.items()))

    def neighbours(self, params: dict) -> list[dict]:
        """The same accuracy params in every latency class one dimension away (fallback, group size, KV)."""
        out = []
        if params["kind"] != "fp16":
            out += [{**params, "fp16_fallback": k} for k in FALLBACK_K if k != params["fp16_fallback"]]
        if params["kind"] in GROUPED:
            out += [{**params, "group_size": g} for g in self.group_sizes if g != params["group_size"]]
        out += [{**params, "kv_cache": kv} for kv in self.kv_caches if kv != params["kv_cache"]]
        return [p for p in out if not self.emulated(p)]

    def accuracy_variants(self, params: dict) -> list[dict]:
        """Recipes of a failing class's neighbourhood that may pass: other alphas (nearest 0.8 first), then
        deeper FP16 fallback."""
        out = []
        if params["kind"] == "smoothquant":
            out += [{**params, "alpha": a} for a in sorted(ALPHAS, key=lambda a: (abs(a - DEFAULT_ALPHA), -a))
                    if a != params["alpha"]]
        if params["kind"] != "fp16":
            out += [{**params, "fp16_fallback": k} for k in FALLBACK_K if k > params["fp16_fallback"]]
        return [p for p in out if not self.emulated(p)]


@dataclass(frozen=True)
class Fact:
    """What the policy knows of one measured recipe (from its trial)."""

    params: dict
    hash: str
    status: str  # pass | fail | slower (than a passing recipe: accuracy not measured) | pruned (invalid, garbage)
    emulated: bool
    tpot_ci: tuple[float, float] | None  # the trial's latency interval (ms)
    proxy: float | None  # mean NLL gap to FP16 (nats/token)
    number: int = -1  # the trial
    doc_nll: tuple[float, ...] = ()  # held-out NLL per document (the proxy, paired by document)
    loaded: bool = False  # its latency was timed while other processes took the cores


@dataclass(frozen=True)
class Action:
    what: str  # "trial" | "confirm" | "done"
    params: dict | None = None
    candidates: tuple[str, ...] = ()  # recipe hashes to compare (confirm)
    reason: str = ""


def confirmation_key(hashes) -> str:
    return ",".join(sorted(hashes))


def contenders(facts: list[Fact]) -> list[Fact]:
    """Passing, natively measured recipes, one per latency class (the best proxy of the class: alpha changes no
    kernel): the candidates of an interleaved comparison. Every class goes in, however its trial's own interval
    compares with the others': those intervals were timed minutes apart and drift between trials exceeds their
    width; the comparison itself stops timing a candidate as soon as it is shown slower (experiments/confirm.py)."""
    passing = [f for f in facts if f.status == "pass" and not f.emulated and f.tpot_ci is not None]
    per_class: dict[tuple, Fact] = {}
    for f in sorted(passing, key=lambda f: (f.proxy if f.proxy is not None else 0.0, f.hash)):
        per_class.setdefault(Space.latency_class(f.params), f)
    return sorted(per_class.values(), key=lambda f: f.hash)


def next_action(space: Space, facts: list[Fact], confirmations: list[dict], *, seed: int,
                taken: frozenset[str] = frozenset()) -> Action:
    """The next step of the policy (module docstring). ``confirmations``: the recorded interleaved comparisons in
    the order they were made (each with its ``key`` and ``tie`` list of hashes); ``taken``: recipes other
    workers are measuring now."""
    by_hash = {f.hash: f for f in facts}

    def first_fresh(candidates) -> Action | None:
        for p in candidates:
            h = space.recipe(p).hash
            if h not in by_hash and h not in taken and not space.emulated(p):
                return Action("trial", p)
        return None

    rng = random.Random(seed)
    kinds = [k for k in space.kinds if k != "fp16"]
    rng.shuffle(kinds)
    screen = ([BASELINE] if "fp16" in space.kinds else []) + [space.representative(k) for k in kinds]
    action = first_fresh(screen)
    if action:
        return action

    group = contenders(facts)
    if not group:
        # A pruned recipe (garbage output) is failing too: another alpha or deeper fallback may repair it.
        failing = sorted((f for f in facts if f.status in ("fail", "pruned") and not f.emulated), key=lambda f: f.hash)
        return first_fresh(p for f in failing for p in space.accuracy_variants(f.params)) or \
            Action("done", reason="no recipe passes the gate and no accuracy variant is left to try")

    def frontier(leaders: list[Fact]):
        leaders = sorted(leaders, key=lambda f: (f.proxy if f.proxy is not None else 0.0, f.hash))
        yield from (p for f in leaders for p in space.neighbours(f.params))
        # Failing classes that measured faster than the leaders might still win with more accuracy.
        slowest = max(f.tpot_ci[1] for f in leaders)
        faster_failing = sorted((f for f in facts if f.status == "fail" and not f.emulated and f.tpot_ci
                                 and f.tpot_ci[0] < slowest), key=lambda f: f.hash)
        yield from (p for f in faster_failing for p in space.accuracy_variants(f.params))

    # A wave: every neighbour of the last comparison's tie set, before the next comparison.
    if confirmations:
        last = confirmations[-1]
        action = first_fresh(frontier([by_hash[h] for h in last["tie"] if h in by_hash] or group))
        if action:
            return action
    recorded = {c["key"]: c for c in confirmations}
    key = confirmation_key(f.hash for f in group)
    if len(group) > 1 and key not in recorded:
        return Action("confirm", candidates=tuple(f.hash for f in group))
    leaders = [by_hash[h] for h in recorded[key]["tie"] if h in by_hash] if len(group) > 1 else group
    action = first_fresh(frontier(leaders))
    if action:
        return action
    return Action("done", reason="converged: every recipe one step from the leading tie set is measured")
