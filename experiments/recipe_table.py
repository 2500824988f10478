"""``python -m experiments.recipe_table``: every recipe on one model, one table (ROUGE with CI, perplexity, latency, size).

Runs :func:`experiments.evaluate.evaluate` for each recipe in turn (checkpoints and calibration statistics come
from the cache when present), then prints a Markdown table and writes all records to one JSON file. A recipe the
model's shapes rule out (W4A8's block of 128 on hidden 576) is a row with the reason. ``--formats trtllm,hf`` also
evaluates each recipe's Hugging Face export (what current TensorRT-LLM, vLLM and SGLang load) and adds the paired
ROUGE-1 difference to the TRT-LLM checkpoint's on the same articles, with its CI.
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
        if "refused" in r:
            lines.append(f"| {r['recipe_label']} | refused: {r['refused']} |" + " |" * 8)
            continue
        ro, lat = r["rouge"], r["latency"]
        ppl = f"{r['perplexity']['perplexity']:.2f}" if r.get("perplexity") else "-"
        kern = ", ".join(r["runtime"]["kernels"]) + (" (emulated: " + ", ".join(r["runtime"].get("emulated_parts", [])) + ")"
                                                     if r["runtime"].get("emulated") else "")
        lines.append(f"| {r['recipe_label']} | {ro['rouge1']:.2f} [{ro['rouge1_ci'][0]:.2f}, {ro['rouge1_ci'][1]:.2f}] | "
                     f"{ro['rouge2']:.2f} | {ro['rougeL']:.2f} | {ppl} | {lat['ttft_ms']:.0f} | {lat['tpot_ms']:.1f} | "
                     f"{lat['decode_tokens_per_s']:.1f} | {kern} | {r['checkpoint']['size_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def paired_table(records: list[dict]) -> str:
    """HF export − TRT-LLM checkpoint, per recipe, paired on the same articles."""
    from experiments.stats import mean_ci

    by = {(r["recipe_label"], r.get("format", "trtllm")): r for r in records if "refused" not in r}
    lines = ["| recipe | ROUGE-1 HF export − TRT-LLM checkpoint [95% CI] | articles | perplexity HF / TRT-LLM |",
             "|---|---|---|---|"]
    for (label, fmt), hf in by.items():
        trt = by.get((label, "trtllm"))
        if fmt != "hf" or trt is None:
            continue
        a = {x["id"]: x["rouge1"] for x in trt["samples"]}
        diffs = [x["rouge1"] - a[x["id"]] for x in hf["samples"] if x["id"] in a]
        mean, lo, hi = mean_ci(diffs)
        ppl = (f"{hf['perplexity']['perplexity']:.3f} / {trt['perplexity']['perplexity']:.3f}"
               if hf.get("perplexity") and trt.get("perplexity") else "-")
        lines.append(f"| {label} | {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] | {len(diffs)} | {ppl} |")
    return "\n".join(lines)


def remeasure(args) -> int:
    from experiments import environment, latency
    from quant.checkpoint import load_checkpoint
    from quant.errors import UserError
    from quant.hf_checkpoint import checkpoint_format, load_hf_export
    from quant.runtime.torch_runtime import TorchRuntime

    try:
        data = json.loads(args.out.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--remeasure-latency needs the table's JSON at {args.out} ({exc})") from None
    # A hand-edited or foreign file: check its shape first, so a wrong one is a one-line error.
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and ("refused" in r or isinstance(r.get("checkpoint"), dict)
                                     and isinstance(r["checkpoint"].get("path"), str) and isinstance(r.get("runtime"), dict)
                                     and r["runtime"].get("compute_dtype") in ("float32", "bfloat16")
                                     and isinstance(r.get("rouge"), dict)) for r in records):
        raise UserError(f"{args.out} is not a recipe table (expected records with checkpoint.path, runtime.compute_dtype "
                        "and rouge)")
    for rec in (r for r in records if "refused" not in r):
        folder = Path(rec["checkpoint"]["path"])
        ckpt = load_hf_export(folder) if checkpoint_format(folder) == "hf" else load_checkpoint(folder)
        rt = TorchRuntime(ckpt, compute_dtype=rec["runtime"]["compute_dtype"])
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
    p.add_argument("--formats", default="trtllm", help="comma-separated: trtllm (the TRT-LLM checkpoint) and/or hf "
                   "(ModelOpt's HF export, read back as the servers read it); with both, a paired table compares them")
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
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - {"trtllm", "hf"}:
        raise UserError(f"--formats {args.formats!r}: choose from trtllm, hf")
    settings, calib = settings_from_args(args), calib_spec_from_args(args)
    records = []
    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    from quant.model_source import resolve_model
    from quant.servers import hf_export_refusal

    model = resolve_model(settings.model, trust_remote_code=settings.trust_remote_code)
    config = json.loads((model.hf_dir / "config.json").read_text())
    for recipe in recipes:
        for fmt in formats:
            print(f"== {recipe.label} ({fmt})", file=sys.stderr)
            try:  # what the model's shapes (or the HF format) rule out is a row saying why; other errors stop
                recipe.validate_for(config, device=settings.device)
                if fmt == "hf" and (why := hf_export_refusal(recipe)):
                    raise UserError(why)
            except UserError as exc:
                rec = {"recipe_label": recipe.label, "format": fmt, "refused": str(exc)}
            else:
                rec = _evaluate(settings, model, recipe, calib, fmt, log)
            if len(formats) == 1:
                rec.pop("samples", None)  # kept only to pair the formats
            records.append(rec)
        atomic_write_json(args.out, {"records": records, "machine": environment.machine(),
                                     "command": "python -m experiments.recipe_table " + " ".join(sys.argv[1:] if argv is None else argv),
                                     "created": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0})
        print(table(records[-1:]).splitlines()[-1], file=sys.stderr)
    print(table(records))
    if len(formats) > 1:
        print()
        print(paired_table(records))
    return 0


def _evaluate(settings, model, recipe, calib, fmt: str, log) -> dict:
    if fmt == "trtllm":
        return {**evaluate(settings, recipe, calib=calib, log=log), "format": "trtllm"}
    from quant.hf_checkpoint import build_hf_export

    folder = build_hf_export(model, recipe, calib if recipe.needs_calibration else None, log=log)
    rec = evaluate(settings, recipe, calib=calib, checkpoint=folder, log=log)
    return {**rec, "recipe_label": recipe.label, "recipe": recipe.to_dict(), "format": "hf"}


if __name__ == "__main__":
    sys.exit(main())
