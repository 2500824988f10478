"""``python -m experiments.sequential_error``: the real error rate of the search's sequential accuracy gate.

Looking at a growing sample several times and stopping at the first look whose bound clears the threshold passes
a failing candidate more often than one look would. This measures by how much, on real per-article scores: the
paired ROUGE-1 differences of every recipe against FP16 in the committed 50-paper table, shifted so that their
mean sits exactly on the threshold (the hardest true candidate to reject), resampled with replacement (articles
drawn at random, as a new evaluation set would be), and run through the gate under several ways of sharing the
error over the looks (experiments/stats.Gate), the search's among them. Also: how often a recipe with no true drop passes (power), and the mean number
of articles a verdict used. Prints a table; ``--out`` writes the JSON record.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from quant.atomic import atomic_write_json
from quant.errors import ArgumentParser, cli_entry, positive_int, seed_int

TABLE = Path(__file__).parent / "results" / "recipe_table_default.json"
# The rules compared: every look at the nominal level; Bonferroni over the looks, without and with the rule that a
# pass needs 32 articles or more; O'Brien-Fleming-type spending without and with it (the last: the search's rule).
RULES = {"naive": {"spending": "none", "min_pass": 0}, "bonferroni": {"spending": "bonferroni", "min_pass": 0},
         "bonferroni+min32": {"spending": "bonferroni", "min_pass": 32},
         "obrien-fleming": {"spending": "obrien-fleming", "min_pass": 0},
         "obrien-fleming+min32": {"spending": "obrien-fleming", "min_pass": 32}}


def per_article_drops(table: Path) -> dict[str, list[float]]:
    records = json.loads(table.read_text())["records"]
    base = next(r for r in records if r["recipe_label"] == "fp16")["rouge"]["per_sample_rouge1"]
    return {r["recipe_label"]: [b - s for b, s in zip(base, r["rouge"]["per_sample_rouge1"])]
            for r in records if r["recipe_label"] != "fp16"}


def measure(drops: list[float], gate, *, trials: int, seed: int) -> dict:
    from experiments.stats import false_pass_rate, sequential_verdict

    x = np.asarray(drops, dtype=float)
    rng = np.random.default_rng(seed + 1)
    null0 = x - x.mean()  # the same spread, no true drop
    used = [sequential_verdict(gate, rng.choice(null0, size=gate.bounds[-1])).n for _ in range(trials)]
    return {"false_pass": false_pass_rate(x, gate, shift_to=gate.threshold, trials=trials, seed=seed),
            "power_at_zero_drop": false_pass_rate(x, gate, shift_to=0.0, trials=trials, seed=seed),
            "mean_articles_at_zero_drop": float(np.mean(used)), "sd": float(x.std(ddof=1))}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from experiments.stages import block_bounds
    from experiments.stats import Gate

    p = ArgumentParser(prog="python -m experiments.sequential_error", description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, default=TABLE, help="a recipe table JSON with per-article ROUGE-1")
    p.add_argument("--max-drop", type=float, default=2.0, help="the drop gate's threshold (points)")
    p.add_argument("--confidence", type=float, default=0.95, help="the gate's confidence")
    p.add_argument("--block-size", type=positive_int, default=8, help="articles at the first look")
    p.add_argument("--ceilings", default="50,100", help="comma-separated article ceilings to simulate")
    p.add_argument("--trials", type=positive_int, default=4000, help="resampled evaluations per row")
    p.add_argument("--seed", type=seed_int, default=0, help="resampling seed")
    p.add_argument("--out", type=Path, default=None, help="JSON record")
    args = p.parse_args(argv)
    drops = per_article_drops(args.table)
    rows = []
    for ceiling in (int(c) for c in args.ceilings.split(",")):
        bounds = tuple(block_bounds(args.block_size, ceiling))
        for label, d in drops.items():
            for rule, kw in RULES.items():
                gate = Gate("drop", args.max_drop, args.confidence, bounds, **kw)
                rows.append({"recipe": label, "looks": list(bounds), "rule": rule,
                             **measure(d, gate, trials=args.trials, seed=args.seed)})
    nominal = 1 - args.confidence
    print(f"drop gate ≤ {args.max_drop:g} at {args.confidence:g}: nominal false-pass rate {nominal:.3f}; "
          f"{args.trials} resampled evaluations per row")
    print(f"{'recipe':24s} {'looks':>16s} {'rule':>22s} {'false pass':>10s} {'pass@0':>7s} {'articles@0':>10s}")
    for r in rows:
        print(f"{r['recipe']:24s} {','.join(map(str, r['looks'])):>16s} {r['rule']:>22s} "
              f"{r['false_pass']:10.3f} {r['power_at_zero_drop']:7.3f} {r['mean_articles_at_zero_drop']:10.1f}")
    worst = {rule: max(r["false_pass"] for r in rows if r["rule"] == rule) for rule in RULES}
    print("worst false-pass rate: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()) + f" (nominal {nominal:.3f})")
    if args.out:
        atomic_write_json(args.out, {"command": "python -m experiments.sequential_error " + " ".join(argv or sys.argv[1:]),
                                     "table": str(args.table), "nominal": nominal, "rows": rows, "worst": worst})
    return 0


if __name__ == "__main__":
    sys.exit(main())
