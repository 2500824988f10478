"""``python -m experiments.kernel_quality``: does a kernel choice change what the model says?

The paired check of issue 14's "the default model's ROUGE-1 and perplexity on CUDA unchanged by the new kernels".

Each recipe's checkpoint is built once (the search's cache) and opened once per kernel configuration: the
*reference* (the plainest CUDA kernels: no compiled or Triton GEMV at batch 1, so cuBLAS / ``_scaled_mm`` /
tinygemm / the tl.dot kernel; attention unfused; nothing in an epilogue) and each variant (``default``:
KernelConfig's defaults; or any ``experiments.bench`` kernel variant, e.g. ``nothen``). Every configuration
summarizes the same articles and scores the same held-out documents (on CUDA through the batch-1 decode step, one
true token at a time: TorchRuntime.decode_logits), so a variant is compared with the reference *paired*: the mean
per-article ROUGE-1 difference and the mean per-document NLL difference (nats per token), each with a 95 %
Student-t interval; the table says on how many articles and documents that rests. The verdict takes the run's
tests together: each (row, metric) a paired two-sided t-test, all of them under Holm's step-down at a family-wise
0.05 (:data:`FAMILY_ALPHA`). A run compares about twenty such pairs, so at 95 % each about one would read changed
by chance alone; a row is CHANGED when one of its tests is rejected (its Holm-adjusted p in the table), and a
row whose summaries and NLLs are all identical is unchanged. ``--from-record`` prints a record's table again
under this rule, writing nothing.

On a CPU the configurations run the same kernels (the CPU path has one per format), so every row is unchanged
by construction: that run checks the machinery, not the kernels.

Exit codes: 0 every row unchanged; 1 a row changed (the table says which); 2 bad input; 130 / 143 interrupted
(the record of the recipes finished so far is written first).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from experiments.evaluate import DEFAULTS, Candidate, EvalSettings, add_trust_remote_code_arg, resolve_compute_dtype, \
    resolve_device, summarize
from quant.atomic import atomic_write_json, ensure_writable_file
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.recipes import parse_recipe_arg

# the recipes checked by default: each weight format's batch-1 path (the default model's hidden 576 takes group 64)
DEFAULT_RECIPES = ("fp16", "int8_wo", "smoothquant", "fp8", "int4_awq:group_size=64")
# KernelConfig fields of the reference: every batch-1 row through the M > 1 kernels, attention unfused, the
# prefill's RoPE in torch ops
REFERENCE = {"gemv": frozenset(), "w8g": frozenset(), "w4g_rows": None, "w4m_rows": None, "int4_kernel": "tinygemm",
             "attn_fused_reduce": False, "attn_rope_fused": False, "gemv_then": False, "prefill_rope": False}


def kernel_configs(variants: list[str], device: str) -> dict:
    """name → KernelConfig: "reference" first, then each variant ("default": the device's, schemes.base.card_kernels;
    or a bench KERNEL_VARIANTS name, which changes those)."""
    import torch

    from experiments.bench import kernel_variant
    from quant.runtime.schemes.base import card_kernels

    base = card_kernels(torch.device(device))[1]
    configs = {"reference": dataclasses.replace(base, **REFERENCE)}
    for v in variants:
        configs[v] = base if v == "default" else dataclasses.replace(base, **kernel_variant(v))
    return configs


FAMILY_ALPHA = 0.05  # the chance, over a whole run, of calling any unchanged row changed


def paired(ref: list[float], got: list[float]) -> dict:
    """Mean of got − ref per item with its 95 % interval and the paired t-test's two-sided p; identical lists give
    exactly 0, [0, 0] and p 1."""
    from experiments.stats import mean_ci, paired_t_p

    diffs = [g - r for g, r in zip(got, ref)]
    if not any(diffs):
        return {"mean": 0.0, "ci": [0.0, 0.0], "n": len(diffs), "p": 1.0}
    m, lo, hi = mean_ci(diffs)
    return {"mean": m, "ci": [lo, hi], "n": len(diffs), "p": paired_t_p(diffs)}


def run_config(ckpt: Path, kernels, cand: Candidate, samples, docs: list[str], settings: EvalSettings) -> dict:
    """One kernel configuration on the checkpoint: per-article ROUGE-1 and summaries, per-document NLL."""
    from experiments import rouge
    from experiments.perplexity import perplexity
    from quant.runtime.torch_runtime import TorchRuntime

    rt = TorchRuntime.from_dir(ckpt, device=settings.device, compute_dtype=settings.compute_dtype, kernels=kernels)
    texts, _, _ = summarize(rt, cand.builder, samples, batch_size=settings.batch_size,
                            max_output_len=settings.max_output_len, eos_ids=cand.eos_ids, progress=settings.progress)
    scores = rouge.score(texts, [s.reference for s in samples], seed=settings.seed)
    # on CUDA through the decode step, whose batch-1 kernels are the ones under test (a forward pass over the whole
    # document runs the prefill's, the same in every configuration)
    ppl = perplexity(rt, cand.tokenizer, docs, seq_len=settings.ppl_seq_len, decode=rt.cuda) if docs else None
    return {"rouge1": scores.rouge1, "per_article": list(scores.per_sample_rouge1), "summaries": texts,
            "perplexity": ppl["perplexity"] if ppl else None, "doc_nll": ppl["doc_nll"] if ppl else [],
            "kernels": rt.describe()["kernels"]}


def compare(ref: dict, got: dict) -> dict:
    """The paired differences of a configuration against the reference (the verdict: :func:`judge`)."""
    same = sum(a == b for a, b in zip(ref["summaries"], got["summaries"]))
    return {"rouge1_diff": paired(ref["per_article"], got["per_article"]),
            "nll_diff": paired(ref["doc_nll"], got["doc_nll"]), "same_summaries": same,
            "articles": len(ref["summaries"])}


def versus_reference(configs: dict) -> dict:
    """Each configuration of a recipe's run (name → :func:`run_config`'s result) compared with its reference."""
    return {n: compare(configs["reference"], c) for n, c in configs.items() if n != "reference"}


def judge(recipes: list[dict]) -> list[str]:
    """Every comparison's verdict, in place, from all the run's tests together (module doc): ``p_holm`` (the
    smallest Holm-adjusted p of its metrics) and ``unchanged``; returns the changed rows as ``recipe@variant``."""
    from experiments.stats import holm

    comparisons = [c for r in recipes for c in r["versus_reference"].values()]
    tests = [(i, d["p"]) for i, c in enumerate(comparisons) for d in (c["rouge1_diff"], c["nll_diff"]) if d["n"]]
    for c in comparisons:
        c["p_holm"] = 1.0
    for (i, _), adjusted in zip(tests, holm([p for _, p in tests])):
        comparisons[i]["p_holm"] = min(comparisons[i]["p_holm"], adjusted)
    for c in comparisons:
        c["unchanged"] = c["p_holm"] > FAMILY_ALPHA
    return [f"{r['recipe']}@{n}" for r in recipes for n, c in r["versus_reference"].items() if not c["unchanged"]]


def _verdict(changed: list[str]) -> int:
    """The exit code (module doc), the changed rows named on stderr."""
    if changed:
        print("changed: " + ", ".join(changed), file=sys.stderr)
    return 1 if changed else 0


def table(record: dict) -> str:
    head = ("| recipe | kernels | ROUGE-1 | Δ ROUGE-1 vs reference [95% CI] | same summaries | perplexity "
            f"| Δ NLL / token [95% CI] | verdict (Holm p, family {FAMILY_ALPHA}) |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for r in record["recipes"]:
        for name, c in r["configs"].items():
            ppl = "-" if c["perplexity"] is None else f"{c['perplexity']:.3f}"
            if name == "reference":
                rows.append(f"| {r['recipe']} | reference | {c['rouge1']:.2f} | | | {ppl} | | |")
                continue
            d = r["versus_reference"][name]
            dr, dn = d["rouge1_diff"], d["nll_diff"]
            nll = f"{dn['mean']:+.5f} [{dn['ci'][0]:+.5f}, {dn['ci'][1]:+.5f}] on {dn['n']} docs" if dn["n"] else "-"
            rows.append(f"| {r['recipe']} | {name} | {c['rouge1']:.2f} | {dr['mean']:+.2f} [{dr['ci'][0]:+.2f}, "
                        f"{dr['ci'][1]:+.2f}] on {dr['n']} articles | {d['same_summaries']}/{d['articles']} | {ppl} "
                        f"| {nll} | {'unchanged' if d['unchanged'] else 'CHANGED'} ({d['p_holm']:.3g}) |")
    return "\n".join([head, *rows])


@cli_entry
def main(argv: list[str] | None = None) -> int:
    d = DEFAULTS
    parser = ArgumentParser(prog="python -m experiments.kernel_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="'default' (embedded SmolLM2-135M-Instruct), a .gguf or a HF folder")
    add_trust_remote_code_arg(parser)
    parser.add_argument("--recipe", action="append", default=None,
                        help="a recipe (kind[:key=value,...] or a file), repeatable (default: "
                             + ", ".join(DEFAULT_RECIPES) + ")")
    parser.add_argument("--variants", default="default",
                        help="comma-separated kernel configurations to compare with the reference: default, or "
                             "any experiments.bench kernel variant (its KERNEL_VARIANTS: nothen, w4k16, wqplain, …)")
    parser.add_argument("--dataset", default=d["dataset"], help="aclsum | cnn_dailymail | a local file or folder")
    parser.add_argument("--split", default=d["split"])
    parser.add_argument("--num-samples", type=positive_int, default=d["num_samples"], help="articles summarized")
    parser.add_argument("--seed", type=seed_int, default=d["seed"], help="article and document selection")
    parser.add_argument("--max-input-len", type=positive_int, default=d["max_input_len"])
    parser.add_argument("--max-output-len", type=positive_int, default=d["max_output_len"])
    parser.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    parser.add_argument("--ppl-docs", type=int, default=20,
                        help="held-out documents scored, on CUDA through the decode step (0: none)")
    parser.add_argument("--ppl-seq-len", type=positive_int, default=512)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, default=Path("results") / "kernel_quality.json", help="JSON record")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-record", type=Path, default=None, metavar="JSON",
                        help="print a record's table again, its verdicts under this version's rule; runs nothing "
                             "and writes nothing")
    args = parser.parse_args(argv)
    if args.from_record is not None:
        return reprint(args.from_record)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from experiments.bench import KERNEL_VARIANTS, known_variant  # (torch: after the flags are read: --help light)

    unknown = [v for v in variants if v != "default" and not known_variant(v)]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise UserError(f"--variants: distinct names from default, {', '.join(KERNEL_VARIANTS)}, attnBxSwW; "
                        f"got {args.variants!r}")
    if args.ppl_docs < 0:
        raise UserError("--ppl-docs must be >= 0")
    recipes = [parse_recipe_arg(r) for r in (args.recipe or DEFAULT_RECIPES)]
    ensure_writable_file(args.out)  # before minutes of work, not after them
    device = resolve_device(args.device)
    settings = EvalSettings(model=args.model, dataset=args.dataset, split=args.split, num_samples=args.num_samples,
                            seed=args.seed, max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                            batch_size=args.batch_size, device=device,
                            compute_dtype=resolve_compute_dtype(args.compute_dtype, device), ppl_docs=args.ppl_docs,
                            ppl_seq_len=args.ppl_seq_len, progress=not args.no_progress,
                            trust_remote_code=args.trust_remote_code)
    from calibration.datasets import load_samples
    from experiments import environment
    from experiments.perplexity import heldout_texts

    samples = load_samples(settings.dataset, split=settings.split, num_samples=settings.num_samples,
                           seed=settings.seed)
    docs = heldout_texts(num_docs=settings.ppl_docs, seed=settings.seed) if settings.ppl_docs else []
    configs = kernel_configs(variants, device)
    record = {"device": device, "compute_dtype": settings.compute_dtype, "articles": len(samples),
              "documents": len(docs), "nll_logits": "decode step" if device.startswith("cuda") else "forward pass",
              "reference": {k: str(v) for k, v in REFERENCE.items()},
              "versions": environment.versions(), "machine": environment.machine(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipes": []}
    if not device.startswith("cuda"):
        print(f"note: on {device} every kernel configuration runs the same kernels: this checks the machinery only",
              file=sys.stderr)
    model, log, changed = None, (lambda m: print(m, file=sys.stderr)), []
    try:
        for recipe in recipes:
            cand = Candidate(settings, recipe, model=model, log=log)
            model = cand.model
            try:
                runs = {name: run_config(cand.ckpt_dir, k, cand, samples, docs, settings)
                        for name, k in configs.items()}
            finally:
                cand.close()
            record["recipes"].append({"recipe": recipe.label, "configs": runs,
                                      "versus_reference": versus_reference(runs)})
    finally:
        if record["recipes"]:  # what finished is kept, also on Ctrl-C / SIGTERM
            record["family_alpha"] = FAMILY_ALPHA
            changed = judge(record["recipes"])
            atomic_write_json(args.out, record)
    print(table(record))
    print(f"record: {args.out}")
    return _verdict(changed)


def reprint(path: Path) -> int:
    """--from-record: the table of a record, every comparison recomputed from its per-item scores and judged."""
    import json

    try:
        recipes = json.loads(path.read_text())["recipes"]
        for r in recipes:
            r["versus_reference"] = versus_reference(r["configs"])
        changed = judge(recipes)
        text = table({"recipes": recipes})
    except OSError as e:
        raise UserError(f"--from-record {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--from-record {path}: not a kernel_quality record ({type(e).__name__}: {e})") from None
    print(text)
    return _verdict(changed)


if __name__ == "__main__":
    sys.exit(main())
