"""``python -m quant.build``: one recipe → its TRT-LLM checkpoint, and its engine where ``trtllm-build`` exists.

Without TensorRT-LLM on the machine it says so and prints the exact ``trtllm-build`` command for the recipe.
``--format hf`` writes ModelOpt's Hugging Face export instead, which TensorRT-LLM >= 1.0's ``tensorrt_llm.LLM``
(PyTorch backend) loads directly (no engine build).
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
from pathlib import Path

from calibration.data import CalibSpec, add_calib_args, calib_spec_from_args
from experiments.evaluate import add_trust_remote_code_arg
from experiments.report import summarize_study
from quant.atomic import atomic_dir, ensure_writable_dir
from quant.cache_budget import add_cache_budget_arg, apply_cache_budget_arg
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int
from quant.model_source import resolve_model
from quant.recipes import Recipe, parse_recipe_arg
from quant.servers import SERVERS, add_serve_with_arg, check_servable, hf_export_refusal
from quant.study_store import existing_storage_url, open_study, reading
from quant.trtllm import Workload, build_command, build_engine, trtllm_build_available


def recipe_from_study(name: str, storage: str | None):
    """(best feasible recipe, model spec, calibration spec) of a finished search study."""
    url = existing_storage_url(storage)
    with reading(url):
        study = open_study(url, name)
        attrs, summary = study.user_attrs, summarize_study(study)
    try:  # the study may come from anyone's database: a foreign attribute is bad input, not a traceback
        calib = CalibSpec(**attrs["calibration"]) if "calibration" in attrs else CalibSpec()
    except (TypeError, UserError) as exc:  # not a mapping, or a field that is not a calibration setting
        raise UserError(f"study {name!r} has a malformed calibration attribute ({exc})") from None
    model = attrs.get("model")
    if model is not None and not isinstance(model, str):
        raise UserError(f"study {name!r} has a malformed model attribute {model!r}")
    if summary.best is None:
        raise UserError(f"study {name!r} has no feasible trial to build ({summary.verdict().splitlines()[0]})")
    print(f"study {name!r}: best trial #{summary.best.number}, {summary.best.label}", file=sys.stderr)
    return Recipe.from_dict(summary.best.recipe), model, calib


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m quant.build", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=None,
                   help="a recipe file (.yaml/.json) or kind[:key=value,...], e.g. smoothquant:alpha=0.6,kv_cache=int8 "
                        "(default: fp16, no quantization)")
    p.add_argument("--model", default=None, help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a HF folder")
    add_trust_remote_code_arg(p)
    add_cache_budget_arg(p)
    p.add_argument("--output", type=Path, default=None, help="copy the checkpoint here (default: print the cache path)")
    p.add_argument("--format", default=None, choices=("trtllm", "hf"),
                   help="trtllm: TRT-LLM checkpoint (+ engine where trtllm-build exists); hf: ModelOpt's Hugging "
                        "Face export for tensorrt_llm.LLM, vLLM, SGLang (default: what --serve-with loads, else "
                        "trtllm)")
    add_serve_with_arg(p)
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="copy the built engine here (default: print its cache path)")
    p.add_argument("--no-engine", action="store_true", help="only print the trtllm-build command, even where it exists")
    p.add_argument("--build-timeout", type=float, default=None,
                   help="seconds before trtllm-build is killed (default: $QUANT_TRTLLM_BUILD_TIMEOUT or 3600)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="engine: max batch size")
    p.add_argument("--input-len", type=positive_int, default=512, help="engine: max prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=100, help="engine: max generated tokens")
    add_calib_args(p)
    p.add_argument("--from-study", default=None, metavar="NAME",
                   help="build the best feasible trial of this search study (model and calibration from the study)")
    p.add_argument("--storage", default=None, help="the study's optuna storage URL (default: $QUANT_SEARCH_STORAGE, else results/search/study.db)")
    args = p.parse_args(argv)
    apply_cache_budget_arg(args)
    # Imported after the flags are read: torch costs seconds, and --help or a bad flag need none of it.
    from quant.apply import build_checkpoint
    from quant.checkpoint import load_checkpoint, summary

    calib = calib_spec_from_args(args)
    if args.from_study:
        # The study fixes the recipe, the model and the calibration: a flag that would be ignored is refused.
        ignored = [f"--{d.replace('_', '-')}" for d in ("recipe", "model", "calib_source", "calib_samples",
                                                         "calib_seq_len", "calib_seed")
                   if getattr(args, d) != p.get_default(d)]
        if ignored:
            raise UserError("--from-study takes the recipe, model and calibration from the study; drop "
                            + ", ".join(ignored))
        recipe, args.model, calib = recipe_from_study(args.from_study, args.storage)
    else:
        if args.recipe is None:
            print("no --recipe: building FP16 (no quantization)", file=sys.stderr)
        recipe = parse_recipe_arg(args.recipe or "fp16")
    server = SERVERS[args.serve_with]
    if args.format is None:
        args.format = server.checkpoint or "trtllm"
    elif server.checkpoint not in (None, args.format):
        raise UserError(f"--serve-with {args.serve_with} loads the {server.checkpoint} format, not --format "
                        f"{args.format}")
    check_servable(recipe, args.serve_with)
    if args.format == "hf" and (why := hf_export_refusal(recipe)):
        raise UserError(why)
    if args.output is not None and args.output.exists():
        raise UserError(f"--output {args.output} already exists; choose a new folder")
    if args.engine_dir is not None and args.engine_dir.exists():
        raise UserError(f"--engine-dir {args.engine_dir} already exists; choose a new folder")
    if args.build_timeout is not None and not (math.isfinite(args.build_timeout) and args.build_timeout > 0):
        raise UserError(f"--build-timeout must be > 0 seconds (a finite number), got {args.build_timeout:g}")

    for flag, target in (("--output", args.output), ("--engine-dir", args.engine_dir)):
        if target is not None:  # checked before the quantization, which can take minutes
            ensure_writable_dir(target.parent, f"the folder of {flag}")
    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.format == "hf":
        return _build_hf(model, recipe, calib, args.output, log)
    ckpt = cached = build_checkpoint(model, recipe, calib, log=log)
    if args.output is not None:
        with atomic_dir(args.output) as tmp:
            for f in ckpt.iterdir():
                shutil.copy2(f, tmp / f.name)
        ckpt = args.output
    print(summary(load_checkpoint(ckpt)))
    workload = Workload(args.batch_size, args.input_len, args.output_len)
    if trtllm_build_available() is None or args.no_engine:
        engine_dir = (args.engine_dir or Path("engines") / f"{model.short_hash}-{recipe.hash}").absolute()
        cmd = build_command(ckpt, engine_dir, recipe, workload)
        print("trtllm-build is not on PATH (TensorRT-LLM is not installed here); to build the engine run:"
              if not args.no_engine else "to build the engine run:")
        print("  " + shlex.join(cmd))
        return 0
    # Built (or found) in the cache, keyed like the checkpoint plus the build options.
    engine = build_engine(cached, recipe, workload, source_key=cached.name, timeout_s=args.build_timeout, log=log)
    if args.engine_dir is not None:
        with atomic_dir(args.engine_dir) as tmp:
            for f in engine.iterdir():
                shutil.copy2(f, tmp / f.name)
        engine = args.engine_dir
    print(f"engine       {engine}")
    return 0


def _build_hf(model, recipe, calib, output: Path | None, log) -> int:
    from quant.hf_checkpoint import build_hf_export, hf_quantization

    out = build_hf_export(model, recipe, calib, log=log)
    if output is not None:
        with atomic_dir(output) as tmp:
            for f in out.iterdir():
                shutil.copy2(f, tmp / f.name)
        out = output
    quant = hf_quantization(out) if (out / "hf_quant_config.json").is_file() else {}
    print(f"hf export    {out}")
    print(f"quantization {json.dumps(quant) if quant else 'none (fp16)'}")
    print("run it with TensorRT-LLM >= 1.0 (PyTorch backend):")
    print(f"  python -c \"from tensorrt_llm import LLM, SamplingParams; "
          f"print(LLM(model='{out}').generate(['Hello'], SamplingParams(max_tokens=32))[0].outputs[0].text)\"")
    return 0

