"""``python -m experiments.regret``: how often the search's answer is really the best, over seeds.

1. **Truth**: every latency class of the space that runs natively on this device (one recipe per class: alpha
   changes no kernel) is built and timed *interleaved in one process* (experiments/confirm.py) with a long time
   cap (a class shown slower than the leader stops being timed); from the fastest down (paired ratio to the
   leader), each class's representative goes through the search's own accuracy gate, except those shown slower
   than the fastest feasible class (their accuracy cannot matter). The true best tie
   set: the feasible classes whose ratio interval to the fastest feasible one reaches 1.
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

from experiments import environment
from experiments.evaluate import Candidate
from experiments.search import Search, parse_args
from quant.atomic import atomic_write_json
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int
from quant.paths import cache_root
from quant.space import Space

REPO = Path(__file__).resolve().parent.parent


def truth(search_args: list[str], *, seconds: float, log, comparison: dict | None = None) -> dict:
    """Time every native latency class interleaved; then, from the fastest, gate classes with the search's rule
    until the fastest feasible one and every class tied with it are known (slower classes need no accuracy)."""
    from experiments.confirm import compare
    args = parse_args(search_args)
    search = Search(args)
    search.load_model()
    sp = search.space
    classes: dict[tuple, dict] = {}
    for p in sp.enumerate():
        if not sp.emulated(p) and Space.latency_class(p) not in classes:
            classes[Space.latency_class(p)] = dict(p, alpha=0.8) if p["kind"] == "smoothquant" else p
    recipes = {sp.recipe(p).hash: sp.recipe(p) for p in classes.values()}
    s = search.settings
    if comparison is None:
        runtimes = {h: Candidate(search.settings, r, model=search.model, calib=search.calib, log=lambda m: None,
                                 backend=search.backend).runtime for h, r in recipes.items()}
        log(f"truth: timing {len(runtimes)} latency classes interleaved (cap {seconds:.0f} s)")
        comparison = compare(runtimes, batch_size=s.batch_size, input_len=s.input_len, output_len=s.output_len,
                             seed=s.seed, resolution=args.resolution, max_seconds=seconds, max_rounds=200)
        del runtimes
    cmp = comparison
    verdicts: dict[str, dict] = {}
    fastest = None
    # Fastest first by the paired ratio to the comparison's leader; every class not shown slower than the
    # fastest feasible one is gated (the order of point estimates is not the order of what ties).
    for h in sorted(recipes, key=lambda h: cmp["ratios"][h]["ratio"]):
        if fastest is not None and _slower(cmp, h, fastest):
            continue  # certainly slower than the fastest feasible class: its accuracy cannot matter
        result: dict = {}
        search._gate(recipes[h], result, [])
        search.measurer.release()
        verdicts[h] = {"feasible": result["feasible"], "rouge1": result["rouge1"], "n": result["n"]}
        log(f"truth: {recipes[h].label}: {'pass' if result['feasible'] else 'fail'} (ROUGE-1 {result['rouge1']:.2f})")
        if fastest is None and result["feasible"]:
            fastest = h
    if fastest is None:
        raise UserError("no latency class passes the gate: there is no best recipe to compare the searches with")
    best_set = [h for h in verdicts if verdicts[h]["feasible"] and not _slower(cmp, h, fastest)]
    return {"classes": {h: {"label": recipes[h].label, "tpot_ms": cmp["tpot_ms"][h], **verdicts.get(h, {})}
                        for h in recipes},
            "comparison": cmp, "fastest_feasible": fastest, "best_tie_set": best_set,
            "class_of": {sp.recipe(p).hash: list(cls) for cls, p in classes.items()}}


def _slower(cmp: dict, h: str, ref: str) -> bool:
    """``h`` shown slower than ``ref`` by the comparison's own rule and level (experiments/confirm.py)."""
    from experiments.confirm import shown_slower
    from experiments.stats import ratio_ci

    times = cmp["rounds_ms"]
    if h == ref:
        return False
    n = min(len(times[h]), len(times[ref]))  # a class dropped as slower ran fewer rounds: pair the common ones
    level = cmp.get("level", cmp["confidence"])  # a record kept from before the corrected level (--regate)
    return shown_slower(ratio_ci(times[h][:n], times[ref][:n], level), cmp["resolution"])


def _outcome(results: Path) -> dict:
    """What one seed's search answered, read from its study: the pick, its tie set, its latency class."""
    import optuna

    study = optuna.load_study(study_name="quant-search", storage=f"sqlite:///{(results / 'study.db').resolve()}")
    answer = study.user_attrs.get("answer") or {}
    measured = {t.user_attrs.get("recipe_hash") for t in study.trials if t.user_attrs.get("result")}
    chosen = next((t for t in study.trials if t.user_attrs.get("recipe_hash") == answer.get("chosen")), None)
    return {"chosen": answer.get("label"), "tie_set": answer.get("tie_labels"), "trials": len(measured),
            "stopped": study.user_attrs.get("stopped"),
            "class": list(Space.latency_class(dict(chosen.params))) if chosen else None}


def _score(record: dict) -> None:
    """Each seed's pick against the truth: in its best tie set? latency regret = the chosen class's time ÷ that of
    the fastest feasible class (their ratios to the leader of the truth's interleaved comparison, paired by round)."""
    t = record["truth"]
    best_classes = {tuple(t["class_of"][h]) for h in t["best_tie_set"]}
    ratio = {tuple(c): t["comparison"]["ratios"][h]["ratio"] for h, c in t["class_of"].items()}
    best = ratio[tuple(t["class_of"][t["fastest_feasible"]])]
    for r in record["runs"]:
        cls = tuple(r["class"]) if r.get("class") else None
        r["in_best_tie_set"] = cls in best_classes
        r["regret"] = ratio[cls] / best if cls in ratio else None
    record["hits"] = sum(r["in_best_tie_set"] for r in record["runs"])


def snapshot_without_latency(cache: Path, dest: Path) -> Path:
    """The shared cache, hard-linked (entries are only replaced by rename), minus every latency record."""
    shutil.copytree(cache, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".*.lock"))
    for rec in (dest / "evaluations").glob("*.json"):
        if json.loads(rec.read_text()).get("stage") == "latency":
            rec.unlink()
    return dest


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.regret", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=positive_int, default=10, help="searches, seeds 0..N-1")
    p.add_argument("--search-args", default="--min-rouge1 14",
                   help="flags of every search (and of the truth's gate and workload), as one string")
    p.add_argument("--truth-seconds", type=float, default=600.0, help="time cap of the interleaved truth")
    p.add_argument("--work", type=Path, default=Path("results/regret"), help="per-seed results and caches")
    p.add_argument("--out", type=Path, default=None, help="JSON record, written after each seed")
    p.add_argument("--resume", action="store_true", help="keep the truth and the seeds already in --out")
    p.add_argument("--retruth", action="store_true",
                   help="with --resume: measure the truth again and re-score the seeds already run against it")
    p.add_argument("--regate", action="store_true",
                   help="with --resume: keep the truth's timing, gate its classes again, re-score the seeds")
    args = p.parse_args(argv)
    search_args = shlex.split(args.search_args) + ["--no-progress"]
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)

    record = json.loads(args.out.read_text()) if args.resume and args.out and args.out.is_file() else {
        "command": "python -m experiments.regret " + " ".join(argv or sys.argv[1:]), "machine": environment.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    # The truth first, in the user's cache (it builds every class's checkpoint and scores its representative); a
    # record written after each seed holds a meaningful partial result.
    for r in record["runs"]:  # records written before runs kept their class: read it from the seed's study
        if "class" not in r:
            r.update(_outcome(args.work / f"seed-{r['seed']}"))
    if "truth" not in record or args.retruth or args.regate:
        kept = record["truth"]["comparison"] if args.regate and "truth" in record else None
        record["truth"] = truth(search_args, seconds=args.truth_seconds, log=log, comparison=kept)
        record["truth_gated" if kept else "truth_measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _score(record)
        if args.out:
            atomic_write_json(args.out, record)
    t = record["truth"]
    log(f"true best tie set: {', '.join(t['classes'][h]['label'] for h in t['best_tie_set'])}")
    source = cache_root()
    done = {r["seed"] for r in record["runs"]}
    for seed in (s for s in range(args.seeds) if s not in done):
        cache = args.work / f"cache-{seed}"
        shutil.rmtree(cache, ignore_errors=True)
        snapshot_without_latency(source, cache)
        results = args.work / f"seed-{seed}"
        shutil.rmtree(results, ignore_errors=True)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "quant.search", *search_args, "--seed", str(seed),
                               "--results-dir", str(results)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "QUANT_SUITE_CACHE": str(cache)})
        wall = time.monotonic() - t0
        shutil.rmtree(cache, ignore_errors=True)
        if proc.returncode != 0:
            raise UserError(f"the search for seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
        record["runs"].append({"seed": seed, "wall_s": wall, **_outcome(results)})
        _score(record)
        if args.out:
            atomic_write_json(args.out, record)
        log(f"seed {seed}: {record['runs'][-1]['chosen']} ({record['runs'][-1]['trials']} trials, {wall:.0f} s)")
    print(f"true best tie set: {', '.join(t['classes'][h]['label'] for h in t['best_tie_set'])}")
    print(f"{'seed':>4s} {'chosen':28s} {'in best':>7s} {'regret':>7s} {'trials':>6s} {'wall s':>7s}")
    for r in record["runs"]:
        print(f"{r['seed']:>4d} {str(r['chosen']):28s} {'yes' if r['in_best_tie_set'] else 'NO':>7s} "
              f"{(r['regret'] or float('nan')):7.3f} {r['trials']:>6d} {r['wall_s']:7.0f}")
    print(f"picked in the true best tie set: {record.get('hits', 0)}/{len(record['runs'])}")
    if args.out:
        atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
