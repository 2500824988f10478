"""``python -m experiments.regret``: how often the search's answer is really the best, over seeds.

1. **Truth**: every latency class of the space that runs natively on this device (one recipe per class: alpha
   changes no kernel) is built and timed *interleaved in one process* (experiments/confirm.py) with a long time
   cap; each class's accuracy verdict comes from the search's own gate on its representative (cached article
   blocks). The true best tie set: the feasible classes whose ratio interval to the fastest feasible one
   reaches 1.
2. **Searches**: the real CLI, ``python -m quant.search`` with the given flags and ``--seed s`` for each seed,
   each in its own results folder and with its own cache folder: a hard-linked copy of the shared cache minus
   every latency record, so each seed measures latency afresh (checkpoints and article blocks are reused: they
   are deterministic).
3. **Record**: per seed the chosen recipe, whether its class is in the true best tie set, latency regret
   (true TPOT of the chosen class ÷ that of the fastest feasible class), trials used, wall time.

Prints a table and writes ``--out`` (JSON). Long: run it on a quiet machine.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quant.atomic import atomic_write_json
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int

REPO = Path(__file__).resolve().parent.parent


def truth(search_args: list[str], *, seconds: float, log) -> dict:
    """Time every native latency class interleaved; gate each class's representative with the search's rule."""
    from experiments.confirm import compare
    from experiments.evaluate import Candidate
    from quant.search import Search, parse_args
    from quant.space import Space

    args = parse_args(search_args)
    search = Search(args)
    search.load_model()
    sp = search.space
    classes: dict[tuple, dict] = {}
    for p in sp.enumerate():
        if not sp.emulated(p) and Space.latency_class(p) not in classes:
            rep = dict(p, alpha=0.8) if p["kind"] == "smoothquant" else p
            classes[Space.latency_class(p)] = rep
    verdicts, runtimes, labels = {}, {}, {}
    for cls, p in classes.items():
        recipe = sp.recipe(p)
        result: dict = {}
        search._gate(recipe, result, [])  # cached blocks when the searches already scored this recipe
        verdicts[recipe.hash] = {"feasible": result["feasible"], "rouge1": result["rouge1"], "n": result["n"]}
        labels[recipe.hash] = recipe.label
        runtimes[recipe.hash] = Candidate(search.settings, recipe, model=search.model, calib=search.calib,
                                          log=lambda m: None, backend=search.backend).runtime
        log(f"truth: {recipe.label}: {'pass' if result['feasible'] else 'fail'} (ROUGE-1 {result['rouge1']:.2f}, "
            f"n={result['n']})")
    s = search.settings
    cmp = compare(runtimes, batch_size=s.batch_size, input_len=s.input_len, output_len=s.output_len, seed=s.seed,
                  resolution=args.resolution, max_seconds=seconds, max_rounds=200)
    feasible = [h for h in runtimes if verdicts[h]["feasible"]]
    fastest = min(feasible, key=lambda h: cmp["tpot_ms"][h])
    # Ratios against the fastest feasible class, from the same rounds.
    best_set = [h for h in feasible if h == fastest or _ratio_low(cmp, h, fastest) <= 1.0]
    return {"classes": {h: {"label": labels[h], **verdicts[h], "tpot_ms": cmp["tpot_ms"][h]} for h in runtimes},
            "comparison": cmp, "fastest_feasible": fastest, "best_tie_set": best_set,
            "class_of": {sp.recipe(p).hash: list(cls) for cls, p in classes.items()}}


def _ratio_low(cmp: dict, h: str, ref: str) -> float:
    import math

    from experiments.stats import ratio_ci

    times = cmp["rounds_ms"]
    if h == ref:
        return 1.0
    q = ratio_ci(times[h], times[ref])
    return q.low if math.isfinite(q.low) else 0.0


def snapshot_without_latency(cache: Path, dest: Path) -> Path:
    """The shared cache, hard-linked (entries are only replaced by rename), minus every latency record."""
    shutil.copytree(cache, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".*.lock"))
    for rec in (dest / "evaluations").glob("*.json"):
        if json.loads(rec.read_text()).get("stage") == "latency":
            rec.unlink()
    return dest


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from quant.paths import cache_root

    p = ArgumentParser(prog="python -m experiments.regret", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=positive_int, default=10)
    p.add_argument("--search-args", default="--min-rouge1 14",
                   help="flags of every search (and of the truth's gate and workload), as one string")
    p.add_argument("--truth-seconds", type=float, default=600.0, help="time cap of the interleaved truth")
    p.add_argument("--work", type=Path, default=Path("results/regret"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    search_args = shlex.split(args.search_args) + ["--no-progress"]
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    source = cache_root()
    for seed in range(args.seeds):
        cache = args.work / f"cache-{seed}"
        shutil.rmtree(cache, ignore_errors=True)
        snapshot_without_latency(source, cache) if source.exists() else cache.mkdir(parents=True)
        results = args.work / f"seed-{seed}"
        shutil.rmtree(results, ignore_errors=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "quant.search", *search_args, "--seed", str(seed),
                               "--results-dir", str(results)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "QUANT_SUITE_CACHE": str(cache)})
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise UserError(f"the search for seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
        import optuna

        study = optuna.load_study(study_name="quant-search", storage=f"sqlite:///{(results / 'study.db').resolve()}")
        answer = study.user_attrs.get("answer") or {}
        measured = {t.user_attrs.get("recipe_hash") for t in study.trials if t.user_attrs.get("result")}
        chosen = next((t for t in study.trials if t.user_attrs.get("recipe_hash") == answer.get("chosen")), None)
        runs.append({"seed": seed, "chosen": answer.get("label"), "chosen_params": dict(chosen.params) if chosen else None,
                     "tie_set": answer.get("tie_labels"), "trials": len(measured), "wall_s": wall,
                     "stopped": study.user_attrs.get("stopped")})
        log(f"seed {seed}: {answer.get('label')} ({len(measured)} trials, {wall:.0f} s)")
        source = cache  # the next seed reuses this one's checkpoints and blocks; its latency records are dropped
    os.environ["QUANT_SUITE_CACHE"] = str(source)
    t = truth(search_args, seconds=args.truth_seconds, log=log)
    from quant.space import Space

    best = set(t["best_tie_set"])
    class_tpot = {tuple(t["class_of"][h]): t["comparison"]["tpot_ms"][h] for h in t["class_of"]}
    best_tpot = t["comparison"]["tpot_ms"][t["fastest_feasible"]]
    best_classes = {tuple(t["class_of"][h]) for h in best}
    for r in runs:
        cls = Space.latency_class(r["chosen_params"]) if r["chosen_params"] else None
        r["in_best_tie_set"] = cls in best_classes
        r["regret"] = class_tpot[cls] / best_tpot if cls in class_tpot else None
    hits = sum(r["in_best_tie_set"] for r in runs)
    print(f"true best tie set: {', '.join(t['classes'][h]['label'] for h in best)}")
    print(f"{'seed':>4s} {'chosen':28s} {'in best':>7s} {'regret':>7s} {'trials':>6s} {'wall s':>7s}")
    for r in runs:
        print(f"{r['seed']:>4d} {str(r['chosen']):28s} {'yes' if r['in_best_tie_set'] else 'NO':>7s} "
              f"{(r['regret'] or float('nan')):7.3f} {r['trials']:>6d} {r['wall_s']:7.0f}")
    print(f"picked in the true best tie set: {hits}/{len(runs)}")
    if args.out:
        from experiments import environment

        atomic_write_json(args.out, {"command": "python -m experiments.regret " + " ".join(argv or sys.argv[1:]),
                                     "machine": environment.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "truth": t, "runs": runs, "hits": hits})
    return 0


if __name__ == "__main__":
    sys.exit(main())
