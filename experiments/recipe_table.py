"""``python -m experiments.recipe_table``: every recipe on one model, one table (ROUGE with CI, perplexity, latency, size).

Runs :func:`experiments.evaluate.evaluate` for each recipe in turn (checkpoints and calibration statistics come
from the cache when present), then prints a Markdown table and writes all records to one JSON file.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from calibration.data import add_calib_args, calib_spec_from_args
from experiments import environment
from experiments.evaluate import add_common_args, evaluate, settings_from_args
from quant.atomic import atomic_write_json
from quant.errors import ArgumentParser, UserError, cli_entry
from quant.recipes import parse_recipe_arg

DEFAULT_RECIPES = ("fp16", "int8_wo", "smoothquant:alpha=0.5", "smoothquant:alpha=0.8", "int4_awq:group_size=64", "fp8",
                   "int8_wo:kv_cache=int8", "smoothquant:alpha=0.8,exclude=layers.11.mlp.proj+layers.28.mlp.proj")


def table(records: list[dict]) -> str:
    lines = ["| recipe | ROUGE-1 [95% CI] | ROUGE-2 | ROUGE-L | perplexity | TTFT ms | TPOT ms | decode tok/s | kernels | checkpoint MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ro, lat = r["rouge"], r["latency"]
        ppl = f"{r['perplexity']['perplexity']:.2f}" if r.get("perplexity") else "-"
        kern = ", ".join(r["runtime"]["kernels"]) + (" (emulated: " + ", ".join(r["runtime"].get("emulated_parts", [])) + ")"
                                                     if r["runtime"].get("emulated") else "")
        lines.append(f"| {r['recipe_label']} | {ro['rouge1']:.2f} [{ro['rouge1_ci'][0]:.2f}, {ro['rouge1_ci'][1]:.2f}] | "
                     f"{ro['rouge2']:.2f} | {ro['rougeL']:.2f} | {ppl} | {lat['ttft_ms']:.0f} | {lat['tpot_ms']:.1f} | "
                     f"{lat['decode_tokens_per_s']:.1f} | {kern} | {r['checkpoint']['size_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def remeasure(args) -> int:
    from experiments import environment, latency
    from quant.errors import UserError
    from quant.runtime.torch_runtime import TorchRuntime

    try:
        data = json.loads(args.out.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--remeasure-latency needs the table's JSON at {args.out} ({exc})") from None
    # A hand-edited or foreign file: check its shape first, so a wrong one is a one-line error.
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and isinstance(r.get("checkpoint"), dict) and isinstance(r["checkpoint"].get("path"), str)
            and isinstance(r.get("runtime"), dict) and r["runtime"].get("compute_dtype") in ("float32", "bfloat16")
            and isinstance(r.get("rouge"), dict) for r in records):
        raise UserError(f"{args.out} is not a recipe table (expected records with checkpoint.path, runtime.compute_dtype "
                        "and rouge)")
    for rec in records:
        rt = TorchRuntime.from_dir(Path(rec["checkpoint"]["path"]), compute_dtype=rec["runtime"]["compute_dtype"])
        rec["latency"] = latency.measure(rt, batch_size=args.batch_size, input_len=args.input_len,
                                         output_len=args.output_len, repeats=args.latency_repeats).to_dict()
        print(table([rec]).splitlines()[-1], file=sys.stderr)
    data["latency_remeasured"] = {"created": time.strftime("%Y-%m-%d %H:%M"), "machine": environment.machine(),
                                  "repeats": args.latency_repeats}
    atomic_write_json(args.out, data)
    print(table(data["records"]))
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.recipe_table", description=__doc__.splitlines()[0])
    add_common_args(p)
    add_calib_args(p)
    p.add_argument("--recipes", default=";".join(DEFAULT_RECIPES), help="';'-separated recipe specs")
    p.add_argument("--out", type=Path, default=Path("results/recipe_table.json"), help="the table's JSON record")
    p.add_argument("--remeasure-latency", action="store_true",
                   help="keep the quality columns of --out and measure latency again for each of its checkpoints at "
                        "this run's workload (--batch-size/--input-len/--output-len): ROUGE does not depend on machine "
                        "load, timings do, so they can be taken later on a quiet machine")
    args = p.parse_args(argv)
    if args.remeasure_latency:
        return remeasure(args)
    recipes = [parse_recipe_arg(r) for r in args.recipes.split(";") if r.strip()]
    if not recipes:
        raise UserError("--recipes names no recipe")
    if args.ppl_docs is not None and args.ppl_docs < 0:
        raise UserError("--ppl-docs must be >= 0")
    settings, calib = settings_from_args(args), calib_spec_from_args(args)
    records = []
    t0 = time.perf_counter()
    for recipe in recipes:
        print(f"== {recipe.label}", file=sys.stderr)
        rec = evaluate(settings, recipe, calib=calib, log=lambda m: print(m, file=sys.stderr))
        rec.pop("samples")
        records.append(rec)
        atomic_write_json(args.out, {"records": records, "machine": environment.machine(),
                                     "command": "python -m experiments.recipe_table " + " ".join(sys.argv[1:] if argv is None else argv),
                                     "created": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0})
        print(table(records[-1:]).splitlines()[-1], file=sys.stderr)
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
